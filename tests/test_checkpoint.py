"""Checkpoint reader and inspect report: inputs, layouts, schema problems, verification, lazy access."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from moge_cli.synthetic import write_checkpoint
from moge_cli import inspect_checkpoint, open_checkpoint
from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.errors import CheckpointError, ConfigError
from moge_cli.problems import Problem

TINY = MoGEConfig.from_dict(PRESETS["tiny-moge"])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return write_checkpoint(TINY, tmp_path_factory.mktemp("sharded"), dtype="float32", max_shard_bytes=200_000, tokenizer=False)


@pytest.fixture()
def copy(sharded, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(sharded, dst)
    return dst


def read_raw_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def shard_holding(ckpt_dir: Path, name: str) -> Path:
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    return ckpt_dir / index["weight_map"][name]


def test_sharded_directory_reads_headers_only(sharded):
    ckpt = open_checkpoint(sharded)
    assert len(ckpt.files) > 1 and ckpt.index_path is not None
    assert ckpt.layout == "per-expert"
    assert not ckpt._maps  # nothing memory-mapped until a tensor is asked for
    report = inspect_checkpoint(sharded)
    assert report.problems == []
    assert report.num_groups == 4 and report.experts_per_group == 2 and report.picks_per_group == 1
    assert report.params["total"] == sum(t.numel for t in ckpt.tensors.values())


def test_single_file_and_single_model_safetensors(sharded, tmp_path):
    from safetensors.torch import save_file

    ckpt = open_checkpoint(sharded)
    state = {n: ckpt.tensor(n).clone() for n in ckpt.tensors}
    d = tmp_path / "single"
    d.mkdir()
    shutil.copy(sharded / "config.json", d)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    assert inspect_checkpoint(d).problems == []
    r = inspect_checkpoint(d / "model.safetensors")  # the file itself, config.json beside it
    assert r.problems == [] and r.path.endswith("model.safetensors")


def test_lazy_tensor_access_matches_file_bytes(sharded):
    import torch

    ckpt = open_checkpoint(sharded)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    t = ckpt.tensor(name)
    assert t.shape == (32, 64) and t.dtype == torch.float32
    assert list(ckpt._maps) == [ckpt.tensors[name].file]  # only the shard that holds it is mapped
    assert bytes(ckpt.raw(name)) == t.numpy().tobytes()
    layer = ckpt.layer(1)
    assert set(layer) == set(ckpt.layer_names(1)) and all(n.startswith("model.layers.1.") for n in layer)
    assert len(layer) == 5 + 10 + 3 * TINY.num_experts


def test_tensor_file_is_never_modified(copy):
    before = {p.name: p.read_bytes() for p in copy.glob("*.safetensors")}
    ckpt = open_checkpoint(copy)
    t = ckpt.tensor("model.norm.weight")
    t.mul_(0)  # private copy-on-write mapping: the file must not change
    ckpt.close()
    assert {p.name: p.read_bytes() for p in copy.glob("*.safetensors")} == before


def test_stacked_layout_detected(tmp_path):
    d = write_checkpoint(TINY, tmp_path / "st", dtype="float32", layout="stacked", tokenizer=False)
    r = inspect_checkpoint(d)
    assert r.layout == "stacked" and r.problems == []


def test_schema_problems_reported_not_raised(copy):
    # drop one tensor from the index and its shard header -> missing; add an unknown one -> unexpected
    gone = "model.layers.0.mlp.experts.5.down_proj.weight"
    shard = shard_holding(copy, gone)
    header, body = read_raw_header(shard)
    header["model.layers.0.mlp.extra_scale"] = header.pop(gone)
    write_raw(shard, header, body)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra_scale"] = index["weight_map"].pop(gone)
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    r = inspect_checkpoint(copy)
    kinds = {(p.kind, p.tensor) for p in r.problems}
    assert ("missing", gone) in kinds
    assert ("unexpected", "model.layers.0.mlp.extra_scale") in kinds


def test_wrong_shape_reported(copy):
    name = "model.layers.1.mlp.gate.weight"  # [8, 64] float32 = 2048 bytes
    shard = shard_holding(copy, name)
    header, body = read_raw_header(shard)
    header[name]["shape"] = [16, 32]
    write_raw(shard, header, body)
    problems = inspect_checkpoint(copy).problems
    assert Problem("shape", name, "shape [16, 32], config says [8, 64]") in problems


def test_mixed_float_dtypes_reported(tmp_path):
    from safetensors.torch import save_file

    ckpt = open_checkpoint(write_checkpoint(TINY, tmp_path / "a", dtype="bfloat16", tokenizer=False))
    state = {n: ckpt.tensor(n).clone() for n in ckpt.tensors}
    state["model.norm.weight"] = state["model.norm.weight"].float()
    d = tmp_path / "b"
    d.mkdir()
    shutil.copy(tmp_path / "a" / "config.json", d)
    save_file(state, d / "model.safetensors")
    r = inspect_checkpoint(d)
    assert r.dtype == "bfloat16"
    assert [(p.kind, p.tensor) for p in r.problems] == [("dtype", "model.norm.weight")]


def test_verify_counts_nonfinite_and_zero(copy):
    import numpy as np

    name = "model.layers.0.self_attn.q_proj.bias"  # float32 [64]
    shard = shard_holding(copy, name)
    header, body = read_raw_header(shard)
    b, e = header[name]["data_offsets"]
    vals = np.zeros(64, dtype=np.float32)
    vals[:3] = [np.nan, np.inf, -np.inf]
    body = body[:b] + vals.tobytes() + body[e:]
    zero = "model.layers.0.self_attn.k_proj.bias"
    if zero in header:
        zb, ze = header[zero]["data_offsets"]
        body = body[:zb] + b"\x00" * (ze - zb) + body[ze:]
    write_raw(shard, header, body)
    seen = []
    r = inspect_checkpoint(copy, verify=True, progress=lambda n, total: seen.append((n, total)))
    assert r.verify.nan == 1 and r.verify.inf == 2
    assert Problem("nonfinite", name, "1 NaN and 2 Inf values") in r.problems
    if zero in header:
        assert Problem("zero", zero, "every value is zero") in r.problems
    assert sum(n for n, _ in seen) == sum(p.stat().st_size for p in copy.glob("*.safetensors"))


def test_manifest_round_trip_and_tamper(copy, tmp_path):
    import hashlib

    manifest = tmp_path / "manifest.json"
    inspect_checkpoint(copy, manifest=manifest)
    files = json.loads(manifest.read_text())["files"]
    for name, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((copy / name).read_bytes()).hexdigest()
    assert inspect_checkpoint(copy, check=manifest).problems == []
    victim = sorted(copy.glob("model-*.safetensors"))[-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01  # flip one bit of tensor data: still a valid file
    victim.write_bytes(bytes(data))
    problems = inspect_checkpoint(copy, check=manifest).problems
    assert [(p.kind, p.tensor) for p in problems] == [("hash", victim.name)]


def test_hub_repo_id_resolved_from_local_cache_only(sharded, tmp_path, monkeypatch):
    from hub_cache import add_snapshot

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = add_snapshot(cache, "pangu/tiny-moge", sharded, commit)  # the real layout: links into blobs/ (tests/test_hf_cache.py has more)
    assert all(p.is_symlink() for p in snap.iterdir())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    r = inspect_checkpoint("pangu/tiny-moge")
    assert r.problems == [] and Path(r.path) == snap
    assert inspect_checkpoint("pangu/tiny-moge", revision=commit).problems == []
    with pytest.raises(CheckpointError, match="pangu/other.*hf download pangu/other"):
        inspect_checkpoint("pangu/other")
    with pytest.raises(CheckpointError, match="revision v2"):
        inspect_checkpoint("pangu/tiny-moge", revision="v2")


def test_missing_config_is_config_error(copy):
    os.remove(copy / "config.json")
    with pytest.raises(ConfigError, match="config.json not found"):
        open_checkpoint(copy)
