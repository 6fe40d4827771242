"""`moge convert` on bad input and failing writes: a clear error, and nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moge_converters.shards as shards
from moge_converters.convert import convert
from moge_converters.shards import WriteError
from moge_cli.synthetic import write_checkpoint
from moge_cli.cli import app
from moge_cli.config import MoGEConfig
from moge_cli.errors import CheckpointError, ConfigError, UsageError

TINY = MoGEConfig.from_name("tiny-moge")
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_checkpoint(TINY, tmp_path_factory.mktemp("good") / "ck", max_shard_bytes=100_000, tokenizer=False)


@pytest.fixture()
def work(good, tmp_path) -> Path:
    """A private copy of the source in work/src; outputs go to work/out. Only src may remain afterwards."""
    shutil.copytree(good, tmp_path / "src")
    return tmp_path


def left_behind(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name != "src")


def first_shard(d: Path) -> Path:
    return sorted(d.glob("model-*.safetensors"))[0]


def edit_header(path: Path, fn) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def drop_tensor(path: Path, name: str) -> None:
    """Remove a tensor from a shard (header and bytes: the file stays a valid safetensors file) and from
    the index: a consistent but incomplete checkpoint."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    header.pop(name)
    kept, pos = [], 0
    for entry in sorted((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"]):
        b, e = entry["data_offsets"]
        kept.append(body[b:e])
        entry["data_offsets"] = [pos, pos + e - b]
        pos += e - b
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(kept))
    index = path.parent / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][name]
    data["metadata"].pop("total_size", None)
    index.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage,error,match",
    [
        (lambda d: first_shard(d).write_bytes(first_shard(d).read_bytes()[:-10]), CheckpointError, "outside the"),
        (lambda d: first_shard(d).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"), CheckpointError, "not valid JSON"),
        (lambda d: edit_header(first_shard(d), lambda h: h["model.embed_tokens.weight"].update(dtype="Q7")), CheckpointError, "unknown dtype"),
        (lambda d: (d / "config.json").unlink(), ConfigError, "config.json not found"),
        (lambda d: first_shard(d).unlink(), CheckpointError, "does not exist"),
    ],
    ids=["truncated", "garbage-header", "bad-dtype", "no-config", "missing-shard"],
)
def test_reader_rejections_write_nothing(work, damage, error, match):
    damage(work / "src")
    with pytest.raises(error, match=match):
        convert(work / "src", work / "out", layout="stacked")
    assert left_behind(work) == []


def test_missing_expert_cannot_be_stacked(work):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    index = json.loads((work / "src" / "model.safetensors.index.json").read_text())
    drop_tensor(work / "src" / index["weight_map"][name], name)
    with pytest.raises(CheckpointError, match=r"layer 1: cannot stack the experts, missing 1 .*5\.up_proj"):
        convert(work / "src", work / "out", layout="stacked")
    assert left_behind(work) == []
    convert(work / "src", work / "out", dtype="float32")  # per-expert output passes the gap on; load reports it


def fail_writes_after(monkeypatch, n: int, error: BaseException) -> list[int]:
    """Make the n-th low-level write of any kind (write, pwrite, sendfile) raise `error`; returns the call log."""
    calls: list[int] = []
    for fn in ("_write", "_pwrite", "_sendfile"):
        real = getattr(shards, fn)

        def failing(*args, real=real):
            calls.append(1)
            if len(calls) == n:
                raise error
            return real(*args)

        monkeypatch.setattr(shards, fn, failing)
    return calls


