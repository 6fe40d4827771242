"""The runtime model (moge_cli.model) against the float64 reference, through the cache, across layouts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moge_cli.synthetic import write_checkpoint
from moge_cli.checkpoint import open_checkpoint
from moge_cli.config import MoGEConfig
from moge_cli.errors import CheckpointError, UsageError
from moge_cli.loader import load_model
from moge_cli.model import MoGEForCausalLM
from moge_cli.reference_model import reference_logits

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=32, max_position_embeddings=128,
    rope_theta=10000.0, torch_dtype="float32",
)  # fmt: skip
SHAPES = {
    "G2-K2": dict(BASE, num_experts=8, num_experts_per_tok=4, num_expert_groups=2),  # 2 groups of 4, 2 picks each
    "G8-K1": dict(BASE, num_experts=16, num_experts_per_tok=8, rope_theta=1e6),  # 8 groups of 2, 1 pick each
    "dense": dict(BASE, num_hidden_layers=3, num_experts=8, num_experts_per_tok=4, mlp_only_layers=[1],
                  intermediate_size=48),  # fmt: skip
    "GQA-4to1": dict(BASE, num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, hidden_size=64),
    "no-shared": dict(BASE, num_experts=8, num_experts_per_tok=4, shared_expert_intermediate_size=0),
    "no-experts": dict(BASE, num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, intermediate_size=48),
}
IDS = torch.tensor([[5, 17, 3, 90, 42, 42, 7, 61, 0, 33, 12]])  # [1, T]


def make(tmp_path_factory, shape: str, layout: str = "per-expert", dtype: str = "float32") -> Path:
    """A seed-1 random checkpoint (written once per session); stacked ones sharded, to cover that too."""
    out = tmp_path_factory.getbasetemp() / f"{shape}-{layout}-{dtype}"
    if not (out / "config.json").exists():
        shard = 40_000 if layout == "stacked" else None
        cfg = MoGEConfig.from_dict(SHAPES[shape])
        write_checkpoint(cfg, out, seed=1, dtype=dtype, layout=layout, max_shard_bytes=shard, tokenizer=False)
    return out


@pytest.fixture(scope="module", params=list(SHAPES))
def ckpt_dir(request, tmp_path_factory) -> Path:
    return make(tmp_path_factory, request.param)


def test_prefill_matches_reference(ckpt_dir):
    model = load_model(ckpt_dir)
    ckpt = open_checkpoint(ckpt_dir)
    assert model.config == ckpt.config and model.dtype == torch.float32
    logits = model(IDS)
    assert logits.shape == (1, IDS.shape[1], model.config.vocab_size) and logits.dtype == torch.float32
    ref = reference_logits(ckpt, ckpt.config, IDS[0])
    torch.testing.assert_close(logits[0].double(), ref, atol=1e-4, rtol=0)


def test_incremental_decode_matches_full_sequence(ckpt_dir):
    model = load_model(ckpt_dir)
    full = model(IDS)
    cache = model.new_cache(batch_size=1, max_len=32)
    steps = [model(IDS[:, :4], cache=cache)] + [model(IDS[:, t : t + 1], cache=cache) for t in range(4, IDS.shape[1])]
    assert cache.length == IDS.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    # a multi-token chunk that continues a cache (bottom-right causal mask)
    cache.reset()
    chunks = [model(IDS[:, :3], cache=cache), model(IDS[:, 3:8], cache=cache), model(IDS[:, 8:], cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=0)


def test_steps_at_device_positions_match_the_full_sequence(ckpt_dir):
    """step_at (what a CUDA graph captures: the position a tensor, every cache row masked by it) gives the
    logits and the cache of the usual steps, and of the float64 reference."""
    model = load_model(ckpt_dir)
    full = model(IDS)
    usual, static = model.new_cache(batch_size=1, max_len=16), model.new_cache(batch_size=1, max_len=16)
    model(IDS[:, :4], cache=usual)
    model(IDS[:, :4], cache=static)
    assert model.static_positions(static)
    steps = []
    for t in range(4, IDS.shape[1]):
        steps.append(model.step_at(IDS[:, t : t + 1], torch.tensor([static.length]), static))
        static.length += 1
        model(IDS[:, t : t + 1], cache=usual)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], atol=1e-4, rtol=0)
    n = IDS.shape[1]
    torch.testing.assert_close(static.k[:, :, :, :n], usual.k[:, :, :, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(static.v[:, :, :, :n], usual.v[:, :, :, :n], atol=1e-5, rtol=0)
    ckpt = open_checkpoint(ckpt_dir)
    ref = reference_logits(ckpt, ckpt.config, IDS[0])  # [T, V] float64
    torch.testing.assert_close(torch.cat(steps, dim=1)[0].double(), ref[4:], atol=1e-4, rtol=0)


def test_static_positions_refuses_dynamic_rope_past_the_trained_length(tmp_path_factory):
    """Dynamic NTK rows depend on the call's length: a captured step cannot hold them."""
    model = load_model(make(tmp_path_factory, "G2-K2"))
    assert model.static_positions(model.new_cache(1, 256))
    model.config = MoGEConfig.from_dict(dict(SHAPES["G2-K2"], rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert model.static_positions(model.new_cache(1, 128)) and not model.static_positions(model.new_cache(1, 129))
    assert not model.static_positions(model.new_cache(2, 16))  # one sequence only


def greedy(model: MoGEForCausalLM, prompt: torch.Tensor, n: int, use_cache: bool) -> list[int]:
    ids, out = prompt, []
    cache = model.new_cache() if use_cache else None
    step = prompt
    for _ in range(n):
        logits = model(step if use_cache else ids, cache=cache)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        step = ids[:, -1:]
    return out


def test_greedy_tokens_identical_with_and_without_cache(tmp_path_factory):
    model = load_model(make(tmp_path_factory, "G8-K1"))
    assert greedy(model, IDS[:, :5], 12, use_cache=True) == greedy(model, IDS[:, :5], 12, use_cache=False)


def test_batch_rows_match_single_sequences(tmp_path_factory):
    model = load_model(make(tmp_path_factory, "GQA-4to1"))
    batch = torch.cat([IDS, IDS.flip(1)])  # [2, T]
    cache = model.new_cache(batch_size=2)
    both = torch.cat([model(batch[:, :6], cache=cache), model(batch[:, 6:], cache=cache)], dim=1)
    for row in range(2):
        torch.testing.assert_close(both[row], model(batch[row : row + 1])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["G2-K2", "dense"])
def test_per_expert_and_stacked_give_the_same_logits(tmp_path_factory, shape):
    per_expert = load_model(make(tmp_path_factory, shape, "per-expert"))
    stacked_dir = make(tmp_path_factory, shape, "stacked")
    assert open_checkpoint(stacked_dir).layout == "stacked" and len(open_checkpoint(stacked_dir).files) > 1
    assert torch.equal(load_model(stacked_dir)(IDS), per_expert(IDS))
    stacked = open_checkpoint(stacked_dir)
    ref = reference_logits(stacked, None, IDS[0, :4])  # the reference reads stacked too
    torch.testing.assert_close(per_expert(IDS[:, :4])[0].double(), ref, atol=1e-4, rtol=0)
    state = {name: stacked.tensor(name) for name in stacked.tensors}  # and a plain state dict
    assert torch.equal(reference_logits(state, stacked.config, IDS[0, :4]), ref)


def test_bfloat16_load_runs_and_is_close(tmp_path_factory):
    path = make(tmp_path_factory, "G2-K2")
    full = load_model(path)
    half = load_model(path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.layers[0].mlp.gate_up.dtype == torch.bfloat16
    long_ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))  # prefill upcasts
    a, b = full(long_ids), half(long_ids)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().mean() < 0.05 * a.abs().mean()
    cache = half.new_cache()
    steps = torch.cat([half(long_ids[:, :20], cache=cache)] + [half(long_ids[:, t : t + 1], cache=cache) for t in range(20, 40)], 1)
    assert (steps - b).abs().mean() < 0.05 * b.abs().mean()
    assert load_model(make(tmp_path_factory, "G2-K2", dtype="bfloat16")).dtype == torch.bfloat16  # dtype=None
    assert load_model(path, dtype="float16")(IDS).isfinite().all()


def test_from_config_on_meta_holds_no_storage():
    cfg = MoGEConfig.from_dict(SHAPES["dense"])
    model = MoGEForCausalLM.from_config(cfg, "bfloat16", "meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.layers[0].mlp.gate_up.shape == (8, 32, 32) and model.layers[0].mlp.down.shape == (8, 32, 16)
    assert model.layers[1].mlp.w13.shape == (96, 32)


def test_cache_overflow_and_bad_ids_raise(tmp_path_factory):
    model = load_model(make(tmp_path_factory, "G2-K2"))
    cache = model.new_cache(max_len=8)
    model(IDS[:, :6], cache=cache)
    with pytest.raises(UsageError, match="cache"):
        model(IDS[:, :3], cache=cache)
    with pytest.raises(UsageError, match="vocabulary"):
        model(torch.tensor([[96]]))
    assert model.new_cache().max_len == 128  # max_position_embeddings below the 4096 cap


def test_missing_or_unexpected_tensors_raise(tmp_path_factory, tmp_path):
    src = make(tmp_path_factory, "G2-K2")
    ckpt = open_checkpoint(src)
    del ckpt.tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match="missing.*experts.3.up_proj"):
        load_model(ckpt)
    ckpt = open_checkpoint(src)
    ckpt.tensors["model.layers.0.self_attn.q_proj.weight_scale"] = ckpt.tensors["model.norm.weight"]
    with pytest.raises(CheckpointError, match="unexpected.*weight_scale"):
        load_model(ckpt)


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.loader import load_model

    def kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    ckpt = open_checkpoint(sys.argv[1])
    dtype = getattr(torch, sys.argv[2])
    for src in (torch.float32, dtype):  # fault in the cast kernels' code pages: not model memory
        torch.empty(4096, dtype=dtype).copy_(torch.ones(4096, dtype=src))
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = kib("VmRSS")
    model = load_model(ckpt, dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base * 1024, "peak": kib("VmHWM") * 1024, "model": size}))
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_during_load_is_about_the_model(tmp_path_factory, dtype):
    """Loading holds no second copy: peak RSS growth <= 1.2 x the loaded model (file pages included)."""
    path = tmp_path_factory.getbasetemp() / "rss-ckpt"
    if not (path / "config.json").exists():
        cfg = dict(BASE, vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=16,
                   num_experts_per_tok=4)  # fmt: skip
        write_checkpoint(MoGEConfig.from_dict(cfg), path, dtype="float32", tokenizer=False)  # ~40 MB
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), dtype], cwd=ROOT, capture_output=True, text=True)
    if "clear_refs" in run.stderr:
        pytest.skip("cannot reset VmHWM on this kernel")
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["peak"] - r["base"] <= 1.2 * r["model"], r
