"""The models as a transformers causal LM: RebasedConfig wraps a ModelConfig, RebasedForCausalLM a LanguageModel.

Weights: the wrapper holds the LanguageModel as its `model` attribute, so a transformers checkpoint holds the
project's own tensors, each under "model." + its name in a run folder's model.safetensors; nothing else changes.

Generation: the cache that generate() carries from call to call is the model's own recurrent state
(RecurrentCache around a ModelState: each layer's mixer state and the next position). The first call prefills
the prompt through LanguageModel.prefill (parallel or chunk form); every later call feeds only the tokens the
state has not seen, one LanguageModel.step each. Greedy search thus takes the path of rebased.generate.generate
and picks the same tokens.

Padding: a recurrent state takes in every token it is fed, pads included, so a padded prompt cannot be continued
correctly. A forward pass from scratch accepts right padding (the logits before the padding are exact, as in any
causal model); left padding, and any padding once a state is carried on (generate() on a padded batch), raise.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rebased.config import ModelConfig
from rebased.model import LanguageModel, ModelState
from rebased.train.labels import IGNORE_INDEX

MISSING_TRANSFORMERS = "the transformers interface needs the `transformers` package: pip install 'rebased[hf]'"
try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError:
    raise ImportError(MISSING_TRANSFORMERS) from None

MODEL_TYPE = "rebased"
# transformers 5 renamed the cache from past_key_values to cache (the old name still works, with a warning)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# trust_remote_code: a model folder carries this one-line module, which takes the classes from the installed
# package, so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (lm-eval's
# `trust_remote_code=True`) works without importing rebased.hf first, and always runs the installed code.
REMOTE_CODE_MODULE = "rebased_remote_code"
REMOTE_CODE = (
    '"""The model code of this folder is the installed `rebased` package\'s (pip install \'rebased[hf]\')."""\n\n'
    "from rebased.hf import RebasedConfig, RebasedForCausalLM  # noqa: F401\n"
)
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_CODE_MODULE}.RebasedConfig",
    "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.RebasedForCausalLM",
}
COMPUTES_BUFFERS = {"hyena"}  # mixers with buffers computed at construction and not saved
# what transformers and its users read from a config, copied from the ModelConfig (which alone defines the model)
DERIVED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "tie_word_embeddings")


def _keep_the_installed_code(cls, auto_class=None) -> None:
    """In place of transformers' register_for_auto_class, which it calls on classes loaded as remote code so that
    saving copies their source file into the folder and points auto_map there: the folder's remote code stays the
    shim above, which RebasedConfig.save_pretrained writes."""


class RebasedConfig(PretrainedConfig):
    """config.json's "model" section is ModelConfig.to_dict(), validated here; the rest is transformers' own."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict | None = None, use_cache: bool = True, **kwargs):
        cfg = ModelConfig() if model is None else ModelConfig.from_dict(model)
        self.model = cfg.to_dict()
        self.use_cache = use_cache
        for name in DERIVED_FIELDS:  # a stale copy in a config.json must not contradict "model"
            kwargs.pop(name, None)
        self.vocab_size, self.hidden_size, self.num_hidden_layers = cfg.vocab_size, cfg.d_model, cfg.n_layers
        if cfg.max_position_embeddings:  # only a real limit: lm-eval reads this as the longest context
            self.max_position_embeddings = cfg.max_position_embeddings
        kwargs.setdefault("auto_map", AUTO_MAP)
        super().__init__(tie_word_embeddings=cfg.tie_embeddings, **kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> RebasedConfig:
        return cls(model=cfg.to_dict(), **kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """config.json, and beside it the module that auto_map names (model.save_pretrained calls this too)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / f"{REMOTE_CODE_MODULE}.py").write_text(REMOTE_CODE)

    register_for_auto_class = classmethod(_keep_the_installed_code)


class RecurrentCache:
    """What generate() carries between forward calls: the model's state after the tokens seen so far."""

    is_compileable = False  # what transformers asks of a cache before compiling a decoding step

    def __init__(self, state: ModelState):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.position

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row i of the batch continues from row beam_idx[i]."""
        self.state = select_rows(self.state, beam_idx)


def select_rows(state, rows: Tensor):
    """The state with its batch rows taken at `rows`: every mixer state is a (named) tuple of batch-first tensors
    and plain numbers (positions, shared by the rows)."""
    if isinstance(state, Tensor):
        return state.index_select(0, rows.to(state.device))
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(select_rows(part, rows) for part in state))
    if isinstance(state, (list, tuple)):
        return type(state)(select_rows(part, rows) for part in state)
    return state


PADDING_HELP = (
    "to score texts (loss, logits), pad on the right; to generate, pass prompts of one length at a time "
    "(rebased.generate.generate takes prompts of different lengths without padding)"
)


def check_attention_mask(mask: Tensor | None, continuing: bool) -> None:
    """Accept the masks a recurrent model can honour (see the module docstring)."""
    if mask is None or bool(mask.all()):
        return
    if continuing:
        raise ValueError(f"attention_mask has padding, which a state carried on would take in: {PADDING_HELP}")
    real = mask.bool()
    if (real[:, 1:] & ~real[:, :-1]).any():  # a real token after a padded one
        raise ValueError(f"attention_mask has left padding, which a recurrent state would take in: {PADDING_HELP}")


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Next-token cross-entropy as transformers defines it: labels line up with input_ids and are shifted here;
    IGNORE_INDEX (-100, transformers' value too) is not scored. Mean over the scored tokens, or their sum over
    num_items_in_batch when the Trainer counts them across accumulated batches."""
    predictions = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten().to(predictions.device)
    if num_items_in_batch is None:
        return F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


