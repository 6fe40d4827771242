"""Fast kernels against their slow float64 twins: routing, routed experts, dense MLP."""

# T tokens, E experts, G groups, K' picks per group, k = G*K', H hidden, I intermediate.

from __future__ import annotations

import pytest
import torch

from moge_kernels.experts import dense_mlp, moe_decode, moe_experts, moe_prefill
from moge_kernels.reference import dense_mlp_reference, moe_reference, route_reference
from moge_kernels.routing import route

# (E, G, K'): the release (8 groups of 8, one pick each), small MoGE shapes, plain top-k.
SHAPES = [(64, 8, 1), (8, 2, 2), (16, 4, 2), (16, 1, 4)]
H, I = 32, 16
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _experts(E: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5  # [E, 2I, H]
    down = torch.randn(E, H, I, generator=g) / I**0.5  # [E, H, I]
    return gate_up.to(dtype), down.to(dtype)


def _routed(T: int, E: int, G: int, K: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids, w = route(torch.randn(T, E, generator=g), G, K, torch.rand(E, generator=g) + 0.5)
    return x, ids, w


# ---- routing ---------------------------------------------------------------------------


@pytest.mark.parametrize("E,G,K", SHAPES)
@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("scale_shape", ["1E", "E"])
def test_route_matches_reference(E, G, K, T, scale_shape):
    g = torch.Generator().manual_seed(E * 100 + T)
    logits = torch.randn(T, E, generator=g) * 3
    scale = torch.rand(E, generator=g) + 0.5
    scale = scale.view(1, E) if scale_shape == "1E" else scale
    ids, w = route(logits, G, K, scale)
    ref_ids, ref_w = route_reference(logits, G, K, scale)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.shape == w.shape == (T, G * K)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_low_precision_logits(dtype):
    # bf16 logits repeat values often, so this exercises ties on real-looking inputs too.
    E, G, K = 16, 4, 2
    logits = (torch.randn(300, E, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    scale = torch.linspace(0.5, 1.5, E).to(dtype).view(1, E)
    ids, w = route(logits, G, K, scale)
    ref_ids, ref_w = route_reference(logits, G, K, scale)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("E,G,K", SHAPES)
def test_route_moge_invariant_and_column_order(E, G, K):
    T, per_group = 64, E // G
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(2))
    ids, w = route(logits, G, K, torch.ones(1, E))
    groups = (ids // per_group).view(T, G, K)  # [T, G, K']
    # exactly K' distinct experts per group, group-major columns
    assert torch.equal(groups, torch.arange(G).view(1, G, 1).expand(T, G, K))
    assert all(len(set(row)) == G * K for row in ids.tolist())
    # inside a group: descending probability
    probs = torch.softmax(logits, -1).gather(1, ids).view(T, G, K)
    assert bool((probs[..., :-1] >= probs[..., 1:]).all())
    # each pick beats every unpicked expert of its group
    masked = torch.softmax(logits, -1).scatter(1, ids, -1.0).view(T, G, per_group)
    assert bool((probs[..., -1] >= masked.max(-1).values).all())


def test_route_weights_are_scaled_probs_without_renormalisation():
    E, G, K = 16, 4, 2
    logits = torch.randn(5, E, generator=torch.Generator().manual_seed(3))
    scale = torch.rand(1, E, generator=torch.Generator().manual_seed(4)) + 0.5
    ids, w = route(logits, G, K, scale)
    expected = torch.softmax(logits, -1).gather(1, ids) * scale.view(E)[ids]
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)
    # all experts picked with scale 1: the weights are the full softmax, summing to 1
    _, w_all = route(logits, 1, E, torch.ones(E))
    torch.testing.assert_close(w_all.sum(-1), torch.ones(5))
    _, w_some = route(logits, G, K, torch.ones(E))
    assert bool((w_some.sum(-1) < 0.999).all())


def test_route_all_equal_logits_pick_lowest_indices():
    E, G, K = 64, 8, 2
    for logits in (torch.zeros(3, E), torch.full((3, E), 7.5, dtype=torch.bfloat16)):
        ids, w = route(logits, G, K, torch.ones(E))
        expected = torch.tensor([[g * 8 + j for g in range(G) for j in range(K)]] * 3)
        assert torch.equal(ids, expected)
        torch.testing.assert_close(w, torch.full((3, G * K), 1 / E))


def test_route_duplicate_values_inside_a_group():
    # group 0: 5 at 1, 2, 3 -> 1, 2; group 1: 7 at 6, then 2 at 4, 5, 7 -> 4.
    logits = torch.tensor([[0.0, 5, 5, 5, 2, 2, 7, 2], [1.0, 1, 1, 1, 3, 9, 3, 9]])
    ids, _ = route(logits, 2, 2, torch.ones(8))
    assert ids.tolist() == [[1, 2, 6, 4], [0, 1, 5, 7]]
    assert torch.equal(ids, route_reference(logits, 2, 2, torch.ones(8))[0])
    # many random rows with forced duplicates: a big tie pool in every group
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 3, (200, 16), generator=g).float()
    ids, _ = route(logits, 4, 2, torch.ones(16))
    assert torch.equal(ids, route_reference(logits, 4, 2, torch.ones(16))[0])


def test_route_is_pure():
    logits = torch.randn(4, 16)
    scale = torch.rand(1, 16)
    before = (logits.clone(), scale.clone())
    first = route(logits, 4, 2, scale)
    second = route(logits, 4, 2, scale)
    assert torch.equal(logits, before[0]) and torch.equal(scale, before[1])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    "args",
    [
        (3, 1, torch.ones(16)),  # 3 does not divide 16
        (4, 5, torch.ones(16)),  # 5 picks from groups of 4
        (4, 0, torch.ones(16)),
        (4, 1, torch.ones(15)),  # wrong scale length
    ],
)
def test_route_rejects_bad_settings(args):
    with pytest.raises(ValueError):
        route(torch.randn(2, 16), *args)


# ---- routed experts --------------------------------------------------------------------

PATHS = {"decode": moe_decode, "prefill": moe_prefill, "auto": moe_experts}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("E,G,K", SHAPES)
@pytest.mark.parametrize("T", [0, 1, 2, 23])
def test_moe_matches_reference_float32(path, E, G, K, T):
    x, ids, w = _routed(T, E, G, K, seed=T)
    gate_up, down = _experts(E)
    out = PATHS[path](x, ids, w, gate_up, down)
    assert out.shape == (T, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, moe_reference(x, ids, w, gate_up, down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_matches_reference_low_precision(path, dtype):
    E, G, K = 64, 8, 1
    x, ids, w = _routed(19, E, G, K, dtype=dtype, seed=7)
    gate_up, down = _experts(E, dtype)
    out = PATHS[path](x, ids, w, gate_up, down)
    ref = moe_reference(x, ids, w, gate_up, down)
    assert out.dtype == dtype
    # a few bf16 roundings inside each expert: relative to the output's scale
    atol = 2e-2 * ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 50])
def test_decode_and_prefill_agree(dtype, T):
    x, ids, w = _routed(T, 16, 4, 2, dtype=dtype, seed=11)
    gate_up, down = _experts(16, dtype)
    dec = moe_decode(x, ids, w, gate_up, down)
    pre = moe_prefill(x, ids, w, gate_up, down)
    # same matmuls on the same rows, same combine: equal up to BLAS kernel choice
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dec, pre, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", PATHS)
def test_moe_is_deterministic(path):
    x, ids, w = _routed(40, 64, 8, 1, dtype=torch.bfloat16, seed=13)
    gate_up, down = _experts(64, torch.bfloat16)
    runs = [PATHS[path](x, ids, w, gate_up, down) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("path", PATHS)
def test_moe_experts_without_tokens_and_crowded_experts(path):
    # every token to experts 3 and 60: 62 experts idle, two experts with all tokens
    E, T = 64, 9
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(17))
    ids = torch.tensor([[3, 60]] * T)
    w = torch.rand(T, 2, generator=torch.Generator().manual_seed(18))
    gate_up, down = _experts(E)
    out = PATHS[path](x, ids, w, gate_up, down)
    torch.testing.assert_close(out, moe_reference(x, ids, w, gate_up, down), rtol=1e-5, atol=1e-5)
    # idle experts are never read: poisoning them changes nothing
    poisoned_gu, poisoned_dn = gate_up.clone(), down.clone()
    idle = [e for e in range(E) if e not in (3, 60)]
    poisoned_gu[idle] = float("nan")
    poisoned_dn[idle] = float("nan")
    assert torch.equal(PATHS[path](x, ids, w, poisoned_gu, poisoned_dn), out)


@pytest.mark.parametrize("path", PATHS)
def test_moe_repeated_expert_in_one_token(path):
    # route never picks an expert twice, but the kernels must still add both slots
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(19))
    ids = torch.tensor([[5, 5, 1], [1, 2, 5], [0, 0, 0], [7, 6, 5]])
    w = torch.rand(4, 3, generator=torch.Generator().manual_seed(20))
    gate_up, down = _experts(8)
    out = PATHS[path](x, ids, w, gate_up, down)
    torch.testing.assert_close(out, moe_reference(x, ids, w, gate_up, down), rtol=1e-5, atol=1e-5)


