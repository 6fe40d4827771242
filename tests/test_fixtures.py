"""The checkpoint generator (fixtures/) and the committed fixtures/tiny-moge it wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from moge_cli.synthetic import plan_shards, random_tensors, write_checkpoint, write_skeleton
from moge_cli.synthetic_tokenizer import CHAT_EOS_ID, TOKENIZER_CONFIG, corpus_lines, corpus_sha256, train_tokenizer, write_tokenizer
from moge_cli.config import MoGEConfig
from moge_cli.errors import UsageError
from moge_cli.names import expected_tensors
from moge_cli.safetensors_format import read_header

TINY_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
# The settings fixtures/README.md regenerates tiny-moge with.
TINY_SETTINGS = dict(seed=0, dtype="bfloat16", layout="per-expert", max_shard_bytes=160_000)
TINY_SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
# What the committed tokenizer.model was trained on; sentencepiece output is byte-identical only
# for the same training text (this Python's stdlib files) and the same sentencepiece.
TINY_TOKENIZER_BUILT_WITH = ("d0fad4efcb024a98db2362e9e06792a718c5b4f912ef0eb7a21e743742ae2676", "0.2.3")
CHAT = "[unused9]系统：You are helpful.[unused10][unused9]用户：Hi![unused10][unused9]助手："


@pytest.fixture(scope="module")
def tiny_cfg() -> MoGEConfig:
    return MoGEConfig.from_name("tiny-moge")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory, tiny_cfg) -> Path:
    return write_checkpoint(tiny_cfg, tmp_path_factory.mktemp("tiny-moge"), **TINY_SETTINGS)


@pytest.fixture(scope="module")
def tiny_sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(TINY_DIR / "tokenizer.model"))


# ---- the committed fixture is what the generator writes ----------------------------------------
def test_committed_files_match_generator(regenerated):
    committed = sorted(p.name for p in TINY_DIR.iterdir())
    assert committed == sorted(p.name for p in regenerated.iterdir())
    assert set(TINY_SHARDS) < set(committed) and "model.safetensors.index.json" in committed
    for name in committed:
        if name != "tokenizer.model":  # see the next test
            assert (TINY_DIR / name).read_bytes() == (regenerated / name).read_bytes(), name


def test_committed_tokenizer_matches_generator(regenerated):
    if (corpus_sha256(), spm.__version__) != TINY_TOKENIZER_BUILT_WITH:
        pytest.skip("tokenizer training text or sentencepiece differs from the fixture's; see fixtures/README.md")
    assert (TINY_DIR / "tokenizer.model").read_bytes() == (regenerated / "tokenizer.model").read_bytes()


# Run in a fresh interpreter with another str hash seed and sentencepiece's own random generator
# seeded: neither may reach the tokenizer (by default sentencepiece seeds it from std::random_device).
_TRAIN_ELSEWHERE = """
import hashlib, sentencepiece
sentencepiece.set_random_generator_seed(12345)
from moge_cli.synthetic_tokenizer import train_tokenizer
print(hashlib.sha256(train_tokenizer(512)).hexdigest())
"""


def test_tokenizer_training_is_deterministic():
    """train_tokenizer has no seed: its bytes are a function of the vocabulary size and the training
    text alone. The same inputs give the same bytes, here and in another process (other hash seed,
    other sentencepiece seed); other inputs give another tokenizer (a cached or constant result,
    or one that ignored its text, would pass the first two checks)."""
    import hashlib
    import os
    import subprocess
    import sys

    a = train_tokenizer(512)
    assert a == train_tokenizer(512)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run([sys.executable, "-c", _TRAIN_ELSEWHERE], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == hashlib.sha256(a).hexdigest()
    assert train_tokenizer(600) != a
    other_text = corpus_lines()[::2]
    assert train_tokenizer(512, other_text) != a and train_tokenizer(512, other_text) == train_tokenizer(512, other_text)


def test_committed_fixture_is_small():
    assert sum(p.stat().st_size for p in TINY_DIR.iterdir()) < 5 * 10**6


# ---- headers, index, values --------------------------------------------------------------------
def test_committed_headers_give_expected_tensors(tiny_cfg):
    expected = expected_tensors(tiny_cfg, "per-expert")
    index = json.loads((TINY_DIR / "model.safetensors.index.json").read_text())
    names, total = [], 0
    for shard in TINY_SHARDS:
        tensors, metadata = read_header(TINY_DIR / shard)
        assert metadata == {"format": "pt"}
        in_order = sorted(tensors.values(), key=lambda t: t.start)
        names += [t.name for t in in_order]
        for t in in_order:
            assert t.dtype == "BF16" and t.shape == expected[t.name]
            assert index["weight_map"][t.name] == shard
        assert in_order[-1].end == (TINY_DIR / shard).stat().st_size  # no trailing bytes
        data = sum(t.nbytes for t in in_order)
        assert data <= TINY_SETTINGS["max_shard_bytes"]
        total += data
    assert names == list(expected)  # file order, every tensor exactly once
    assert list(index["weight_map"]) == sorted(expected)
    assert index["metadata"]["total_size"] == total == sum(math.prod(s) * 2 for s in expected.values())


def test_committed_values_are_random_tensors(tiny_cfg):
    loaded = {}
    for shard in TINY_SHARDS:
        loaded.update(load_file(TINY_DIR / shard))  # the reference reader accepts our files
    generated = dict(random_tensors(tiny_cfg, seed=0, dtype="bfloat16"))
    assert loaded.keys() == generated.keys()
    for name, t in generated.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], t), name


def test_init_is_sensible(tiny_cfg):
    t = {n: x.float() for n, x in random_tensors(tiny_cfg, seed=0, dtype="float32")}
    for name, x in t.items():
        assert torch.isfinite(x).all() and x.std() > 0, name
        if name.endswith("norm.weight"):
            assert (x - 1).abs().max() < 0.2, name
        elif name.endswith(".bias"):
            assert x.abs().max() < 0.2, name
        elif name.endswith("router_scale"):
            assert x.shape == (1, tiny_cfg.num_experts) and 0.5 <= x.min() and x.max() <= 1.5
        elif name != "model.embed_tokens.weight":
            assert 0.5 < x.std() * x.shape[-1] ** 0.5 < 1.5, name  # ~ 1/sqrt(fan_in)
    # Distinct tensors get distinct numbers (no generator reused across names).
    expert = "model.layers.0.mlp.experts.0."
    assert not torch.equal(t[expert + "gate_proj.weight"], t[expert + "up_proj.weight"])


def test_tensors_do_not_depend_on_order_or_other_tensors(tiny_cfg):
    one_layer = MoGEConfig.from_dict({**tiny_cfg.to_dict(), "num_hidden_layers": 1})
    a = dict(random_tensors(one_layer, seed=3, dtype="float32"))
    b = dict(random_tensors(tiny_cfg, seed=3, dtype="float32"))
    c = dict(random_tensors(tiny_cfg, seed=4, dtype="float32"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(b[name], c[name]), name


def test_checkpoint_seed_same_bytes_other_seed_other_tensors(tiny_cfg, tmp_path):
    """write_checkpoint's seed: the same seed writes the same bytes, file for file; another seed
    the same files and headers with other numbers in every tensor."""
    kw = dict(dtype="bfloat16", max_shard_bytes=160_000, tokenizer=False)
    a = write_checkpoint(tiny_cfg, tmp_path / "a", seed=5, **kw)
    again = write_checkpoint(tiny_cfg, tmp_path / "again", seed=5, **kw)
    other = write_checkpoint(tiny_cfg, tmp_path / "other", seed=6, **kw)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) == sorted(p.name for p in other.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1
    for name in names:
        assert (a / name).read_bytes() == (again / name).read_bytes(), name
        if not name.endswith(".safetensors"):  # config, generation config and index do not depend on the seed
            assert (a / name).read_bytes() == (other / name).read_bytes(), name
    for shard in shards:
        head = (a / shard).read_bytes()
        head = head[: 8 + int.from_bytes(head[:8], "little")]  # safetensors: u64 length, then the JSON header
        assert (other / shard).read_bytes().startswith(head), shard  # names, dtypes, shapes and offsets
        x, y = load_file(a / shard), load_file(other / shard)
        for name in x:
            assert not torch.equal(x[name], y[name]), name
    # and the seed is the one random_tensors takes
    generated = dict(random_tensors(tiny_cfg, seed=6, dtype="bfloat16"))
    written = {n: t for shard in shards for n, t in load_file(other / shard).items()}
    assert written.keys() == generated.keys() and all(torch.equal(written[n], generated[n]) for n in generated)


def test_stacked_and_per_expert_hold_the_same_model(tiny_cfg, tmp_path):
    cfg, n_i = tiny_cfg, tiny_cfg.moe_intermediate_size
    per = dict(random_tensors(cfg, seed=7, dtype="float16"))
    write_checkpoint(cfg, tmp_path, seed=7, dtype="float16", layout="stacked", tokenizer=False)
    stacked = load_file(tmp_path / "model.safetensors")
    assert list(stacked) != []  # load_file's key order is not file order; check names and shapes
    assert {n: tuple(x.shape) for n, x in stacked.items()} == expected_tensors(cfg, "stacked")
    for name, x in stacked.items():
        if name.endswith("experts.gate_up_proj"):
            pre = name.removesuffix("gate_up_proj")
            for e in range(cfg.num_experts):
                assert torch.equal(x[e, :n_i], per[f"{pre}{e}.gate_proj.weight"])
                assert torch.equal(x[e, n_i:], per[f"{pre}{e}.up_proj.weight"])
        elif name.endswith("experts.down_proj"):
            pre = name.removesuffix("down_proj")
            assert torch.equal(x, torch.stack([per[f"{pre}{e}.down_proj.weight"] for e in range(cfg.num_experts)]))
        else:
            assert torch.equal(x, per[name]), name


# ---- file layout --------------------------------------------------------------------------------
def test_plan_shards_never_splits_a_tensor():
    sizes = {"a": 40, "b": 70, "c": 200, "d": 10, "e": 90}
    assert plan_shards(sizes, None) == [list(sizes)]
    assert plan_shards(sizes, 100) == [["a"], ["b"], ["c"], ["d", "e"]]
    assert plan_shards(sizes, 110) == [["a", "b"], ["c"], ["d", "e"]]
    with pytest.raises(UsageError):
        plan_shards(sizes, 0)


def test_single_file_then_resharded_leaves_no_stale_weights(tiny_cfg, tmp_path):
    write_checkpoint(tiny_cfg, tmp_path, tokenizer=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    write_checkpoint(tiny_cfg, tmp_path, tokenizer=False, max_shard_bytes=300_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    config = json.loads((tmp_path / "config.json").read_text())
    assert MoGEConfig.from_dict(config) == MoGEConfig.from_dict({**tiny_cfg.to_dict(), "torch_dtype": "bfloat16"})


def test_72b_skeleton_has_real_headers_and_no_data(tmp_path):
    cfg = MoGEConfig.from_name("pangu-pro-moe-72b")
    out = write_skeleton(cfg, tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    tensors = {}
    for shard in shards:
        header, _ = read_header(out / shard)
        assert sum(t.nbytes for t in header.values()) <= 5 * 10**9
        tensors.update(header)
    assert len(tensors) == len(index["weight_map"]) == 9939
    assert {n: t.shape for n, t in tensors.items()} == expected_tensors(cfg, "per-expert")
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values()) == 143_977_562_112
    assert sum(t.numel for t in tensors.values()) == 71_988_781_056
    assert sum(p.stat().st_size for p in out.iterdir()) > 143_977_562_112
    assert sum(p.stat().st_blocks * 512 for p in out.iterdir()) < 50 * 2**20
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 153376
    assert not (out / "tokenizer.model").exists()


# ---- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_special_ids(tiny_sp):
    assert tiny_sp.get_piece_size() == 512
    assert [tiny_sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (tiny_sp.pad_id(), tiny_sp.bos_id(), tiny_sp.eos_id(), tiny_sp.unk_id()) == (0, 1, 2, 3)
    assert tiny_sp.encode("[unused9]") == [13]
    assert tiny_sp.encode("[unused10]") == [14] == [CHAT_EOS_ID]
    assert [tiny_sp.piece_to_id(f"[unused{i}]") for i in range(18)] == list(range(4, 22))
    gen = json.loads((TINY_DIR / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 14, "pad_token_id": 0}
    assert json.loads((TINY_DIR / "tokenizer_config.json").read_text()) == TOKENIZER_CONFIG
    assert "chat_template" not in TOKENIZER_CONFIG


def test_tokenizer_chat_prompt(tiny_sp):
    pieces = tiny_sp.encode(CHAT, out_type=str)
    assert pieces[:3] == ["[unused9]", "系统", "："]
    assert pieces[-3:] == ["[unused9]", "助手", "："]
    assert pieces.count("[unused10]") == 2
    assert tiny_sp.decode(tiny_sp.encode(CHAT)) == CHAT


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "def f(x):\n    return x  +  1\n\n",
        "  leading and trailing spaces  ",
        "tabs\tand ~`^|{}[]<>@#$%&*_=\\ punctuation; 0123456789",
    ],
)
def test_tokenizer_round_trips_ascii(tiny_sp, text):
    ids = tiny_sp.encode(text)
    assert 3 not in ids  # byte fallback, never <unk>
    assert tiny_sp.decode(ids) == text


def test_tokenizer_vocab_it_cannot_hit_raises(tmp_path):
    with pytest.raises(UsageError, match="too small"):
        write_tokenizer(tmp_path, 100)
    with pytest.raises(UsageError, match="153376"):
        write_tokenizer(tmp_path, 153376)
    with pytest.raises(UsageError, match="153376"):  # before any weight is written
        write_checkpoint(MoGEConfig.from_name("pangu-pro-moe-72b"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# ---- moge fixture --------------------------------------------------------------------------------
def test_fixture_command(tmp_path):
    from typer.testing import CliRunner

    from moge_cli.cli import app

    def moge_fixture(*args: str):
        return CliRunner().invoke(app, ["fixture", *args])

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({**MoGEConfig.from_name("tiny-moge").to_dict(), "vocab_size": 1024}))
    r = moge_fixture(str(cfg_file), str(tmp_path / "a"), "--dtype", "float32", "--max-shard-size", "100000")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "a")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert sp.get_piece_size() == 1024
    shards = sorted((tmp_path / "a").glob("model-*.safetensors"))
    assert len(shards) > 1
    assert {t.dtype for s in shards for t in read_header(s)[0].values()} == {"F32"}

    assert moge_fixture("bench-0.47b", str(tmp_path / "b"), "--skeleton", "--layout", "stacked").exit_code == 0
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()

    r = moge_fixture("no-such-preset", str(tmp_path / "c"))
    assert r.exit_code == 2 and "error: unknown preset" in r.stderr
