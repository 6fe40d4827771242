"""How a model's forward call runs: a whole one-token decode step as one C call (kernels/step.c, from a
plan of pointers built once per model), on CUDA as one replayed CUDA graph (cuda_graph.py), or op by op
through moge_kernels.ops on the right threads.

Running a step's ops one by one from Python costs more per layer than reading its weights; the plan
hands kernels/step.c every weight's address once, and a step is then one C call. The plan's field
order is written out in kernels/step.c; `plan` below builds it in the same order. A model whose
weights the kernels cannot read (float16, torch's int4 packing, shapes the int4 kernel does not
take) gets no plan and keeps the op-by-op path.

The model asks `try_step` first (logits, or None: run op by op) and runs its op-by-op forward inside
`forward_context`; both choices are made here, not in the model.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager
from typing import Callable

import torch

from moge_kernels import cuda_graph, native
from moge_kernels.qlinear import QLinear

NO_MAT = [0] * 6  # w, wtype, scale, sdtype, zero, group


class DecodePlan:
    """The int64 plan of kernels/step.c and the tensors it points into (kept alive with it)."""

    def __init__(self, fields: list[int], keep: list[torch.Tensor], vocab: int, eps: float) -> None:
        self.fields = torch.tensor(fields, dtype=torch.int64)
        self.keep = keep
        self.vocab, self.eps = vocab, eps
        native.check_plan(self.fields)
        self.address = self.fields.data_ptr()
        self._bound: tuple = ()  # weak references to (k cache, v cache, cos, sin), and their addresses: checked once

    def step(self, token: int, pos: int, cache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Logits [1, 1, V] float32 of `token` at `pos`; writes its k and v to the cache (caches
        [L, 1, nKV, S, D]; rope: the (cos, sin) tables [P, D], P > pos). Does not advance the cache.

        A step's weights pass through the CPU caches, so every Python or torch operation between two
        steps runs on cold caches (4 small torch ops: 24-38 us right after a step, 3 us warm): this path
        checks the cache and tables once and reuses their addresses while they stay the same tensors."""
        cos, sin = rope
        b = self._bound
        if not (b and b[0]() is cache.k and b[1]() is cache.v and b[2]() is cos and b[3]() is sin):
            tensors = (cache.k, cache.v, cos, sin)  # weakly held: a dropped cache's memory is freed
            b = self._bound = (*map(weakref.ref, tensors), native.step_addresses(*tensors))
        logits = torch.empty(1, 1, self.vocab, dtype=torch.float32)
        native.step(self.address, logits.data_ptr(), token, pos, b[4], self.eps)
        return logits