def test_combine_accumulates_in_float32():
    # the k weighted expert outputs are summed in float32 and rounded to bf16 once:
    # within one bf16 rounding of the exact sum (a bf16 sum would be off by several)
    from moge_kernels.experts import _combine

    g = torch.Generator().manual_seed(31)
    y = torch.randn(64, 8, 256, generator=g).bfloat16()  # [T, k, H]
    w = torch.rand(64, 8, generator=g)
    out = _combine(y, w)
    exact = (y.double() * w.double().unsqueeze(-1)).sum(1)
    step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)  # bf16 spacing at |exact|
    assert out.dtype == torch.bfloat16
    assert bool(((out.double() - exact).abs() <= step * 0.5 + exact.abs() * 2**-20).all())


def test_moe_gate_rows_come_first():
    # expert 0 with up = 0: the output must vanish; with gate = 0 it must too (silu(0) = 0)
    x = torch.randn(3, H)
    ids, w = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    gate_up, down = _experts(1)
    no_up = gate_up.clone()
    no_up[:, I:] = 0
    assert torch.equal(moe_prefill(x, ids, w, no_up, down), torch.zeros(3, H))
    only_gate = moe_prefill(x, ids, w, gate_up, down)
    gu = gate_up[0]
    expected = (torch.nn.functional.silu(x @ gu[:I].T) * (x @ gu[I:].T)) @ down[0].T
    torch.testing.assert_close(only_gate, expected, rtol=1e-5, atol=1e-6)


