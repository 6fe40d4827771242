"""The memory plan (moge_cli.memory_plan): its figures against what a loaded model and generate really hold,
`moge generate` refusing a model that does not fit before reading any weight, and the 72B skeleton's plan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moge_cli import memory_plan as mp
from moge_cli.checkpoint import Checkpoint, open_checkpoint
from moge_cli.cli import app
from moge_cli.config import MoGEConfig
from moge_cli.errors import UsageError
from moge_cli.generate import generate
from moge_cli.loader import load_model
from moge_cli.synthetic import write_checkpoint, write_skeleton
from moge_converters.quantize_pipeline import quantize_checkpoint
from moge_converters.quantize_plan import QuantOptions
from moge_kernels import native
from moge_kernels.qlinear import QLinear

TINY_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
TINY = MoGEConfig.from_name("tiny-moge")
runner = CliRunner()

QUANTIZED = {  # name -> quantize_checkpoint options
    "int8": dict(bits=8),
    "int4": dict(bits=4),  # asymmetric, group 128 fitted to the tiny widths
    "int4-sym-g32": dict(bits=4, group_size=32, symmetric=True),
    "int4-embeddings-head": dict(bits=4, embeddings=True, lm_head=True),  # embeddings dequantised at load, lm_head a QLinear
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plans")
    out = {"bf16": TINY_DIR}
    out["tied-stacked-fp32"] = write_checkpoint(
        dataclasses.replace(TINY, tie_word_embeddings=True), root / "tied", layout="stacked", dtype="float32", tokenizer=False
    )
    for name, opts in QUANTIZED.items():
        out[name] = root / name
        quantize_checkpoint(TINY_DIR, out[name], **opts)
    return out


def held_bytes(model: torch.nn.Module) -> int:
    """What the loaded model holds: every parameter and buffer once (a tied lm_head is the embedding;
    a QLinear's weight, scales and zeros are its parameters, its per-expert lists views of them)."""
    return sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())


# ---- weights: the plan counts exactly what loading holds ----------------------------------------
@pytest.mark.parametrize(
    "name, dtype",
    [("bf16", None), ("bf16", "float32"), ("bf16", "float16"), ("tied-stacked-fp32", None), ("tied-stacked-fp32", "bfloat16"),
     ("int8", None), ("int4", None), ("int4-sym-g32", None), ("int4-embeddings-head", None),
     ("int8", "float32"), ("int4", "float32")],  # quantized at float32: the stored integers (mode dequant)
)  # fmt: skip
def test_weight_bytes_equal_the_loaded_model(checkpoints, name, dtype):
    model = load_model(checkpoints[name], dtype=dtype)
    plan = mp.plan_memory(open_checkpoint(checkpoints[name]), dtype=dtype, context=64, prompt_tokens=8, available=1 << 40)
    assert plan.dtype == str(model.dtype).removeprefix("torch.")
    assert plan.weights_bytes == held_bytes(model)
    assert (plan.quantization is None) == (model.quantization is None)


def test_the_leaves_that_become_qlinears_are_the_loaders():
    from moge_cli.loader import LINEAR_PARAMS

    assert mp.QUANTIZED_LEAVES == tuple(LINEAR_PARAMS)


def test_int4_in_torchs_packing_counted_too(checkpoints, monkeypatch):
    """Without the C extension int4 runs on torch's own packing (mode int4): other scale bytes, same count."""
    monkeypatch.setenv("MOGE_NATIVE", "0")
    model = load_model(checkpoints["int4"])
    assert {q.mode for q in model.modules() if isinstance(q, QLinear)} >= {"int4"}
    plan = mp.plan_memory(open_checkpoint(checkpoints["int4"]), context=64, available=1 << 40)
    assert plan.weights_bytes == held_bytes(model)


@pytest.mark.parametrize("opts", QUANTIZED.values(), ids=QUANTIZED.keys())
def test_planning_a_quantization_equals_planning_its_output(checkpoints, opts):
    """plan_memory(quantize=...) on the float checkpoint (quantize's plan, no data) = the plan of what quantize wrote."""
    name = next(n for n, o in QUANTIZED.items() if o is opts)
    what_if = mp.plan_memory(open_checkpoint(TINY_DIR), quantize=QuantOptions(**opts), context=64, available=1 << 40)
    written = mp.plan_memory(open_checkpoint(checkpoints[name]), context=64, available=1 << 40)
    assert what_if.weights_bytes == written.weights_bytes and what_if.quantization == written.quantization


