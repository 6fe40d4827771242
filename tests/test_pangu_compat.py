"""Checkpoints Huawei's Pangu code accepts (issue 14, part 1): tied embeddings, rope_scaling, buffers that
carry no weight, MoE layers without a shared expert, models without experts; and openPangu V2 refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moge_cli.checkpoint import open_checkpoint
from moge_cli.cli import app
from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.errors import CheckpointError, ConfigError
from moge_cli.inspect import count_params
from moge_cli.loader import load_model
from moge_cli.names import expected_tensors
from moge_cli.reference_model import reference_logits
from moge_cli.synthetic import write_checkpoint
from moge_kernels import native

BASE = dict(
    vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=4,
    num_expert_groups=2, max_position_embeddings=128, rope_theta=10000.0, torch_dtype="float32",
)  # fmt: skip
IDS = torch.tensor([5, 17, 3, 90, 42, 42, 7, 61, 0, 33, 12, 8])  # [T]
runner = CliRunner()


def write(tmp_path: Path, name: str = "ckpt", dtype: str = "float32", **over) -> Path:
    return write_checkpoint(MoGEConfig.from_dict(dict(BASE, **over)), tmp_path / name, seed=3, dtype=dtype, tokenizer=False)


def step_logits(model, ids: torch.Tensor, plan: bool) -> torch.Tensor:
    """Logits [T, V] of feeding ids one token at a time through a cache: kernels/step.c's whole steps (plan) or
    the op-by-op path."""
    model._plan = False if plan else None
    cache = model.new_cache(1, len(ids) + 4)
    out = torch.cat([model(ids[t].view(1, 1), cache)[0] for t in range(len(ids))])
    assert (model._plan not in (None, False)) == plan  # the path asked for really ran
    return out


def add_tensors(ckpt: Path, extra: dict[str, torch.Tensor]) -> None:
    """Rewrite a checkpoint's (first) weight file with more tensors, and its index if it has one."""
    file = min(ckpt.glob("model*.safetensors"))
    tensors = {**load_file(file), **extra}
    save_file(tensors, file, metadata={"format": "pt"})
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"].update({n: file.name for n in extra})
        d["metadata"]["total_size"] = sum(t.nbytes for f in ckpt.glob("model*.safetensors") for t in load_file(f).values())
        index.write_text(json.dumps(d))


def set_config(ckpt: Path, **over) -> None:
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **over}))


def load_json(path: Path) -> tuple[int, dict]:
    res = runner.invoke(app, ["load", str(path), "--json"])
    return res.exit_code, json.loads(res.stdout)


# ---- openPangu V2 / Pangu Ultra MoE ----------------------------------------------------------------
V2 = {  # the shape of openPangu-Ultra-MoE's config.json (DeepSeek-V3 style)
    "architectures": ["PanguUltraMoEForCausalLM"], "model_type": "pangu_ultra_moe", "vocab_size": 153600,
    "hidden_size": 7680, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "kv_lora_rank": 512,
}  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        V2,
        {k: v for k, v in V2.items() if k not in ("model_type", "architectures", "scoring_func")},  # keys alone
        dict(PRESETS["tiny-moge"], model_type="pangu_ultra_moe"),  # the name alone, on MoGE-looking keys
        dict(PRESETS["tiny-moge"], scoring_func="sigmoid"),
    ],
)
def test_openpangu_v2_configs_are_refused_as_what_they_are(config):
    with pytest.raises(ConfigError, match="openPangu V2 / Pangu Ultra MoE.*not a MoGE model; moge supports Pangu Pro MoE"):
        MoGEConfig.from_dict(config)


@pytest.mark.parametrize("over, key", [({"decoder_sparse_step": 2}, "decoder_sparse_step"), ({"partial_rotary_factor": 0.5}, "partial_rotary_factor")])
def test_keys_that_would_change_the_model_are_refused_not_dropped(over, key):
    with pytest.raises(ConfigError, match=f"{key} .* is not supported"):
        MoGEConfig.from_dict(dict(BASE, **over))


def test_sliding_window_attention_is_refused_and_its_off_switch_accepted():
    """use_sliding_window true would change attention; false (with any sliding_window, as Qwen2-style configs
    carry it) is the model moge runs."""
    with pytest.raises(ConfigError, match="use_sliding_window is true .*sliding-window attention is not supported"):
        MoGEConfig.from_dict(dict(BASE, use_sliding_window=True, sliding_window=4096))
    cfg = MoGEConfig.from_dict(dict(BASE, use_sliding_window=False, sliding_window=4096))
    assert cfg.extra["use_sliding_window"] is False


