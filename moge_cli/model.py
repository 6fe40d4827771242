"""The MoGE (Pangu Pro MoE) decoder as a torch module, with a preallocated KV cache (loading: moge_cli.loader)."""

# B batch, T new tokens, S cache positions, N = B*T tokens, V vocab, H hidden, D head_dim,
# nH heads, nKV kv heads, E experts, k picks per token, I expert width, Is shared width.
#
# Precision: weights and the residual stream are in the model dtype; RMSNorm, RoPE, router
# logits and softmax, and attention run in float32. Norm weights, the router gate and
# router_scale are kept in float32 whatever the dtype (they are small and they decide routing).

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moge_kernels import decode_step
from moge_kernels.ops import attention, linear, mlp, moe, rms_norm, route, shared_mlp
from moge_cli import instrument, rope
from moge_cli.config import MoGEConfig
from moge_cli.dtypes import resolve_dtype
from moge_cli.errors import UsageError
from moge_cli.instrument import inputs as record_inputs
from moge_cli.instrument import routing as record_routing
from moge_cli.instrument import section

DEFAULT_MAX_LEN = 4096  # new_cache's default cap; config.max_position_embeddings may be 131072


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


# ---- KV cache ------------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values of every layer; positions 0..length-1 are filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # [L, B, nKV, S, D] each, model dtype
        self.k_layers, self.v_layers = k.unbind(0), v.unbind(0)  # per-layer views [B, nKV, S, D]
        self.batch_size, self.max_len = k.shape[1], k.shape[3]  # plain ints: read every token
        self.length = 0

    def reset(self) -> None:
        self.length = 0


