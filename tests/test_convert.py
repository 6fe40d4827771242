"""`moge convert`: layout round trips, casts, sharding, layer extraction, EP split, dry run, verify, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moge_converters.convert import convert
from moge_converters.shards import parse_size
from moge_converters.overflow import Fp16OverflowError
from moge_converters.verify import VerifyError
from moge_cli.synthetic import random_tensors, write_checkpoint
from moge_cli.checkpoint import open_checkpoint
from moge_cli.cli import app
from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.errors import UsageError
from moge_cli.inspect import inspect_checkpoint
from moge_cli.safetensors_format import read_header

TINY = MoGEConfig.from_name("tiny-moge")
SHARD = 100_000  # tensor bytes per shard of the sources: several shards
EXTRA_FILES = {"tokenizer.json": '{"t": 1}\n', "special_tokens_map.json": "{}\n", "modeling_pangu.py": "# code\n", "README.md": "# hi\n"}
runner = CliRunner()


def make(path: Path, cfg: MoGEConfig = TINY, **kw) -> Path:
    kw.setdefault("max_shard_bytes", SHARD)
    write_checkpoint(cfg, path, tokenizer=False, **kw)
    for name, text in EXTRA_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("src") / "ck")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {n: ck.tensor(n).clone() for n in ck.tensors}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def no_problems(path: Path) -> None:
    report = inspect_checkpoint(path)
    assert report.problems == [], report.problems[:5]


def test_per_expert_stacked_per_expert_is_bit_exact(src, tmp_path):
    st = tmp_path / "st"
    convert(src, st, layout="stacked", verify=True)
    want = dict(random_tensors(TINY, layout="stacked"))  # the generator's stacked twin of the same seed
    got = tensors(st)
    assert list(got) == list(want)
    assert all(bits_equal(got[n], want[n]) for n in want)
    back = tmp_path / "back"
    convert(st, back, layout="per-expert", max_shard_size=SHARD)
    for f in sorted(src.glob("*.safetensors")) + [src / "model.safetensors.index.json"]:
        assert (back / f.name).read_bytes() == f.read_bytes(), f.name  # whole files, byte for byte
    for name, text in EXTRA_FILES.items():
        assert (back / name).read_text() == text
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    no_problems(st)
    no_problems(back)


def test_cast_is_the_exact_cast_and_updates_config(src, tmp_path):
    convert(src, tmp_path / "f32", dtype="float32", verify=True)
    convert(tmp_path / "f32", tmp_path / "bf16", dtype="bfloat16", verify=True)
    convert(src, tmp_path / "f16", dtype="float16", layout="stacked", verify=True)
    orig, f32, bf16 = tensors(src), tensors(tmp_path / "f32"), tensors(tmp_path / "bf16")
    assert all(bits_equal(f32[n], orig[n].float()) for n in orig)
    assert all(bits_equal(bf16[n], orig[n]) for n in orig)  # bf16 -> f32 -> bf16 loses nothing
    f16 = tensors(tmp_path / "f16")
    want = {n: t.to(torch.float16) for n, t in random_tensors(TINY, layout="stacked")}
    assert all(bits_equal(f16[n], want[n]) for n in want)
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["torch_dtype"] == "float16"
    no_problems(tmp_path / "f16")


@pytest.mark.parametrize("src_dtype,dst_dtype", [("bfloat16", "float16"), ("float32", "float16"), ("float16", "bfloat16"), ("float32", "bfloat16")])
@pytest.mark.parametrize("clamp", [False, True])
def test_chunked_cast_matches_the_reference_cast(src_dtype, dst_dtype, clamp):
    from moge_converters.cast import Caster, cast_exact

    specials = [65504.0, 65519.0, 65520.0, -7e4, 1e6, float("inf"), float("-inf"), float("nan"), 6e-8, -0.0]
    x = torch.cat([torch.randn(5000) * 3e4, torch.tensor(specials)]).to(getattr(torch, src_dtype))
    caster = Caster(x.dtype, getattr(torch, dst_dtype), clamp, block=1000)
    got, overflow = [], 0
    for a in range(0, x.numel(), 1000):
        chunk = x[a : a + 1000]
        y = caster.block[: chunk.numel()]
        overflow += caster.cast_into(chunk, y)
        got.append(y.clone())
    want = cast_exact(x, getattr(torch, dst_dtype), clamp)
    assert bits_equal(torch.cat(got), want)
    xf = x.double()
    assert overflow == (int(((xf.abs() > 65504) & xf.isfinite()).sum()) if dst_dtype == "float16" and src_dtype != "float16" else 0)


def poke(ckpt: Path, name: str, values: list[float]) -> None:
    """Overwrite the first len(values) elements of a float32 tensor in place."""
    info = open_checkpoint(ckpt).tensors[name]
    assert info.dtype == "F32"
    with open(info.file, "r+b") as f:
        f.seek(info.start)
        f.write(torch.tensor(values, dtype=torch.float32).numpy().tobytes())


def test_fp16_overflow_refused_with_report_or_clamped(tmp_path):
    ck = make(tmp_path / "f32", dtype="float32")
    poke(ck, "model.layers.1.mlp.experts.3.up_proj.weight", [1e6, -7e4, 65519.0, float("inf"), float("nan"), 65504.0])
    poke(ck, "lm_head.weight", [7e4])
    with pytest.raises(Fp16OverflowError) as e:
        convert(ck, tmp_path / "out", dtype="float16", layout="stacked")
    msg = str(e.value)
    assert "4 value(s) in 2 tensor(s)" in msg and "model.layers.1.mlp.experts.gate_up_proj (3)" in msg and "--clamp" in msg
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f32"]

    r = convert(ck, tmp_path / "out", dtype="float16", clamp=True, verify=True)
    assert (r.clamped_values, r.clamped_tensors) == (4, {"model.layers.1.mlp.experts.3.up_proj.weight": 3, "lm_head.weight": 1})
    up = tensors(tmp_path / "out")["model.layers.1.mlp.experts.3.up_proj.weight"].view(-1)[:6].float()
    assert up[:3].tolist() == [65504.0, -65504.0, 65504.0] and up[3] == float("inf") and up[4].isnan() and up[5] == 65504.0


def test_pytorch_bin_input_weights_only(src, tmp_path):
    ref = tmp_path / "ref"
    convert(src, ref, layout="stacked")
    sd = {n: t for n, t in random_tensors(TINY)}
    names = list(sd)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(src / "config.json", bin_dir)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    for fname, part in halves.items():
        torch.save({n: sd[n] for n in part}, bin_dir / fname)
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = tmp_path / "from_bin"
    r = convert(bin_dir, out, layout="stacked", verify=True)
    assert r.notes == []
    got, want = tensors(out), tensors(ref)
    assert list(got) == list(want) and all(bits_equal(got[n], want[n]) for n in want)

    pt_dir = tmp_path / "pt"  # a single legacy-format .pt: read whole, said so
    pt_dir.mkdir()
    shutil.copy(src / "config.json", pt_dir)
    torch.save(sd, pt_dir / "model.pt", _use_new_zipfile_serialization=False)
    r = convert(pt_dir / "model.pt", tmp_path / "from_pt", dtype="float16", verify=True)
    assert "legacy" in r.notes[0]
    assert all(bits_equal(t, sd[n].half()) for n, t in tensors(tmp_path / "from_pt").items())


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_and_never_runs(src, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": torch.ones(64), "x": Evil(marker)}, d / "pytorch_model.bin")
    r = runner.invoke(app, ["convert", str(d), str(tmp_path / "out")])
    assert r.exit_code == 2 and "refused" in r.output and "weights_only" in r.output
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.save({"model.norm.weight": torch.ones(64), "step": 3}, d / "pytorch_model.bin")  # not a flat state dict
    r = runner.invoke(app, ["convert", str(d), str(tmp_path / "out")])
    assert r.exit_code == 2 and "'step' is a int, not a tensor" in r.output


@pytest.mark.parametrize(
    "text,want",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("100KB", 10**5), ("2GiB", 2 * 2**30), ("512MiB", 2**29), ("1KiB", 1024),
     ("1.5GB", 1_500_000_000), ("1000", 1000), ("64 mb", 64 * 10**6), (4096, 4096)],
)  # fmt: skip
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "GB", "5XB", "-1GB", "0", "5 G B"])
def test_parse_size_rejects(bad):
    with pytest.raises(UsageError):
        parse_size(bad)


def test_shards_named_sized_indexed_and_never_split(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, layout="stacked", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] and n > 5
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    total = 0
    for f in files:
        header, meta = read_header(f)
        assert meta == {"format": "pt"}
        data = sum(t.nbytes for t in header.values())
        total += data
        assert data <= 40_000 or len(header) == 1  # a tensor over the limit gets a shard of its own
        assert all(index["weight_map"][name] == f.name for name in header)
    assert index["metadata"]["total_size"] == total == sum(t.numel() * t.element_size() for t in tensors(out).values())


@pytest.mark.parametrize("shift", [0, 1])
def test_copies_coalesce_and_use_sendfile_only_when_page_aligned(tmp_path, monkeypatch, shift):
    import os

    import moge_converters.shards as shards
    from moge_converters.plan import OutTensor, Part

    data = os.urandom(4 * 4096)
    (tmp_path / "in").write_bytes(data)
    calls: list[int] = []
    real = shards._sendfile
    monkeypatch.setattr(shards, "_sendfile", lambda *a: calls.append(a[3]) or real(*a))
    shard = shards.Shard("out.safetensors", [OutTensor(n, "U8", (4096,), "U8", (Part(n, 0, 4096),)) for n in ("a", "b")])
    sf = shards.ShardFile(tmp_path / "out.safetensors", shard)
    head = sf.pos
    start = head % 4096 + shift  # shift 0: same offset within a page as in the output
    fd = os.open(tmp_path / "in", os.O_RDONLY)
    sf.send(fd, start, 4096)
    sf.send(fd, start + 4096, 4096)  # continues the run: one copy for both tensors
    sf.close()
    os.close(fd)
    assert calls == ([8192] if shift == 0 else [])
    assert (tmp_path / "out.safetensors").read_bytes()[head:] == data[start : start + 8192]


def test_layers_extracted_renumbered_and_loadable(tmp_path):
    cfg = MoGEConfig.from_dict({**PRESETS["tiny-moge"], "num_hidden_layers": 4, "mlp_only_layers": [1, 3], "intermediate_size": 48})
    ck = make(tmp_path / "ck", cfg)
    out = tmp_path / "out"
    r = convert(ck, out, layers="1-2", layout="stacked", verify=True)
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_hidden_layers"] == 2 and conf["mlp_only_layers"] == [0]
    no_problems(out)
    src_t, got = tensors(ck), tensors(out)
    assert bits_equal(got["model.layers.0.mlp.down_proj.weight"], src_t["model.layers.1.mlp.down_proj.weight"])
    assert bits_equal(got["model.layers.1.self_attn.q_proj.weight"], src_t["model.layers.2.self_attn.q_proj.weight"])
    assert bits_equal(got["lm_head.weight"], src_t["lm_head.weight"]) and r.tensors == len(got)
    with pytest.raises(UsageError, match="do not exist"):
        convert(ck, tmp_path / "x", layers="2-4")
    with pytest.raises(UsageError, match="expected a list"):
        convert(ck, tmp_path / "x", layers="1..2")


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
def test_ep_split_holds_whole_groups(src, tmp_path, layout):
    out = tmp_path / "ep"
    convert(src, out, ep=2, layout=layout, verify=True)
    plan = json.loads((out / "ep_plan.json").read_text())
    assert plan["world_size"] == 2 and [r["groups"] for r in plan["ranks"]] == [[0, 1], [2, 3]]
    assert plan["experts"][5] == {"expert": 5, "rank": 1, "local": 1}
    full = dict(random_tensors(TINY, layout="stacked"))
    for r in (0, 1):
        rank = out / f"rank-{r}"
        conf = json.loads((rank / "config.json").read_text())
        assert conf["moge_ep"] == {"rank": r, "world_size": 2, "experts": list(range(4 * r, 4 * r + 4))}
        assert conf["num_experts"] == 8
        got = tensors(rank)
        for layer in (0, 1):
            gu = full[f"model.layers.{layer}.mlp.experts.gate_up_proj"][4 * r : 4 * r + 4]
            if layout == "stacked":
                assert bits_equal(got[f"model.layers.{layer}.mlp.experts.gate_up_proj"], gu)
            else:
                assert bits_equal(got[f"model.layers.{layer}.mlp.experts.2.up_proj.weight"], gu[2, 32:])
                assert f"model.layers.{layer}.mlp.experts.4.up_proj.weight" not in got
            assert bits_equal(got[f"model.layers.{layer}.mlp.gate.weight"], full[f"model.layers.{layer}.mlp.gate.weight"])  # replicated
        assert (rank / "tokenizer.json").read_text() == EXTRA_FILES["tokenizer.json"]
        no_problems(rank)
    report = inspect_checkpoint(out)  # the top directory: every rank and the plan
    assert report.problems == [] and report.ep_plan["world_size"] == 2
    with pytest.raises(UsageError, match="must divide"):
        convert(src, tmp_path / "ep3", ep=3)


def test_ep_from_stacked_slices_and_rank_dirs_convert_again(src, tmp_path):
    st = tmp_path / "st"
    convert(src, st, layout="stacked")
    plan = convert(st, tmp_path / "ep", ep=4, dry_run=True)
    gate_up = [t for o in plan.outputs for t in o["tensors"] if t["name"].endswith("gate_up_proj")]
    assert gate_up[0]["shape"] == [2, 64, 64] and "stack" not in gate_up[0]["from"]  # one contiguous slice, no stacking
    convert(st, tmp_path / "ep", ep=4, verify=True)
    full = tensors(st)
    for r in range(4):
        got = tensors(tmp_path / "ep" / f"rank-{r}")
        assert bits_equal(got["model.layers.1.mlp.experts.down_proj"], full["model.layers.1.mlp.experts.down_proj"][2 * r : 2 * r + 2])
    back = tmp_path / "rank3-per-expert"  # a rank directory is a checkpoint of its own: convert it again
    convert(tmp_path / "ep" / "rank-3", back, layout="per-expert", verify=True)
    no_problems(back)
    assert json.loads((back / "config.json").read_text())["moge_ep"]["experts"] == [6, 7]
    assert bits_equal(tensors(back)["model.layers.0.mlp.experts.1.gate_proj.weight"], full["model.layers.0.mlp.experts.gate_up_proj"][7, :32])
    with pytest.raises(UsageError, match="already one rank"):
        convert(tmp_path / "ep" / "rank-3", tmp_path / "x", ep=2)


def test_72b_plan_from_headers_alone(tmp_path):
    """The full Pangu Pro MoE layout (sparse skeleton files): planned in seconds, memory estimate far below a tensor."""
    from moge_cli.synthetic import write_skeleton

    skel = write_skeleton(MoGEConfig.from_name("pangu-pro-moe-72b"), tmp_path / "72b")
    r = convert(skel, tmp_path / "out", layout="stacked", dtype="float16", ep=8, dry_run=True)
    assert r.bytes_in == 143_977_562_112 and r.tensors == 8 * (3 + 48 * 17)
    assert r.largest_tensor_bytes == 153376 * 5120 * 2  # embeddings; one rank's gate_up is [8, 2688, 5120]
    assert r.estimated_peak_rss_bytes < 1e9 and len(r.ep_plan["ranks"]) == 8
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(src, tmp_path):
    out = tmp_path / "out"
    r = convert(src, out, layout="stacked", dtype="float16", ep=2, max_shard_size="100KB", dry_run=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert r.dtype_changes == {"bfloat16 -> float16": r.tensors} and r.outputs[0]["file"].startswith("rank-0/")
    assert r.disk_bytes > sum(o["bytes"] for o in r.outputs) and r.estimated_peak_rss_bytes > 0
    res = runner.invoke(app, ["convert", str(src), str(out), "--layout", "stacked", "--dry-run", "--verbose"])
    assert res.exit_code == 0 and "gate_up_proj" in res.output and "nothing written" in res.output and not out.exists()


def test_destination_rules(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        convert(src, out)
    assert (out / "old").exists()
    convert(src, out, force=True, layout="stacked")
    assert not (out / "old").exists() and (out / "config.json").exists()
    for bad in (src, src / "sub", src.parent):
        with pytest.raises(UsageError, match="inside the source|contains the source"):
            convert(src, bad, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_verify_catches_a_mismatch(src, tmp_path, monkeypatch):
    import moge_converters.shards as shards

    real_close = shards.ShardFile.close

    def close_and_corrupt(self):
        real_close(self)
        with open(self.path, "r+b") as f:  # flip one bit in the last byte of tensor data
            f.seek(-1, 2)
            b = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([b[0] ^ 1]))

    monkeypatch.setattr(shards.ShardFile, "close", close_and_corrupt)
    with pytest.raises(VerifyError, match="values differ"):
        convert(src, tmp_path / "out", layout="stacked", verify=True)
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--verify", "--quiet"])
    assert res.exit_code == 1 and "verification failed" in res.output and not (tmp_path / "out").exists()
    convert(src, tmp_path / "out")  # without --verify the corruption goes unnoticed: the check is what catches it


def test_cli_json_summary_and_exit_codes(src, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(src), str(out), "--layout", "stacked", "--dtype", "float16", "--json", "--verify"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    for key in ("tensors", "bytes_in", "bytes_out", "seconds", "peak_rss_bytes", "outputs"):
        assert key in summary
    assert summary["bytes_out"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert summary["bytes_in"] == sum(t.nbytes for t in open_checkpoint(src).tensors.values())
    assert summary["verified"] is True and summary["tensors"] == 37
    res = runner.invoke(app, ["convert", str(src), str(out), "--quiet"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "o2"), "--layout", "sideways"])
    assert res.exit_code == 2 and "--layout 'sideways'" in res.output
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "o2"), "--quiet"])
    assert res.exit_code == 0 and "wrote 81 tensors" in res.stdout


def test_memory_is_flat_for_big_tensors(tmp_path):
    """A 32 MB stacked projection and a cast to float16 stay within a few MB of anonymous memory."""
    from moge_converters.convert import rss_anon

    cfg = MoGEConfig.from_dict({**PRESETS["tiny-moge"], "hidden_size": 512, "moe_intermediate_size": 1024, "num_experts": 16})
    ck = make(tmp_path / "ck", cfg, max_shard_bytes=None)
    before = rss_anon()
    r = convert(ck, tmp_path / "out", layout="stacked", dtype="float16", verify=True)  # many cast chunks, checked
    largest = max(t.numel() * 2 for t in tensors(tmp_path / "out").values())
    assert largest == 16 * 2048 * 512 * 2
    assert r.peak_rss_bytes - before < 24 * 2**20


def test_result_to_dict_is_the_json_output(src, tmp_path, monkeypatch):
    import moge_converters.convert as module

    seen = []
    monkeypatch.setattr(module, "convert", lambda *a, **k: seen.append(convert(*a, **k)) or seen[-1])  # keep what the command printed
    for extra in (["--layout", "stacked", "--verify"], ["--ep", "2"], ["--dtype", "float32", "--dry-run"], ["--ep", "2", "--dry-run"]):
        r = runner.invoke(app, ["convert", str(src), str(tmp_path / "-".join(extra)), "--json", "--quiet", *extra])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == seen[-1].to_dict(), extra
    assert seen[0].to_dict()["ep"] is False and seen[1].to_dict()["ep"] == {"world_size": 2, "plan": "ep_plan.json"}
    assert seen[2].to_dict()["dry_run"] is True and seen[2].to_dict()["layout"] == {"from": "per-expert", "to": "per-expert"}
