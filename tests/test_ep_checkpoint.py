"""The checkpoint side of expert parallelism (issue 17): what a rank directory of `convert --ep` is, and the merge back.

tiny-moge has 4 groups of 2 experts: --ep 2 gives ranks of 2 groups, --ep 4 ranks of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moge_cli.checkpoint import open_checkpoint
from moge_cli.cli import app
from moge_cli.config import MoGEConfig
from moge_cli.errors import CheckpointError
from moge_cli.synthetic import write_checkpoint
from moge_converters.convert import convert

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(MoGEConfig.from_name("tiny-moge"), tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def split(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split") / "ep2"
    convert(ckpt, out, ep=2)
    return out


def files(d: Path) -> dict[str, bytes]:
    """Every file of a checkpoint directory, by name: shards, index, config.json, tokenizer files."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_load_on_a_rank_directory_says_which_rank_and_groups(split):
    res = runner.invoke(app, ["load", str(split / "rank-1"), "--json"])
    assert res.exit_code == 0, res.output  # a healthy rank: its own experts, nothing missing
    ep = json.loads(res.stdout)["ep"]
    assert ep["rank"] == 1 and ep["world_size"] == 2 and ep["groups"] == [2, 3] and ep["experts"] == [4, 5, 6, 7]
    assert "rank 1 of 2 of an expert-parallel split (groups 2..3, experts 4..7)" in ep["explanation"]
    assert f"moge generate {split} --ep 2" in ep["explanation"]
    res = runner.invoke(app, ["load", str(split / "rank-0")])
    assert res.exit_code == 0 and "expert-parallel split (groups 0..1, experts 0..3)" in " ".join(res.stdout.split()), res.output


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{rank}", "--prompt-ids", "1,2", "-n", "1"],
        ["profile", "{rank}", "--prompt-ids", "1,2", "--decode", "1"],
        ["quantize", "{rank}", "{dst}"],
    ],
    ids=["generate", "profile", "quantize"],
)
def test_commands_that_need_a_whole_checkpoint_refuse_a_rank_directory(split, tmp_path, argv):
    res = runner.invoke(app, [a.format(rank=split / "rank-0", dst=tmp_path / "out") for a in argv])
    assert res.exit_code == 2, res.output
    message = " ".join(res.stderr.split())
    assert "rank 0 of 2 of an expert-parallel split (groups 0..1, experts 0..3)" in message, message
    assert f"moge generate {split} --ep 2" in message and "missing" not in message
    assert not (tmp_path / "out").exists()


def test_missing_tensors_hint_names_a_command_that_exists(ckpt, tmp_path):
    from moge_cli.loader import load_model

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in ckpt.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    with pytest.raises(CheckpointError, match="is missing tensor") as e:
        load_model(broken)
    assert "--check" not in str(e.value) and f"moge load {broken}" in str(e.value)


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
@pytest.mark.parametrize("world", [2, 4])
def test_merge_round_trip_is_bit_exact(ckpt, tmp_path, layout, world):
    ref = tmp_path / "ref"
    convert(ckpt, ref, layout=layout)
    convert(ckpt, tmp_path / "split", layout=layout, ep=world)
    res = runner.invoke(app, ["convert", str(tmp_path / "split"), str(tmp_path / "merged"), "--verify", "-q"])
    assert res.exit_code == 0, res.output
    assert files(tmp_path / "merged") == files(ref)  # same tensor names, order, dtypes, bytes; same config.json
    original = json.loads((ckpt / "config.json").read_text())
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == original
    assert open_checkpoint(tmp_path / "merged").layout == layout


def test_merge_takes_layout_dtype_and_shard_size(ckpt, tmp_path):
    options = dict(layout="per-expert", dtype="float32", max_shard_size="100KB")
    convert(ckpt, tmp_path / "ref", **options)
    convert(ckpt, tmp_path / "split", layout="stacked", ep=4)
    convert(tmp_path / "split", tmp_path / "merged", verify=True, **options)
    assert files(tmp_path / "merged") == files(tmp_path / "ref") and len(files(tmp_path / "ref")) > 6  # several shards


def test_merge_refuses_ranks_that_do_not_match_the_plan(split, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ep_plan.json").write_bytes((split / "ep_plan.json").read_bytes())
    for r in ("rank-0", "rank-1"):
        (bad / r).mkdir()
        for p in (split / r).iterdir():
            (bad / r / p.name).write_bytes(p.read_bytes())
    config = json.loads((bad / "rank-1" / "config.json").read_text())
    config["moge_ep"]["experts"] = [0, 1, 2, 3]  # rank 1 claims rank 0's experts
    (bad / "rank-1" / "config.json").write_text(json.dumps(config))
    res = runner.invoke(app, ["convert", str(bad), str(tmp_path / "merged")])
    assert res.exit_code == 2 and "do not match ep_plan.json" in res.stderr, res.output
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("source", ["whole", "split"])
def test_ep_that_does_not_divide_the_groups_is_refused_up_front(ckpt, split, tmp_path, source):
    res = runner.invoke(app, ["convert", str(ckpt if source == "whole" else split), str(tmp_path / "ep3"), "--ep", "3"])
    assert res.exit_code == 2, res.output
    assert "--ep 3: the model has 4 expert groups; N must divide it" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_merge_only_moves_bytes(tmp_path):
    """A merge that keeps the dtype is a file-to-file copy like every such convert: torch is never imported."""
    import subprocess
    import sys

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
    script = (
        "import sys; from moge_converters.convert import convert; "
        f"convert({str(fixture)!r}, {str(tmp_path / 'split')!r}, ep=2, layout='stacked'); "
        f"r = convert({str(tmp_path / 'split')!r}, {str(tmp_path / 'merged')!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(r.to_dict()['layout'])"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "'to': 'stacked'" in res.stdout, res.stderr
