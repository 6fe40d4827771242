"""Routed-expert and dense SwiGLU MLP compute on stacked expert weights."""

# T tokens, E experts, k picks per token (G*K'), P = T*k (token, slot) pairs,
# H hidden, I intermediate (per expert), n tokens routed to one expert.
#
# Precision: every matmul runs in x's dtype (which must be the weights' dtype). The
# float32 routing weights are applied and the k expert outputs summed in float32,
# then cast back to x's dtype once: for bf16/fp16 this rounds once instead of once
# per product and per partial sum.
#
# Determinism: every path computes each expert on its pairs in ascending (token, slot)
# order (moe_gathered: each pair alone), places the results at their pair positions (a
# permutation, no atomics) and sums the k slots with one reduction of the same shape.
# Same inputs, same bits.
#
# Host reads: moe_decode and moe_prefill group the pairs on the host (one sync per call: free on
# the CPU). moe_grouped and moe_gathered read nothing back (a GPU step stays queued); moe_experts
# takes them off the CPU.
#
# Bad arguments raise plain ValueError (shapes, ids) or TypeError (dtypes): the kernels import nothing
# of ours. The model checks config, shapes and dtypes at load time, so one escaping from a run is a bug.

from __future__ import annotations

import torch
import torch.nn.functional as F

from moge_kernels import native

# moe_experts takes the decode path while T*k is at most this. Measured on CPU (E=64,
# H=1024, I=256, k=8, fp32 and bf16): decode is 5-15% faster at T=1, even at T=2, and
# slower from T=4 on, where its per-expert index tensors cost more than one argsort.
DECODE_MAX_PAIRS = 16


def moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert output [T, H]: sum over a token's k picks of weight * expert(x).

    x [T, H], expert_ids [T, k] int, weights [T, k] (float32 from route),
    gate_up [E, 2I, H] (gate rows first, then up), down [E, H, I].
    On the CPU, one token runs kernels/cpu.c's fused kernel where it can (native.moe_vec); otherwise
    moe_decode for at most DECODE_MAX_PAIRS (token, slot) pairs, else moe_prefill. On other devices
    nothing is read back to the host where it can be helped (a GPU step stays queued; see moe_grouped):
    moe_grouped where torch's grouped GEMM runs on the device, moe_gathered for a few pairs, else
    moe_prefill (one sync per call, for many tokens only).
    """
    if x.device.type != "cpu":
        if grouped_mm_on_device(x, gate_up):
            return moe_grouped(x, expert_ids, weights, gate_up, down)
        if expert_ids.numel() <= DECODE_MAX_PAIRS:
            return moe_gathered(x, expert_ids, weights, gate_up, down)
        return moe_prefill(x, expert_ids, weights, gate_up, down)
    if x.shape[0] == 1 and (y := native.moe_vec(x, expert_ids, weights, gate_up, down)) is not None:
        return y.to(x.dtype)
    if expert_ids.numel() <= DECODE_MAX_PAIRS:
        return moe_decode(x, expert_ids, weights, gate_up, down)
    return moe_prefill(x, expert_ids, weights, gate_up, down)


def moe_decode(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """moe_experts for a few tokens: groups the picks on the host, one pass per picked expert."""
    return _grouped_moe(by_expert_few, x, expert_ids, weights, gate_up, down)


def moe_prefill(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """moe_experts for many tokens: sorts the pairs by expert, one matmul pair per non-empty expert (its rows
    padded to padded_rows: see ROW_STEPS_PER_OCTAVE)."""
    return _grouped_moe(by_expert_many, x, expert_ids, weights, gate_up, down)


def moe_grouped(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """moe_experts without reading a value back to the host: the pairs sorted by expert on the device,
    each expert's rows found by a search in the sorted ids, two grouped GEMMs (torch._grouped_mm), the
    results put back in pair order and combined, all queued on x's device.

    expert_ids are not range-checked (that needs their values on the host): route's always are in range.
    torch._grouped_mm runs without a sync only where it has a device kernel (CUDA bfloat16 on sm90+:
    grouped_mm_on_device); elsewhere torch's own loop over the groups reads the offsets back once."""
    T, k = _check(x, expert_ids, weights, gate_up, down)
    E = gate_up.shape[0]
    flat = expert_ids.reshape(-1)  # [P]
    sorted_ids, order = torch.sort(flat, stable=True)  # [P] each; (token, slot) order inside an expert
    ends = torch.searchsorted(sorted_ids, torch.arange(E, device=flat.device), right=True, out_int32=True)  # [E]
    xs = x.index_select(0, order // k)  # [P, H], grouped by expert
    gate, up = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=ends).chunk(2, dim=-1)  # [P, I] each
    ys = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=ends)  # [P, H], grouped by expert
    y = torch.empty_like(ys).index_copy_(0, order, ys)  # [P, H], (token, slot) order
    return _combine(y.view(T, k, x.shape[1]), weights)


