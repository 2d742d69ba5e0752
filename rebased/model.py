"""The language model: embeddings, pre-norm blocks (mixer + optional MLP), final norm, tied head.

    x = drop(E[ids] + P[positions]);  per layer: x = x + drop(mixer(norm1(x))); x = x + drop(mlp(norm2(x)))
    logits = W_head norm_f(x)      (W_head = E when tie_embeddings)

This is the official ReBased / Zoology block (pre-norm; with mlp="identity", its Identity state mixer).
Initialisation as theirs (GPT-2 style): Linear and Embedding weights N(0, init_std), biases 0, and every
residual output projection (out_proj, fc2) N(0, init_std / sqrt(2 n_layers)); mixers then restore their
own special parameters (Mamba's dt bias, RWKV's decays, Hyena's filter).

Generation: prefill(ids) -> (logits, state); step(ids_t, state) -> (logits_t, state). For recurrent
mixers the state has a fixed size; state_size() reports it (the MQAR x-axis).

Shape letters: B batch, T time, D d_model, V vocab.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rebased.config import ModelConfig
from rebased.mixers import make_mixer
from rebased.ops.common import compute_dtype
from rebased.ops.cross_entropy import linear_cross_entropy
from rebased.ops.embedding import Embedding
from rebased.ops.norm import LayerNorm

# forward(..., targets=) takes the fused head and loss from this many logits (rows x vocabulary) up, where the
# logits' memory starts to count; below, the plain head and F.cross_entropy, which on the CPU at the quick
# task's size (256 x 64) is 8% faster per training step. An estimate for GPUs, where it is not measured.
FUSED_LOSS_MIN_LOGITS = 2**22


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)  # gate and value in one matmul
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


def _gelu_mlp(d_model: int, hidden: int) -> nn.Module:
    return GeluMLP(d_model, hidden or 4 * d_model)


def _swiglu(d_model: int, hidden: int) -> nn.Module:
    return SwiGLU(d_model, hidden or 64 * math.ceil(8 * d_model / 3 / 64))


MLP_BUILDERS = {"none": None, "identity": lambda d_model, hidden: nn.Identity(), "gelu": _gelu_mlp, "swiglu": _swiglu}
NORM_BUILDERS = {
    "layernorm": lambda d, eps, affine: LayerNorm(d, eps=eps, elementwise_affine=affine),  # fused on CUDA
    "rmsnorm": lambda d, eps, affine: nn.RMSNorm(d, eps=eps, elementwise_affine=affine),
}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer_name: str):
        super().__init__()
        norm = NORM_BUILDERS[cfg.norm]
        self.norm1 = norm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        self.mixer = make_mixer(mixer_name, cfg.d_model, cfg.mixers[mixer_name])
        build_mlp = MLP_BUILDERS[cfg.mlp]
        self.mlp = None if build_mlp is None else build_mlp(cfg.d_model, cfg.mlp_hidden)
        self.norm2 = None if self.mlp is None else norm(cfg.d_model, cfg.norm_eps, cfg.norm_affine)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def _mlp(self, x: Tensor) -> Tensor:
        return x if self.mlp is None else x + self.drop(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self._mlp(x + self.drop(self.mixer(self.norm1(x))))

    def prefill(self, x: Tensor) -> tuple[Tensor, object]:
        y, state = self.mixer.prefill(self.norm1(x))
        return self._mlp(x + self.drop(y)), state

    def step(self, x: Tensor, state: object) -> tuple[Tensor, object]:  # x [B, D]
        y, state = self.mixer.step(self.norm1(x), state)
        return self._mlp(x + self.drop(y)), state

    def step_static(self, x: Tensor, state: object, position: Tensor) -> Tensor:  # x [B, D]
        return self._mlp(x + self.drop(self.mixer.step_static(self.norm1(x), state, position)))


class ModelState(NamedTuple):
    layers: list  # one state per layer, as its mixer defines it
    position: int  # tokens seen so far (the next token's position)


class StateSize(NamedTuple):
    elements: int
    bytes: int


def select_positions(x: Tensor, select: Tensor) -> Tensor:
    """Rows of x [B, T, ...] at a boolean mask [B, T] or at flat indices b * T + t, in row-major order. Flat
    indices go through index_select, whose gradient adds the rows back with index_add_; indexing's accumulates
    with index_put_, which on CUDA sorts the indices first (the radix sorts of a graphed MQAR step, 0.36 ms at
    L 2048 on an H200). The sum is exact either way: an index appears once, or again as a padding entry of the
    label table whose target is ignored and whose gradient is zero."""
    return x[select] if select.dtype == torch.bool else x.flatten(0, 1).index_select(0, select)


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Recompute each block's activations in the backward pass instead of keeping them: less memory for
        # about one more forward pass. A training setting, not part of the model's config.
        self.checkpoint_layers = False
        self.embedding = Embedding(cfg.vocab_size, cfg.d_model)  # nn.Embedding whose gradient may come from Triton
        positions = cfg.max_position_embeddings
        self.position_embedding = nn.Embedding(positions, cfg.d_model) if positions > 0 else None
        self.drop = nn.Dropout(cfg.embed_dropout)
        self.layers = nn.ModuleList(Block(cfg, name) for name in cfg.layer_mixers())
        self.norm_f = NORM_BUILDERS[cfg.norm](cfg.d_model, cfg.norm_eps, True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):  # residual outputs: 2 per block
                nn.init.normal_(parameter, std=std / math.sqrt(2 * self.cfg.n_layers))
        for module in self.modules():
            if module is not self and hasattr(module, "reset_special_parameters"):
                module.reset_special_parameters()

    def _embed(self, ids: Tensor, offset: int | Tensor) -> Tensor:
        """offset: the first token's position, an int or (decoding under a CUDA graph, checked by the caller) a
        0-dim tensor on the device."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        x = self.embedding(ids)
        if self.position_embedding is not None:
            end = offset + ids.shape[1]
            if isinstance(end, int) and end > self.cfg.max_position_embeddings:
                raise ValueError(
                    f"position {end - 1} is beyond max_position_embeddings={self.cfg.max_position_embeddings}"
                )
            x = x + self._positions(offset, ids.shape[1], ids.device)
        return self.drop(x)

    def _positions(self, offset: int | Tensor, length: int, device: torch.device) -> Tensor:
        """The position embeddings of positions offset .. offset + length - 1, [length, D]: from an int offset a
        slice of the table, whose gradient is a copy into its rows (a lookup's runs torch's embedding backward,
        0.2 ms of a graphed MQAR step at L 2048); from a tensor offset (decoding under a CUDA graph) a lookup."""
        table = self.position_embedding
        if isinstance(offset, int):
            return table.weight[offset : offset + length]
        return table(torch.arange(length, device=device) + offset)

    def _logits(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm_f(x))

    def forward(self, ids: Tensor, select: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
        """ids [B, T] -> logits [B, T, V]; with select, logits [n_selected, V] only at the selected positions
        (MQAR labels a few positions: the head over the vocabulary dominates otherwise). select is a boolean
        mask [B, T] or the flat indices b * T + t of the positions (an index tensor: on the GPU a boolean
        mask makes the host wait for the device to count its True entries, an index does not).

        With targets (one label per selected position, or [B, T] without select; IGNORE_INDEX = -100 where
        unscored): the cross-entropy summed over the scored positions, a 0-dim tensor; from
        FUSED_LOSS_MIN_LOGITS logits up by rebased.ops.linear_cross_entropy, which never holds them."""
        x = self._embed(ids, 0)
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        x = x if select is None else select_positions(x, select)
        if targets is None:
            return self._logits(x)
        hidden, targets = self.norm_f(x).flatten(0, -2), targets.flatten()
        if hidden.shape[0] * self.cfg.vocab_size < FUSED_LOSS_MIN_LOGITS:
            logits = self.lm_head(hidden)
            return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), targets, reduction="sum")
        return linear_cross_entropy(hidden, self.lm_head.weight, targets)

    def prefill(self, ids: Tensor, last_only: bool = False) -> tuple[Tensor, ModelState]:
        """Logits [B, T, V] (last_only: [B, 1, V], which is all generation needs: at batch 64 and 64k tokens the
        whole [B, T, V] would take 400 GB) and the state after ids."""
        x, states = self._embed(ids, 0), []
        for layer in self.layers:
            x, state = layer.prefill(x)
            states.append(state)
        return self._logits(x[:, -1:] if last_only else x), ModelState(states, ids.shape[1])

    def step(self, ids: Tensor, state: ModelState | None) -> tuple[Tensor, ModelState]:  # ids [B] -> [B, V]
        position = 0 if state is None else state.position
        x = self._embed(ids.view(-1, 1), position)[:, 0]
        states = []
        for i, layer in enumerate(self.layers):
            x, layer_state = layer.step(x, None if state is None else state.layers[i])
            states.append(layer_state)
        return self._logits(x), ModelState(states, position + 1)

    def step_static(self, ids: Tensor, states: list, position: Tensor) -> Tensor:  # ids [B] -> logits [B, V]
        """One token into states made by each layer's mixer.static_state, in place (rebased.decode)."""
        x = self._embed(ids.view(-1, 1), position)[:, 0]
        for layer, state in zip(self.layers, states, strict=True):
            x = layer.step_static(x, state, position)
        return self._logits(x)

    def state_size(self, seq_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> StateSize:
        """The generation state after seq_len tokens: fp32 parts (linear-attention, SSM states) at 4 bytes,
        activation parts (caches, conv tails) at the size of dtype (default: the parameters')."""
        dtype = dtype or next(self.parameters()).dtype
        fp32 = activations = 0
        for layer in self.layers:
            a, b = layer.mixer.state_elements(seq_len)
            fp32, activations = fp32 + a, activations + b
        size = torch.empty((), dtype=dtype).element_size()
        return StateSize(batch * (fp32 + activations), batch * (4 * fp32 + size * activations))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without token/position embeddings."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embedding.weight.numel()
            if self.position_embedding is not None:
                total -= self.position_embedding.weight.numel()
        return total