# ---- KV cache: the cache generate allocates --------------------------------------------------------
@pytest.mark.parametrize("prompt, new", [(5, 7), (500, 100)])  # (500, 100): clamped to the 512-token context
def test_kv_cache_bytes_equal_the_cache_generate_allocates(prompt, new):
    model = load_model(TINY_DIR)
    made = []
    new_cache = model.new_cache
    model.new_cache = lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]
    list(generate(model, [1] * prompt, max_new_tokens=new))
    context = mp.cache_tokens(TINY.max_position_embeddings, prompt, new)
    plan = mp.plan_memory(open_checkpoint(TINY_DIR), context=context, prompt_tokens=prompt, available=1 << 40)
    allocated = sum(c.k.nbytes + c.v.nbytes for c in made)
    assert len(made) == 1 and plan.kv_cache_bytes == allocated and plan.context_tokens == made[0].max_len


def test_default_context_is_new_caches():
    from moge_cli.model import DEFAULT_MAX_LEN

    assert mp.DEFAULT_CONTEXT == DEFAULT_MAX_LEN
    model = load_model(TINY_DIR)
    plan = mp.plan_memory(open_checkpoint(TINY_DIR), available=1 << 40)
    cache = model.new_cache()
    assert cache.max_len == min(TINY.max_position_embeddings, DEFAULT_MAX_LEN)
    assert plan.context_tokens == cache.max_len and plan.kv_cache_bytes == cache.k.nbytes + cache.v.nbytes


# ---- the whole figure and the refusal --------------------------------------------------------------
def test_needed_is_the_sum_and_the_check_says_the_figures():
    plan = mp.plan_memory(open_checkpoint(TINY_DIR), context=100, prompt_tokens=10, available=1 << 40)
    assert plan.needed_bytes == plan.weights_bytes + plan.kv_cache_bytes + plan.activation_bytes + plan.reserve_bytes
    assert plan.reserve_bytes == mp.RESERVE_BYTES + int(mp.RESERVE_FRACTION * plan.weights_bytes)
    assert plan.fits is True
    plan.check()
    small = dataclasses.replace(plan, available_bytes=plan.needed_bytes - 1)
    assert small.fits is False
    with pytest.raises(UsageError, match=r"does not fit: it needs .* \(weights .* \+ KV cache .* for 100 tokens .*\), cpu has .* free"):
        small.check()
    assert dataclasses.replace(plan, available_bytes=None).fits is None  # unknown: no check
    assert json.loads(json.dumps(plan.to_dict()))["needed_bytes"] == plan.needed_bytes


def test_mem_available_reads_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       1000 kB\nMemFree:         10 kB\nMemAvailable:     600 kB\n")
    assert mp.mem_available(str(f)) == 600 * 1024
    assert mp.mem_available(str(tmp_path / "none")) is None


