"""The run-level analysis behind `rebased analyze`: metrics per layer, kernel floors, gamma/beta, figures.

analyze_model(model, inputs, labels, num_kv_pairs) works on any LanguageModel and MQAR examples;
analyze_run(run_dir) loads an MQAR run folder (rebased.tasks.mqar.sweep.run_one's model.safetensors and
config.json with "mqar_run"), draws fresh examples from its test distribution, and writes analysis.json and
the figures. matplotlib is imported only when a figure is drawn.

Shape letters: B examples, H heads, T time, Q queries per example, C key-value columns (2N).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rebased.analysis.scores import analysable_layers, capture_mixer_inputs, mixer_scores
from rebased.analysis.similarity import (
    TARGETS,
    BinarisationRule,
    GroundTruth,
    iou_per_example,
    mass_on_targets,
    mqar_ground_truth,
    parse_rule,
    query_accuracy,
    query_rows,
    row_entropy,
)
from rebased.feature_maps import QuadraticMap
from rebased.mixers.linear_attention import LinearAttention

ANALYSIS_FILE = "analysis.json"
SCORE_ELEMENTS_PER_BATCH = 1 << 24  # bounds the [B, H, T, T] scores held at once (64 MiB in float32)


def reduce_heads(scores: Tensor, heads: str | int = "mean") -> Tensor:
    """scores [B, H, T, T] -> [B, T, T]: the mean over heads, or one head by index."""
    return scores.mean(1) if heads == "mean" else scores[:, int(heads)]


def kernel_floor(mixer: nn.Module) -> dict:
    """The smallest similarity the mixer's kernel can give any visible token, analytically.

    Based 1 + s + s^2/2: 0.5 at s = -1, so no visible token is ever scored below 0.5 before normalising;
    ReBased s^2: 0 at s = 0; softmax exp(s): > 0 for every finite s, 0 only in the limit."""
    if not isinstance(mixer, LinearAttention):
        return {"kernel": "softmax exp(s)", "min_similarity": 0.0, "attained": False, "note": "> 0, never reached"}
    kernel = mixer.feature_map.kernel
    if kernel is None:
        return {"kernel": mixer.cfg.feature_map, "min_similarity": None, "attained": None, "note": "no closed form"}
    c0, c1, c2 = kernel.c0, kernel.c1, kernel.c2
    terms = [f"{c:g}" if not power else power if c == 1 else f"{c:g} {power}"
             for c, power in ((c0, ""), (c1, "s"), (c2, "s^2")) if c]  # fmt: skip
    name = f"{mixer.cfg.feature_map}: " + " + ".join(terms)
    if c2 == 0 and c1 != 0:  # linear in s: no floor (JSON has no -inf, so None)
        return {"kernel": name, "min_similarity": None, "attained": None, "note": "unbounded below"}
    if c2 == 0:
        return {"kernel": name, "min_similarity": c0, "attained": True, "note": "constant"}
    at = -c1 / (2 * c2) + 0.0  # the parabola's vertex (+ 0.0: no "-0")
    return {"kernel": name, "min_similarity": c0 - c1 * c1 / (4 * c2), "attained": True, "note": f"at s = {at:g}"}


def _describe(values: Tensor) -> dict:
    values = values.detach().double().flatten()
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "min": values.min().item(),
        "max": values.max().item(),
    }


def normalisation_parameters(model: nn.Module) -> dict[int, dict[str, Tensor]]:
    """{layer: {"q_gamma", "q_beta", "k_gamma", "k_beta": [H, D]}} of the ReBased-style maps (LayerNorm/affine
    over H * D, or shared by heads: then [1, D]); layers without such parameters are left out."""
    found = {}
    for i, layer in enumerate(model.layers):
        fmap = getattr(layer.mixer, "feature_map", None)
        if not isinstance(fmap, QuadraticMap):
            continue
        params = {}
        for side, norm in (("q", fmap.q_norm), ("k", fmap.k_norm)):
            for label, param in (("gamma", norm.weight), ("beta", norm.bias)):
                if param is not None:
                    params[f"{side}_{label}"] = param.detach().reshape(-1, fmap.head_dim)
        if params:
            found[i] = params
    return found


def gamma_beta_stats(model: nn.Module) -> list[dict]:
    """One row per (layer, parameter, head) plus head "all": mean, std, min, max of ReBased's gamma and beta."""
    rows = []
    for layer, params in normalisation_parameters(model).items():
        for name, values in params.items():
            rows.append({"layer": layer, "parameter": name, "head": "all", **_describe(values)})
            for head in range(values.shape[0]) if values.shape[0] > 1 else ():
                rows.append({"layer": layer, "parameter": name, "head": head, **_describe(values[head])})
    return rows