def moe_gathered(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """moe_experts for a few tokens without reading a value back to the host and without a grouped GEMM
    (float32 / float16 on GPUs): each (token, slot) pair's expert weights gathered into one batch
    (a copy of P experts: for a few pairs only) and two batched matrix-vector products.

    expert_ids are not range-checked on the host (moe_grouped); an id outside 0..E-1 fails in the gather."""
    T, k = _check(x, expert_ids, weights, gate_up, down)
    flat = expert_ids.reshape(-1)  # [P]
    xs = x.unsqueeze(1).expand(T, k, x.shape[1]).reshape(T * k, x.shape[1], 1)  # [P, H, 1], pair order
    gate, up = torch.bmm(gate_up.index_select(0, flat), xs).squeeze(-1).chunk(2, dim=-1)  # [P, I] each
    ys = torch.bmm(down.index_select(0, flat), (F.silu(gate) * up).unsqueeze(-1))  # [P, H, 1]
    return _combine(ys.view(T, k, x.shape[1]), weights)


def grouped_mm_on_device(x: torch.Tensor, gate_up: torch.Tensor | None = None) -> bool:
    """torch._grouped_mm has a device kernel for x (CUDA bfloat16 on compute capability 9.x or 10.x, the GPUs its
    cutlass kernel is built for; elsewhere torch's fallback reads the offsets back) and the stacks' rows are
    16-byte aligned (H and I multiples of 8), so it runs without reading its offsets back to the host. Asks the
    device's properties only (no sync)."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    if gate_up is not None and (gate_up.shape[-1] % 8 or gate_up.shape[-2] % 16):  # H, 2I
        return False
    return torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def _grouped_moe(group, x, expert_ids, weights, gate_up, down) -> torch.Tensor:
    """The routed output with the (token, slot) pairs grouped per expert by `group` (a by_expert* function)."""
    T, k = _check(x, expert_ids, weights, gate_up, down)
    y = group(x, expert_ids, gate_up.shape[0], lambda xe, e: _swiglu(xe, gate_up[e], down[e]))  # [T*k, H]
    return _combine(y.view(T, k, x.shape[1]), weights)


def by_expert(x: torch.Tensor, expert_ids: torch.Tensor, E: int, expert) -> torch.Tensor:
    """expert(rows [n, H], e) -> [n, H] run once per picked expert on the tokens that picked it, in
    (token, slot) order: [P, H] in pair order. Few pairs (DECODE_MAX_PAIRS) group on the host, many by a sort."""
    if expert_ids.numel() <= DECODE_MAX_PAIRS:
        return by_expert_few(x, expert_ids, E, expert)
    return by_expert_many(x, expert_ids, E, expert)


def by_expert_few(x: torch.Tensor, expert_ids: torch.Tensor, E: int, expert) -> torch.Tensor:
    """by_expert grouping the pairs on the host (one sync; for a few pairs)."""
    k = expert_ids.shape[1]
    pairs_of: dict[int, list[int]] = {}
    for p, e in enumerate(expert_ids.reshape(-1).tolist()):  # one host sync; P is small here
        pairs_of.setdefault(e, []).append(p)
    _check_ids_in_range(pairs_of, E)
    outs, order = [], []
    for e in sorted(pairs_of):
        pairs = pairs_of[e]
        if len(pairs) == 1:  # a slice, not a gather: the usual case at T=1
            t = pairs[0] // k
            xe = x[t : t + 1]
        else:
            xe = x[torch.tensor([p // k for p in pairs], device=x.device)]  # [n, H]
        outs.append(expert(xe, e))
        order += pairs
    ys = torch.cat(outs) if outs else x.new_empty(0, x.shape[1])  # [P, H], grouped by expert
    y = torch.empty_like(ys)
    y[torch.tensor(order, dtype=torch.long, device=x.device)] = ys  # back to (token, slot) order
    return y


def by_expert_many(x: torch.Tensor, expert_ids: torch.Tensor, E: int, expert) -> torch.Tensor:
    """by_expert sorting the pairs by expert (a stable sort: (token, slot) order inside an expert).

    Each expert runs on its rows padded up to padded_rows(n) (copies of token 0's row, whose results
    are dropped), so that the GEMMs see a few row counts per process instead of a new one per expert
    and prompt: see ROW_STEPS_PER_OCTAVE."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [P]
    order = torch.argsort(flat, stable=True)  # [P], pairs grouped by expert, (token, slot) order inside
    # Shifted by one after clamping, so bins 0 and E+1 count out-of-range ids: range check
    # and per-expert counts in one host sync.
    counts = torch.bincount(flat.clamp(-1, E) + 1, minlength=E + 2).tolist()
    if counts[0] or counts[-1]:
        raise ValueError(f"moe: expert_ids has values outside 0..{E - 1}")
    counts = counts[1:-1]  # [E]
    padded = [padded_rows(n) for n in counts]  # [E]
    xs = x[_padded_rows_index(order // k, counts, padded)]  # [sum(padded), H], each expert's rows contiguous
    ys = x.new_empty(flat.shape[0], x.shape[1])  # [P, H], grouped by expert
    start = padded_start = 0
    for e, (n, m) in enumerate(zip(counts, padded)):
        if n:
            ys[start : start + n] = expert(xs[padded_start : padded_start + m], e)[:n]
            start, padded_start = start + n, padded_start + m
    del xs
    y = torch.empty_like(ys)
    y[order] = ys  # back to (token, slot) order; a permutation, so nothing accumulates
    return y


# A CPU GEMM pays a set-up the first time a process sees its shape (oneDNN's primitive and JIT kernel:
# 0.6-0.8 ms for a bf16 expert matmul that then takes 0.1-0.2 ms), and per-expert row counts change
# with every prompt: a process's first 512-token prefill of bench-0.47b ran 1.3x slower than its
# later ones. Padding each expert's rows up to one of this many sizes per octave (n in (2^j, 2^(j+1)]
# rounds up to a multiple of 2^j / ROW_STEPS_PER_OCTAVE; n <= ROW_STEPS_PER_OCTAVE stays) bounds
# the shapes a process meets, at most 1 / ROW_STEPS_PER_OCTAVE more rows per expert. 0: no padding.
ROW_STEPS_PER_OCTAVE = 4


def padded_rows(n: int) -> int:
    """n rows rounded up to the next of ROW_STEPS_PER_OCTAVE sizes per octave (n itself when small)."""
    if ROW_STEPS_PER_OCTAVE <= 0 or n <= ROW_STEPS_PER_OCTAVE:
        return n
    step = max(1, (1 << (n - 1).bit_length()) // (2 * ROW_STEPS_PER_OCTAVE))  # n in (2^j, 2^(j+1)]: 2^j / steps
    return -(-n // step) * step


def _padded_rows_index(rows: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """rows [P] (token of each pair, grouped by expert) spread out to [sum(padded)]: expert e's counts[e]
    rows, then padded[e] - counts[e] zeros (token 0's row, computed and dropped)."""
    if padded == counts:
        return rows
    starts, padded_starts, s, ps = [], [], 0, 0
    for n, m in zip(counts, padded):
        starts.append(s)
        padded_starts.append(ps)
        s, ps = s + n, ps + m
    shift = torch.tensor(padded_starts) - torch.tensor(starts)  # [E], how far each expert's rows move
    dest = torch.arange(rows.shape[0]) + shift.repeat_interleave(torch.tensor(counts), output_size=rows.shape[0])  # [P]
    index = rows.new_zeros(ps)  # [sum(padded)]
    index[dest.to(rows.device)] = rows
    return index


def dense_mlp(
    x: torch.Tensor,
    w13: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    w2: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU MLP (shared expert, dense layer): w2 @ (silu(gate x) * up x).

    x [T, H]; w13 is fused [2I, H] (gate rows first) or a (gate [I, H], up [I, H]) pair;
    w2 [H, I]. Returns [T, H] in x's dtype. One token runs kernels/cpu.c's kernel where it can.
    """
    if x.shape[0] == 1 and isinstance(w13, torch.Tensor) and (y := native.swiglu_vec(x, w13, w2)) is not None:
        return y.to(x.dtype)
    if isinstance(w13, (tuple, list)):
        gate, up = w13
        _check_dtypes(x, gate, up, w2)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), w2)
    _check_dtypes(x, w13, w2)
    return _swiglu(x, w13, w2)


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: x [n, H], w13 [2I, H], w2 [H, I] -> [n, H]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # [n, I] each; gate and up in one matmul
    return F.linear(F.silu(gate) * up, w2)


def _combine(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[:, j] * y[:, j]: y [T, k, H] -> [T, H], in float32, then y's dtype."""
    return combine_f32(y, weights).to(y.dtype)


def combine_f32(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[:, j] * y[:, j] in float32: y [T, k, H] (any float dtype), weights [T, k] -> [T, H].

    Slot by slot into one float32 accumulator (bf16/fp16 * fp32 promotes exactly): a fixed order, so
    deterministic, and without the [T, k, H] float32 temporary of (y * w).sum(1), which cost 3-12 ms
    per layer of a 512-token bf16 prefill (this: under 1 ms)."""
    w = weights.to(device=y.device, dtype=torch.float32)  # [T, k]
    out = torch.zeros(y.shape[0], y.shape[2], dtype=torch.float32, device=y.device)  # [T, H]
    for j in range(y.shape[1]):
        out.addcmul_(y[:, j], w[:, j : j + 1])
    return out


def _check(x, expert_ids, weights, gate_up, down) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"moe: x must be [T, H], got {tuple(x.shape)}")
    T, H = x.shape
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or weights.shape != expert_ids.shape:
        raise ValueError(
            f"moe: expert_ids and weights must both be [T, k] with T = {T}, "
            f"got {tuple(expert_ids.shape)} and {tuple(weights.shape)}"
        )
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise TypeError(f"moe: expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if expert_ids.shape[1] == 0:
        raise ValueError("moe: k (picks per token) must be at least 1")
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[2] != H or gate_up.shape[1] % 2:
        raise ValueError(f"moe: gate_up must be [E, 2I, H] with H = {H}, got {tuple(gate_up.shape)}")
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (E, H, I):
        raise ValueError(f"moe: down must be [E, H, I] = {(E, H, I)} to match gate_up, got {tuple(down.shape)}")
    _check_dtypes(x, gate_up, down)
    return T, expert_ids.shape[1]


def _check_dtypes(x: torch.Tensor, *ws: torch.Tensor) -> None:
    bad = [w.dtype for w in ws if w.dtype != x.dtype]
    if bad:
        raise TypeError(
            f"moe: x is {x.dtype} but weights are {bad[0]}; cast the weights once at load time "
            f"(or x) so that both have the same dtype"
        )


def _check_ids_in_range(ids, E: int) -> None:
    bad = sorted(e for e in ids if not 0 <= e < E)
    if bad:
        raise ValueError(f"moe: expert_ids {bad[:8]} are outside 0..{E - 1}")
