"""`moge quantize`: quant math, packing against compressed-tensors, the plan, the streamed output, CLI, load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from moge_converters.quantize import dequantize, error_stats, error_sums, quantize
from moge_converters.quantize_pipeline import QuantizeResult, quantize_checkpoint
from moge_converters.quantize_plan import QuantOptions, fit_scheme, selected
from moge_converters.verify import VerifyError
from moge_cli.synthetic import write_checkpoint
from moge_cli.checkpoint import open_checkpoint
from moge_cli.cli import app
from moge_cli.config import MoGEConfig
from moge_cli.errors import UsageError
from moge_cli.inspect import inspect_checkpoint
from moge_cli.quant_format import Scheme, pack_int32, read_quantization, scheme_of, unpack_int32

TINY = MoGEConfig.from_name("tiny-moge")
runner = CliRunner()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """tiny-moge, bf16, stacked experts, sharded, with a tokenizer (for --eval)."""
    return write_checkpoint(TINY, tmp_path_factory.mktemp("src") / "ck", layout="stacked", max_shard_bytes=150_000)


@pytest.fixture(scope="module")
def q4(src, tmp_path_factory) -> tuple[Path, QuantizeResult]:
    out = tmp_path_factory.mktemp("q4") / "q"
    return out, quantize_checkpoint(src, out, bits=4, max_shard_size=60_000)


def real_shaped(n: int = 128, k: int = 256, seed: int = 0) -> torch.Tensor:
    """A weight like a trained one: Gaussian rows of different scales, a few large outliers, bf16."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5 * (0.5 + torch.rand(n, 1, generator=g))
    w[torch.rand(n, k, generator=g) < 0.002] *= 8
    return w.bfloat16()


# ---- math ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(8, 64), (5, 13), (33, 40), (128, 1), (1, 128), (3, 1)])
def test_pack_matches_compressed_tensors(bits, shape):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    for dim in (0, 1):
        packed = pack_int32(q, bits, dim)
        assert torch.equal(packed, helpers.pack_to_int32(q, bits, packed_dim=dim))
        assert torch.equal(unpack_int32(packed, bits, shape, dim), q)
        assert torch.equal(helpers.unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim), q)


def test_int4_little_end_order():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)  # unsigned 0, 1, 8, 9, 10, 11, 12, 15
    word = int(pack_int32(q, 4)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 15 for j in range(8)] == [0, 1, 8, 9, 10, 11, 12, 15]


@pytest.mark.parametrize("scheme", [Scheme(4, 32, False), Scheme(4, 32, True), Scheme(8, None, True)])
def test_rtn_reproduces_representable_weights_and_zero_groups(scheme):
    g = torch.Generator().manual_seed(2)
    q = torch.randint(scheme.qmin, scheme.qmax + 1, (4, 64), generator=g).float()
    q[:, 0], q[:, 1] = scheme.qmin, scheme.qmax  # every group spans the full range
    q[:, 32], q[:, 33] = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        q = q.clamp(min=-scheme.qmax)  # symmetric rtn scales by abs-max / qmax
    w = q * 0.25
    w[1] = 0.0  # an all-zero row: no division by zero, exact zeros back
    t = quantize(w, scheme, torch.float32)
    assert torch.equal(dequantize(t), w)


def test_mse_beats_rtn_on_real_shaped_weights():
    w = real_shaped()
    for scheme in (Scheme(4, 128, False), Scheme(4, 128, True), Scheme(4, 32, False), Scheme(8, None, True)):
        errs = {}
        for method in ("rtn", "mse"):
            s = Scheme(scheme.bits, scheme.group_size, scheme.symmetric, method)
            errs[method] = error_stats(*error_sums(w, dequantize(quantize(w, s, torch.bfloat16))))["rel_error"]
        assert errs["mse"] <= errs["rtn"], (scheme, errs)
        if scheme.bits == 4:
            assert errs["mse"] < 0.97 * errs["rtn"], (scheme, errs)  # measurably lower: >= 3%


def test_scale_dtype_and_integers_use_the_stored_scale():
    w = real_shaped(16, 64)
    t = quantize(w, Scheme(4, 32, False, "mse"), torch.bfloat16)
    assert t.scale.dtype == torch.bfloat16 and t.scale.shape == (16, 2) and t.zero.dtype == torch.int8
    assert int(t.q.min()) >= -8 and int(t.q.max()) <= 7 and int(t.zero.min()) >= -8 and int(t.zero.max()) <= 7
    assert dequantize(t).dtype == torch.bfloat16