# ---- layers --------------------------------------------------------------------------------------
class Attention(nn.Module):
    """GQA with q/k/v/o biases, neox RoPE, causal, float32 softmax; q/k/v fused in one matmul."""

    def __init__(self, cfg: MoGEConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.qkv_weight = _param((qkv, cfg.hidden_size), dtype, device)  # rows: q, k, v
        self.qkv_bias = _param((qkv,), dtype, device)
        self.o_weight = _param((cfg.hidden_size, self.n_heads * self.head_dim), dtype, device)
        self.o_bias = _param((cfg.hidden_size,), dtype, device)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        nH, nKV, D = self.n_heads, self.n_kv, self.head_dim
        qkv = linear(x, self.qkv_weight, self.qkv_bias).view(B, T, nH + 2 * nKV, D)
        if cache is None:
            o = attention(qkv, nH, nKV, cos, sin)
        else:  # at cache.length, or at pos on the device (step_at: cos and sin are then the whole tables)
            start = cache.length if pos is None else pos
            o = attention(qkv, nH, nKV, cos, sin, cache.k_layers[layer], cache.v_layers[layer], start)
        record_inputs("o_proj", layer, o)  # o [B, T, nH*D]
        return linear(o, self.o_weight, self.o_bias)


class MoE(nn.Module):
    """MoGE block: grouped top-K' routing over E stacked experts plus an always-on shared expert (none when
    shared_expert_intermediate_size is 0: shared_w13 / shared_w2 are then None)."""

    def __init__(self, cfg: MoGEConfig, dtype: torch.dtype, device, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        E, H, I, Is = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        self.n_groups, self.picks = cfg.n_groups, cfg.picks_per_group
        self.gate = _param((E, H), torch.float32, device)
        self.router_scale = _param((E,), torch.float32, device)
        self.gate_up = _param((E, 2 * I, H), dtype, device)  # rows 0..I-1 gate_proj, I..2I-1 up_proj
        self.down = _param((E, H, I), dtype, device)
        self.shared_w13 = _param((2 * Is, H), dtype, device) if Is else None
        self.shared_w2 = _param((H, Is), dtype, device) if Is else None
        # Expert parallelism (moge_cli.distributed): gate_up / down then hold this rank's experts only, and this
        # callable (x, logits, expert_ids, weights, gate_up, down) -> routed output summed over all ranks replaces moe.
        self.expert_parallel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, H]
        with section("router"):
            logits = linear(x.float(), self.gate)  # [N, E]
            expert_ids, weights = route(logits, self.n_groups, self.picks, self.router_scale)  # [N, k] each
        record_routing(self.layer, logits, expert_ids)
        with section("routed_experts"):
            if self.expert_parallel is None:
                y = moe(x, expert_ids, weights, self.gate_up, self.down)  # float32, or the dtype the stacks ran in
            else:
                y = self.expert_parallel(x, logits, expert_ids, weights, self.gate_up, self.down)
        if self.shared_w13 is not None:
            with section("shared_expert"):
                y = y + shared_mlp(x, self.shared_w13, self.shared_w2)
        return y.to(x.dtype)


class DenseMLP(nn.Module):
    """mlp_only_layers: one SwiGLU MLP of width intermediate_size (Qwen2-MoE convention)."""

    def __init__(self, cfg: MoGEConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.w13 = _param((2 * cfg.intermediate_size, cfg.hidden_size), dtype, device)  # gate rows, then up
        self.w2 = _param((cfg.hidden_size, cfg.intermediate_size), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, H]
        with section("dense_mlp"):
            return mlp(x, self.w13, self.w2)


class DecoderLayer(nn.Module):
    """Pre-norm: h = x + attn(norm(x)); y = h + mlp(norm(h))."""

    def __init__(self, cfg: MoGEConfig, layer: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.layer, self.eps = layer, cfg.rms_norm_eps
        self.input_layernorm = _param((cfg.hidden_size,), torch.float32, device)
        self.post_attention_layernorm = _param((cfg.hidden_size,), torch.float32, device)
        self.self_attn = Attention(cfg, dtype, device)
        self.mlp = DenseMLP(cfg, dtype, device) if cfg.is_dense(layer) else MoE(cfg, dtype, device, layer)

    def forward(self, x, cos, sin, cache: KVCache | None, pos: torch.Tensor | None = None) -> torch.Tensor:  # x [B, T, H]
        with section("attention"):
            x = x + self.self_attn(rms_norm(x, self.input_layernorm, self.eps), cos, sin, cache, self.layer, pos)
        h = rms_norm(x, self.post_attention_layernorm, self.eps)
        record_inputs("mlp", self.layer, h)
        return x + self.mlp(h.view(-1, h.shape[-1])).view(h.shape)


class MoGEForCausalLM(nn.Module):
    """Pangu Pro MoE decoder. forward(input_ids [B, T], cache=None) -> float32 logits [B, T, V]."""

    def __init__(self, cfg: MoGEConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        V, H = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = _param((V, H), dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device) for i in range(cfg.num_hidden_layers))
        self.norm = _param((H,), torch.float32, device)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else _param((V, H), dtype, device)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_len = 0
        self.quantization = None  # set by moge_cli.loader.load_quantized
        self.native_decode = True  # the loader's moge_kernels.ops.runs_natively: passed back to the kernels' choices
        self._plan: decode_step.DecodePlan | None | bool = False  # built at the first decode step (None: cannot run)
        self.eval()

    @classmethod
    def from_config(
        cls, cfg: MoGEConfig, dtype: str | torch.dtype | None = None, device: str | torch.device = "meta"
    ) -> "MoGEForCausalLM":
        """The model with uninitialised parameters (torch.empty; no storage at all on "meta")."""
        return cls(cfg, resolve_dtype(dtype), torch.device(device))

    def tie_weights(self) -> "MoGEForCausalLM":
        """With tie_word_embeddings, point lm_head at the (re)loaded embedding matrix; returns self."""
        if self.config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for batch_size sequences of up to max_len positions
        (default: max_position_embeddings, capped at 4096)."""
        cfg = self.config
        if max_len is None:
            max_len = min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
        if batch_size <= 0 or max_len <= 0:
            raise UsageError(f"new_cache: batch_size and max_len must be positive, got {batch_size}, {max_len}")
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        # zeros, not empty: a step with the position on the device (step_at) reads every row, masked; a masked
        # row must hold a finite number (0 x NaN from uninitialised memory would be NaN)
        return KVCache(
            torch.zeros(shape, dtype=self.dtype, device=self.device),
            torch.zeros(shape, dtype=self.dtype, device=self.device),
        )

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] float32 for int ids [B, T]; with a cache, continue at cache.length and advance it.
        The kernels may run a whole decode step at once (decode_step.try_step); a Recorder times every
        section, so while one is active the model runs op by op."""
        if cache is not None and not instrument.active():
            if (logits := decode_step.try_step(self.decode_plan, input_ids, cache, self._rope_tables)) is not None:
                cache.length += 1
                return logits
        return self._forward(input_ids, cache)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T = _check_ids(input_ids, self.config.vocab_size)
        start = 0 if cache is None else cache.length
        if cache is not None and (cache.batch_size != B or start + T > cache.max_len):
            raise UsageError(
                f"cache holds {cache.batch_size} sequences of up to {cache.max_len} positions ({start} used); "
                f"got {B} x {T} more tokens; make a bigger one with new_cache(batch_size, max_len)"
            )
        cos, sin = self._rope_rows(start, T)  # [T, 1, D] each
        with decode_step.forward_context(B * T, self.device, self.native_decode):
            with section("embedding"):
                x = F.embedding(input_ids.to(self.device), self.embed_tokens)  # [B, T, H]
            for layer in self.layers:
                x = layer(x, cos, sin, cache)
            if cache is not None:
                cache.length += T
            with section("lm_head"):
                x = rms_norm(x, self.norm, self.config.rms_norm_eps)
                return linear(x, self.lm_head).float()  # [B, T, V]

    @torch.inference_mode()
    def step_at(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [1, 1, V] float32 of one token [1, 1] at position pos, a [1] int64 tensor on the model's device
        that no host code reads: the step kernels/cuda_graph.py captures once and replays. Writes the token's k
        and v into the cache at pos; the caller advances cache.length (and checks pos < cache.max_len and the id,
        which this path does not read). Needs static_positions(cache)."""
        cos, sin = self._rope_tables(cache.max_len)  # [P, D]: attention picks row pos on the device
        x = F.embedding(token, self.embed_tokens)  # [1, 1, H]
        for layer in self.layers:
            x = layer(x, cos, sin, cache, pos)
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return linear(x, self.lm_head).float()  # [1, 1, V]

    def static_positions(self, cache: KVCache) -> bool:
        """step_at can run over this cache: RoPE rows for every position come from the fixed tables (not dynamic
        NTK past the trained length) and no MoE layer all-reduces mid-step (expert parallel)."""
        r = self.config.rope
        dynamic = r is not None and r.rope_type == "dynamic" and cache.max_len > self.config.max_position_embeddings
        return not dynamic and cache.batch_size == 1 and all(getattr(layer.mlp, "expert_parallel", None) is None for layer in self.layers)

    def decode_plan(self) -> decode_step.DecodePlan | None:
        """The kernels' whole-step plan for this model, built at the first decode step, or None where it cannot run.
        It holds the weights' addresses: after replacing a parameter, set model._plan = False to rebuild it."""
        if self._plan is False:
            self._plan = decode_step.plan(self)
        return self._plan

    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """moge_cli.rope's tables [P, D] for at least n positions, grown in powers of two (rows never change)."""
        if self._rope is None or self._rope_len < n:
            self._rope_len = size = max(256, 1 << (n - 1).bit_length())
            self._rope = rope.rope_tables(self.config, size, self.device)
        return self._rope

    def _rope_rows(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] of a forward call over positions start..start+T-1."""
        rows = rope.call_rows(self.config, start, start + T, self.device)  # dynamic NTK past the trained length
        if rows is None:
            cos, sin = self._rope_tables(start + T)
            rows = cos[start : start + T], sin[start : start + T]
        return rows[0][:, None], rows[1][:, None]


def _check_ids(input_ids: torch.Tensor, vocab: int) -> tuple[int, int]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise UsageError("model input must be an integer tensor of token ids [batch, tokens]")
    B, T = input_ids.shape
    if T == 0:
        raise UsageError("model input holds no tokens")
    if input_ids.device.type != "cpu":
        return B, T  # ids already on an accelerator (the model's own samples) are not read back: that would sync each step
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab:
        raise UsageError(f"token id {hi if hi >= vocab else lo} is outside the vocabulary 0..{vocab - 1}")
    return B, T
