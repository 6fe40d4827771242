"""One rule for links and special files (moge_cli/files.py), for every file every command reads or copies.

A link may lead inside the checkpoint directory or, from a Hugging Face cache snapshot, into that
repo's blobs/; where it ends must be a regular file. Anything else: exit 2, one `error:` line naming the
file (and where it leads), nothing written at the destination, the source untouched. A FIFO must be
refused before anything opens it: the `fifo_guard` fixture releases any reader a regression would
leave blocked on one and fails the test, so the suite cannot hang.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub_cache import add_snapshot, fingerprint, repo_dir
from moge_cli.cli import app
from moge_cli.errors import CheckpointError
from moge_cli.files import checked_file, snapshot_blobs
from moge_cli.main import load_json

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"
INDEX = "model.safetensors.index.json"
runner = CliRunner()


def command(cmd: str, src, dst: Path) -> list[str]:
    return [str(a) for a in {
        "load": ["load", src, "--json"],
        "convert": ["convert", src, dst, "-q"],
        "quantize": ["quantize", src, dst, "--bits", "8", "-q"],
        "generate": ["generate", src, "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"],
        "profile": ["profile", src, "--prompt-ids", "1,2,3", "--decode", "2", "--json"],
    }[cmd]]  # fmt: skip


ALL = ("load", "convert", "quantize", "generate", "profile")
WRITERS = ("convert", "quantize")


@pytest.fixture(autouse=True)
def _no_bandwidth_probe(monkeypatch):
    monkeypatch.setattr("moge_cli.profiling.measure_read_bandwidth", lambda *a, **k: 1e10)  # not what is tested


@pytest.fixture()
def fifo_guard():
    """fifo_guard(path): watch a FIFO; a reader still blocked on it after a few seconds is released (the
    guard opens it for writing and closes it: the reader sees end of file) and the test fails."""
    fifos: list[Path] = []
    stop = threading.Event()
    hung: list[Path] = []

    def watch() -> None:
        if stop.wait(8):
            return
        while not stop.is_set():
            for f in fifos:
                try:
                    fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as e:  # ENXIO: nobody is reading it, as it should be
                    if e.errno not in (errno.ENXIO, errno.ENOENT):
                        raise
                    continue
                hung.append(f)
                os.close(fd)
            stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield lambda path: (os.mkfifo(path), fifos.append(path))
    stop.set()
    thread.join()
    assert not hung, f"a command opened the FIFO {hung[0]} instead of refusing it"


@pytest.fixture()
def ck(tmp_path) -> Path:
    """A copy of the fixture (3 shards + index, tokenizer.model, README to copy) and a file outside it."""
    d = tmp_path / "ck"
    shutil.copytree(FIXTURE, d)
    (d / "README.md").write_text("# tiny\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("do not copy me\n")
    return d


def single(d: Path) -> None:
    """Make d a directory without an index: its weights as one model.safetensors."""
    from moge_converters.convert import convert

    tmp = d.parent / "single-out"
    convert(d, tmp, max_shard_size="1GB")
    for p in [*d.glob("model-*.safetensors"), d / INDEX]:
        p.unlink()
    shutil.move(tmp / "model-00001-of-00001.safetensors", d / "model.safetensors")
    shutil.rmtree(tmp)


# Each case breaks the checkpoint at `d` and returns (file named in the error, what the error says, commands that must refuse).
def readme_outside(d, guard):
    (d / "README.md").unlink()
    (d / "README.md").symlink_to(d.parent / "elsewhere" / "secret.txt")
    return "README.md", str(d.parent / "elsewhere" / "secret.txt"), WRITERS


def tokenizer_outside(d, guard):
    shutil.move(d / "tokenizer.model", d.parent / "elsewhere" / "tokenizer.model")
    (d / "tokenizer.model").symlink_to(d.parent / "elsewhere" / "tokenizer.model")
    return "tokenizer.model", str(d.parent / "elsewhere" / "tokenizer.model"), ("convert", "quantize", "generate", "profile")


def single_file_outside(d, guard):
    single(d)
    shutil.move(d / "model.safetensors", d.parent / "elsewhere" / "weights.safetensors")
    (d / "model.safetensors").symlink_to(d.parent / "elsewhere" / "weights.safetensors")
    return "model.safetensors", str(d.parent / "elsewhere" / "weights.safetensors"), ALL


def shard_through_directory_link(d, guard):
    (d / "sub").symlink_to(d.parent / "elsewhere")
    shutil.move(d / SHARD1, d.parent / "elsewhere" / SHARD1)
    index = json.loads((d / INDEX).read_text())
    index["weight_map"] = {k: (f"sub/{SHARD1}" if v == SHARD1 else v) for k, v in index["weight_map"].items()}
    (d / INDEX).write_text(json.dumps(index))
    return f"sub/{SHARD1}", str(d.parent / "elsewhere" / SHARD1), ALL


def fifo_shard(d, guard):
    (d / SHARD1).unlink()
    guard(d / SHARD1)
    return SHARD1, "FIFO", ALL


def fifo_single_file(d, guard):
    single(d)
    (d / "model.safetensors").unlink()
    guard(d / "model.safetensors")
    return "model.safetensors", "FIFO", ALL


def fifo_config(d, guard):
    (d / "config.json").unlink()
    guard(d / "config.json")
    return "config.json", "FIFO", ALL


def fifo_readme(d, guard):
    (d / "README.md").unlink()
    guard(d / "README.md")
    return "README.md", "FIFO", WRITERS


def fifo_tokenizer(d, guard):
    (d / "tokenizer.model").unlink()
    guard(d / "tokenizer.model")
    return "tokenizer.model", "FIFO", ("convert", "quantize", "generate", "profile")


def shard_loop(d, guard):
    (d / SHARD2).unlink()
    (d / SHARD2).symlink_to("loop-b")
    (d / "loop-b").symlink_to(SHARD2)
    return SHARD2, "symlink loop", ALL


def readme_loop(d, guard):
    (d / "README.md").unlink()
    (d / "README.md").symlink_to("README.md")
    return "README.md", "symlink loop", WRITERS


def dangling_generation_config(d, guard):
    (d / "generation_config.json").unlink()
    (d / "generation_config.json").symlink_to("gone.json")
    return "generation_config.json", "does not exist", ("convert", "quantize", "generate", "profile")


CASES = [readme_outside, tokenizer_outside, single_file_outside, shard_through_directory_link, fifo_shard, fifo_single_file,
         fifo_config, fifo_readme, fifo_tokenizer, shard_loop, readme_loop, dangling_generation_config]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_everywhere_it_is_read(case, ck, tmp_path, fifo_guard, capsys):
    name, says, commands = case(ck, fifo_guard)
    before, outside = fingerprint(ck), fingerprint(tmp_path / "elsewhere")
    for cmd in ALL:
        dst = tmp_path / "out" / cmd
        r = runner.invoke(app, command(cmd, ck, dst))
        if cmd not in commands:  # does not read that file: unaffected
            assert r.exit_code == 0, (cmd, r.output)
            shutil.rmtree(dst, ignore_errors=True)
            continue
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (cmd, r.output)
        assert name in lines[0] and says in lines[0], (cmd, lines[0])
        assert "unexpected" not in lines[0] and "Traceback" not in r.output
        assert r.stdout == "" or json.loads(r.stdout)["error"] == lines[0].removeprefix("error: ")  # --json: the error as JSON too
        assert not dst.exists() and not any((tmp_path / "out").glob(f".{cmd}.moge-*")), cmd  # no output, no staging left
        assert fingerprint(ck) == before and fingerprint(tmp_path / "elsewhere") == outside, cmd
    if "load" in commands:  # the entry point's fast path (`moge load PATH --json`) says the same
        capsys.readouterr()
        assert load_json(str(ck)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and name in err and says in err


@pytest.fixture()
def two_repos(tmp_path, monkeypatch):
    """A cache holding pangu/tiny (the fixture) and pangu/other (its tokenizer.model differs)."""
    cache = tmp_path / "cache"
    add_snapshot(cache, "pangu/tiny", FIXTURE, "1" * 40)
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    (other / "tokenizer.model").write_bytes(b"not this one")
    (other / "README.md").write_text("other's readme\n")
    add_snapshot(cache, "pangu/other", other, "2" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def _relink_into_other(cache: Path, name: str) -> Path:
    """Point pangu/tiny's snapshot file `name` at pangu/other's blob of the same name: returns that blob."""
    snap = repo_dir(cache, "pangu/tiny") / "snapshots" / ("1" * 40)
    theirs = (repo_dir(cache, "pangu/other") / "snapshots" / ("2" * 40) / name).resolve()
    (snap / name).unlink(missing_ok=True)
    (snap / name).symlink_to(os.path.relpath(theirs, snap))  # ../../../models--pangu--other/blobs/<sha>
    return theirs


@pytest.mark.parametrize("name,commands", [(SHARD1, ALL), ("tokenizer.model", ("convert", "quantize", "generate", "profile")),
                                           ("README.md", WRITERS)])  # fmt: skip
def test_snapshot_link_into_another_repos_blobs(two_repos, tmp_path, name, commands):
    theirs = _relink_into_other(two_repos, name)
    before = fingerprint(two_repos)
    for cmd in commands:
        dst = tmp_path / "out" / cmd
        r = runner.invoke(app, command(cmd, "pangu/tiny", dst))
        assert r.exit_code == 2 and r.stderr.startswith("error: "), (cmd, r.output)
        assert name in r.stderr and str(theirs) in r.stderr and "blobs" in r.stderr, (cmd, r.stderr)
        assert not dst.exists()
        assert fingerprint(two_repos) == before


def test_snapshot_links_into_its_own_blobs_are_followed(two_repos, tmp_path):
    """The control for the test above: the untouched snapshot converts, and its files arrive as files."""
    r = runner.invoke(app, command("convert", "pangu/tiny", tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (FIXTURE / "tokenizer.model").read_bytes()
    assert not (tmp_path / "out" / "tokenizer.model").is_symlink()


def test_links_inside_the_checkpoint_are_followed(ck, tmp_path):
    """Links that stay inside the directory (a file, a folder on the way) are fine: copied as files."""
    (ck / "docs").mkdir()
    (ck / "README.md").rename(ck / "docs" / "readme.txt")
    (ck / "README.md").symlink_to("docs/readme.txt")
    (ck / "store").mkdir()
    shutil.move(ck / SHARD1, ck / "store" / SHARD1)
    (ck / SHARD1).symlink_to(Path("store") / SHARD1)
    (ck / "tok").symlink_to("store")  # a directory link that stays inside
    shutil.move(ck / "tokenizer.model", ck / "store" / "tokenizer.model")
    (ck / "tokenizer.model").symlink_to(Path("tok") / "tokenizer.model")
    for cmd in ALL:
        r = runner.invoke(app, command(cmd, ck, tmp_path / "out" / cmd))
        assert r.exit_code == 0, (cmd, r.output)
    out = tmp_path / "out" / "convert"
    assert (out / "README.md").read_text() == "# tiny\n" and not (out / "README.md").is_symlink()
    assert (out / "tokenizer.model").read_bytes() == (FIXTURE / "tokenizer.model").read_bytes()


def test_a_file_named_on_the_command_line_may_be_a_link(tmp_path):
    """The rule is for what a directory holds; a .safetensors file the user names is theirs to point anywhere."""
    from moge_converters.convert import convert

    convert(FIXTURE, tmp_path / "one", max_shard_size="1GB")
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(FIXTURE / "config.json", d / "config.json")
    (d / "weights.safetensors").symlink_to(tmp_path / "one" / "model-00001-of-00001.safetensors")
    r = runner.invoke(app, ["load", str(d / "weights.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    (d / "pipe.safetensors").unlink(missing_ok=True)
    os.mkfifo(d / "pipe.safetensors")
    r = runner.invoke(app, ["load", str(d / "pipe.safetensors"), "--json"])
    assert r.exit_code == 2 and "FIFO" in r.stderr and "pipe.safetensors" in r.stderr


def test_expert_parallel_rank_folder_linking_outside(tmp_path):
    from moge_converters.convert import convert

    split = tmp_path / "split"
    convert(FIXTURE, split, ep=2)
    assert runner.invoke(app, ["load", str(split), "--json"]).exit_code == 0
    shutil.move(split / "rank-1", tmp_path / "rank-1")
    (split / "rank-1").symlink_to(tmp_path / "rank-1")
    r = runner.invoke(app, ["load", str(split), "--json"])
    assert r.exit_code == 2 and "rank-1" in r.stderr and "outside the checkpoint directory" in r.stderr, r.output


def test_torch_checkpoint_files_follow_the_rule(tmp_path):
    import torch

    d = tmp_path / "pt"
    d.mkdir()
    shutil.copy(FIXTURE / "config.json", d / "config.json")
    (tmp_path / "elsewhere.bin").write_bytes(b"")
    torch.save({"x": torch.zeros(2)}, tmp_path / "elsewhere.bin")
    (d / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    r = runner.invoke(app, ["convert", str(d), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 2 and "pytorch_model.bin" in r.stderr and str(tmp_path / "elsewhere.bin") in r.stderr, r.output
    assert not (tmp_path / "out").exists()


def test_checked_file_rule(tmp_path):
    """The function itself: nested snapshot folders, the blobs of the same repo only, names that climb out."""
    cache = tmp_path / "cache"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.json").write_text("[]")
    snap = add_snapshot(cache, "org/name", src, "f" * 40)
    blobs = repo_dir(cache, "org/name") / "blobs"
    assert snapshot_blobs(snap) == blobs.resolve() and snapshot_blobs(snap / "sub") == blobs.resolve()
    assert snapshot_blobs(src) is None
    assert checked_file(snap, snap / "a.json") == snap / "a.json"
    assert checked_file(snap / "sub", snap / "sub" / "b.json") == snap / "sub" / "b.json"  # ../../../blobs
    assert (snap / "sub" / "b.json").read_text() == "[]"
    for bad, says in ((snap / ".." / "x", "outside"), (tmp_path / "x", "outside"), (snap, "outside")):
        with pytest.raises(CheckpointError, match=says):
            checked_file(snap, bad)
    # the same layout outside a cache (no models--X--Y/snapshots/ above it) gets no blobs exemption
    fake = tmp_path / "plain" / "snapshots" / "c"
    fake.mkdir(parents=True)
    (fake / "a.json").symlink_to(blobs / hashlib.sha256(b"{}").hexdigest())
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        checked_file(fake, fake / "a.json")
    with pytest.raises(CheckpointError, match="no such file"):
        checked_file(snap, snap / "absent.json")
