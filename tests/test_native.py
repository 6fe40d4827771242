"""kernels/cpu.c (through kernels/native.py) against the torch paths it replaces for one token."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moge_kernels import native
from moge_kernels.experts import dense_mlp, moe_decode
from moge_kernels.routing import route
from moge_cli.model import MoGEForCausalLM, rms_norm

pytestmark = pytest.mark.skipif(not native.available(), reason="kernels._cpu not built or this CPU lacks AVX2/FMA")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _rand(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(1, 8), (3, 5), (37, 130), (1536, 1024), (4099, 64)])  # odd sizes hit the scalar tails
@pytest.mark.parametrize("bias", [False, True])
def test_linear_vec_matches_torch(dtype, n, k, bias):
    x, w = _rand(1, 1, k, dtype=dtype, seed=1), _rand(n, k, dtype=dtype, scale=k**-0.5, seed=2)
    b = _rand(n, dtype=dtype, seed=3) if bias else None
    y = native.linear_vec(x, w, b)
    assert y.shape == (1, 1, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E, k, H, I", [(64, 8, 256, 64), (8, 1, 40, 12), (16, 4, 1024, 256)])
def test_moe_vec_matches_torch_decode(dtype, E, k, H, I):
    x = _rand(1, H, dtype=dtype, seed=4)
    gate_up, down = _rand(E, 2 * I, H, dtype=dtype, scale=H**-0.5, seed=5), _rand(E, H, I, dtype=dtype, scale=I**-0.5, seed=6)
    ids = torch.randperm(E, generator=torch.Generator().manual_seed(7))[:k][None]
    ids[0, -1] = ids[0, 0]  # the same expert twice is allowed and counted twice
    weights = torch.rand(1, k, generator=torch.Generator().manual_seed(8))
    y = native.moe_vec(x, ids, weights, gate_up, down)
    assert y.shape == (1, H) and y.dtype == torch.float32
    torch.testing.assert_close(y.to(dtype).float(), moe_decode(x, ids, weights, gate_up, down).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_vec_is_dense_mlp(dtype):
    x, w13, w2 = _rand(1, 96, dtype=dtype, seed=9), _rand(2 * 48, 96, dtype=dtype, scale=0.1, seed=10), _rand(96, 48, dtype=dtype, scale=0.1, seed=11)
    gate, up = w13.chunk(2)
    expected = F.linear(F.silu(F.linear(x.float(), gate.float())) * F.linear(x.float(), up.float()), w2.float())
    torch.testing.assert_close(native.swiglu_vec(x, w13, w2), expected, **TOL[dtype])
    torch.testing.assert_close(dense_mlp(x, w13, w2).float(), expected.to(dtype).float(), **TOL[dtype])


def test_out_of_range_expert_id_raises():
    gate_up, down = torch.zeros(4, 8, 16), torch.zeros(4, 16, 4)
    with pytest.raises(ValueError, match="outside 0..3"):
        native.moe_vec(torch.zeros(1, 16), torch.tensor([[1, 4]]), torch.ones(1, 2), gate_up, down)


def test_same_bits_with_any_thread_count():
    x, w = _rand(1, 1024, dtype=torch.float32, seed=12), _rand(4096, 1024, dtype=torch.float32, seed=13)
    gate_up, down = _rand(16, 512, 1024, dtype=torch.bfloat16, seed=14), _rand(16, 1024, 256, dtype=torch.bfloat16, seed=15)
    ids, wts = torch.tensor([[3, 9, 1, 15]]), torch.rand(1, 4)
    results = []
    try:
        for threads in (1, 2, 3):
            native._cpu.set_threads(threads)
            results.append((native.linear_vec(x, w), native.moe_vec(x.bfloat16(), ids, wts, gate_up, down)))
    finally:
        native._cpu.set_threads(1)
    for lin, moe in results[1:]:
        assert torch.equal(lin, results[0][0]) and torch.equal(moe, results[0][1])


def test_concurrent_callers_get_the_same_results():
    """Kernels called from several Python threads at once: one job holds the pool, the others run alone."""
    from concurrent.futures import ThreadPoolExecutor

    x, w = _rand(1, 1024, dtype=torch.bfloat16, seed=16), _rand(2048, 1024, dtype=torch.bfloat16, seed=17)
    gate_up, down = _rand(16, 512, 1024, dtype=torch.float32, seed=18), _rand(16, 1024, 256, dtype=torch.float32, seed=19)
    ids, wts = torch.tensor([[2, 7, 11, 5]]), torch.rand(1, 4)
    expected = (native.linear_vec(x, w), native.moe_vec(x.float(), ids, wts, gate_up, down))
    native._cpu.set_threads(2)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: (native.linear_vec(x, w), native.moe_vec(x.float(), ids, wts, gate_up, down)), range(40)))
    finally:
        native._cpu.set_threads(1)
    for lin, moe in results:
        assert torch.equal(lin, expected[0]) and torch.equal(moe, expected[1])


@pytest.mark.parametrize(
    "case",
    ["two tokens", "float16", "not contiguous", "dtype mismatch"],
)
def test_declines_what_it_cannot_run(case):
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    if case == "two tokens":
        x = torch.randn(2, 64)
    elif case == "float16":
        x, w = x.half(), w.half()
    elif case == "not contiguous":
        w = torch.randn(64, 32).t()
    else:
        w = w.bfloat16()
    assert native.linear_vec(x, w) is None


def test_decode_threads_lends_torchs_threads_to_the_kernels():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with native.decode_threads():
            assert torch.get_num_threads() == 1
            with native.decode_threads():  # nested: no change
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with native.decode_threads(active=False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_forward_context_lends_the_threads_for_one_cpu_token_of_kernel_weights_only():
    from moge_kernels.decode_step import forward_context

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cases = [(1, "cpu", True, 1), (2, "cpu", True, 2), (1, "meta", True, 2), (1, "cpu", False, 2)]  # ..., torch's threads inside
        for tokens, device, native_weights, threads in cases:
            with forward_context(tokens, torch.device(device), native_weights):
                assert torch.get_num_threads() == threads, (tokens, device, native_weights)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_moge_native_0_turns_it_off_and_forked_children_still_compute():
    """MOGE_NATIVE=0 is the switch benchmarks use for the torch baseline; a fork after the pool started works."""
    code = (
        "import os, torch; from moge_kernels import native\n"
        "assert native.available() == (os.environ['MOGE_NATIVE'] != '0')\n"
        "x, w = torch.randn(1, 256), torch.randn(512, 256)\n"
        "y = native.linear_vec(x, w)\n"
        "if y is not None:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(0 if torch.allclose(native.linear_vec(x, w), x @ w.T, atol=1e-4) else 1)\n"
        "    assert os.waitpid(pid, 0)[1] == 0, 'child failed'\n"
    )
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOGE_NATIVE": flag}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_vec_matches_torch(dtype, monkeypatch):
    x, w = _rand(1, 1, 1000, dtype=dtype, scale=3.0, seed=20), _rand(1000, dtype=torch.float32, seed=21)
    y = native.rms_norm_vec(x, w, 1e-6)
    monkeypatch.setenv("MOGE_NATIVE", "0")
    torch.testing.assert_close(y.float(), rms_norm(x, w, 1e-6).float(), **TOL[dtype])


@pytest.mark.parametrize("groups, picks", [(8, 1), (2, 2), (4, 3), (1, 4)])
def test_route_vec_is_route_with_ties(groups, picks, monkeypatch):
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(1, 48, generator=g)
    logits[0, 5:9] = logits[0, 5]  # exact ties inside a group: the lowest index wins
    logits[0, 30] = logits[0, 25] = logits[0, 40]
    scale = torch.rand(48, generator=g) + 0.5
    ids, weights = native.route_vec(logits, groups, picks, scale)
    monkeypatch.setenv("MOGE_NATIVE", "0")
    ref_ids, ref_weights = route(logits, groups, picks, scale)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (6, 1)])
def test_decode_with_native_attention_matches_torch(dtype, heads, kv_heads, monkeypatch):
    """Whole-model decode through the cache: every one-token kernel on against all off, same logits."""
    from moge_cli.config import PRESETS, MoGEConfig

    cfg = MoGEConfig.from_dict({**PRESETS["tiny-moge"], "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": 96})
    torch.manual_seed(23)
    model = MoGEForCausalLM.from_config(cfg, dtype=dtype, device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])

    feed = [7, 2, 9, 4, 4, 1, 8, 3, 5, 0, 6, 2]  # the same tokens for both (bf16 greedy paths may part at near-ties)

    def decode(flag: str) -> torch.Tensor:
        monkeypatch.setenv("MOGE_NATIVE", flag)
        cache = model.new_cache(1, 64)
        logits = [model(prompt, cache)[:, -1]]
        for t in feed:
            logits.append(model(torch.tensor([[t]]), cache)[:, -1])
        return torch.cat(logits)

    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(decode("1"), decode("0"), **tol)


def test_cast_bf16_f16_is_torchs_cast_bit_for_bit():
    special = torch.tensor([0.0, -0.0, 1e-8, -6e-5, 65280.0, 65536.0, -70000.0, 3e38, float("inf"), float("-inf"), float("nan"), 1 / 3])
    x = torch.cat([special, torch.randn(1000) * 300, torch.randn(37) * 1e5]).bfloat16()  # an odd length: the scalar tail too
    y = torch.empty(x.numel(), dtype=torch.float16)
    n = native.cast_bf16_f16(x, y)
    assert torch.equal(y.view(torch.int16), x.to(torch.float16).view(torch.int16))  # NaN and inf bits included
    xf = x.float()
    assert n == int(((xf.abs() > 65504) & xf.isfinite()).sum()) > 0


def test_cast_file_bf16_f16_reads_and_casts_like_torch(tmp_path):
    x = torch.cat([torch.randn(300_000) * 3e4, torch.tensor([7e4, -1e5, float("inf"), float("nan")])]).bfloat16()
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 10 + x.view(torch.uint8).numpy().tobytes())  # an odd offset: pread takes any
    fd = os.open(path, os.O_RDONLY)
    try:
        y = torch.empty(x.numel(), dtype=torch.float16)
        n = native.cast_file_bf16_f16(fd, 10, y)
        assert torch.equal(y.view(torch.int16), x.to(torch.float16).view(torch.int16))
        xf = x.float()
        assert n == int(((xf.abs() > 65504) & xf.isfinite()).sum())
        with pytest.raises(OSError):  # the file ends before n values
            native.cast_file_bf16_f16(fd, 12, y)
    finally:
        os.close(fd)