class _LayerTotals:
    """Running per-example and per-query sums for one layer over batches."""

    def __init__(self) -> None:
        self.iou, self.right, self.irrelevant, self.entropy, self.smallest = [], [], [], [], math.inf

    def add(self, scores: Tensor, truth: GroundTruth, rule: BinarisationRule) -> None:
        self.iou.append(iou_per_example(scores, truth, rule))
        right, irrelevant = mass_on_targets(scores, truth)
        self.right.append(right.flatten())
        self.irrelevant.append(irrelevant.flatten())
        self.entropy.append(row_entropy(scores, truth).flatten())
        kv_region = query_rows(scores, truth)[..., : 2 * truth.num_kv_pairs]  # every kv token is visible there
        self.smallest = min(self.smallest, kv_region.min().item())

    def summary(self) -> dict:
        iou = torch.cat(self.iou)
        return {
            "iou": iou.mean().item(),
            "iou_std": iou.std(unbiased=False).item(),
            "mass_right": torch.cat(self.right).mean().item(),
            "mass_irrelevant": torch.cat(self.irrelevant).mean().item(),
            "entropy": torch.cat(self.entropy).mean().item(),
            "min_kv_score": self.smallest,
        }


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    inputs: Tensor,  # [B, T] MQAR examples
    labels: Tensor,  # [B, T]
    num_kv_pairs: int,
    *,
    layers: list[int] | None = None,
    rule: BinarisationRule | str = "top1",
    target: str = "value",
    heads: str | int = "mean",
) -> dict:
    """Per layer: IoU with the ground truth, mass on the right / irrelevant positions, row entropy, the smallest
    key-value score and the kernel's floor; the model's accuracy; the first example's scores [H, T, T] of each
    layer for figures ("example"). The model is put in eval mode (dropout off)."""
    rule = parse_rule(rule) if isinstance(rule, str) else rule
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    layers = analysable_layers(model) if layers is None else layers
    model.eval()
    truth = mqar_ground_truth(inputs, labels, num_kv_pairs, target)
    totals = {i: _LayerTotals() for i in layers}
    correct, example = [], {}
    heads_max = max((_num_heads(model.layers[i].mixer) for i in layers), default=1)
    batch = max(1, SCORE_ELEMENTS_PER_BATCH // (heads_max * inputs.shape[1] ** 2))
    for start in range(0, inputs.shape[0], batch):
        rows = slice(start, start + batch)
        part = GroundTruth(truth.query_positions[rows], truth.targets[rows], num_kv_pairs)
        logits, mixer_inputs = capture_mixer_inputs(model, inputs[rows], layers)
        correct.append(query_accuracy(logits, labels[rows], part).flatten())
        for i in layers:
            scores = mixer_scores(model.layers[i].mixer, mixer_inputs[i]).scores  # [b, H, T, T]
            totals[i].add(reduce_heads(scores, heads), part, rule)
            if start == 0:
                example[i] = scores[0].float()
    accuracy = torch.cat(correct).double().mean().item()
    per_layer = [
        {"layer": i, "mixer": type(model.layers[i].mixer).__name__, **totals[i].summary(),
         "kernel_floor": kernel_floor(model.layers[i].mixer)}
        for i in layers
    ]  # fmt: skip
    return {"rule": str(rule), "target": target, "heads": heads, "examples": int(inputs.shape[0]),
            "accuracy": accuracy, "layers": per_layer, "example": example, "truth": truth}  # fmt: skip


def _num_heads(mixer: nn.Module) -> int:
    return mixer.cfg.num_heads


# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_maps(panels: dict[str, Tensor], path: Path, title: str = "", rows: list[int] | None = None) -> Path:
    """Side by side, one heat map per panel: {title: [Q, C] query rows x key-value columns}; rows: the
    queries' positions, for the row labels."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for axis, (name, matrix) in zip(axes[0], panels.items()):
        image = axis.imshow(matrix.cpu().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("key-value position")
        axis.set_ylabel("query position")
        if rows is not None and len(rows) <= 16:
            axis.set_yticks(range(len(rows)), [str(r) for r in rows])
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_last_query(row: Tensor, targets: Tensor, num_kv_pairs: int, path: Path, title: str = "") -> Path:
    """The last query's scores over positions 0 .. p (row [p + 1]), ground-truth positions (targets [C]) in red,
    the key-value region shaded."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    figure, axis = plt.subplots(figsize=(8, 3))
    positions = np.arange(row.shape[0])
    colours = ["tab:blue"] * row.shape[0]
    for position in torch.nonzero(targets).flatten().tolist():
        colours[position] = "tab:red"
    axis.bar(positions, row.cpu().numpy(), color=colours, width=1.0)
    span = axis.axvspan(-0.5, 2 * num_kv_pairs - 0.5, color="grey", alpha=0.12)
    target = Patch(color="tab:red")
    axis.set_xlabel("position")
    axis.set_ylabel("normalised score")
    axis.set_title(title or "the last query's scores", fontsize=10)
    axis.legend([target, span], ["the position it must read", "key-value region"], loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_gamma_beta(model: nn.Module, path: Path) -> Path | None:
    """Histograms of ReBased's q/k gamma and beta (all layers and heads); None when the model has none."""
    found = normalisation_parameters(model)
    if not found:
        return None
    plt = _pyplot()
    present = {name for params in found.values() for name in params}
    names = [name for name in ("q_gamma", "q_beta", "k_gamma", "k_beta") if name in present]
    figure, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names):
        for layer, params in found.items():
            if name in params:
                axis.hist(params[name].flatten().cpu().double().numpy(), bins=30, alpha=0.6, label=f"layer {layer}")
        axis.set_title(name.replace("_", " "), fontsize=9)
        axis.legend(fontsize=7)
    figure.suptitle("ReBased normalisation: gamma and beta of q and k, all heads and features", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_figures(model: nn.Module, analysis: dict, layer: int, out: Path, name: str = "") -> list[Path]:
    """score_maps.png (ground truth, mean over heads, heads 0 and 1 of the first example at `layer`),
    last_query.png and gamma_beta.png (ReBased only) into out."""
    truth: GroundTruth = analysis["truth"]
    scores = analysis["example"][layer]  # [H, T, T]
    queries = truth.query_positions[0]
    crop = lambda matrix: matrix[queries][:, : 2 * truth.num_kv_pairs]  # noqa: E731  [Q, C]
    panels = {"ground truth": truth.targets[0].float(), "mean over heads": crop(scores.mean(0))}
    for head in range(min(2, scores.shape[0])):
        panels[f"head {head}"] = crop(scores[head])
    label = f"{name} layer {layer}".strip()
    title = f"{label}: first example, query rows x key-value columns"
    paths = [plot_score_maps(panels, out / "score_maps.png", title, queries.tolist())]
    last = int(queries[-1])
    title = f"{label}: the last query (position {last}), mean over heads"
    paths.append(plot_last_query(scores.mean(0)[last, : last + 1], truth.targets[0, -1], truth.num_kv_pairs,
                                 out / "last_query.png", title))  # fmt: skip
    histogram = plot_gamma_beta(model, out / "gamma_beta.png")
    return paths + ([histogram] if histogram else [])


def to_json(analysis: dict) -> dict:
    """The analysis without its tensors (example scores, ground truth): what analysis.json holds."""
    return {key: value for key, value in analysis.items() if key not in ("example", "truth")}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# The run-level analysis


def load_mqar_run(run_dir: str | Path):
    """The MQARRun a run folder was trained with (config.json's "mqar_run"); ValueError when it has none."""
    from rebased.checkpoint import MODEL_CONFIG_FILE
    from rebased.tasks.mqar.grids import MQARRun

    path = Path(run_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_CONFIG_FILE} in {run_dir}: not a saved run folder")
    try:
        fields = json.loads(path.read_text()).get("mqar_run")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{path} is not a JSON object: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path} has no 'mqar_run' section: not an MQAR run (made by `rebased mqar`)")
    mixes = {key: tuple(tuple(pair) for pair in fields.get(key, ())) for key in ("train_mix", "test_mix")}
    try:
        return MQARRun(**{**fields, **mixes})
    except TypeError as error:
        raise ValueError(f"{path}: 'mqar_run' does not match MQARRun's fields: {error}") from None


def check_layer(model: nn.Module, layer: int | None) -> list[int]:
    """The layers to analyse: [layer], or every layer with a score matrix; ValueError naming the choices."""
    choices = analysable_layers(model)
    if not choices:
        raise ValueError("the model has no softmax or linear attention layer: no score matrix to analyse")
    if layer is None:
        return choices
    if not 0 <= layer < len(model.layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(model.layers)} layers; "
                         f"layers with a score matrix: {choices}")  # fmt: skip
    if layer not in choices:
        mixer = type(model.layers[layer].mixer).__name__
        raise ValueError(f"layer {layer} is a {mixer}, which has no score matrix; layers with one: {choices}")
    return [layer]