def test_moge_load_refuses_an_openpangu_v2_checkpoint(tmp_path):
    ckpt = write(tmp_path)
    set_config(ckpt, n_routed_experts=8, scoring_func="sigmoid")
    res = runner.invoke(app, ["load", str(ckpt)])
    assert res.exit_code != 0 and "openPangu V2" in res.output and "unexpected" not in res.output


# ---- rope_scaling ----------------------------------------------------------------------------------
SCALINGS = {
    "linear": {"type": "linear", "factor": 4},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
    "yarn-attention": {"type": "yarn", "factor": 3.0, "attention_factor": 0.9, "beta_slow": 2},
}


@pytest.mark.parametrize(
    "scaling, fragment",
    [
        ({"type": "longrope", "factor": 2.0}, "rope_scaling.rope_type 'longrope' is not supported"),
        ({"rope_type": "linear"}, "rope_scaling.factor is required"),
        ({"rope_type": "linear", "factor": 0.5}, "rope_scaling.factor must be at least 1"),
        ({"rope_type": "linear", "factor": "4"}, "rope_scaling.factor must be a number"),
        ({"rope_type": "dynamic", "factor": 2.0, "low_freq_factor": 1}, "rope_scaling.low_freq_factor is not a parameter of dynamic"),
        ({"type": "linear", "rope_type": "yarn", "factor": 2}, "rope_scaling.type and rope_scaling.rope_type differ"),
        ({"factor": 2}, "rope_scaling has no type"),
        ({"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 0}, "rope_scaling.original_max_position_embeddings"),
        ("linear", "rope_scaling must be an object"),
    ],
)
def test_rope_scaling_refusals_name_the_key(scaling, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        MoGEConfig.from_dict(dict(BASE, rope_scaling=scaling))


def test_rope_scaling_default_and_rope_parameters_spelling():
    assert MoGEConfig.from_dict(dict(BASE, rope_scaling={"rope_type": "default"})).rope is None
    no_theta = {k: v for k, v in BASE.items() if k != "rope_theta"}
    cfg = MoGEConfig.from_dict(dict(no_theta, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}))
    assert (cfg.rope.rope_type, cfg.rope.factor, cfg.rope_theta) == ("linear", 2.0, 5000.0)
    again = MoGEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.rope == cfg.rope and again.rope_theta == 5000.0


@pytest.mark.parametrize("name", list(SCALINGS))
def test_frequencies_match_transformers_rope_utils(name):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moge_cli import rope
    from moge_cli.reference_model import rope_speeds

    cfg = MoGEConfig.from_dict(dict(BASE, max_position_embeddings=32, rope_scaling=SCALINGS[name]))
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32, rope_theta=10000.0,
                                  rope_scaling=dict(SCALINGS[name]))  # fmt: skip
    for seq_len in (1, 32, 33, 50, 400):
        want, want_factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu", seq_len=seq_len)
        torch.testing.assert_close(rope.inv_freq(cfg, seq_len), want.double(), rtol=2e-6, atol=0)
        assert rope.attention_factor(cfg) == pytest.approx(want_factor, rel=1e-12)
        speeds, factor = rope_speeds(cfg, seq_len)  # the slow reference, one dim at a time
        torch.testing.assert_close(rope.inv_freq(cfg, seq_len), torch.tensor(speeds, dtype=torch.float64), rtol=1e-12, atol=0)
        assert factor == pytest.approx(want_factor, rel=1e-12)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_logits_match_the_reference_on_every_path(tmp_path, name):
    """Prefill past max_position_embeddings (dynamic rescales there), and one-token steps on kernels/step.c and on the
    op-by-op path, each against the float64 reference computed the same way."""
    ckpt = write(tmp_path, max_position_embeddings=8, rope_scaling=SCALINGS[name])
    model = load_model(ckpt)
    src = open_checkpoint(ckpt)
    ref = reference_logits(src, None, IDS)
    torch.testing.assert_close(model(IDS[None])[0].double(), ref, atol=1e-4, rtol=0)
    unscaled = reference_logits(src, MoGEConfig.from_dict(dict(BASE, max_position_embeddings=8)), IDS)
    assert (ref - unscaled).abs().max() > 1e-2  # the scaling matters at these positions
    ref_steps = reference_logits(src, None, IDS, calls=[1] * len(IDS))
    for plan in [False] + ([True] if native.available() else []):
        torch.testing.assert_close(step_logits(model, IDS, plan).double(), ref_steps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("calls", [[6, 6], [9, 3], [2, 1, 7, 2]])
def test_dynamic_ntk_calls_through_a_cache_rotate_each_call_at_its_own_length(tmp_path, calls):
    """Each forward call rotates its tokens at the length it ends at (as transformers does); cached keys keep
    the rotation they were written with."""
    ckpt = write(tmp_path, max_position_embeddings=4, rope_scaling=SCALINGS["dynamic"])
    model = load_model(ckpt)
    cache = model.new_cache(1, 16)
    got = torch.cat([model(part[None], cache)[0] for part in IDS.split(calls)])
    ref = reference_logits(open_checkpoint(ckpt), None, IDS, calls=calls)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)
    assert (ref - reference_logits(open_checkpoint(ckpt), None, IDS)).abs().max() > 1e-2  # the calls matter


# ---- tie_word_embeddings -----------------------------------------------------------------------------
def test_tied_checkpoint_without_lm_head_loads_counts_and_runs(tmp_path):
    ckpt = write(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in open_checkpoint(ckpt).tensors
    model = load_model(ckpt)
    assert model.lm_head is model.embed_tokens
    ref = reference_logits(open_checkpoint(ckpt), None, IDS)
    torch.testing.assert_close(model(IDS[None])[0].double(), ref, atol=1e-4, rtol=0)
    if native.available():
        torch.testing.assert_close(step_logits(model, IDS, True).double(), ref, atol=1e-4, rtol=0)
    untied = count_params(MoGEConfig.from_dict(BASE))
    tied = count_params(model.config)
    assert tied["lm_head"] == 0 and tied["total"] == untied["total"] - 96 * 64 == sum(p.numel() for p in model.parameters())
    code, report = load_json(ckpt)
    assert code == 0 and report["problems"] == [] and report["params"]["lm_head"] == 0
    assert any("tie_word_embeddings" in n for n in report["notes"])


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    ckpt = write(tmp_path, tie_word_embeddings=True)
    embed = load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"]
    add_tensors(ckpt, {"lm_head.weight": embed.clone()})
    code, report = load_json(ckpt)
    assert code == 0 and report["skipped_tensors"] == ["lm_head.weight"]
    ref = reference_logits(open_checkpoint(ckpt), None, IDS)
    torch.testing.assert_close(load_model(ckpt)(IDS[None])[0].double(), ref, atol=1e-4, rtol=0)
    add_tensors(ckpt, {"lm_head.weight": embed + 1})
    with pytest.raises(CheckpointError, match="tie_word_embeddings: true, but lm_head.weight differs"):
        load_model(ckpt)


def test_tied_checkpoint_converts_quantizes_profiles_and_generates(tmp_path):
    ckpt = write(tmp_path, tie_word_embeddings=True)
    ids = ",".join(map(str, IDS[:5].tolist()))
    greedy = reference_logits(open_checkpoint(ckpt), None, IDS[:5])[-1].argmax().item()
    stacked, q8 = tmp_path / "stacked", tmp_path / "q8"
    res = runner.invoke(app, ["convert", str(ckpt), str(stacked), "--layout", "stacked"])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(load_model(stacked)(IDS[None]), load_model(ckpt)(IDS[None]))
    res = runner.invoke(app, ["quantize", str(ckpt), str(q8), "--bits", "8"])
    assert res.exit_code == 0, res.output
    qmodel = load_model(q8)
    assert qmodel.lm_head is qmodel.embed_tokens
    for src in (ckpt, stacked, q8):
        res = runner.invoke(app, ["generate", str(src), "--prompt-ids", ids, "-n", "1", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["generated_ids"] == [greedy]
    res = runner.invoke(app, ["profile", str(q8), "--prompt-ids", ids, "--decode", "2", "--json"])
    assert res.exit_code == 0, res.output


# ---- buffers that carry no weight ----------------------------------------------------------------
def buffers(cfg_layers: int = 2) -> dict[str, torch.Tensor]:
    out = {}
    for L in range(cfg_layers):
        out[f"model.layers.{L}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
        for p in ("k_proj", "v_proj"):
            out[f"model.layers.{L}.self_attn.{p}.kv_cache_scale"] = torch.rand(32)
            out[f"model.layers.{L}.self_attn.{p}.kv_cache_offset"] = torch.zeros(32)
    return out


def test_known_buffers_are_skipped_with_a_note_and_carried_by_convert(tmp_path):
    ckpt = write(tmp_path, dtype="bfloat16")  # the buffers float32, as real checkpoints store inv_freq
    before = load_model(ckpt)(IDS[None])
    add_tensors(ckpt, buffers())
    code, report = load_json(ckpt)
    assert code == 0 and report["problems"] == [] and sorted(report["skipped_tensors"]) == sorted(buffers())
    assert any("skipped 2 RoPE inv_freq" in n for n in report["notes"]) and any("skipped 8 KV-cache" in n for n in report["notes"])
    text = runner.invoke(app, ["load", str(ckpt)], env={"COLUMNS": "400"}).output
    assert "skipped 2 RoPE inv_freq" in text and "no problems found" in text
    model = load_model(ckpt)
    assert not any("inv_freq" in n or "kv_cache" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(IDS[None]), before)
    out = tmp_path / "stacked"
    res = runner.invoke(app, ["convert", str(ckpt), str(out), "--layout", "stacked"])
    assert res.exit_code == 0, res.output
    assert set(buffers()) <= set(open_checkpoint(out).tensors)  # carried unchanged
    torch.testing.assert_close(load_model(out)(IDS[None]), before)
    assert all(open_checkpoint(out).tensors[n].dtype == "F32" for n in buffers())


def test_unknown_tensors_stay_an_error(tmp_path):
    ckpt = write(tmp_path)
    add_tensors(ckpt, {"model.layers.0.self_attn.rotary_emb.cos_cached": torch.rand(4), **buffers()})
    with pytest.raises(CheckpointError, match="unexpected tensor.*cos_cached"):
        load_model(ckpt)
    code, report = load_json(ckpt)
    assert code == 1 and [p["tensor"] for p in report["problems"]] == ["model.layers.0.self_attn.rotary_emb.cos_cached"]


def test_buffers_in_a_quantized_checkpoint_are_skipped(tmp_path):
    ckpt = write(tmp_path)
    q8 = tmp_path / "q8"
    assert runner.invoke(app, ["quantize", str(ckpt), str(q8), "--bits", "8"]).exit_code == 0
    before = load_model(q8)(IDS[None])
    add_tensors(q8, buffers())
    code, report = load_json(q8)
    assert code == 0 and report["problems"] == [], report["problems"]
    torch.testing.assert_close(load_model(q8)(IDS[None]), before)


# ---- no shared expert, no experts ------------------------------------------------------------------
@pytest.mark.parametrize(
    "over, dense",
    [
        ({"shared_expert_intermediate_size": 0}, False),
        ({"shared_expert_intermediate_size": 0, "num_hidden_layers": 3, "mlp_only_layers": [1], "intermediate_size": 48}, False),
        ({"num_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0, "shared_expert_intermediate_size": 0,
          "num_expert_groups": None, "intermediate_size": 48}, True),  # fmt: skip
        ({"num_experts": 0, "intermediate_size": 48}, True),  # routing keys left as they were: not read
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_models_without_shared_expert_or_experts_match_the_reference(tmp_path, over, dense, dtype):
    ckpt = write(tmp_path, dtype=dtype, **over)
    cfg = open_checkpoint(ckpt).config
    names = set(expected_tensors(cfg))
    assert not any(".shared_expert." in n for n in names)
    assert any(".mlp.experts." in n for n in names) != dense
    model = load_model(ckpt, dtype="float32" if dtype == "float32" else "bfloat16")
    ref = reference_logits(open_checkpoint(ckpt), None, IDS)
    tol = 1e-4 if dtype == "float32" else 0.15
    torch.testing.assert_close(model(IDS[None])[0].double(), ref, atol=tol, rtol=0)
    for plan in [False] + ([True] if native.available() else []):
        steps = step_logits(model, IDS, plan)
        torch.testing.assert_close(steps.double(), ref, atol=tol, rtol=0)
        if dtype == "float32":  # greedy tokens are the reference's
            assert steps.argmax(-1).tolist() == ref.argmax(-1).tolist()
    p = count_params(cfg)
    assert p["shared_experts"] == 0 and (p["routed_experts"] == 0) == dense
    assert p["total"] == sum(t.numel() for t in model.parameters())
    code, report = load_json(ckpt)
    assert code == 0 and report["problems"] == []


def test_model_without_experts_quantizes_and_profiles(tmp_path):
    ckpt = write(tmp_path, num_experts=0, intermediate_size=48)
    q8 = tmp_path / "q8"
    res = runner.invoke(app, ["quantize", str(ckpt), str(q8), "--bits", "8"])
    assert res.exit_code == 0, res.output
    ref = reference_logits(open_checkpoint(ckpt), None, IDS)
    torch.testing.assert_close(load_model(q8)(IDS[None])[0].double(), ref, atol=0.1, rtol=0)
    for src in (ckpt, q8):
        res = runner.invoke(app, ["profile", str(src), "--prompt-ids", "1,2,3", "--decode", "2", "--json"])
        assert res.exit_code == 0, res.output


def test_expert_parallel_split_of_a_model_without_experts_is_refused(tmp_path):
    ckpt = write(tmp_path, num_experts=0, intermediate_size=48)
    res = runner.invoke(app, ["convert", str(ckpt), str(tmp_path / "ep"), "--ep", "2"])
    assert res.exit_code == 2 and "no experts" in res.output
