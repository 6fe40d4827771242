"""The model, generate, profile, quantize --calib and the memory plan on CUDA (issue 16); skipped without CUDA.

Each test takes a few seconds on a GPU. MOGE_CUDA_TEST_DEVICE=cpu runs the same tests on the CPU (a dry run
of the test code where no GPU is lent; the CUDA-only checks skip there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moge_cli import memory_plan as mp
from moge_cli.checkpoint import open_checkpoint
from moge_cli.cli import app
from moge_cli.loader import load_model
from moge_cli.reference_model import reference_logits
from moge_converters.quantize_pipeline import quantize_checkpoint

DEVICE = os.environ.get("MOGE_CUDA_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs CUDA")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="a CUDA-only check")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_DIR, TRAINED_DIR = FIXTURES / "tiny-moge", FIXTURES / "tiny-trained"
IDS = torch.tensor([1, 13, 24, 22, 7, 300, 41, 5, 99, 17, 250, 3])
runner = CliRunner()


def moge(*args: object) -> dict:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[int, Path]:
    """The trained fixture quantized to int8 and int4 (on the CPU: rounding is the CPU's anyway)."""
    root = tmp_path_factory.mktemp("q")
    out = {}
    for bits in (8, 4):
        out[bits] = root / f"int{bits}"
        quantize_checkpoint(TRAINED_DIR, out[bits], bits=bits)
    return out


def load_quantized_on_device(path: Path, dtype: str):
    """The quantized model on DEVICE (its QLinears repacked there: cuda_int8 / cuda_int4 where they fit)."""
    return load_model(path, dtype=dtype, device=DEVICE)


# ---- the model -------------------------------------------------------------------------------------
def test_logits_match_the_float64_reference_and_the_cpu():
    """float32 on the device: prefill and one-token-at-a-time decode within 1e-4 of the reference, and of the CPU."""
    model = load_model(TINY_DIR, dtype="float32", device=DEVICE)
    ids = IDS.to(DEVICE)[None]
    ref = reference_logits(open_checkpoint(TINY_DIR), None, IDS)  # [T, V] float64
    with torch.inference_mode():
        prefill = model(ids)[0]
        cache = model.new_cache(1, len(IDS))
        steps = torch.cat([model(ids[:, t : t + 1], cache)[0] for t in range(len(IDS))])
    assert prefill.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(prefill.double().cpu(), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(steps.double().cpu(), ref, atol=1e-4, rtol=0)
    cpu = load_model(TINY_DIR, dtype="float32")(IDS[None])[0]
    torch.testing.assert_close(prefill.cpu(), cpu, atol=1e-4, rtol=0)


def test_bf16_logits_close_to_the_cpu():
    model, cpu = load_model(TINY_DIR, device=DEVICE), load_model(TINY_DIR)
    got, want = model(IDS.to(DEVICE)[None])[0].cpu(), cpu(IDS[None])[0]
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bfloat16 sums in another order
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


# ---- generate ----------------------------------------------------------------------------------------
def test_greedy_tokens_equal_the_cpus_on_the_trained_fixture():
    prompt = (TRAINED_DIR / "heldout.txt").read_text(encoding="utf-8")[:200]
    args = ["generate", TRAINED_DIR, "--prompt", prompt, "-n", "32", "--json"]
    on_device, on_cpu = moge(*args, "--device", DEVICE), moge(*args, "--device", "cpu")
    assert on_device["generated_ids"] == on_cpu["generated_ids"] and len(on_cpu["generated_ids"]) > 8
    assert on_device["memory_plan"]["device"] == DEVICE and on_device["memory_plan"]["fits"] is True


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoints_generate_and_agree_with_the_cpu(quantized, bits):
    """int8 / int4 in bfloat16 (the int kernels' dtype): the next token of every prompt position agrees with
    the CPU's quantized model at >= 90% of positions, and `moge generate --device` runs."""
    model = load_quantized_on_device(quantized[bits], "bfloat16")
    ids = torch.tensor(load_tokenizer_ids(200))
    got = model(ids.to(DEVICE)[None])[0].argmax(-1).cpu()
    want = load_model(quantized[bits], dtype="bfloat16")(ids[None])[0].argmax(-1)
    assert (got == want).float().mean() >= 0.9
    out = moge("generate", quantized[bits], "--prompt-ids", ",".join(map(str, ids[:16].tolist())), "-n", "16", "--dtype", "bfloat16",
               "--device", DEVICE, "--json")  # fmt: skip
    assert len(out["generated_ids"]) > 0 and out["memory_plan"]["quantization"].startswith(f"int{bits}")


def load_tokenizer_ids(n: int) -> list[int]:
    from moge_cli.tokenizer import load_tokenizer

    text = (TRAINED_DIR / "heldout.txt").read_text(encoding="utf-8")
    return load_tokenizer(TRAINED_DIR).encode(text, add_bos=True)[:n]


# ---- profile and quantize --calib ---------------------------------------------------------------------
def test_profile_runs_on_the_device():
    args = ["profile", TINY_DIR, "--prompt-ids", "1,2,3,4,5,6,7,8", "-n", "8", "--dtype", "float32", "--json"]
    report = moge(*args, "--device", DEVICE)
    assert report["device"].startswith(DEVICE.split(":")[0]) and len(report["generated_ids"]) == 8
    want = moge(*args)["generated_ids"]
    assert report["generated_ids"] == want


def test_quantize_calib_on_the_device(tmp_path):
    """--calib runs the model on --device; the result equals the CPU's calibration up to a few rounding ties."""
    common = ["--bits", "4", "--method", "mse", "--calib", TRAINED_DIR / "heldout.txt", "--calib-tokens", "256", "--json"]
    moge("quantize", TRAINED_DIR, tmp_path / "dev", *common, "--device", DEVICE)
    moge("quantize", TRAINED_DIR, tmp_path / "cpu", *common)
    dev, cpu = open_checkpoint(tmp_path / "dev"), open_checkpoint(tmp_path / "cpu")
    assert set(dev.tensors) == set(cpu.tensors)
    packed = [n for n in cpu.tensors if n.endswith("weight_packed")]
    same = sum(int(torch.equal(dev.tensor(n), cpu.tensor(n))) for n in packed)
    assert same >= 0.9 * len(packed), f"{same} of {len(packed)} packed weights equal"


# ---- the memory plan ------------------------------------------------------------------------------------
def test_memory_plan_counts_what_the_device_holds():
    plan = mp.plan_memory(open_checkpoint(TINY_DIR), device=DEVICE, context=64, prompt_tokens=8)
    if ON_CUDA:
        free, total = torch.cuda.mem_get_info(torch.device(DEVICE))
        assert 0 < plan.available_bytes <= total and abs(plan.available_bytes - free) < total // 10
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(DEVICE)
    model = load_model(TINY_DIR, device=DEVICE)
    held = sum(p.nbytes for p in model.parameters())
    assert plan.weights_bytes == held
    if ON_CUDA:  # the allocator rounds each tensor up to 512 bytes
        allocated = torch.cuda.memory_allocated(DEVICE) - before
        assert held <= allocated <= held + 512 * sum(1 for _ in model.parameters())
    cache = model.new_cache(1, 64)
    assert plan.kv_cache_bytes == cache.k.nbytes + cache.v.nbytes


@pytest.mark.parametrize("bits", [8, 4])
def test_memory_plan_of_quantized_weights_on_the_device(quantized, bits):
    """The plan counts the layout each weight is repacked to on the device (choose_mode, qlinear_nbytes)."""
    plan = mp.plan_memory(open_checkpoint(quantized[bits]), device=DEVICE, dtype="bfloat16", context=64, available=1 << 40)
    model = load_quantized_on_device(quantized[bits], "bfloat16")
    held = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert plan.weights_bytes == held


# ---- decode without host round-trips ---------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("path", ["cuda graph", "op by op"])
def test_decode_step_is_sync_free(path):
    model = load_model(TINY_DIR, device=DEVICE)
    if path == "op by op":
        model._plan = None  # no whole-step plan: every op launched from Python
    cache = model.new_cache(1, 32)
    token = torch.ones(1, 1, dtype=torch.long, device=DEVICE)
    with torch.inference_mode():
        model(IDS[None].to(DEVICE), cache)  # prefill, may sync
        model(token, cache)  # a first step: lazy set-up (RoPE tables, plans) may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                logits = model(token, cache)
                token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1], on the device
        finally:
            torch.cuda.set_sync_debug_mode(0)


@cuda_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_steps_match_op_by_op_steps(dtype):
    """Decode steps replayed from the captured graph give the op-by-op steps' logits and cache; one capture
    per cache, a new cache captures again."""
    from moge_kernels.cuda_graph import GraphStep

    graphed, eager = load_model(TRAINED_DIR, dtype=dtype, device=DEVICE), load_model(TRAINED_DIR, dtype=dtype, device=DEVICE)
    eager._plan = None
    tol = dict(atol=1e-4, rtol=0) if dtype == "float32" else dict(atol=5e-2, rtol=0)
    for round_ in (1, 2):
        a, b = graphed.new_cache(1, 64), eager.new_cache(1, 64)
        ids = IDS[None].to(DEVICE)
        with torch.inference_mode():
            graphed(ids, a)
            eager(ids, b)
            token = torch.tensor([[7]], device=DEVICE)
            for _ in range(6):
                la, lb = graphed(token, a), eager(token, b)
                torch.testing.assert_close(la, lb, **tol)
                token = lb[:, -1].argmax(-1, keepdim=True)
        assert a.length == b.length == IDS.numel() + 6
        torch.testing.assert_close(a.k[..., : a.length, :].float(), b.k[..., : b.length, :].float(), **tol)
        assert type(graphed._plan) is GraphStep and graphed._plan.failed is None and graphed._plan.captures == round_
