"""QLinear's CUDA modes (cuda_int8, cuda_int4) and kernels/qexperts.moe_device.

On the CPU: the mode choice for a CUDA device, torch's CUDA int4 packing (a tensor twin of its packing kernel,
checked against a line-by-line port of that kernel), the CUDA layouts built on the CPU and dequantised, the
int8 kernel's numbers (torch._weight_int8pack_mm also runs on the CPU), moe_device against the existing
quantized experts and without host syncs. Where CUDA is present: the same layouts built by torch's own ops and
the matmuls against the dequantised float weights, moe_device under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moge_cli.quant_format import Scheme
from moge_kernels import native
from moge_kernels import qlinear as ql
from moge_kernels.ops import _quantized_experts
from moge_kernels.qexperts import moe_device
from moge_kernels.qlinear import QLinear, choose_mode, dequantize, mode_and_reason, qlinear_nbytes
from test_ops import _q  # random quantized weights, as the ops tests make them

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
INT8 = Scheme(8, None, True)
INT4_SYM = Scheme(4, 32, True)
INT4_ASYM = Scheme(4, 64, False)
E, H, I = 8, 128, 64  # experts, hidden, expert width


def parts_of(shape: tuple[int, int], scheme: Scheme, experts: int = 1, seed: int = 0):
    """(q, scale, zero) of `experts` random weights [N, K], as test_ops makes them."""
    return _q(shape, scheme, experts, seed)


def qlinear(parts, scheme: Scheme, mode: str | None = None, device="cpu", kernel="native") -> QLinear:
    return QLinear(parts, scheme.bits, scheme.symmetric, torch.bfloat16, kernel, device=device, mode=mode)


def reference(parts) -> torch.Tensor:
    """The checkpoint's dequantisation, float32 [E, N, K]."""
    return torch.stack([dequantize(q, s, z).float() for q, s, z in parts])


# ---- which mode on a CUDA device -------------------------------------------------------------------
@pytest.fixture
def cuda_kernels(monkeypatch):
    """A CUDA build of torch on an sm90 device, as far as choose_mode asks."""
    monkeypatch.setattr(ql, "_has_cuda_kernel", lambda op: True)
    monkeypatch.setattr(ql, "_capability", lambda device: (9, 0))


@pytest.mark.parametrize(
    "bits, symmetric, n, k, groups, dtype, mode, why",
    [
        (8, True, 2688, 5120, 1, torch.bfloat16, "cuda_int8", ""),
        (8, True, 2688, 5120, 1, torch.float16, "cuda_int8", ""),
        (8, False, 2688, 5120, 1, torch.bfloat16, "dequant", "zero points"),
        (8, True, 2688, 5120, 40, torch.bfloat16, "dequant", "groups"),
        (4, False, 2688, 5120, 40, torch.bfloat16, "cuda_int4", ""),
        (4, True, 5120, 1344, 21, torch.bfloat16, "cuda_int4", ""),  # Pangu's expert down_proj, g64
        (4, True, 2688, 5120, 40, torch.float16, "dequant", "bfloat16 only"),
        (4, True, 2688, 5120, 10, torch.bfloat16, "dequant", "group size 512"),
        (4, True, 2684, 5120, 40, torch.bfloat16, "dequant", "N % 8"),
    ],
)
def test_mode_on_cuda(cuda_kernels, bits, symmetric, n, k, groups, dtype, mode, why):
    got, reason = mode_and_reason(bits, symmetric, n, k, groups, dtype, "native", "cuda")
    assert got == mode and why in reason and bool(reason) == bool(why)
    assert choose_mode(bits, symmetric, n, k, groups, dtype, "torch", "cuda:0") == mode
    assert mode_and_reason(bits, symmetric, n, k, groups, dtype, "dequant", "cuda")[0] == "dequant"


def test_mode_on_cuda_needs_the_kernels(monkeypatch):
    monkeypatch.setattr(ql, "_has_cuda_kernel", lambda op: False)
    monkeypatch.setattr(ql, "_capability", lambda device: (9, 0))
    assert mode_and_reason(8, True, 64, 64, 1, torch.bfloat16, "native", "cuda") == ("dequant", f"torch {torch.__version__} has no CUDA _weight_int8pack_mm (torch >= 2.9)")
    assert mode_and_reason(4, True, 64, 64, 2, torch.bfloat16, "native", "cuda")[0] == "dequant"
    monkeypatch.setattr(ql, "_has_cuda_kernel", lambda op: True)
    monkeypatch.setattr(ql, "_capability", lambda device: (7, 5))
    assert mode_and_reason(4, True, 64, 64, 2, torch.bfloat16, "native", "cuda") == ("dequant", "_weight_int4pack_mm needs compute capability 8.0 or newer")