# ---- the plan -----------------------------------------------------------------------------------
def test_selection_rules():
    o = QuantOptions()
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
           "model.layers.0.mlp.shared_expert.up_proj.weight"]  # fmt: skip
    no = ["model.layers.0.mlp.gate.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"]
    assert all(selected(n, (4, 4), o) for n in yes)
    assert not any(selected(n, (4, 4), o) for n in no)
    assert not selected("model.layers.0.self_attn.q_proj.bias", (4,), o)
    assert not selected("model.layers.0.mlp.router_scale", (1, 8), o)
    assert selected("lm_head.weight", (4, 4), QuantOptions(lm_head=True)) and selected("model.embed_tokens.weight", (4, 4), QuantOptions(embeddings=True))
    assert not selected("model.layers.0.mlp.gate.weight", (8, 4), QuantOptions(include=("*",)))  # never the router
    only = QuantOptions(include=("*.experts.*",), exclude=("model.layers.1.*",))
    assert selected(yes[2].replace("layers.1", "layers.0"), (4, 4), only)
    assert not selected(yes[2], (4, 4), only) and not selected(yes[0], (4, 4), only)


def test_options_are_validated():
    for bad in (dict(bits=3), dict(bits=4, group_size=48), dict(bits=8, group_size=64), dict(bits=8, symmetric=False), dict(method="gptq")):
        with pytest.raises(UsageError):
            QuantOptions(**bad).scheme()
    assert QuantOptions().scheme() == Scheme(4, 128, False, "rtn")
    assert QuantOptions(bits=8).scheme() == Scheme(8, None, True, "rtn")
    assert fit_scheme(Scheme(4, 128, False), 1344) == Scheme(4, 64, False)  # Pangu's expert width
    assert fit_scheme(Scheme(4, 128, False), 5120) == Scheme(4, 128, False)
    assert fit_scheme(Scheme(4, 64, True), 48).group_size is None  # no group >= 32 divides 48: per channel


# ---- the output ---------------------------------------------------------------------------------
def test_output_format(q4, src):
    out, r = q4
    conf = json.loads((out / "config.json").read_text())
    qc = conf["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert set(qc["config_groups"]) == {"group_0", "group_1"}  # tiny widths: g64 and g32 instead of g128
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert {"lm_head", r"re:^model\.layers\.\d+\.mlp\.gate$"} == set(qc["ignore"])
    assert conf["moge_quantization"]["method"] == "rtn" and conf["moge_quantization"]["tensors"] == r.quantized_tensors == 62
    ck = open_checkpoint(out)
    names = set(ck.tensors)
    assert len(ck.files) > 1  # sharded
    assert "model.layers.0.mlp.experts.3.down_proj.weight_packed" in names  # per expert, from a stacked source
    assert not any("gate_up_proj" in n or n.endswith("mlp.experts.down_proj") for n in names)
    for keep in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.router_scale", "model.norm.weight", "lm_head.weight",
                 "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"):  # fmt: skip
        assert ck.tensors[keep].dtype == "BF16"
    m = "model.layers.1.self_attn.q_proj"  # [64, 64], g64 asymmetric
    assert ck.tensors[f"{m}.weight_packed"].dtype == "I32" and ck.tensors[f"{m}.weight_packed"].shape == (64, 8)
    assert ck.tensors[f"{m}.weight_scale"].shape == (64, 1) and ck.tensors[f"{m}.weight_scale"].dtype == "BF16"
    assert ck.tensors[f"{m}.weight_zero_point"].shape == (8, 1) and ck.tensors[f"{m}.weight_zero_point"].dtype == "I32"
    assert ck.tensor(f"{m}.weight_shape").tolist() == [64, 64]
    assert (out / "tokenizer.model").is_file()
    assert r.quality.components.keys() == {"attention", "routed_experts", "shared_experts"}
    assert all(0 < t["rel_error"] < 0.2 and t["sqnr_db"] > 10 for t in r.quality.tensors)
    ck.close()


