"""Hugging Face repo ids (`org/name`, `--revision`) resolved offline from a cache laid out as huggingface_hub
writes it (blobs/ named by content hash, relative links from snapshots/<commit>/, refs/<name>), for
every command that takes a checkpoint, on a sharded and a single-file repo."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub_cache import add_snapshot, fingerprint, repo_dir
from moge_cli.checkpoint import hub_cache_dir, open_checkpoint, resolve_hub_repo
from moge_cli.cli import app
from moge_cli.config import MoGEConfig
from moge_cli.errors import CheckpointError
from moge_cli.inspect import inspect_checkpoint
from moge_cli.main import load_json
from moge_cli.synthetic import write_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
TINY = MoGEConfig.from_name("tiny-moge")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
COMMITS = {  # repo -> {ref: commit}
    "pangu/tiny-sharded": {"main": "a" * 40, "v1": "b" * 40},
    "pangu/tiny-single": {"main": "c" * 40, "v1": "d" * 40},
}
runner = CliRunner()


def moge(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A cache with two repos, each with two commits: main, and an older one tagged v1.

    pangu/tiny-sharded: main = fixtures/tiny-moge (3 shards + index, bfloat16); v1 = 2 float32 shards.
    pangu/tiny-single: main = one bfloat16 model.safetensors; v1 = one float32 model.safetensors.
    Every version carries the fixture's tokenizer, so identical files share one blob across commits.
    """
    base = tmp_path_factory.mktemp("hub")
    cache = base / "cache"
    work = base / "work"
    sources = {
        ("pangu/tiny-sharded", "main"): FIXTURE,
        ("pangu/tiny-sharded", "v1"): write_checkpoint(TINY, work / "s1", dtype="float32", seed=1, max_shard_bytes=300_000, tokenizer=False),
        ("pangu/tiny-single", "main"): write_checkpoint(TINY, work / "m0", dtype="bfloat16", seed=2, tokenizer=False),
        ("pangu/tiny-single", "v1"): write_checkpoint(TINY, work / "m1", dtype="float32", seed=3, tokenizer=False),
    }
    expect = {}
    for (repo, ref), src in sources.items():
        for name in TOKENIZER_FILES:
            if not (src / name).exists():
                shutil.copy(FIXTURE / name, src / name)
        commit = COMMITS[repo][ref]
        snap = add_snapshot(cache, repo, src, commit, refs=(ref,))
        expect[repo, ref] = {
            "snapshot": snap,
            "dtype": json.loads((src / "config.json").read_text())["torch_dtype"],
            "shards": sorted(p.name for p in src.glob("*.safetensors")),
            "source": src,
        }
    return {"cache": cache, "expect": expect, "before": fingerprint(cache)}


@pytest.fixture()
def env(hub, monkeypatch, tmp_path):
    """HF_HUB_CACHE points at the cache (set after huggingface_hub may have been imported: read at call time)."""
    from huggingface_hub import constants  # read before the variable is set, on purpose

    assert constants.HF_HUB_CACHE != str(hub["cache"])
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # nothing named pangu/ here: the ids must come from the cache
    monkeypatch.setattr("moge_cli.profiling.measure_read_bandwidth", lambda *a, **k: 1e10)  # not what is tested: 0.5 s saved a run
    yield hub
    assert fingerprint(hub["cache"]) == hub["before"], "the cache was modified"


# (repo, --revision value or None, the ref whose snapshot that must select)
CASES = [
    (repo, rev, ref)
    for repo in COMMITS
    for rev, ref in ((None, "main"), ("v1", "v1"), (COMMITS[repo]["v1"], "v1"))
]
IDS = [f"{repo.split('-')[-1]}-{'default' if rev is None else 'ref' if rev == 'v1' else 'commit'}" for repo, rev, _ in CASES]


def rev_args(rev):
    return [] if rev is None else ["--revision", rev]