def test_cpu_modes_do_not_move(cuda_kernels):
    """The CPU's choice is the one it was before devices entered (and no other device gets a CPU kernel)."""
    assert choose_mode(8, True, 64, 128, 1, torch.bfloat16, "native") == "int8"
    assert choose_mode(8, True, 64, 128, 1, torch.float32, "native") == "dequant"
    assert choose_mode(4, True, 64, 128, 4, torch.bfloat16, "torch") == "int4"
    assert mode_and_reason(8, True, 64, 128, 1, torch.bfloat16, "native", "mps") == ("dequant", "no integer kernel on mps")


# ---- torch's CUDA int4 packing, on the CPU -----------------------------------------------------------
def _kernel_port(u8: torch.Tensor, inner: int) -> torch.Tensor:
    """aten/src/ATen/native/cuda/int4mm.cu matrix_to_m16n8k16_Bint4_layout (the non-ROCm branch), line by line."""
    n, half = u8.shape
    out = torch.zeros(-(-n // 8), half * 2 // (inner * 16), 32, inner // 2, dtype=torch.int64)
    v = u8.tolist()
    for n_tile in range(out.shape[0]):
        for k_outer in range(out.shape[1]):
            for t in range(32):
                for inner_tile in range(0, inner, 2):
                    n0 = n_tile * 8 + t // 4
                    k_base0 = (k_outer * inner + inner_tile) * 16 // 2
                    ks = [k_base0 + t % 4, k_base0 + t % 4 + 4, k_base0 + 8 + t % 4, k_base0 + 8 + t % 4 + 4]
                    b = [v[n0][kk] if n0 < n and kk < half else 0 for kk in ks]
                    pack = (
                        ((b[3] & 0xF) << 28) | ((b[2] & 0xF) << 24) | ((b[1] & 0xF) << 20) | ((b[0] & 0xF) << 16)
                        | ((b[3] & 0xF0) << 8) | ((b[2] & 0xF0) << 4) | (b[1] & 0xF0) | ((b[0] & 0xF0) >> 4)
                    )
                    out[n_tile, k_outer, t, inner_tile // 2] = pack - (1 << 32) if pack >= 1 << 31 else pack
    return out.to(torch.int32)


@pytest.mark.parametrize("inner, k", [(2, 32), (2, 96), (4, 192), (8, 256)])
def test_tinygemm_pack_is_the_cuda_kernels(inner, k):
    q = torch.randint(-8, 8, (24, k), dtype=torch.int8, generator=torch.Generator().manual_seed(inner))
    u8 = ql._tinygemm_bytes(q)
    packed = ql._tinygemm_pack(u8, inner)
    assert torch.equal(packed, _kernel_port(u8, inner))
    assert packed.shape == torch._convert_weight_to_int4pack(u8.to("meta"), inner).shape


def test_tinygemm_unpack_reads_the_mma_fragments():
    """Word [nt, ko, lane, w] holds row 8 nt + lane // 4; nibble 0 is k = 2 (lane % 4) of its first k-tile, nibble 4
    the k after it (two values per bf16x2 register of mma.m16n8k16's B fragment)."""
    q = torch.randint(-8, 8, (16, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = _kernel_port(ql._tinygemm_bytes(q), 2)
    assert torch.equal(ql._tinygemm_unpack(packed).to(torch.int8) - 8, q)
    lane, word = 9, packed[0, 0, 9, 0].item()
    n, k = lane // 4, 2 * (lane % 4)
    assert word & 15 == q[n, k] + 8 and (word >> 16) & 15 == q[n, k + 1] + 8  # nibble 0 and nibble 4


@pytest.mark.parametrize("scheme", [INT4_SYM, INT4_ASYM], ids=["sym-g32", "asym-g64"])
@pytest.mark.parametrize("k", [192, 256])  # inner k-tiles 4, 8
def test_cuda_int4_layout_dequantises_as_the_checkpoint(scheme, k):
    parts = parts_of((48, k), scheme, experts=3)
    lin = qlinear(parts, scheme, mode="cuda_int4")
    assert lin.inner_k_tiles == (8 if k % 128 == 0 else 4)
    ref = reference(parts)
    # tinygemm stores m = -zero * scale in bfloat16: one more rounding than (q - zero) * scale, |m| <= 8 |scale|
    step = torch.stack([s.float() for _, s, _ in parts]).repeat_interleave(lin.group_size, dim=-1)  # [E, N, K]
    for e in range(3):
        assert (lin.dequantized(e) - ref[e]).abs().le(step[e] / 16).all()
    ids = torch.tensor([2, 0, 2])
    assert torch.equal(lin.dequantized_experts(ids, torch.bfloat16), torch.stack([lin.dequantized(e, torch.bfloat16) for e in (2, 0, 2)]))
    assert lin.nbytes == qlinear_nbytes("cuda_int4", 4, scheme.symmetric, 48, k, k // scheme.group_size, torch.bfloat16, experts=3)


def test_cuda_int8_kernel_matches_dequant_on_cpu():
    """cuda_int8's operands through torch._weight_int8pack_mm (which the CPU has too) against the dequantised GEMM."""
    parts = parts_of((96, 128), INT8, experts=2)
    lin, ref = qlinear(parts, INT8, mode="cuda_int8"), qlinear(parts, INT8, kernel="dequant")
    assert torch.equal(lin.dequantized(1, torch.bfloat16), ref.dequantized(1, torch.bfloat16))
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    for rows in (1, 3, 40):  # the int8 kernel under MANY_TOKENS, the dequantised GEMM at and above
        y, want = lin(x[:rows], None, 1), F.linear(x[:rows].float(), ref.dequantized(1))
        torch.testing.assert_close(y.float(), want, atol=0.02 * want.abs().max().item(), rtol=0.02)
    assert lin.nbytes == qlinear_nbytes("cuda_int8", 8, True, 96, 128, 1, torch.bfloat16, experts=2)


@pytest.mark.parametrize("mode", ["int8", "packed4", "int4", "dequant"])
def test_nbytes_counts_what_each_mode_holds(mode):
    scheme = INT8 if mode == "int8" else INT4_ASYM
    parts = parts_of((64, 256), scheme, experts=2)
    lin = qlinear(parts, scheme, mode=mode) if mode != "packed4" or native.available() else None
    if lin is None:
        pytest.skip("kernels._cpu not built")
    assert lin.nbytes == qlinear_nbytes(mode, scheme.bits, scheme.symmetric, 64, 256, 256 // (scheme.group_size or 256), torch.bfloat16, experts=2)


# ---- moe_device -------------------------------------------------------------------------------------
MODES = {"int8": ["int8", "cuda_int8", "dequant"], "int4-sym": ["packed4", "cuda_int4", "dequant"], "int4-asym": ["packed4", "cuda_int4", "dequant"]}
SCHEMES = {"int8": INT8, "int4-sym": INT4_SYM, "int4-asym": INT4_ASYM}
CASES = [(s, m) for s, modes in MODES.items() for m in modes]


def experts_of(scheme: Scheme, mode: str | None, device="cpu") -> tuple[QLinear, QLinear]:
    gate_up, down = parts_of((2 * I, H), scheme, E, seed=1), parts_of((H, I), scheme, E, seed=2)
    if mode is None:  # the existing path's own modes on this device
        return qlinear(gate_up, scheme, device=device), qlinear(down, scheme, device=device)
    return qlinear(gate_up, scheme, mode, device), qlinear(down, scheme, mode, device)


def routing(tokens: int, k: int = 2, device="cpu"):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    return x.to(device), ids.to(device), w.to(device)


@pytest.mark.parametrize("tokens", [1, 3, 64])  # 2 and 6 pairs <= E: the picked experts; 128 > E: every expert
@pytest.mark.parametrize("scheme, mode", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_moe_device_matches_quantized_experts(scheme, mode, tokens):
    if mode == "packed4" and not native.available():
        pytest.skip("kernels._cpu not built")
    x, ids, w = routing(tokens)
    want = _quantized_experts(x, ids, w, *experts_of(SCHEMES[scheme], None if mode == "cuda_int4" else mode))
    got = moe_device(x, ids, w, *experts_of(SCHEMES[scheme], mode))
    assert got.dtype == torch.float32 and got.shape == (tokens, H)
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0.02)


SYNCS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero", "cpu", "numpy")


@pytest.mark.parametrize("scheme, mode", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_moe_device_makes_no_host_sync(monkeypatch, scheme, mode):
    if mode == "packed4" and not native.available():
        pytest.skip("kernels._cpu not built")
    gate_up, down = experts_of(SCHEMES[scheme], mode)
    runs = [routing(tokens) for tokens in (1, 3, 64)]

    def sync(*args, **kwargs):
        raise AssertionError("a host sync in moe_device")

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    for x, ids, w in runs:
        moe_device(x, ids, w, gate_up, down)


# ---- on a CUDA device ------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("scheme", [INT8, INT4_SYM, INT4_ASYM], ids=["int8", "int4-sym-g32", "int4-asym-g64"])
def test_cuda_modes_match_the_dequantised_matmul(scheme):
    parts = parts_of((256, 512), scheme, experts=2)
    before = torch.cuda.memory_allocated()
    lin = qlinear(parts, scheme, device="cuda")
    held = torch.cuda.memory_allocated() - before
    assert lin.mode == ("cuda_int8" if scheme.bits == 8 else "cuda_int4"), lin.why
    assert lin.nbytes <= held <= lin.nbytes + 64 * 1024  # repacked once; the allocator rounds each tensor up
    w = reference(parts)[1].cuda()  # [N, K] float32
    torch.testing.assert_close(lin.dequantized(1), w, atol=float(w.abs().max()) / 64, rtol=0)
    x = torch.randn(64, 512, device="cuda").bfloat16()
    for rows in (1, 3, 15, 16, 64):  # the integer kernel under MANY_TOKENS, the dequantised GEMM at and above
        y, want = lin(x[:rows], None, 1), F.linear(x[:rows].float(), w)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 256)
        torch.testing.assert_close(y.float(), want, atol=0.02 * float(want.abs().max()), rtol=0.02)


@needs_cuda
@pytest.mark.parametrize("inner, k", [(2, 96), (4, 192), (8, 256)])
def test_int4pack_op_is_the_tensor_twin(inner, k):
    q = torch.randint(-8, 8, (24, k), dtype=torch.int8)
    u8 = ql._tinygemm_bytes(q)
    assert torch.equal(torch._convert_weight_to_int4pack(u8.cuda(), inner).cpu(), ql._tinygemm_pack(u8, inner))


@needs_cuda
@pytest.mark.parametrize("scheme", [INT8, INT4_ASYM], ids=["int8", "int4-asym"])
def test_moe_device_on_cuda_syncs_nothing(scheme):
    on_cpu = experts_of(scheme, "dequant")
    on_cuda = experts_of(scheme, None, device="cuda")
    assert on_cuda[0].mode.startswith("cuda_"), on_cuda[0].why
    for tokens in (1, 3, 64):
        x, ids, w = routing(tokens)
        want = _quantized_experts(x, ids, w, *on_cpu)
        args = [t.cuda() for t in (x, ids, w)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = moe_device(*args, *on_cuda)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(got.cpu(), want, atol=0.02 * float(want.abs().max()), rtol=0.02)


@pytest.mark.parametrize("scheme, mode", [("int8", "cuda_int8"), ("int4-asym", "cuda_int4"), ("int4-sym", "dequant")])
def test_moe_device_traces_under_compile(scheme, mode):
    """Under torch.compile the picked experts run as multiply-and-sum (for inductor to fuse the gather and the
    dequantisation into it): traced (backend "eager": dynamo's graph, run by torch), the same numbers."""
    torch._dynamo.reset()
    gate_up, down = experts_of(SCHEMES[scheme], mode)
    compiled = torch.compile(moe_device, backend="eager", fullgraph=True)
    for tokens in (1, 3):
        x, ids, w = routing(tokens)
        want = moe_device(x, ids, w, gate_up, down)
        torch.testing.assert_close(compiled(x, ids, w, gate_up, down), want, atol=0.02 * want.abs().max().item(), rtol=0.02)


def test_cuda_int8_forward_traces_under_compile():
    """cuda_int8 under torch.compile: a multiply-and-sum on the int8 weight cast, times the scales (for inductor to fuse)."""
    torch._dynamo.reset()
    parts = parts_of((96, 128), INT8, experts=2)
    lin = qlinear(parts, INT8, mode="cuda_int8")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    want = lin(x, None, 1)
    got = torch.compile(lin.forward, backend="eager", fullgraph=True)(x, None, 1)
    torch.testing.assert_close(got.float(), want.float(), atol=0.02 * want.abs().max().item(), rtol=0.02)
