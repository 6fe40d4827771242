"""Quantized checkpoints at run time: QLinear kernels against dequantised weights, load_model, decode, generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moge_converters.quantize import QTensor, quantize
from moge_converters.quantize_pipeline import quantize_checkpoint
from moge_kernels import native
from moge_cli.synthetic import write_checkpoint, write_tensors
from moge_cli.checkpoint import open_checkpoint
from moge_cli.cli import app
from moge_cli.config import MoGEConfig
from moge_cli.quant_format import Scheme, quantization_of, read_module
from moge_cli.loader import load_model, load_quantized, qlinear
from moge_kernels.gemm import MANY_TOKENS
from moge_kernels.ops import moe as routed_experts
from moge_kernels.qlinear import QLinear, dequantize

TINY = MoGEConfig.from_name("tiny-moge")
runner = CliRunner()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_checkpoint(TINY, tmp_path_factory.mktemp("src") / "ck", tokenizer=False)


def parts_of(w: torch.Tensor, scheme: Scheme, dtype=torch.bfloat16):
    t: QTensor = quantize(w, scheme, dtype)
    return t.q, t.scale, t.zero


BF16_U = 2.0**-8  # bfloat16's unit roundoff (8 significant bits): rounding to nearest moves a value by at most 2^-8 of it


def _gamma(n: int) -> float:
    """The classic bound on n float32 roundings in a sum: it moves by at most gamma_n * sum |terms|."""
    e = n * 2.0**-24
    return e / (1 - e)


def _kernel_path(lin: QLinear, rows: int) -> str:
    """Which computation QLinear.forward runs for `rows` tokens (its dispatch, restated)."""
    if lin.mode in ("int8", "packed4") and rows == 1 and native.available():
        return "native"  # kernels/cpu.c on the stored integers
    if lin.mode == "int4":
        return "int4mm"  # torch._weight_int4pack_mm_for_cpu, for every row count
    if lin.mode == "int8" and rows < MANY_TOKENS:
        return "int8mm"  # torch._weight_int8pack_mm
    return "gemm"  # dequantise the weight as stored (bfloat16), one GEMM


def _exact_and_bound(lin: QLinear, rows: int, x: torch.Tensor, q, scale, zero) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bound): the exact (float64) result of what the kernel computes, and a derived bound on |out - y|.

    Every path multiplies the bfloat16 x by an effective weight W with float32 sums and rounds the
    result to bfloat16 once, so with y = x @ W.T and A = |x| @ |W|.T:
        |out - y| <= u |y| + (1 + u) (activation error + gamma_2K * A),   u = 2^-8.
    gamma_2K (about 8e-6 for K = 64) covers the K float32 additions plus scale products, conversions
    and the final reduction; the bfloat16 rounding of the output (u, ~0.4%) dominates. For the
    int4 words kernel A runs over the unsigned integers and the zero points, which it sums apart.
    The effective W per path:
      gemm    dequantize(q, scale, zero) in bfloat16: (q - zero) * scale rounded once, the numbers
              QLinear.dequantized gives (native.dequant's, or the torch ops');
      int8mm  q * scale exactly (the bfloat16 scale applied in float32);
      int4mm  q * scale + m, m = -zero * scale rounded to bfloat16 (torch's int4 kernel takes
              [scale, m] pairs in the model's dtype: quantized._scales_and_zeros);
      native  (q - zero) * scale exactly, against x rounded to integers per block: int16 on
              max|x| / 32767 per 128 values (int8 weights), int8 on max|x| / 127 per 32 values (int4
              words). Each x_k moves by at most half a step: activation error sum_k |W_k| step_k / 2.
    """
    path = _kernel_path(lin, rows)
    n, k = q.shape
    gs = k // scale.shape[1]
    s = scale.double().repeat_interleave(gs, 1)
    z = torch.zeros_like(s) if zero is None else zero.double().repeat_interleave(gs, 1)
    x64 = x.double()
    if path == "gemm":
        w = dequantize(q, scale, zero).double()
    elif path == "int4mm":
        zf = torch.zeros_like(scale, dtype=torch.float32) if zero is None else zero.float()
        m = (-zf * scale.float()).to(scale.dtype)
        w = q.double() * s + m.double().repeat_interleave(gs, 1)
    else:
        w = (q.double() - z) * s
    y = x64 @ w.t()
    a = x64.abs() @ w.abs().t()
    act = torch.zeros_like(y)
    if path == "native":
        levels, block = (32767, 128) if lin.mode == "int8" else (127, 32)
        block = min(block, k)
        half_step = x64.abs().reshape(rows, k // block, block).amax(-1).repeat_interleave(block, 1) / (2 * levels)
        act = half_step @ w.abs().t()
        if lin.mode == "packed4":
            a = x64.abs() @ ((q.double() + 8) * s + (z + 8) * s).t()
    return y, BF16_U * y.abs() + (1 + BF16_U) * (act + _gamma(2 * k) * a)


@pytest.mark.parametrize("scheme", [Scheme(8, None, True), Scheme(4, 32, False), Scheme(4, 64, True)])
@pytest.mark.parametrize("rows", [1, 3, 20])  # decode, a few tokens, and the many-token (prefill) path
def test_qlinear_kernels_match_the_dequantised_weight(scheme, rows):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(48, 64, generator=g) / 8 for _ in range(2)]
    parts = [parts_of(w, scheme) for w in ws]
    x = torch.randn(rows, 64, generator=g).bfloat16()
    native_mode = "int8" if scheme.bits == 8 else "packed4" if native.available() else "int4"
    for kernel, mode in (("native", native_mode), ("torch", "int8" if scheme.bits == 8 else "int4"), ("dequant", "dequant")):
        lin = qlinear(parts, scheme, torch.bfloat16, kernel)
        assert lin.mode == mode and lin.num_experts == 2
        for e in range(2):
            got = lin(x, e=e)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, 48)
            want, bound = _exact_and_bound(lin, rows, x, *parts[e])
            err = (got.double() - want).abs()
            assert bool((err <= bound).all()), (kernel, mode, _kernel_path(lin, rows), e, float((err / bound).max()))
    # float32 models always dequantise: the bfloat16 weight as stored, one float32 GEMM (sums only)
    lin = qlinear(parts, scheme, torch.float32, "torch")
    assert lin.mode == "dequant"
    w = dequantize(*parts[1]).double()
    got = lin(x.float(), e=1).double()
    assert bool(((got - x.double() @ w.t()).abs() <= _gamma(2 * 64) * (x.double().abs() @ w.abs().t())).all())