def _skeleton(ck) -> nn.Module:
    """A meta-device module tree with an nn.Linear (nn.Embedding) for every 2-D weight, quantized or not."""
    root = nn.Module()
    for name, info in ck.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            module, shape = name.removesuffix(".weight"), info.shape
        elif name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            shape = tuple(ck.tensor(f"{module}.weight_shape").tolist())
        else:
            continue
        parent = root
        *path, leaf = module.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        layer = nn.Embedding(*shape, device="meta") if leaf == "embed_tokens" else nn.Linear(shape[1], shape[0], bias=False, device="meta")
        parent.add_module(leaf, layer)
    return root


@pytest.mark.parametrize("opts", [dict(bits=4), dict(bits=8), dict(bits=4, group_size=32, symmetric=True, lm_head=True)])
def test_compressed_tensors_decompresses_to_moges_dequantization(src, tmp_path, opts):
    """The library's own target/ignore matching and PackedQuantizationCompressor.decompress on moge's files
    give bit-for-bit the weights moge's runtime dequantises."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    compressors = pytest.importorskip("compressed_tensors.compressors")
    from moge_cli.quant_format import quantization_of, read_module
    from moge_kernels.qlinear import dequantize as runtime_dequantize

    out = tmp_path / "q"
    quantize_checkpoint(src, out, **opts)
    ck = open_checkpoint(out)
    config = ct.QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    model = _skeleton(ck)
    ct.apply_quantization_config(model, config, show_progress=False)
    quant = quantization_of(ck)
    seen = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        assert (scheme is not None) == (name in quant.modules), name
        if scheme is None:
            continue
        ours = quant.modules[name]
        assert (scheme.weights.num_bits, scheme.weights.symmetric, scheme.weights.group_size) == (ours.bits, ours.symmetric, ours.group_size)
        state = {k.rsplit(".", 1)[1]: ck.tensor(k).clone() for k in ck.tensors if k.startswith(f"{name}.weight_")}
        theirs = compressors.PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        mine = runtime_dequantize(*read_module(ck, name, ours))
        assert theirs.dtype == mine.dtype == torch.bfloat16 and torch.equal(theirs, mine), name
        seen += 1
    assert seen == len(quant.modules) == (63 if opts.get("lm_head") else 62)
    ck.close()


def test_verify_dry_run_and_destination_rules(src, q4, tmp_path):
    out = tmp_path / "q8"
    r = quantize_checkpoint(src, out, bits=8, method="mse", verify=True, exclude=("*.shared_expert.*",))
    assert r.verified and "shared_experts" not in r.quality.components
    assert open_checkpoint(out).tensors["model.layers.0.mlp.shared_expert.up_proj.weight"].dtype == "BF16"
    plan = quantize_checkpoint(src, tmp_path / "dry", dry_run=True)
    assert plan.to_dict()["dry_run"] and not (tmp_path / "dry").exists() and plan.quantized_tensors == 62
    names = [t["name"] for s in plan.outputs for t in s["tensors"]]
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_zero_point" in names
    with pytest.raises(UsageError, match="already exists"):
        quantize_checkpoint(src, out, bits=8)
    with pytest.raises(UsageError, match="already quantized"):
        quantize_checkpoint(q4[0], tmp_path / "again")
    with pytest.raises(UsageError, match="nothing to quantize"):
        quantize_checkpoint(src, tmp_path / "none", include=("nothing*",))
    assert not (tmp_path / "again").exists() and not (tmp_path / "none").exists()


def test_verify_catches_a_corrupted_output(src, tmp_path, monkeypatch):
    import moge_converters.quantize_pipeline as qp

    real = qp.verify_quantized
    victim = "model.layers.1.mlp.experts.5.up_proj.weight_packed"

    def corrupt_then_verify(source, shards, out_dir, config, importance=None):
        ck = open_checkpoint(out_dir)
        info = ck.tensors[victim]
        ck.close()
        with open(info.file, "r+b") as f:  # flip one bit of the written weight
            f.seek(info.start + 5)
            byte = f.read(1)[0]
            f.seek(info.start + 5)
            f.write(bytes([byte ^ 1]))
        return real(source, shards, out_dir, config, importance)

    monkeypatch.setattr(qp, "verify_quantized", corrupt_then_verify)
    with pytest.raises(VerifyError, match=f"1 item.*{victim}: differs from a fresh"):
        quantize_checkpoint(src, tmp_path / "bad", verify=True)
    assert not (tmp_path / "bad").exists()


def test_load_reports_quantized_checkpoints(q4):
    out, _ = q4
    report = inspect_checkpoint(out)
    assert report.problems == []
    assert report.layout == "per-expert"
    assert report.params == inspect_checkpoint(Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge").params  # counted as the original model
    q = report.quantization
    assert (q.bits, q.group_size, q.method, q.tensors) == (4, 128, "rtn", 62)
    assert q.schemes == {"int4 g64 asym": 46, "int4 g32 asym": 16}
    assert q.components == {"attention": 8, "routed_experts": 48, "shared_experts": 6}
    per_layer = (64 + 32 + 32 + 64) * 64 + 8 * 3 * 32 * 64 + 3 * 64 * 64  # q k v o, 8 experts, shared expert
    assert q.quantized_params == 2 * per_layer
    assert 4.0 < q.bits_per_quantized_weight < 5.0
    assert q.quantized_bytes + q.float_bytes == report.tensor_bytes


def test_read_quantization_matching_rules():
    qc = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head", r"re:.*mlp\.gate$"],
        "config_groups": {
            "a": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": False}},
            "b": {"targets": [r"re:.*down_proj$"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 64, "symmetric": False}},
            "c": {"targets": ["model.layers.0.self_attn.q_proj"], "weights": {"num_bits": 8, "strategy": "channel", "symmetric": True}},
        },
    }  # fmt: skip
    assert scheme_of("model.layers.3.mlp.experts.1.up_proj", qc) == Scheme(4, 128, False)
    assert scheme_of("model.layers.3.mlp.experts.1.down_proj", qc) == Scheme(4, 64, False)
    assert scheme_of("model.layers.0.self_attn.q_proj", qc) == Scheme(8, None, True)
    assert scheme_of("lm_head", qc) is None and scheme_of("model.layers.0.mlp.gate", qc) is None
    assert scheme_of("model.embed_tokens", qc) is None
    assert read_quantization({"num_experts": 8}, {"a.weight": (2, 2)}) is None
    with pytest.raises(Exception, match="format"):
        read_quantization({"quantization_config": {**qc, "format": "int-quantized"}}, {"x.weight_packed": (1, 1), "x.weight_shape": (2,)})


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_json_eval_and_load(src, tmp_path):
    out = tmp_path / "cli"
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    res = runner.invoke(app, ["quantize", str(src), str(out), "--bits", "8", "--json", "--eval", str(text), "--eval-window", "32"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["quantization"]["bits"] == 8 and r["quality"]["overall"]["sqnr_db"] > 30
    e = r["eval"]
    assert e["tokens"] > 10 and e["window"] == 32 and abs(e["change"]) < 0.05 and e["before"] > 1
    res = runner.invoke(app, ["load", str(out)])
    assert res.exit_code == 0, res.output
    assert "quantization" in res.stdout and "int8 channel sym" in res.stdout
    res = runner.invoke(app, ["quantize", str(src), str(tmp_path / "x"), "--bits", "5"])
    assert res.exit_code == 2 and "error: --bits 5" in res.stderr
    res = runner.invoke(app, ["quantize", str(src), str(tmp_path / "y"), "--group-size", "32", "--symmetric", "--method", "mse", "--errors", "-q"])
    assert res.exit_code == 0, res.output
    assert "routed_experts" in res.stdout and "model.layers.1.mlp.experts.7.down_proj.weight" in res.stdout


TRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-trained"


@pytest.mark.skipif(not (TRAINED / "heldout.txt").is_file(), reason="fixtures/tiny-trained is not there")
def test_perplexity_targets_on_tiny_trained(tmp_path):
    """int8 within 0.5% of the original perplexity, int4 g128 rtn within 5%, mse at or below rtn."""
    text = TRAINED / "heldout.txt"
    ppl = {}
    for key, opts in {"int8": dict(bits=8), "int4 rtn": dict(bits=4), "int4 mse": dict(bits=4, method="mse")}.items():
        r = quantize_checkpoint(TRAINED, tmp_path / key.replace(" ", "-"), eval_text=text, **opts)
        ppl[key], before = r.eval.after, r.eval.before
    assert ppl["int8"] / before - 1 < 0.005, (before, ppl)
    assert ppl["int4 rtn"] / before - 1 < 0.05, (before, ppl)
    assert ppl["int4 mse"] <= ppl["int4 rtn"], (before, ppl)


def test_kind_patterns_group_the_modules_of_one_vocabulary_kind():
    import re

    from moge_cli.names import expected_tensors, kind_of_name, module_of
    from moge_cli.quant_format import kind_of

    cfg = MoGEConfig.from_dict(dict(TINY.to_dict(), intermediate_size=96, mlp_only_layers=[1]))
    weights = [n for n, shape in expected_tensors(cfg).items() if n.endswith(".weight") and len(shape) == 2]
    for w in weights:
        pattern = kind_of(module_of(w))
        assert [v for v in weights if re.match(pattern, module_of(v))] == [v for v in weights if kind_of_name(v) == kind_of_name(w)], w
    assert kind_of("model.layers.3.mtp.12.proj") == r"^model\.layers\.\d+\.mtp\.\d+\.proj$"  # outside the vocabulary: every number


def test_result_to_dict_is_the_json_output(src, tmp_path, monkeypatch):
    import moge_converters.quantize_pipeline as module

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    seen = []
    monkeypatch.setattr(module, "quantize_checkpoint", lambda *a, **k: seen.append(quantize_checkpoint(*a, **k)) or seen[-1])
    for extra in (["--bits", "8"], ["--perplexity", str(text), "--perplexity-window", "32"], ["--dry-run"]):
        r = runner.invoke(app, ["quantize", str(src), str(tmp_path / "-".join(extra[:1])), "--json", "--quiet", *extra])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == seen[-1].to_dict(), extra
    plain, evaluated, dry = (x.to_dict() for x in seen)
    assert "eval" not in plain and "calibration" not in plain["quantization"]  # absent, not null, as before
    assert evaluated["eval"]["window"] == 32 and dry["dry_run"] and dry["quantized_tensors"] == 62


# ---- --device: where --calib and --perplexity run the model ------------------------------------
def test_device_cpu_runs_and_an_unavailable_device_fails_before_writing(src, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    r = runner.invoke(app, ["quantize", str(src), str(tmp_path / "cpu"), "--bits", "8", "--perplexity", str(text), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval"]["after"] > 1
    unavailable = [] if torch.cuda.is_available() else ["cuda"]
    for device in ("tpu", "nonsense", *unavailable):
        out = tmp_path / f"q-{device}"
        r = runner.invoke(app, ["quantize", str(src), str(out), "--method", "mse", "--calib", str(text), "--device", device])
        assert r.exit_code == 2 and r.stderr.startswith(f"error: --device {device}: "), r.output
        assert not out.exists() and not list(tmp_path.glob(f".q-{device}*"))  # nothing written, not even staging
        with pytest.raises(UsageError, match=f"--device {device}"):
            quantize_checkpoint(src, out, bits=8, device=device)
        assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calib_and_perplexity_on_cuda_match_the_cpu(src, tmp_path):
    from moge_converters.calibrate import calibrate

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    on_cpu, on_gpu = (calibrate(src, text, device=d, dtype=torch.float32) for d in ("cpu", "cuda"))
    assert on_cpu.importance.keys() == on_gpu.importance.keys() and on_cpu.experts_reached == on_gpu.experts_reached
    for name, a in on_cpu.importance.items():
        assert on_gpu.importance[name].device.type == "cpu"
        torch.testing.assert_close(on_gpu.importance[name], a, rtol=1e-3, atol=1e-5)
    runs = [quantize_checkpoint(src, tmp_path / d, bits=8, eval_text=text, eval_window=32, device=d).eval for d in ("cpu", "cuda")]
    assert runs[1].tokens == runs[0].tokens
    assert runs[1].before == pytest.approx(runs[0].before, rel=1e-2) and runs[1].after == pytest.approx(runs[0].after, rel=1e-2)


def test_lm_head_on_a_tied_checkpoint_says_it_quantizes_nothing_there(tmp_path):
    """--lm-head where the head is the embedding matrix: a note, not silence (an untied head gets none)."""
    import dataclasses

    tied = write_checkpoint(dataclasses.replace(TINY, tie_word_embeddings=True), tmp_path / "tied", tokenizer=False)
    r = quantize_checkpoint(tied, tmp_path / "q", bits=8, lm_head=True)
    assert any("--lm-head: tie_word_embeddings" in n for n in r.notes)
    untied = quantize_checkpoint(write_checkpoint(TINY, tmp_path / "untied", tokenizer=False), tmp_path / "qu", bits=8, lm_head=True)
    assert not any("--lm-head" in n for n in untied.notes)