def no_reads(monkeypatch):
    """Any tensor read, or any load, fails the test."""

    def refuse(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(Checkpoint, "tensor", refuse)
    monkeypatch.setattr(Checkpoint, "raw", refuse)
    monkeypatch.setattr("moge_cli.loader.load_model", refuse)


def test_generate_refuses_a_model_that_does_not_fit_before_reading_it(monkeypatch):
    monkeypatch.setattr(mp, "free_bytes", lambda device: 1_000_000)
    no_reads(monkeypatch)
    r = runner.invoke(app, ["generate", str(TINY_DIR), "--prompt-ids", "1,2,3", "-n", "4"])
    assert r.exit_code == 2, r.output
    assert "does not fit" in r.stderr and "needs" in r.stderr and "KV cache" in r.stderr and "cpu has 1.0 MB free" in r.stderr


def test_generate_json_has_the_memory_plan():
    r = runner.invoke(app, ["generate", str(TINY_DIR), "--prompt-ids", "1,2,3", "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["memory_plan"]
    plan = mp.plan_memory(open_checkpoint(TINY_DIR), context=7, prompt_tokens=3, available=got["available_bytes"])
    assert got == plan.to_dict() and got["fits"] is True


# ---- the 72B skeleton: a plan from headers alone ------------------------------------------------------
@pytest.fixture(scope="module")
def skeleton(tmp_path_factory) -> Path:
    return write_skeleton(MoGEConfig.from_name("pangu-pro-moe-72b"), tmp_path_factory.mktemp("skel") / "pangu")


def pangu_counts(cfg: MoGEConfig) -> dict[str, int]:
    """Elements of the 72B config by how they load: quantizable linear weights (and their output rows), the
    embedding and lm_head, biases (model dtype), and what stays float32 (norms, router gate and scale)."""
    assert not cfg.mlp_only_layers and not cfg.tie_word_embeddings
    H, V, L, E, I, Is = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = {  # output rows -> input columns of each linear weight
        "q": (q, H), "k": (kv, H), "v": (kv, H), "o": (H, q), "experts_gate_up": (E * 2 * I, H), "experts_down": (E * H, I),
        "shared_gate_up": (2 * Is, H), "shared_down": (H, Is),
    }  # fmt: skip
    return {
        "linear": L * sum(n * k for n, k in per_layer.values()),
        "rows": L * sum(n for n, _ in per_layer.values()),
        "groups": L * sum(n * (k // (128 if k % 128 == 0 else 64)) for n, k in per_layer.values()),  # quantize's fit_scheme
        "embed_head": 2 * V * H,
        "bias": L * (q + 2 * kv + H),
        "float32": L * (2 * H + E * H + E) + H,
    }


def test_72b_skeleton_plans_without_reading_data(skeleton, monkeypatch):
    no_reads(monkeypatch)
    ckpt = open_checkpoint(skeleton)
    cfg = ckpt.config
    c = pangu_counts(cfg)
    bf16 = mp.plan_memory(ckpt, device="cuda:0", context=4096, prompt_tokens=16, available=141 * 10**9)
    assert bf16.weights_bytes == 2 * (c["linear"] + c["embed_head"] + c["bias"]) + 4 * c["float32"]
    assert bf16.kv_cache_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4096 * 2
    assert 140e9 < bf16.weights_bytes < 150e9 and bf16.fits is False  # 144 GB does not fit one 141 GB H200
    assert "cuda:0 has 141.0 GB free" in bf16.summary()

    int8 = mp.plan_memory(ckpt, device="cuda:0", context=4096, prompt_tokens=16, available=141 * 10**9, quantize=QuantOptions(bits=8))
    assert int8.weights_bytes == c["linear"] + 2 * c["rows"] + 2 * (c["embed_head"] + c["bias"]) + 4 * c["float32"]
    assert 70e9 < int8.weights_bytes < 80e9 and int8.fits is True  # ~72 GB of int8 (embeddings, lm_head stay bf16)

    int4 = mp.plan_memory(ckpt, device="cpu", context=4096, prompt_tokens=16, available=80 * 10**9, quantize=QuantOptions(bits=4))
    per_group = 5 if native.available() else 4  # packed4: float32 scale + uint8 zero; torch's int4: two bf16
    assert int4.weights_bytes == c["linear"] // 2 + per_group * c["groups"] + 2 * (c["embed_head"] + c["bias"]) + 4 * c["float32"]
    assert 36e9 < int4.weights_bytes < 44e9 and int4.fits is True


def test_generate_refuses_the_72b_skeleton(skeleton, monkeypatch):
    monkeypatch.setattr(mp, "free_bytes", lambda device: 60 * 10**9)
    no_reads(monkeypatch)
    r = runner.invoke(app, ["generate", str(skeleton), "--prompt-ids", "1,2,3", "-n", "4"])
    assert r.exit_code == 2, r.output
    assert "error: the model does not fit" in r.stderr and "weights 144." in r.stderr and "cpu has 60.0 GB free" in r.stderr


def test_a_float_checkpoints_plan_never_imports_torch():
    """`moge load` (torch-free) can show the plan of a float checkpoint: headers and config only."""
    import subprocess
    import sys

    code = ("import sys; from moge_cli.checkpoint import open_checkpoint; from moge_cli.memory_plan import plan_memory; "
            f"p = plan_memory(open_checkpoint({str(TINY_DIR)!r}), device='cpu'); assert p.weights_bytes > 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