def test_int4_kernel_needs_16_row_blocks():
    parts = [parts_of(torch.randn(8, 64), Scheme(4, 32, False))]
    assert qlinear(parts, Scheme(4, 32, False), torch.bfloat16, "torch").mode == "dequant"
    with pytest.raises(Exception, match="kernel"):
        qlinear(parts, Scheme(4, 32, False), torch.bfloat16, "gpu")


def _dequantised_checkpoint(qdir: Path, out: Path) -> Path:
    """The float checkpoint holding moge's dequantisation of every quantized weight: the reference model."""
    ck = open_checkpoint(qdir)
    quant = quantization_of(ck)
    tensors = {}
    for name in ck.tensors:
        module, _, suffix = name.rpartition(".")
        if module in quant.modules and suffix.startswith("weight_"):
            if suffix == "weight_packed":
                tensors[f"{module}.weight"] = dequantize(*read_module(ck, module, quant.modules[module]))
        else:
            tensors[name] = ck.tensor(name).clone()
    ck.close()
    return write_tensors(TINY, out, tensors, dtype="bfloat16")


@pytest.mark.parametrize("opts", [dict(bits=4), dict(bits=8), dict(bits=4, symmetric=True, embeddings=True, lm_head=True),
                                  dict(bits=4, exclude=("*.k_proj*",))])  # fmt: skip
def test_quantized_model_is_the_dequantised_model(src, tmp_path, opts):
    """float32: every weight the runtime uses is exactly moge's (= compressed-tensors') dequantisation."""
    quantize_checkpoint(src, tmp_path / "q", **opts)
    ref = load_model(_dequantised_checkpoint(tmp_path / "q", tmp_path / "ref"), dtype="float32")
    model = load_model(tmp_path / "q", dtype="float32")
    assert all(isinstance(getattr(model.layers[0].mlp, w), QLinear) for w in ("gate_up", "down", "shared_w13", "shared_w2"))  # quantized weights in place
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=1e-5)
    if "exclude" in opts:  # q/k/v mix schemes: dequantised once into a plain weight
        assert isinstance(model.layers[0].self_attn.qkv_weight, torch.nn.Parameter)
    else:
        assert isinstance(model.layers[0].self_attn.qkv_weight, QLinear)


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_bf16_decode_with_cache_follows_prefill(src, tmp_path, kernel):
    quantize_checkpoint(src, tmp_path / "q", bits=4, lm_head=True)
    ck = open_checkpoint(tmp_path / "q")
    model = load_quantized(ck, quantization_of(ck), kernel=kernel)  # bfloat16, like the checkpoint's scales
    ck.close()
    assert model.dtype == torch.bfloat16
    modes = {m.mode for m in model.modules() if isinstance(m, QLinear)}
    if kernel == "torch":
        assert modes == {"int4"}  # tiny widths are multiples of 16 and the groups 32 / 64
    elif native.available():  # widths of 64 take kernels/cpu.c's words, the expert width 32 torch's kernel
        assert modes == {"int4", "packed4"} and not model.native_decode
    ids = torch.randint(0, TINY.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache(1, 16)
    model(ids[:, :7], cache=cache)
    steps = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(7, 10)], dim=1)
    torch.testing.assert_close(steps, full[:, 7:], atol=0.1, rtol=0.05)