def plan(model) -> DecodePlan | cuda_graph.GraphStep | None:
    """The whole-step plan of a loaded MoGEForCausalLM (its config, and its weights read as attributes: tensors
    or QLinears): kernels/step.c's on the CPU, a CUDA graph of model.step_at on CUDA; None where neither runs it."""
    if model.device.type == "cuda":
        return cuda_graph.plan(model)
    if not native.available() or model.device.type != "cpu" or model.dtype not in native.DTYPES:
        return None
    if any(getattr(layer.mlp, "expert_parallel", None) is not None for layer in model.layers):
        return None  # expert parallel: the routed output is all-reduced between ops, which one C call cannot do
    cfg, dtype = model.config, model.dtype
    keep: list[torch.Tensor] = []

    def f32(t: torch.Tensor) -> int:  # norms, gate, router_scale, biases: float32 copies where needed
        t = t.detach().float().contiguous()
        keep.append(t)
        return t.data_ptr()

    def mat(w, k: int) -> list[int] | None:
        if type(w) is QLinear:
            if (parts := w.native_weight()) is None:  # torch's int4 packing
                return None
        elif w.dtype != dtype:
            return None
        else:
            parts = (w, None, None)
        keep.extend(p for p in parts if p is not None)
        args = native.weight_args(*parts[:1], k, *parts[1:])
        return None if args is None else list(args)

    H, D = cfg.hidden_size, cfg.head_dim
    if model.embed_tokens.dtype != dtype or (lm_head := mat(model.lm_head, H)) is None:
        return None
    keep.append(model.embed_tokens)
    fields = [cfg.num_hidden_layers, H, cfg.num_attention_heads, cfg.num_key_value_heads, D, cfg.vocab_size, cfg.num_experts,
              cfg.moe_intermediate_size, cfg.n_groups, cfg.picks_per_group, native.DTYPES[dtype],
              model.embed_tokens.data_ptr(), f32(model.norm), *lm_head]  # fmt: skip
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        moe = not cfg.is_dense(i)
        mats = [mat(attn.qkv_weight, H), mat(attn.o_weight, cfg.num_attention_heads * D)]
        if moe and mlp.shared_w13 is None:  # no shared expert: width 0, kernels/step.c skips it
            mats += [mat(mlp.gate_up, H), mat(mlp.down, cfg.moe_intermediate_size), NO_MAT, NO_MAT]
        elif moe:
            mats += [mat(mlp.gate_up, H), mat(mlp.down, cfg.moe_intermediate_size), mat(mlp.shared_w13, H),
                     mat(mlp.shared_w2, cfg.shared_expert_intermediate_size)]  # fmt: skip
        else:
            mats += [NO_MAT, NO_MAT, mat(mlp.w13, H), mat(mlp.w2, cfg.intermediate_size)]
        if any(m is None for m in mats):
            return None
        qkv, o, gate_up, down, w13, w2 = mats
        fields += [f32(layer.input_layernorm), f32(layer.post_attention_layernorm), *qkv, f32(attn.qkv_bias), *o, f32(attn.o_bias)]
        fields += [f32(mlp.gate), f32(mlp.router_scale)] if moe else [0, 0]
        fields += [*gate_up, *down, *w13, *w2, cfg.shared_expert_intermediate_size if moe else cfg.intermediate_size]
    try:
        return DecodePlan(fields, keep, cfg.vocab_size, cfg.rms_norm_eps)
    except ValueError:  # kernels/step.c's own checks (routing counts, head sizes): the op-by-op path runs it
        return None


def try_step(plan: Callable[[], DecodePlan | None], input_ids, cache, rope_tables: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """One token's logits [1, 1, V] float32 as one C call (kernels/step.c) or one CUDA graph replay
    (cuda_graph.GraphStep), or None where that path does not apply; the caller then runs op by op (whose checks explain bad input: a token id outside the
    vocabulary, a full cache). Writes the token's k and v to the cache; the caller advances cache.length.

    plan(): the model's plan (built at its first call; None where step.c cannot run the model). cache:
    the model's KV cache (k, v [L, B, nKV, S, D], length, max_len, batch_size). rope_tables(n): the
    (cos, sin) tables [P, D] for at least n positions. Between two steps Python runs on caches the
    weights have just swept (see DecodePlan.step), so this path makes as few torch calls as it can: no
    tensor ops but the token's value and the logits' allocation."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape != (1, 1) or input_ids.dtype.is_floating_point:
        return None
    if cache.k.device.type == "cpu" and not native.available():  # before plan(): MOGE_NATIVE=0 may be set at any time
        return None
    if (p := plan()) is None:
        return None
    if type(p) is cuda_graph.GraphStep:  # CUDA: the token stays on the device, nothing is read back
        if cache.length >= cache.max_len:
            return None  # the op-by-op path explains
        return p.step(input_ids, cache.length, cache)
    token, pos = int(input_ids), cache.length
    if not 0 <= token < p.vocab or pos >= cache.max_len or cache.batch_size != 1:
        return None  # the op-by-op path explains
    return p.step(token, pos, cache, rope_tables(pos + 1))


def forward_context(tokens: int, device: torch.device, native_weights: bool = True) -> AbstractContextManager:
    """What an op-by-op forward call of `tokens` tokens runs inside: one token on the CPU lends torch's
    threads to the one-token kernels (native.decode_threads; torch runs on one), unless some weight runs
    on torch's int kernels (native_weights False: moge_kernels.ops.runs_natively), which want them."""
    return native.decode_threads(tokens == 1 and device.type == "cpu" and native_weights)