def analysis_examples(run, num_examples: int) -> tuple[Tensor, Tensor, int]:
    """(inputs, labels, num_kv_pairs): num_examples fresh MQAR examples [n, L] of the run's (seq_len,
    num_kv_pairs), drawn with the seed its test segment gets (rebased.tasks.mqar.data.make_mqar_splits), so
    from the test distribution. Not checked against the training set (at the paper's vocabulary a repeat is
    vanishingly rare)."""
    from rebased.tasks.mqar.data import MQARConfig, generate_mqar

    test_mix = run.test_mix or run.train_mix or ((run.seq_len, run.num_kv_pairs),)
    segment = (run.seq_len, run.num_kv_pairs)
    index = test_mix.index(segment) if segment in test_mix else 0
    seq_len, num_kv_pairs = test_mix[index]
    seed = int(np.random.SeedSequence(run.data_seed, spawn_key=(1, index)).generate_state(1)[0])
    config = MQARConfig(seq_len, num_kv_pairs, num_examples, vocab_size=run.vocab_size, seed=seed)
    data = generate_mqar(config)
    return data.inputs, data.labels, num_kv_pairs


def analyze_run(
    run_dir: str | Path,
    *,
    examples: int = 1000,
    layer: int | None = None,
    rule: str = "top1",
    target: str = "value",
    out: str | Path | None = None,
    figures: bool = True,
) -> dict:
    """Analyse a trained MQAR run: analyze_model on `examples` fresh test examples, gamma/beta statistics,
    figures of `layer` (default: the last layer with a score matrix); writes out/analysis.json (out defaults to
    run_dir/analysis) and returns what it holds. Every input is checked before any work."""
    from rebased import checkpoint

    parsed_rule = parse_rule(rule)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    run = load_mqar_run(run_dir)
    model = checkpoint.load(run_dir)
    layers = check_layer(model, layer)
    inputs, labels, num_kv_pairs = analysis_examples(run, examples)
    analysis = analyze_model(model, inputs, labels, num_kv_pairs, layers=layers, rule=parsed_rule, target=target)
    out = Path(out) if out is not None else Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    paths = draw_figures(model, analysis, layers[-1], out, run.run_id) if figures else []
    result = {"run": run.run_id, "model": run.model, "seq_len": int(inputs.shape[1]), **to_json(analysis),
              "gamma_beta": gamma_beta_stats(model), "figures": [p.name for p in paths]}  # fmt: skip
    write_json(out / ANALYSIS_FILE, result)
    return result