def test_experts_no_token_reaches_are_skipped():
    E, H, I = 4, 32, 16
    g = torch.Generator().manual_seed(3)
    scheme = Scheme(8, None, True)
    gate_up = qlinear([parts_of(torch.randn(2 * I, H, generator=g) / 4, scheme, torch.float32) for _ in range(E)], scheme, torch.float32, "torch")
    down = qlinear([parts_of(torch.randn(H, I, generator=g) / 4, scheme, torch.float32) for _ in range(E)], scheme, torch.float32, "torch")
    x = torch.randn(5, H, generator=g)
    ids = torch.tensor([[0, 2]] * 5)  # experts 1 and 3 get nothing
    w = torch.rand(5, 2, generator=g)
    got = routed_experts(x, ids, w, gate_up, down)
    want = torch.zeros(5, H)
    for t in range(5):
        for j, e in enumerate(ids[t].tolist()):
            w13 = gate_up.dequantized(e)
            h = torch.nn.functional.silu(x[t] @ w13[:I].t()) * (x[t] @ w13[I:].t())
            want[t] += w[t, j] * (h @ down.dequantized(e).t())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    many = torch.randint(0, 2, (40, 2), generator=g) * 2  # the sorted (prefill) grouping, still only 0 and 2
    assert routed_experts(x.repeat(8, 1), many, torch.rand(40, 2), gate_up, down).shape == (40, H)


def test_generate_and_profile_run_quantized(src, tmp_path, monkeypatch):
    import moge_cli.profiling

    monkeypatch.setattr(moge_cli.profiling, "measure_read_bandwidth", lambda device: 1e10)  # not what is tested here
    out = tmp_path / "q"
    quantize_checkpoint(src, out, bits=8)
    res = runner.invoke(app, ["generate", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["generated_ids"]) == 4
    res = runner.invoke(app, ["profile", str(out), "--prompt-ids", "1,2,3,4", "--decode", "3", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["decode"]["tokens_per_s"] > 0
    assert report["decode"]["components"]["routed_experts"]["seconds"] > 0


def test_load_quantized_refuses_other_devices_and_kernels(src, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(src, out, bits=8)
    ck = open_checkpoint(out)
    with pytest.raises(Exception, match="CPU or CUDA"):
        load_quantized(ck, quantization_of(ck), device="meta")
    with pytest.raises(Exception, match="kernel"):
        load_quantized(ck, quantization_of(ck), kernel="magic")
    ck.close()


@pytest.mark.parametrize("bits, native_decode", [(8, True), (4, False)])
def test_int8_decode_runs_on_the_c_kernels_and_agrees_with_torch(src, tmp_path, monkeypatch, bits, native_decode):
    """int8 per-channel weights decode through kernels/cpu.c; int4 too where every width fits its words,
    but tiny-moge's expert width 32 does not, so its experts keep torch's int4 kernel and torch's threads."""
    if not native.available():
        pytest.skip("kernels._cpu not built")
    quantize_checkpoint(src, tmp_path / "q", bits=bits, lm_head=True)
    model = load_model(tmp_path / "q")
    assert model.native_decode is native_decode
    assert (model.decode_plan() is not None) is native_decode  # the whole C step too: torch's int4 weights decline it
    ids = torch.randint(0, TINY.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))

    def decode(flag: str) -> torch.Tensor:
        monkeypatch.setenv("MOGE_NATIVE", flag)
        cache = model.new_cache(1, 16)
        model(ids[:, :6], cache=cache)
        return torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(6, 10)], dim=1)

    torch.testing.assert_close(decode("1"), decode("0"), atol=0.05, rtol=0.05)
