"""A whole one-token decode step on kernels/cpu.c (kernels/step.c), from a plan of pointers built once per model.

Running a step's ops one by one from Python costs more per layer than reading its weights; the plan
hands kernels/step.c every weight's address once, and a step is then one C call. The plan's field
order is written out in kernels/step.c; `plan` below builds it in the same order. A model whose
weights the kernels cannot read (float16, torch's int4 packing, shapes the int4 kernel does not
take) gets no plan and keeps the op-by-op path.
"""

from __future__ import annotations

import weakref

import torch

from moge_kernels import native
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


def plan(model) -> DecodePlan | None:
    """The plan of a loaded MoGEForCausalLM (its config, and its weights read as attributes: tensors or
    QLinears), or None where kernels/step.c cannot run it."""
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