@pytest.mark.parametrize("repo,rev,ref", CASES, ids=IDS)
def test_load(env, repo, rev, ref, capsys):
    want = env["expect"][repo, ref]
    r = moge("load", repo, *rev_args(rev), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert Path(report["path"]) == want["snapshot"]
    assert report["shards"] == want["shards"] and report["dtype"] == want["dtype"] and report["problems"] == []
    if rev is None:  # `moge load ID --json` takes the entry point's fast path: the same report
        capsys.readouterr()
        assert load_json(repo) == 0 and json.loads(capsys.readouterr().out) == report


@pytest.mark.parametrize("repo,rev,ref", CASES, ids=IDS)
def test_convert(env, repo, rev, ref, tmp_path):
    want = env["expect"][repo, ref]
    out = tmp_path / "out"
    r = moge("convert", repo, out, *rev_args(rev), "--dtype", "float32", "--max-shard-size", "200KB", "--json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert Path(summary["source"]) == want["snapshot"] and len(summary["outputs"]) > 1
    for name in TOKENIZER_FILES + ("generation_config.json",):  # copied as files with the blob's bytes, not as links
        assert (out / name).is_file() and not (out / name).is_symlink()
        assert (out / name).read_bytes() == (want["source"] / name).read_bytes()
    src, dst = open_checkpoint(want["snapshot"]), open_checkpoint(out)
    assert set(dst.tensors) == set(src.tensors)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert dst.tensor(name).equal(src.tensor(name).float())


@pytest.mark.parametrize("repo,rev,ref", CASES, ids=IDS)
def test_quantize(env, repo, rev, ref, tmp_path):
    want = env["expect"][repo, ref]
    out = tmp_path / "q8"
    r = moge("quantize", repo, out, *rev_args(rev), "--bits", "8", "--json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert Path(summary["source"]) == want["snapshot"] and summary["quantized_tensors"] > 0
    assert (out / "tokenizer.model").read_bytes() == (want["source"] / "tokenizer.model").read_bytes()
    assert inspect_checkpoint(out).quantization.bits == 8


@pytest.mark.parametrize("repo,rev,ref", CASES, ids=IDS)
def test_profile(env, repo, rev, ref):
    want = env["expect"][repo, ref]
    r = moge("profile", repo, *rev_args(rev), "--prompt-ids", "1,2,3", "--decode", "2", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert Path(report["model"]) == want["snapshot"] and report["dtype"] == want["dtype"]


@pytest.mark.parametrize("repo,rev,ref", CASES, ids=IDS)
def test_generate(env, repo, rev, ref):
    want = env["expect"][repo, ref]
    r = moge("generate", repo, *rev_args(rev), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == [1, 2, 3] and len(out["generated_ids"]) == 3
    direct = moge("generate", want["snapshot"], "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json")
    assert json.loads(direct.stdout)["generated_ids"] == out["generated_ids"]  # the same snapshot, by path


def test_library_functions_take_a_revision(env, tmp_path):
    from moge_cli.loader import load_model
    from moge_cli.profiling import profile
    from moge_converters.convert import convert
    from moge_converters.quantize_pipeline import quantize_checkpoint

    v1 = env["expect"]["pangu/tiny-sharded", "v1"]
    assert open_checkpoint("pangu/tiny-sharded", revision="v1").root == v1["snapshot"]
    assert inspect_checkpoint("pangu/tiny-sharded", revision=COMMITS["pangu/tiny-sharded"]["v1"]).dtype == "float32"
    assert str(load_model("pangu/tiny-single", revision="v1").dtype) == "torch.float32"
    assert profile("pangu/tiny-single", revision="v1", prompt_ids=[1, 2], decode=1).dtype == "float32"
    r = convert("pangu/tiny-sharded", tmp_path / "c", revision="v1", dtype="bfloat16")
    assert Path(r.source) == v1["snapshot"] and inspect_checkpoint(tmp_path / "c").dtype == "bfloat16"
    r = quantize_checkpoint("pangu/tiny-single", tmp_path / "q", revision="v1", bits=4, group_size=32, verify=True)
    assert Path(r.source) == env["expect"]["pangu/tiny-single", "v1"]["snapshot"] and r.verified


def test_quantize_calib_and_eval_read_the_same_snapshot(env, tmp_path):
    from moge_converters.quantize_pipeline import quantize_checkpoint

    text = tmp_path / "text.txt"
    text.write_text("def main():\n    return [i * i for i in range(10)]\n" * 20)
    r = quantize_checkpoint("pangu/tiny-sharded", tmp_path / "q", revision="v1", bits=4, group_size=32, method="mse",
                            calib=text, calib_tokens=64, eval_text=text, eval_window=32)  # fmt: skip
    assert r.quantization.calibration["tokens"] == 64 and r.eval.tokens > 0


def test_revision_on_a_local_path_is_refused(env):
    r = moge("convert", FIXTURE, "out", "--revision", "v1")
    assert r.exit_code == 2 and "--revision applies to Hugging Face repo ids" in r.stderr
    assert not Path("out").exists()


@pytest.mark.parametrize("cmd", ["load", "convert", "quantize", "profile", "generate"])
def test_unknown_repo_or_revision_says_how_to_download(env, cmd):
    extra = {"convert": ["out"], "quantize": ["out"], "profile": ["--prompt-ids", "1"], "generate": ["--prompt-ids", "1"]}.get(cmd, [])
    r = moge(cmd, "pangu/tiny-sharded", *extra, "--revision", "v9")
    assert r.exit_code == 2 and "revision v9" in r.stderr and "hf download pangu/tiny-sharded --revision v9" in r.stderr, r.output
    r = moge(cmd, "pangu/absent", *extra)
    assert r.exit_code == 2 and "not in the Hugging Face cache" in r.stderr and "hf download pangu/absent" in r.stderr, r.output
    assert str(env["cache"]) in r.stderr
    assert not Path("out").exists()


def test_bad_revision_names_are_refused(env):
    for rev in ("../../etc", "/abs"):
        with pytest.raises(CheckpointError, match="not a branch, tag or commit"):
            resolve_hub_repo("pangu/tiny-sharded", rev)


def test_cache_location_follows_hf_home_when_hf_hub_cache_is_unset(hub, monkeypatch, tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "hub").symlink_to(hub["cache"])  # HF_HOME/hub
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub_cache_dir() == home / "hub"
    assert open_checkpoint("pangu/tiny-single").root == hub["expect"]["pangu/tiny-single", "main"]["snapshot"]
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        open_checkpoint("pangu/tiny-single")


def test_resolution_never_touches_the_network(hub, monkeypatch):
    """HF_HUB_OFFLINE unset: still no connection attempt, for a cached repo or a missing one."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    assert open_checkpoint("pangu/tiny-sharded", revision="v1").root == hub["expect"]["pangu/tiny-sharded", "v1"]["snapshot"]
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        open_checkpoint("pangu/absent")
    with pytest.raises(CheckpointError, match="revision v2"):
        open_checkpoint("pangu/tiny-sharded", revision="v2")
    assert calls == []


def test_expert_parallel_split_in_the_cache(env, monkeypatch, tmp_path):
    """A repo holding a `convert --ep 2` split: the rank folders' links go three levels up (../../../blobs)."""
    from moge_converters.convert import convert

    split = tmp_path / "split"
    convert(FIXTURE, split, ep=2)
    cache = tmp_path / "cache"
    snap = add_snapshot(cache, "pangu/tiny-ep", split, "e" * 40)
    assert str((snap / "rank-0" / "config.json").readlink()).startswith("../../../blobs/")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    r = moge("load", "pangu/tiny-ep", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ep_plan"]["world_size"] == 2 and report["problems"] == []
    assert report["shards"][0].startswith("rank-0/")


def test_blob_names_are_content_hashes(hub):
    """The helper builds the real layout: what huggingface_hub itself reads from the cache."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub["cache"])
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == set(COMMITS)
    for repo_id, refs in COMMITS.items():
        revs = {r.commit_hash: r for r in repos[repo_id].revisions}
        assert set(revs) == set(refs.values())
        for ref, commit in refs.items():
            assert ref in revs[commit].refs
            for f in revs[commit].files:
                assert f.blob_path.name == hashlib.sha256(f.blob_path.read_bytes()).hexdigest()
                assert not f.file_path.readlink().is_absolute()
    blobs = repo_dir(hub["cache"], "pangu/tiny-sharded") / "blobs"
    tok = hashlib.sha256((FIXTURE / "tokenizer.model").read_bytes()).hexdigest()
    assert (blobs / tok).is_file()  # shared by both commits: one blob