def refuse_unsupported(options: dict) -> None:
    """Options transformers models take that this one cannot honour fail loudly instead of being ignored."""
    unsupported = {
        "inputs_embeds": "pass input_ids",
        "position_ids": "positions follow from the tokens fed so far (the state's position)",
        "output_attentions": "linear-attention mixers have no attention matrix to return",
        "output_hidden_states": "not implemented",
    }
    for name, why in unsupported.items():
        value = options.get(name)
        if value is not None and value is not False:
            raise NotImplementedError(f"{name} is not supported by the rebased models: {why}")


def build_language_model(cfg: ModelConfig) -> LanguageModel:
    """LanguageModel(cfg); on the CPU if a mixer computes buffers when built (Hyena's filter positions), which
    fails on the meta device, where transformers builds a model before loading its weights."""
    if not COMPUTES_BUFFERS.intersection(cfg.pattern):
        return LanguageModel(cfg)
    with torch.device("cpu"):
        return LanguageModel(cfg)


class RebasedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RebasedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embedding.weight"}  # when tie_word_embeddings
    _no_split_modules = ["Block"]
    _is_stateful = True  # transformers then refuses what needs a rewindable cache (assisted decoding)
    register_for_auto_class = classmethod(_keep_the_installed_code)

    def __init__(self, config: RebasedConfig, language_model: LanguageModel | None = None):
        super().__init__(config)
        self.model = build_language_model(config.model_config()) if language_model is None else language_model
        self.post_init()

    @classmethod
    def from_language_model(cls, language_model: LanguageModel, **config_options) -> RebasedForCausalLM:
        """Wrap a model in memory (no copy): its weights become this model's."""
        config = RebasedConfig.from_model_config(language_model.cfg, **config_options)
        return cls(config, language_model).train(language_model.training)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, which only warns when the checkpoint lacks weights (and leaves them
        uninitialised here); a rebased checkpoint always has them all, so a gap is an error."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {name: sorted(info.get(name) or ()) for name in ("missing_keys", "unexpected_keys")}
        if any(problems.values()):
            raise ValueError(f"the checkpoint does not match the model in its config.json: {problems}")
        model._restore_computed_buffers()
        return (model, info) if wants_info else model

    def _init_weights(self, module) -> None:
        """Nothing: LanguageModel initialises itself when built (the scaled residual projections and each mixer's
        special parameters, which transformers' generic init would overwrite), and from_pretrained loads every
        weight or fails."""

    def _restore_computed_buffers(self) -> None:
        """transformers builds a model on the meta device and loads only saved tensors: buffers computed at
        construction and not saved (Hyena's filter positions) come back empty. Rebuild them from a fresh model."""
        computed = [name for name, _ in self.model.named_buffers() if not _is_saved(self.model, name)]
        if not computed:
            return
        with torch.random.fork_rng(devices=[]):  # building a model draws random weights: keep the caller's RNG
            fresh = dict(build_language_model(self.model.cfg).named_buffers())
        for name in computed:
            module_name, _, buffer_name = name.rpartition(".")
            buffer = self.model.get_buffer(name)
            self.model.get_submodule(module_name)._buffers[buffer_name] = fresh[name].to(buffer.device, buffer.dtype)

    def get_input_embeddings(self):
        return self.model.embedding

    def get_output_embeddings(self):
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is RecurrentCache, made by the first forward call

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask=None, use_cache=None, **kwargs) -> dict:
        """Feed the tokens the state has not seen: the whole prompt first, then the newest token each step."""
        cache = _cache_argument(kwargs)
        refuse_unsupported(kwargs)
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """input_ids [B, T] -> CausalLMOutputWithPast: logits [B, T, V], loss when labels are given, and the
        cache (the state after these tokens) when use_cache; pass that cache back to continue."""
        cache = _cache_argument(kwargs)
        refuse_unsupported(kwargs)
        if input_ids is None or input_ids.shape[1] == 0:
            raise ValueError("input_ids [batch, tokens] with at least one token are needed")
        check_attention_mask(attention_mask, continuing=cache is not None)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        logits, state = self._logits_and_state(input_ids, cache, use_cache)
        loss = None if labels is None else causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        cache = None if state is None else RecurrentCache(state)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()

    def _logits_and_state(self, input_ids: Tensor, cache: RecurrentCache | None, use_cache: bool):
        if cache is not None:
            return self._steps(input_ids, cache.state)
        if use_cache:
            return self.model.prefill(input_ids)
        return self.model(input_ids), None

    def _steps(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Continue the state over input_ids, one recurrent step per token."""
        logits = []
        for token in input_ids.unbind(1):
            token_logits, state = self.model.step(token, state)
            logits.append(token_logits)
        return torch.stack(logits, dim=1), state


def _cache_argument(kwargs: dict) -> RecurrentCache | None:
    """The cache under either of its names (transformers 5 calls it `cache`, earlier versions past_key_values)."""
    cache, past = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else past
    if cache is not None and not isinstance(cache, RecurrentCache):
        raise TypeError(f"the cache must be the RecurrentCache a forward call returned, got {type(cache).__name__}")
    return cache


def _is_saved(module: torch.nn.Module, buffer_name: str) -> bool:
    owner_name, _, name = buffer_name.rpartition(".")
    owner = module.get_submodule(owner_name)
    return name not in owner._non_persistent_buffers_set


def register() -> None:
    """Let AutoConfig and AutoModelForCausalLM build these classes for model_type "rebased"."""
    AutoConfig.register(MODEL_TYPE, RebasedConfig, exist_ok=True)
    AutoModelForCausalLM.register(RebasedConfig, RebasedForCausalLM, exist_ok=True)
