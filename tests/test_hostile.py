"""Hostile and broken files: safetensors headers checked as the safetensors library checks them (it is the
oracle here), JSON that breaks Python's parser, chat templates that never end, staging left by killed
runs, quantized checkpoints asked to stack, and files that are not safetensors at all."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moge_cli import open_checkpoint
from moge_cli.chat import render_template
from moge_cli.cli import app
from moge_cli.errors import CheckpointError, ConfigError, MogeError, UsageError
from moge_cli.main import load_json
from moge_cli.safetensors_format import read_header

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
SHARD = "model-00001-of-00003.safetensors"
INDEX = "model.safetensors.index.json"
runner = CliRunner()


@pytest.fixture()
def ck(tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(FIXTURE, dst)
    return dst


def st_file(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def split(path: Path) -> tuple[int, bytes, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8 : 8 + n], blob[8 + n :]


def verdicts(path: Path) -> tuple[str, str]:
    """(ours, safetensors'): 'ok' or 'refused' for the same file; anything but a MogeError is a failure."""
    from safetensors import SafetensorError, safe_open

    try:
        read_header(path)
        ours = "ok"
    except CheckpointError:
        ours = "refused"
    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
        theirs = "ok"
    except SafetensorError:
        theirs = "refused"
    return ours, theirs


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (file bytes, expected verdict, fragment of our message)
CASES = {
    "plain": (st_file({"a": F32x2}, bytes(8)), "ok", None),
    "trailing_byte": (st_file({"a": F32x2}, bytes(9)), "refused", "not fully covered"),
    "gap_before_first": (st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "refused", "4-byte gap"),
    "overlap": (st_file({"a": F32x2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "refused", "overlaps"),
    "offsets_out_of_order": (st_file({"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)), "ok", None),
    "empty_tensor_past_the_end": (st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}, bytes(4)), "refused", "outside"),
    "empty_tensor_in_a_gap": (st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [6, 6]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [6, 10]}}, bytes(10)), "refused", "2-byte gap"),
    "utf8_bom": (st_file(b"\xef\xbb\xbf" + json.dumps({"a": F32x2}).encode(), bytes(8)), "refused", "byte-order mark"),
    "utf16_header": (st_file(json.dumps({"a": F32x2}).encode("utf-16-le"), bytes(8)), "refused", "UTF-16"),
    "utf16_bom_header": (st_file(json.dumps({"a": F32x2}).encode("utf-16"), bytes(8)), "refused", "byte-order mark"),
    "lone_surrogate_name": (st_file(b'{"a\\ud800": ' + json.dumps(F32x2).encode() + b"}", bytes(8)), "refused", "lone surrogate"),
    "surrogate_pair_name": (st_file(b'{"a\\ud83d\\ude00": ' + json.dumps(F32x2).encode() + b"}", bytes(8)), "ok", None),
    "metadata_list": (st_file({"__metadata__": [], "a": F32x2}, bytes(8)), "refused", "__metadata__"),
    "metadata_number": (st_file({"__metadata__": {"k": 1}, "a": F32x2}, bytes(8)), "refused", "__metadata__"),
    "metadata_null": (st_file({"__metadata__": None, "a": F32x2}, bytes(8)), "ok", None),
    "extra_key": (st_file({"a": {**F32x2, "note": "x"}}, bytes(8)), "ok", None),
    "extra_key_125_deep": (st_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + nested(125) + b"}}", bytes(8)), "ok", None),
    "extra_key_126_deep": (st_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + nested(126) + b"}}", bytes(8)), "refused", "127 levels"),
    "nan": (st_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}', bytes(8)), "refused", "NaN"),
    "float_overflow": (st_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1e400}}', bytes(8)), "refused", "out of range"),
    "shape_overflows_u64": (st_file({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}), "refused", "64-bit"),
    "nested_2000_deep": (st_file(b'{"__metadata__": ' + nested(2000) + b"}"), "refused", "nested too deeply"),
    "number_5000_digits": (st_file(b'{"__metadata__": {"k": "v"}, "a": ' + b"9" * 5000 + b"}"), "refused", "digits"),
    "negative_zero_offset": (st_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}', bytes(8)), "refused", "data_offsets"),
    "negative_zero_extra": (st_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": -0}, "__metadata__": {"k": "a-0"}}', bytes(8)), "ok", None),
    "leading_whitespace": (st_file(b" \n" + json.dumps({"a": F32x2}).encode() + b"   ", bytes(8)), "ok", None),
    "header_over_cap": (struct.pack("<Q", 100_000_001) + b"{}", "refused", "100000000-byte cap"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_header_checks_agree_with_the_safetensors_library(tmp_path, name):
    blob, expected, fragment = CASES[name]
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    assert verdicts(path) == (expected, expected)
    if fragment:
        with pytest.raises(CheckpointError, match=fragment) as e:
            read_header(path)
        assert str(path) in str(e.value)


@pytest.mark.parametrize("delta", [-1, 1, -8])
def test_header_length_off_by_some_bytes_is_refused(ck, delta):
    """The fixture's header ends in padding spaces, so a length one short still parses: only coverage catches it."""
    shard = ck / SHARD
    n, raw, data = split(shard)
    shard.write_bytes(struct.pack("<Q", n + delta) + raw + data)
    assert verdicts(shard) == ("refused", "refused")
    r = runner.invoke(app, ["load", str(ck), "--json"])
    assert r.exit_code == 2 and "unexpected" not in r.output and SHARD in r.output


def test_off_by_one_shard_fails_load_json_fast_path(ck, capsys):
    shard = ck / SHARD
    n, raw, data = split(shard)
    assert raw.endswith(b" ")  # padded, as every writer pads: n - 1 is still valid JSON
    shard.write_bytes(struct.pack("<Q", n - 1) + raw + data)
    assert load_json(str(ck)) == 2
    assert "not fully covered" in capsys.readouterr().err


def test_every_committed_shard_passes_both_readers():
    for shard in sorted(FIXTURE.glob("*.safetensors")):
        assert verdicts(shard) == ("ok", "ok")


# ---- JSON that breaks Python's parser, in every file a checkpoint reads ---------------------------
def set_shard_name(ck: Path, raw_name: str) -> None:
    """Point the index's first tensor at shard `raw_name` (a JSON string body, escapes allowed)."""
    index = json.loads((ck / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    text = json.dumps(index).replace(json.dumps(first) + ": " + json.dumps(index["weight_map"][first]), json.dumps(first) + f': "{raw_name}"', 1)
    (ck / INDEX).write_text(text)


@pytest.mark.parametrize(
    "damage, error, where, fragment",
    [
        (lambda d: set_shard_name(d, "model\\u0000.safetensors"), CheckpointError, INDEX, "NUL byte"),
        (lambda d: set_shard_name(d, "model\\ud800.safetensors"), CheckpointError, INDEX, "lone surrogate"),
        (lambda d: (d / INDEX).write_text("[" * 2000 + "]" * 2000), CheckpointError, INDEX, "nested too deeply"),
        (lambda d: (d / "config.json").write_text('{"a": ' + "[" * 2000 + "]" * 2000 + "}"), ConfigError, "config.json", "nested too deeply"),
        (lambda d: (d / "config.json").write_text('{"hidden_size": ' + "9" * 5000 + "}"), ConfigError, "config.json", "4300 digits"),
        (lambda d: (d / INDEX).write_text('{"metadata": {"total_size": ' + "9" * 5000 + "}}"), CheckpointError, INDEX, "4300 digits"),
        (lambda d: (d / "config.json").write_bytes(b"\xef\xbb\xbf" + (d / "config.json").read_bytes()), ConfigError, "config.json", "byte-order mark"),
        (lambda d: (d / "config.json").write_text((d / "config.json").read_text(), encoding="utf-16"), ConfigError, "config.json", "byte-order mark"),
    ],
    ids=["nul_in_shard_name", "lone_surrogate_in_shard_name", "index_2000_deep", "config_2000_deep", "config_5000_digits",
         "index_5000_digits", "config_bom", "config_utf16"],
)  # fmt: skip
def test_hostile_json_is_a_clear_error_naming_the_file(ck, damage, error, where, fragment):
    damage(ck)
    with pytest.raises(error, match=fragment) as e:
        open_checkpoint(ck)
    assert str(ck / where) in str(e.value)
    r = runner.invoke(app, ["load", str(ck)])
    assert r.exit_code == 2 and "unexpected" not in r.output and fragment in r.output


def test_hostile_tokenizer_config_is_a_clear_error(ck):
    from moge_cli.tokenizer import load_tokenizer

    (ck / "tokenizer_config.json").write_text('{"x": ' + "[" * 2000 + "]" * 2000 + "}")
    with pytest.raises(MogeError, match="tokenizer_config.json: JSON nested too deeply"):
        load_tokenizer(ck)


# ---- chat templates that would run for hours or fill memory -------------------------------------
MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}", "steps"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "steps"),
        ("{% for i in range(999999999) %}x{% endfor %}", r"range\(999999999\) has over 100,000 items"),
        ("{{ 'x' * 999999999 }}", "repeats a value"),
        ("{{ 'x' * 600000 }}{{ 'x' * 600000 }}", "output passes 1,000,000 characters"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", "builds a value"),
        ("{{ 2 ** 99999999 }}", "bits"),
        ("{{ '%999999999d' % 1 }}", "width"),
        ("{{ '{:999999999}'.format(1) }}", "width"),
        ("{{ 'x'|center(999999999) }}", "argument 999999999"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat template"),
    ],
    ids=["nested_loops_output", "nested_loops_quiet", "huge_range", "repeat", "output_cap", "doubling", "power", "printf_width",
         "format_width", "center_width", "zero_division", "recursion"],
)  # fmt: skip
def test_runaway_chat_template_is_stopped(template, fragment):
    with pytest.raises(UsageError, match=fragment):
        render_template(template, MSGS)


def test_the_time_budget_stops_a_template():
    from moge_cli.template_sandbox import BoundedSandbox

    env = BoundedSandbox(seconds=-1.0)  # already past its deadline: the first step stops it
    with pytest.raises(UsageError, match="still rendering after"):
        env.render_bounded("{% for i in range(3) %}{{ i }}{% endfor %}")


def test_ordinary_templates_still_render():
    t = (
        "{% for m in messages %}{{ '<' ~ m['role'] ~ '>' }}{{ m.content|trim }}{% if not loop.last %}|{% endif %}{% endfor %}"
        "{% for i in range(2) %}{{ loop.length }}{% endfor %}{{ '%3d' % 7 }}{{ '{:>3}'.format('a') }}{{ range(4)|list|length }}"
        "{% if add_generation_prompt %}{{ bos_token }}{% endif %}"
    )
    assert render_template(t, MSGS + [{"role": "assistant", "content": " yo "}], bos_token="<s>") == "<user>hi|<assistant>yo22  7  a4<s>"


# ---- staging left by a killed conversion --------------------------------------------------------
KILLABLE = """
import sys, time
from moge_converters.convert import convert
convert(sys.argv[1], sys.argv[2], dtype="float32", max_shard_size=20_000, progress=lambda n, total: time.sleep(600))
"""


def test_staging_of_a_killed_run_is_removed_and_reported_even_when_its_pid_is_reused(ck, tmp_path):
    from moge_converters.convert import convert

    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(ck), str(tmp_path / "first")])
    staging = tmp_path / f".first.moge-tmp-{proc.pid}"
    try:
        deadline = time.monotonic() + 120
        while not list(staging.glob("*.safetensors")):  # the first shard is being written, then progress sleeps
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reused = tmp_path / f".first.moge-tmp-{os.getpid()}"  # as if the dead run's PID now belonged to a live process
    staging.rename(reused)
    result = convert(ck, tmp_path / "second")  # another destination in the same directory
    assert not reused.exists()
    assert any(str(reused) in note and "killed" in note for note in result.notes)


def test_staging_of_a_live_run_is_left_alone(ck, tmp_path):
    from moge_converters.convert import convert
    from moge_converters.shards import LOCK_NAME

    live = tmp_path / f".other.moge-tmp-{os.getpid()}"
    live.mkdir()
    fd = os.open(live / LOCK_NAME, os.O_CREAT | os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = convert(ck, tmp_path / "out")
        assert live.exists() and not any("removed" in n for n in result.notes)
    finally:
        os.close(fd)
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # the lock never reaches the output


# ---- quantized checkpoints do not stack ---------------------------------------------------------
def test_quantized_checkpoint_is_not_stacked(tmp_path):
    from moge_converters.convert import convert
    from moge_converters.quantize_pipeline import quantize_checkpoint

    q = tmp_path / "q"
    quantize_checkpoint(FIXTURE, q)
    with pytest.raises(UsageError, match="experts are quantized"):
        convert(q, tmp_path / "stacked", layout="stacked")
    assert not (tmp_path / "stacked").exists()
    r = runner.invoke(app, ["convert", str(q), str(tmp_path / "stacked"), "--layout", "stacked"])
    assert r.exit_code == 2 and "per-expert -> stacked" not in r.output and not (tmp_path / "stacked").exists()


# ---- files that are not safetensors -------------------------------------------------------------
def test_pytorch_file_is_named_as_such(tmp_path):
    f = tmp_path / "x.bin"
    with zipfile.ZipFile(f, "w") as z:  # torch.save's format since 1.6
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    r = runner.invoke(app, ["load", str(f)])
    assert r.exit_code == 2 and "PyTorch" in r.output and f"moge convert {f}" in r.output and "config.json" not in r.output


def test_folder_of_pth_files_gets_the_convert_hint(tmp_path):
    d = tmp_path / "pth"
    d.mkdir()
    shutil.copy(FIXTURE / "config.json", d)
    (d / "consolidated.00.pth").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match=r"PyTorch weights \(consolidated.00.pth\).*moge convert"):
        open_checkpoint(d)


def test_a_text_file_is_not_safetensors_before_its_missing_config_matters(tmp_path):
    f = tmp_path / "passwd"
    f.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(CheckpointError, match="not a safetensors file") as e:
        open_checkpoint(f)
    assert "config.json" not in str(e.value)
