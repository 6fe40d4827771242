"""`moge load` through the CLI: output, exit codes, and a corpus of broken checkpoints."""

import dataclasses
import json
import shutil
import struct
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moge_cli.synthetic import write_checkpoint
from moge_cli.cli import app
from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.main import load_json, plain_load_json
from moge_cli.problems import Problem

TINY = MoGEConfig.from_dict(PRESETS["tiny-moge"])
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def moge(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_checkpoint(TINY, tmp_path_factory.mktemp("good"), dtype="float32", max_shard_bytes=200_000, tokenizer=False)


@pytest.fixture()
def ck(good, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(good, dst)
    return dst


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(path: Path, header, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(path: Path, fn) -> None:
    header, body = split(path)
    fn(header)
    join(path, header, body)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def edit_index(d: Path, fn) -> None:
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index["weight_map"])
    p.write_text(json.dumps(index))


# ---- healthy -----------------------------------------------------------------------------------
def test_committed_fixture_is_healthy():
    r = moge("load", REPO / "fixtures" / "tiny-moge")
    assert r.exit_code == 0, r.output
    for fragment in ("PanguProMoE", "4 groups x 2 experts", "1 pick(s) per group", "per-expert", "bfloat16", "no problems found"):
        assert fragment in r.stdout


def test_json_report_fields(good):
    r = moge("load", good, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for key in ("path", "model_type", "layout", "dtype", "num_layers", "hidden_size", "num_experts", "num_groups",
                "experts_per_group", "picks_per_group", "params", "size_bytes", "shards", "problems"):  # fmt: skip
        assert key in data, key
    assert data["params"]["total"] == 214_736 and data["params"]["active"] == 165_584
    assert data["size_bytes"] == sum(p.stat().st_size for p in shards(good))
    assert data["shards"] == [p.name for p in shards(good)]


def test_tensors_table_with_glob(good):
    r = moge("load", good, "--json", "--tensors", "*.mlp.gate.weight")
    rows = json.loads(r.stdout)["tensors"]
    assert [row["name"] for row in rows] == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert rows[0]["shape"] == [8, 64] and rows[0]["dtype"] == "float32" and rows[0]["bytes"] == 2048
    r = moge("load", good, "--tensors")  # no glob: every tensor
    assert r.exit_code == 0 and "81 tensors" in r.stdout


def test_verify_manifest_check_cli(ck, tmp_path):
    man = tmp_path / "m.json"
    r = moge("load", ck, "--verify", "--manifest", man)
    assert r.exit_code == 0, r.output
    assert "0 NaN, 0 Inf, 0 all-zero" in r.stdout and man.is_file()
    assert moge("load", ck, "--check", man).exit_code == 0
    victim = shards(ck)[0]
    data = bytearray(victim.read_bytes())
    data[-2] ^= 0x40
    victim.write_bytes(bytes(data))
    r = moge("load", ck, "--check", man, "--json")
    assert r.exit_code == 1
    assert [p["kind"] for p in json.loads(r.stdout)["problems"]] == ["hash"]


def fast_load(capsys, path) -> tuple[int, str, str]:
    """`moge load PATH --json` through the entry point's typer-free fast path: (exit code, stdout, stderr)."""
    code = load_json(str(path))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv, path",
    [(["load", "ck", "--json"], "ck"), (["load", "--json", "ck"], "ck"), (["load", "ck"], None), (["load", "ck", "--tensors"], None),
     (["load", "ck", "--json", "--verify"], None), (["load", "--json", "--verify"], None), (["--debug", "load", "ck"], None),
     (["convert", "ck", "--json"], None), (["load", "--json"], None), ([], None)],
)  # fmt: skip
def test_fast_path_takes_only_plain_load_json(argv, path):
    assert plain_load_json(argv) == path


def test_fast_path_prints_what_the_typer_command_prints(good, capsys):
    r = moge("load", good, "--json")
    assert fast_load(capsys, good) == (r.exit_code, r.stdout, "")


@pytest.mark.parametrize(
    "entry, absent",
    [("from moge_cli.main import main as run", ("typer", "rich", "torch", "numpy")),  # the console script: fast path
     ("from moge_cli.cli import app as run", ("torch", "numpy"))],  # the Typer app
)  # fmt: skip
def test_load_json_does_not_import_heavy_modules(good, entry, absent):
    code = (
        f"import sys\n{entry}\n"
        "try:\n    run(['load', sys.argv[1], '--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"for m in {absent!r}:\n    assert m not in sys.modules, m + ' imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---- the library's result: a CheckpointReport whose to_dict() is the --json ---------------------
def recording(monkeypatch, module, name: str) -> list:
    """Patch module.name so that what it returns is kept (the object behind a command's --json); returns that list."""
    real, seen = getattr(module, name), []

    def keep(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, name, keep)
    return seen


def drop_a_tensor(d: Path) -> str:
    """Remove one tensor from the last shard and the index: the checkpoint stays readable, with problems (missing, index)."""
    shard = shards(d)[-1]
    name = first_tensor(split(shard)[0])
    edit_header(shard, lambda h: h.pop(name))
    edit_index(d, lambda wm: wm.pop(name))
    return name


def test_report_to_dict_is_the_json_output(ck, tmp_path, monkeypatch, capsys):
    import moge_cli.inspect
    from moge_converters.convert import convert

    drop_a_tensor(ck)  # problems in the report
    convert(REPO / "fixtures" / "tiny-moge", tmp_path / "split", ep=2)  # a split: rank reports merged
    seen = recording(monkeypatch, moge_cli.inspect, "inspect_checkpoint")
    for args in ([ck, "--json"], [ck, "--json", "--verify", "--tensors"], [tmp_path / "split", "--json", "--verify", "--tensors"],
                 [tmp_path / "split" / "rank-1", "--json"]):  # fmt: skip
        r = moge("load", *args)
        assert json.loads(r.stdout) == seen[-1].to_dict(), args
    plain = json.loads(moge("load", ck, "--json").stdout)
    assert not {"ep", "quantization", "tensors", "verify", "ep_plan"} & plain.keys()  # sections not asked for are absent, not null
    code, out, _ = fast_load(capsys, ck)  # the entry point's typer-free path
    assert code == 1 and json.loads(out) == seen[-1].to_dict() and seen[-1].problems


def conforms(value, hint) -> bool:
    """Whether value is what the annotation says: X | None, list[X], dict[K, V], a dataclass (field by field), a class."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)  # an int is a float (PEP 484)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint) and all_fields_conform(value)
    return isinstance(value, hint)


def all_fields_conform(obj) -> bool:
    hints = typing.get_type_hints(type(obj))
    bad = [f.name for f in dataclasses.fields(obj) if not conforms(getattr(obj, f.name), hints[f.name])]
    assert not bad, f"{type(obj).__name__}: {bad} do not hold what their annotations say"
    return True


def test_library_results_are_typed(ck, tmp_path):
    """Each result is a dataclass whose fields hold their annotated types: Problem objects, nested dataclasses, no stray dicts."""
    from moge_cli.inspect import CheckpointReport, QuantizationSummary, VerifySummary, inspect_checkpoint
    from moge_cli.profiling import Bandwidth, DecodeFigures, ProfileReport, profile
    from moge_converters.convert import ConvertResult, DryRunPlan, convert
    from moge_converters.quantize_pipeline import EvalResult, QualityReport, QuantizeDryRun, QuantizeResult, quantize_checkpoint

    tiny = REPO / "fixtures" / "tiny-moge"
    drop_a_tensor(ck)
    report = inspect_checkpoint(ck, verify=True, tensors="*")
    assert isinstance(report, CheckpointReport) and report.problems and all(type(p) is Problem for p in report.problems)
    assert isinstance(report.verify, VerifySummary) and all_fields_conform(report)
    converted = convert(tiny, tmp_path / "split", ep=2)
    assert isinstance(converted, ConvertResult) and all_fields_conform(converted)
    assert all_fields_conform(inspect_checkpoint(tmp_path / "split")) and all_fields_conform(inspect_checkpoint(tmp_path / "split" / "rank-0"))
    plan = convert(tiny, tmp_path / "plan", dtype="float32", dry_run=True)
    assert isinstance(plan, DryRunPlan) and all_fields_conform(plan)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    q = quantize_checkpoint(tiny, tmp_path / "q", bits=8, eval_text=text, eval_window=32)
    assert isinstance(q, QuantizeResult) and isinstance(q.quality, QualityReport) and isinstance(q.eval, EvalResult) and all_fields_conform(q)
    assert isinstance(inspect_checkpoint(tmp_path / "q").quantization, QuantizationSummary)
    assert all_fields_conform(inspect_checkpoint(tmp_path / "q"))
    dry = quantize_checkpoint(tiny, tmp_path / "dry", dry_run=True)
    assert isinstance(dry, QuantizeDryRun) and all_fields_conform(dry)
    prof = profile(tiny, prompt_ids=[1, 2, 3], decode=2, perplexity_file=text, weights=True)
    assert isinstance(prof, ProfileReport) and isinstance(prof.decode, DecodeFigures) and isinstance(prof.bandwidth, Bandwidth)
    assert all_fields_conform(prof)


# ---- --device: the memory plan -------------------------------------------------------------------
def test_load_device_reports_the_memory_plan(good, tmp_path):
    """`load --device` adds the plan generate would check (the same figures), from headers only; without it, no plan."""
    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.memory_plan import MemoryPlan, plan_memory

    r = moge("load", good, "--device", "cpu", "--dtype", "bf16", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["memory_plan"]
    want = plan_memory(open_checkpoint(good), device="cpu", dtype="bfloat16")
    assert got["weights_bytes"] == want.weights_bytes and got["dtype"] == "bfloat16" and got["fits"] is True
    assert got["needed_bytes"] == want.needed_bytes and got["kv_cache_bytes"] == want.kv_cache_bytes
    assert "memory_plan" not in json.loads(moge("load", good, "--json").stdout)
    text = moge("load", good, "--device", "cpu")
    assert text.exit_code == 0 and "memory plan" in text.stdout and "fits" in text.stdout
    from moge_cli.inspect import inspect_checkpoint

    assert isinstance(inspect_checkpoint(good, device="cpu").memory_plan, MemoryPlan)


def test_load_device_says_when_it_does_not_fit(good, monkeypatch):
    """Not fitting is reported (fits false, the figures), not a checkpoint problem: the exit code stays 0."""
    import moge_cli.memory_plan as mp

    monkeypatch.setattr(mp, "free_bytes", lambda device: 1000)
    r = moge("load", good, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["memory_plan"]
    assert plan["fits"] is False and plan["available_bytes"] == 1000 and plan["needed_bytes"] > 1000
    text = moge("load", good, "--device", "cpu")
    words = " ".join(text.stdout.split())  # the table wraps the row
    assert "memory plan does not fit: needs" in words and "cpu has" in words


def test_load_device_refusals(good, tmp_path):
    """An unusable device, and a whole split (one process's plan needs one checkpoint), exit 2."""
    r = moge("load", good, "--device", "tpu")
    assert r.exit_code == 2 and "--device tpu" in r.output
    from moge_converters.convert import convert

    convert(REPO / "fixtures" / "tiny-moge", tmp_path / "split", ep=2)
    r = moge("load", tmp_path / "split", "--device", "cpu")
    assert r.exit_code == 2 and "--device plans one process's memory" in r.output


# ---- schema problems: readable, exit 1 ----------------------------------------------------------
def test_schema_problem_exit_1_with_report(ck, capsys):
    def drop(h):
        del h[first_tensor(h)]

    shard = shards(ck)[-1]
    name = first_tensor(split(shard)[0])
    edit_header(shard, drop)
    edit_index(ck, lambda wm: wm.pop(name))
    r = moge("load", ck, "--json")
    assert r.exit_code == 1
    assert fast_load(capsys, ck) == (1, r.stdout, "")
    problems = json.loads(r.stdout)["problems"]
    # the tensor is gone, and the index's total_size no longer adds up
    assert [(p["kind"], p["tensor"]) for p in problems] == [("missing", name), ("index", "")]
    r = moge("load", ck)
    assert r.exit_code == 1 and "missing" in r.stdout and name in r.stdout


# ---- unreadable: exit 2, one `error:` line naming the file ------------------------------------
def truncate_shard(d):
    p = shards(d)[1]
    p.write_bytes(p.read_bytes()[:-100])
    return p.name, "outside"


def zero_byte_shard(d):
    shards(d)[0].write_bytes(b"")
    return shards(d)[0].name, "too short"


def header_past_end(d):
    p = shards(d)[0]
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    return p.name, "runs past the end"


def header_over_cap(d):
    p = shards(d)[0]
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return p.name, "exceeds"


def invalid_json(d):
    p = shards(d)[0]
    _, body = split(p)
    join(p, b"{this is not json", body)
    return p.name, "not valid JSON"


def unknown_dtype(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h[first_tensor(h)].update(dtype="F12"))
    return p.name, "unknown dtype 'F12'"


def shape_mismatch(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h[first_tensor(h)].update(shape=[3, 3]))
    return p.name, "needs 36 bytes"


def absurd_shape(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h[first_tensor(h)].update(shape=[2**40, 2**40, 2**40]))
    return p.name, "needs"


def negative_shape(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h[first_tensor(h)].update(shape=[-4, 16]))
    return p.name, "non-negative"


def overlapping(d):
    p = shards(d)[0]

    def fn(h):
        names = [k for k in h if k != "__metadata__"]
        a, b = sorted(names, key=lambda k: h[k]["data_offsets"][0])[:2]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]

    edit_header(p, fn)
    return p.name, "overlap"


def offsets_out_of_file(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h[first_tensor(h)].update(data_offsets=[10**9, 10**9 + 4]))
    return p.name, "outside"


def index_missing_shard(d):
    edit_index(d, lambda wm: wm.update({"model.norm.weight": "model-00009-of-00009.safetensors"}))
    return "model-00009-of-00009.safetensors", "does not exist"


def index_dotdot(d):
    edit_index(d, lambda wm: wm.update({"model.norm.weight": "../elsewhere.safetensors"}))
    return "../elsewhere.safetensors", "outside the checkpoint"


def index_absolute(d):
    edit_index(d, lambda wm: wm.update({"model.norm.weight": "/etc/passwd"}))
    return "/etc/passwd", "outside the checkpoint"


def index_symlink_escape(d):
    outside = d.parent / "outside.safetensors"
    shutil.copy(shards(d)[0], outside)
    (d / "link.safetensors").symlink_to(outside)
    edit_index(d, lambda wm: wm.update({"model.norm.weight": "link.safetensors"}))
    return "link.safetensors", "outside the checkpoint"


def index_tensor_not_in_shard(d):
    edit_index(d, lambda wm: wm.update({"model.layers.9.ghost.weight": shards(d)[0].name}))
    return "model.layers.9.ghost.weight", "does not hold it"


def tensor_in_two_shards(d):
    a, b = shards(d)[:2]
    ha = split(a)[0]
    name = first_tensor(ha)
    begin, end = ha[name]["data_offsets"]
    hb, body = split(b)
    hb[name] = {"dtype": ha[name]["dtype"], "shape": ha[name]["shape"], "data_offsets": [len(body), len(body) + end - begin]}
    join(b, hb, body + b"\x00" * (end - begin))  # a valid second copy, appended to shard b
    return name, "two shards"


def index_not_json(d):
    (d / "model.safetensors.index.json").write_text("{oops")
    return "model.safetensors.index.json", "not valid JSON"


def config_missing(d):
    (d / "config.json").unlink()
    return "config.json", "not found"


def config_not_json(d):
    (d / "config.json").write_text("nope")
    return "config.json", "not valid JSON"


def config_inconsistent(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_experts"] = 6
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json", "num_experts (6) is not divisible"


def config_wrong_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json", "hidden_size must be an integer"


def config_negative(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = -2
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json", "num_hidden_layers must be a positive integer"


def empty_directory(d):
    shutil.rmtree(d)
    d.mkdir()
    return str(d), "no model.safetensors.index.json"


def entry_not_an_object(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h.update({first_tensor(h): [1, 2]}))
    return p.name, "not a JSON object"


def offsets_not_a_pair(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h[first_tensor(h)].update(data_offsets=[0, 4, 8]))
    return p.name, "is not [begin, end]"


def boolean_in_shape(d):
    p = shards(d)[0]
    edit_header(p, lambda h: h[first_tensor(h)].update(shape=[True, 16]))
    return p.name, "non-negative integers"


def not_safetensors(d):
    p = d / "notes.safetensors"
    p.write_text("hello, I am a text file pretending to be weights\n" * 3)
    return "notes.safetensors", "header length"


@pytest.mark.parametrize(
    "breaker",
    [truncate_shard, zero_byte_shard, header_past_end, header_over_cap, invalid_json, unknown_dtype, shape_mismatch,
     absurd_shape, negative_shape, overlapping, offsets_out_of_file, index_missing_shard, index_dotdot, index_absolute,
     index_symlink_escape, index_tensor_not_in_shard, tensor_in_two_shards, index_not_json, config_missing,
     config_not_json, config_inconsistent, config_wrong_type, config_negative, empty_directory, not_safetensors,
     entry_not_an_object, offsets_not_a_pair, boolean_in_shape],
)  # fmt: skip
def test_broken_checkpoint_exit_2(ck, breaker, capsys):
    names, fragment = breaker(ck)
    target = ck / "notes.safetensors" if breaker is not_safetensors else ck
    r = moge("load", target, "--json")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert names in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in r.output
    kind = "config" if breaker.__name__.startswith("config") else "checkpoint"
    assert json.loads(r.stdout) == {"error": lines[0].removeprefix("error: "), "kind": kind, "exit_code": 2}  # for jq
    assert fast_load(capsys, target) == (2, r.stdout, r.stderr)  # the entry point's fast path says the same


def test_nonexistent_path_exit_2(tmp_path):
    r = moge("load", tmp_path / "nowhere")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "no such file or directory" in r.stderr


def test_bin_checkpoint_points_to_convert(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00" * 16)
    r = moge("load", tmp_path)
    assert r.exit_code == 2 and "moge convert" in r.stderr


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MOGE_DEBUG", "1")
    r = moge("load", tmp_path / "nowhere")
    assert r.exit_code != 0 and r.exception is not None and type(r.exception).__name__ == "CheckpointError"


def test_model_type_mismatch_is_a_problem(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "qwen2_moe"
    (ck / "config.json").write_text(json.dumps(cfg))
    r = moge("load", ck, "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["problems"][0]["kind"] == "config"


def test_72b_skeleton_figures(tmp_path):
    from moge_cli.synthetic import write_skeleton

    skel = write_skeleton(MoGEConfig.from_name("pangu-pro-moe-72b"), tmp_path / "72b")
    r = moge("load", skel, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["params"]["total"] == 71_988_781_056
    assert data["params"]["active"] == 16_498_139_136
    assert data["tensor_bytes"] == 143_977_562_112
    assert (data["num_groups"], data["experts_per_group"], data["picks_per_group"]) == (8, 8, 1)
    assert data["num_tensors"] == 9939 and data["dtype"] == "bfloat16" and data["layout"] == "per-expert"
    assert data["size_bytes"] > data["tensor_bytes"]  # plus the headers


def test_mixed_layout_judges_each_layer_by_its_own_expert_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.inspect import schema_problems
    from moge_cli.names import PER_EXPERT_RE, STACKED_RE

    per = load_file(write_checkpoint(TINY, tmp_path / "per", tokenizer=False) / "model.safetensors")
    stacked = load_file(write_checkpoint(TINY, tmp_path / "stacked", layout="stacked", tokenizer=False) / "model.safetensors")
    mixed = {n: t for n, t in per.items() if not ((m := PER_EXPERT_RE.match(n)) and m.group(1) == "1")}  # layer 1: stacked
    mixed.update({n: t for n, t in stacked.items() if (m := STACKED_RE.match(n)) and m.group(1) == "1"})
    mixed["model.layers.0.mlp.experts.2.up_proj.weight"] = mixed["model.layers.0.mlp.experts.2.up_proj.weight"][:-1]
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "config.json").write_bytes((tmp_path / "per" / "config.json").read_bytes())
    save_file(mixed, d / "model.safetensors")
    ck = open_checkpoint(d)
    assert ck.layout == "mixed"
    assert [(p.kind, p.tensor) for p in schema_problems(ck)] == [("layout", ""), ("shape", "model.layers.0.mlp.experts.2.up_proj.weight")]