def test_moe_experts_dispatch(monkeypatch):
    from moge_kernels import experts

    calls = []
    monkeypatch.setattr(experts.native, "moe_vec", lambda *a: calls.append("native"))  # returns None: "cannot run here"
    monkeypatch.setattr(experts, "moe_decode", lambda *a: calls.append("decode"))
    monkeypatch.setattr(experts, "moe_prefill", lambda *a: calls.append("prefill"))
    k = 8
    small = experts.DECODE_MAX_PAIRS // k
    for T in (1, small, small + 1, 512):
        ids = torch.zeros(T, k, dtype=torch.long)
        experts.moe_experts(torch.zeros(T, H), ids, ids.float(), *_experts(1))
    assert calls == ["native", "decode", "decode", "prefill", "prefill"]


def test_prefill_gemms_meet_few_row_counts():
    """Issue 16: a process's first prefill paid a GEMM set-up for every new per-expert row count (and counts
    change with every prompt). Padded, five prompts' 512 x 8 pairs over 64 experts meet a handful of counts,
    each covering its expert's rows by at most 1 / ROW_STEPS_PER_OCTAVE more, with the same output."""
    from moge_kernels import experts

    E, T, k = 64, 512, 8
    seen: set[int] = set()
    real: set[int] = set()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k]
        x = torch.randn(T, H, generator=g)
        real |= set(torch.bincount(ids.reshape(-1), minlength=E).tolist())
        y = experts.by_expert_many(x, ids, E, lambda xe, e: seen.add(xe.shape[0]) or xe * (e + 1))
        expected = x.repeat_interleave(k, 0) * (ids.reshape(-1, 1) + 1)  # [P, H]: row of pair p times its expert + 1
        assert torch.equal(y, expected)
    assert len(seen) <= 2 * experts.ROW_STEPS_PER_OCTAVE < len(real)
    assert all(n <= experts.padded_rows(n) <= n * (1 + 1 / experts.ROW_STEPS_PER_OCTAVE) for n in range(1, 4097))
    assert [experts.padded_rows(n) for n in range(1, experts.ROW_STEPS_PER_OCTAVE + 1)] == list(range(1, experts.ROW_STEPS_PER_OCTAVE + 1))


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_moe_rejects_bad_inputs(path):
    f = PATHS[path]
    x, ids, w = _routed(3, 8, 2, 2)
    gate_up, down = _experts(8)
    with pytest.raises(TypeError):
        f(x, ids, w, gate_up.bfloat16(), down.bfloat16())  # dtype mismatch
    with pytest.raises(ValueError):
        f(x, ids + 8, w, gate_up, down)  # ids out of range
    with pytest.raises(ValueError):
        f(x, ids - 9, w, gate_up, down)
    with pytest.raises(ValueError):
        f(x, ids, w[:, :1], gate_up, down)
    with pytest.raises(ValueError):
        f(x, ids, w, gate_up, down.transpose(1, 2))