def test_injected_disk_full_removes_partial_output(work, monkeypatch):
    calls = fail_writes_after(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(WriteError, match="disk full.*partial output was removed"):
        convert(work / "src", work / "out", layout="stacked")
    assert left_behind(work) == [] and len(calls) == 3
    calls.clear()
    res = runner.invoke(app, ["convert", str(work / "src"), str(work / "out"), "--quiet", "--dtype", "float16"])
    assert res.exit_code == 2 and "disk full" in res.output and left_behind(work) == []


def test_failed_force_keeps_the_old_destination(work, monkeypatch):
    (work / "out").mkdir()
    (work / "out" / "keep").write_text("old")
    fail_writes_after(monkeypatch, 4, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(WriteError, match="Input/output error"):
        convert(work / "src", work / "out", dtype="float16", force=True)
    assert left_behind(work) == ["out"] and (work / "out" / "keep").read_text() == "old"


def test_interrupt_removes_partial_output(work, monkeypatch):
    seen = []

    def progress(n, total):
        seen.append(n)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(work / "src", work / "deep" / "er" / "out", layout="stacked", progress=progress)
    assert left_behind(work) == []  # the parents it created are gone too
    fail_writes_after(monkeypatch, 2, KeyboardInterrupt())
    res = runner.invoke(app, ["convert", str(work / "src"), str(work / "out"), "--quiet"])
    assert res.exit_code == 130 and "interrupted" in res.output and left_behind(work) == []


def test_staging_left_by_a_killed_run_is_removed_by_the_next(work):
    """SIGKILL cannot be caught: the next conversion to the same place removes what the dead run left."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = work / f".out.moge-tmp-{victim.pid}"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    victim.kill()
    victim.wait()
    live = work / f".out.moge-tmp-{os.getppid()}"  # a running process's staging is not ours to delete
    live.mkdir()
    convert(work / "src", work / "out")
    assert left_behind(work) == sorted(["out", live.name])


def test_not_enough_free_space_refused_before_writing(work, monkeypatch):
    monkeypatch.setattr(shards, "free_bytes", lambda path: 10_000)
    with pytest.raises(UsageError, match="not enough free disk space"):
        convert(work / "src", work / "out")
    assert left_behind(work) == []


def test_unwritable_destination(work, monkeypatch):
    real_mkdir = Path.mkdir

    def deny(self, *a, **k):
        if ".moge-tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", deny)
    with pytest.raises(UsageError, match="cannot create the output here.*writable"):
        convert(work / "src", work / "out")
    assert left_behind(work) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(work):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = runner.invoke(app, ["convert", str(work / "src"), str(ro / "out"), "--quiet"])
        assert res.exit_code == 2 and "writable" in res.output and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_real_write_failure_at_file_size_limit(work):
    """A real failing write(2)/sendfile(2): RLIMIT_FSIZE makes the kernel refuse bytes past 150 KB."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000)); "
        "from moge_cli.cli import app; sys.argv = ['moge'] + sys.argv[1:]; app()"
    )
    args = [sys.executable, "-c", code, "convert", str(work / "src"), str(work / "out"), "--layout", "stacked", "--max-shard-size", "10MB", "--quiet"]
    res = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "file size limit reached" in res.stderr and "partial output was removed" in res.stderr
    assert left_behind(work) == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
def test_failure_in_a_caster_thread_removes_partial_output(tmp_path, monkeypatch, error):
    """A tensor of several cast blocks is written by the pool's threads; a failure there cleans up too."""
    from moge_cli.config import PRESETS

    cfg = MoGEConfig.from_dict({**PRESETS["tiny-moge"], "hidden_size": 256, "moe_intermediate_size": 1024})
    write_checkpoint(cfg, tmp_path / "src", tokenizer=False)
    calls = []
    real = shards._pwrite

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise error
        return real(fd, data, offset)

    monkeypatch.setattr(shards, "_pwrite", failing)
    with pytest.raises(WriteError if isinstance(error, OSError) else KeyboardInterrupt):
        convert(tmp_path / "src", tmp_path / "out", layout="stacked", dtype="float16")
    assert len(calls) >= 2 and left_behind(tmp_path) == []


def test_a_full_disk_fails_at_the_reservation_before_anything_is_written(work, monkeypatch):
    """Shards are reserved with fallocate before writing: ENOSPC there is the same clear error, nothing left."""
    writes = fail_writes_after(monkeypatch, 10**9, OSError(errno.EIO, "unused"))

    def full(fd, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "_fallocate", full)
    with pytest.raises(WriteError, match="disk full.*partial output was removed"):
        convert(work / "src", work / "out", dtype="float16")
    assert left_behind(work) == [] and writes == []


def test_shards_are_reserved_at_their_final_size(work):
    """The reservation changes nothing in the output: every shard file is exactly its header plus data."""
    convert(work / "src", work / "out", layout="stacked", max_shard_size="100KB")
    for f in (work / "out").glob("*.safetensors"):
        n = int.from_bytes(f.read_bytes()[:8], "little")
        header = json.loads(f.read_bytes()[8 : 8 + n])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert f.stat().st_size == 8 + n + end
