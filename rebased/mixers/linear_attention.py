"""Linear attention with any registered feature map: the ReBased and Based mixers.

    q = W_q x, k = W_k x  [B, T, H, Dk];  v = W_v x  [B, T, H, Dv];  q', k' = fmap.prepare(q, k)
    o_t = sum_{s<=t} sim(q'_t, k'_s) v_s / (sum_{s<=t} sim(q'_t, k'_s) + eps);  y = W_o o

Official MQAR layout (corl-team/rebased, Zoology): H = 12, Dk = 16, Dv = d_model // H, no biases; the
ReBased map adds two joint LayerNorms over H * Dk features. The state is the op's LinearAttentionState
(fp32) plus the position of the next token (cosFormer's features depend on it).

Shape letters: B batch, T time, H heads, Dk projected q/k dim, Dv value head dim, F feature dim.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from rebased.config import LinearAttentionConfig
from rebased.feature_maps import make_feature_map
from rebased.mixers.base import Mixer
from rebased.ops import LinearAttentionState, auto_picks_triton, linear_attention, linear_attention_step


class LinearState(NamedTuple):
    attention: LinearAttentionState
    position: int


class LinearAttention(Mixer):
    def __init__(self, d_model: int, cfg: LinearAttentionConfig):
        super().__init__()
        self.cfg = cfg
        heads, self.key_dim, self.value_dim = cfg.num_heads, cfg.feature_dim, d_model // cfg.num_heads
        self.proj_q = nn.Linear(d_model, heads * self.key_dim, bias=False)
        self.proj_k = nn.Linear(d_model, heads * self.key_dim, bias=False)
        self.proj_v = nn.Linear(d_model, heads * self.value_dim, bias=False)
        self.out_proj = nn.Linear(heads * self.value_dim, d_model, bias=False)
        self.feature_map = make_feature_map(cfg.feature_map, self.key_dim, heads, **cfg.feature_map_options)
        self.feature_map.backend = cfg.backend
        self.eps = self.feature_map.eps if cfg.eps is None else cfg.eps

    def _project(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        heads = self.cfg.num_heads
        q = self.proj_q(x).unflatten(-1, (heads, self.key_dim))  # [B, T, H, Dk]
        k = self.proj_k(x).unflatten(-1, (heads, self.key_dim))
        v = self.proj_v(x).unflatten(-1, (heads, self.value_dim))  # [B, T, H, Dv]
        q, k = self.feature_map.prepare(q, k, offset)
        # Under autocast, LayerNorm / softmax inside the map return fp32 while v is bf16; the fused ops take
        # one dtype (the op computes its state and normaliser in fp32 whatever comes in).
        return q.to(v.dtype), k.to(v.dtype), v

    def _attend(self, x: Tensor, output_final_state: bool) -> tuple[Tensor, LinearAttentionState | None]:
        q, k, v = self._project(x, 0)
        fmap = self.feature_map
        o, state = linear_attention(
            q,
            k,
            v,
            mode=self.cfg.mode,
            backend=self.cfg.backend,
            kernel=fmap.kernel,
            normalize=fmap.normalize,
            eps=self.eps,
            chunk_size=self.cfg.chunk_size,
            output_final_state=output_final_state,
        )
        return self.out_proj(o.flatten(-2)), state

    def forward(self, x: Tensor) -> Tensor:  # [B, T, D]
        return self._attend(x, False)[0]

    def prefill(self, x: Tensor) -> tuple[Tensor, LinearState]:
        y, state = self._attend(x, True)
        return y, LinearState(state, x.shape[1])

    def step(self, x: Tensor, state: LinearState | None) -> tuple[Tensor, LinearState]:
        position = 0 if state is None else state.position
        q, k, v = self._project(x.unsqueeze(1), position)
        fmap = self.feature_map
        o, attention = linear_attention_step(
            q[:, 0],
            k[:, 0],
            v[:, 0],
            None if state is None else state.attention,
            kernel=fmap.kernel,
            normalize=fmap.normalize,
            eps=self.eps,
        )
        return self.out_proj(o.flatten(-2)), LinearState(attention, position + 1)

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        feat = self.feature_map.feature_dim
        return self.cfg.num_heads * feat * (self.value_dim + 1), 0

    def static_state(self, state: LinearState, capacity: int) -> LinearAttentionState:
        """The op's state alone, contiguous (the fused step adds into it); the position comes with each step."""
        return LinearAttentionState(state.attention.kv.contiguous(), state.attention.k_sum.contiguous())

    def step_static(self, x: Tensor, state: LinearAttentionState, position: Tensor) -> Tensor:
        q, k, v = self._project(x.unsqueeze(1), position)
        fmap, fused = self.feature_map, self._fused_step(x)
        options = dict(kernel=fmap.kernel, normalize=fmap.normalize, eps=self.eps)
        if fused:
            try:  # the fused step adds the token into `state` in place
                o, _ = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, backend="triton", **options)
                return self.out_proj(o.flatten(-2))
            except NotImplementedError:  # a shape the kernel does not take (decided before any launch)
                pass
        o, new_state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, **options)
        state.kv.copy_(new_state.kv)
        state.k_sum.copy_(new_state.k_sum)
        return self.out_proj(o.flatten(-2))

    def _fused_step(self, x: Tensor) -> bool:
        backend = self.cfg.backend
        return backend == "triton" or (backend == "auto" and x.is_cuda and auto_picks_triton(x))


# flash-linear-attention's ReBasedLinearAttention arguments -> this mixer. Its LayerNorm is per head with
# gamma/beta shared across heads (scope "per_head"); the flags pick the ablation map with that scope.
_FLA_MAPS = {
    (True, True, True): "rebased",
    (False, False, False): "square",
    (False, False, True): "norm_square",
    (True, False, False): "gamma_square",
    (True, True, False): "affine_square",
}
_FLA_MODES = {"parallel": "parallel", "chunk": "chunk", "fused_chunk": "chunk"}


def from_fla(
    hidden_size: int = 1024,
    l_max: int = 2048,
    feature_dim: int = 16,
    num_key_value_heads: int = 16,
    num_heads: int = 16,
    use_gamma: bool = True,
    use_beta: bool = True,
    normalize: bool = True,
    causal: bool = True,
    eps: float = 1e-5,
    mode: str = "parallel",
    layer_idx: int | None = None,
) -> LinearAttention:
    """Build the mixer from fla.layers.ReBasedLinearAttention's arguments; what has no mapping fails.

    l_max and layer_idx do not affect the computation (fla stores them only).
    """
    del l_max, layer_idx
    if num_key_value_heads != num_heads:
        raise ValueError(
            f"num_key_value_heads={num_key_value_heads} != num_heads={num_heads}: grouped heads are not supported"
        )
    if not causal:
        raise ValueError("causal=False: only causal linear attention is implemented")
    flags = (use_gamma, use_beta, normalize)
    if flags not in _FLA_MAPS:
        raise ValueError(f"use_gamma={use_gamma}, use_beta={use_beta}, normalize={normalize}: no matching feature map")
    if mode not in _FLA_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(_FLA_MODES)}")
    cfg = LinearAttentionConfig(
        feature_map=_FLA_MAPS[flags],
        num_heads=num_heads,
        feature_dim=feature_dim,
        feature_map_options={"scope": "per_head"},
        eps=eps,
        mode=_FLA_MODES[mode],
    )
    cfg.validate("from_fla", hidden_size)
    return LinearAttention(hidden_size, cfg)