# ---- dense MLP (shared expert, mlp_only layers) ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_mlp_fused_and_split(dtype):
    g = torch.Generator().manual_seed(21)
    Is = 24
    x = torch.randn(6, H, generator=g).to(dtype)
    gate = (torch.randn(Is, H, generator=g) / H**0.5).to(dtype)
    up = (torch.randn(Is, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(H, Is, generator=g) / Is**0.5).to(dtype)
    fused = dense_mlp(x, torch.cat([gate, up]), w2)
    split = dense_mlp(x, (gate, up), w2)
    ref = dense_mlp_reference(x, (gate, up), w2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert fused.dtype == dtype and fused.shape == (6, H)
    torch.testing.assert_close(fused.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(split.float(), ref.float(), rtol=tol, atol=tol)



# ---- CUDA ------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("E,G,K", SHAPES)
def test_route_cuda_matches_cpu(E, G, K):
    logits = torch.randint(0, 4, (257, E), generator=torch.Generator().manual_seed(23)).float()
    scale = torch.rand(1, E) + 0.5
    ids, w = route(logits.cuda(), G, K, scale.cuda())
    ref_ids, ref_w = route_reference(logits, G, K, scale)
    assert ids.is_cuda and torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu().double(), ref_w, rtol=1e-5, atol=1e-7)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 300])
def test_moe_cuda(dtype, T):
    x, ids, w = _routed(T, 64, 8, 1, dtype=dtype, seed=29)
    gate_up, down = _experts(64, dtype)
    x, ids, w, gate_up, down = (t.cuda() for t in (x, ids, w, gate_up, down))
    ref = moe_reference(x, ids, w, gate_up, down)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # TF32 may be on for fp32 matmuls
    for f in (moe_decode, moe_prefill, moe_experts):
        runs = [f(x, ids, w, gate_up, down) for _ in range(2)]
        assert runs[0].is_cuda and torch.equal(runs[0], runs[1])
        atol = tol * ref.float().abs().max().item()
        torch.testing.assert_close(runs[0].float(), ref.float(), rtol=tol, atol=atol)
    x2 = torch.randn(5, H, device="cuda", dtype=dtype)
    w13 = torch.cat([gate_up[0, :I], gate_up[0, I:]])
    torch.testing.assert_close(
        dense_mlp(x2, w13, down[0]).float(), dense_mlp_reference(x2, w13, down[0]).float(), rtol=tol, atol=tol
    )
