"""Expert parallelism (moge_cli.distributed): 2 ranks on the CPU (gloo) against one process and the float64 reference."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moge_cli import distributed
from moge_cli.checkpoint import open_checkpoint
from moge_cli.config import MoGEConfig
from moge_cli.errors import CheckpointError, MogeError, UsageError
from moge_cli.generate import run_generation
from moge_cli.loader import load_model
from moge_cli.reference_model import reference_logits
from moge_cli.synthetic import write_checkpoint

MOGE = Path(sys.executable).parent / "moge"
IDS = [3, 17, 250, 9, 44, 101, 7]


def _config(groups: int) -> MoGEConfig:
    """tiny-moge with `groups` groups of 2 experts, one pick each."""
    cfg = MoGEConfig.from_name("tiny-moge")
    return dataclasses.replace(cfg, num_experts=2 * groups, num_experts_per_tok=groups, num_expert_groups=groups)


@pytest.fixture(scope="module", params=[2, 4], ids=["G2", "G4"])
def ckpt_dir(request, tmp_path_factory):
    layout = "per-expert" if request.param == 2 else "stacked"  # both fills of a local expert slice
    return write_checkpoint(_config(request.param), tmp_path_factory.mktemp(f"g{request.param}"), dtype="float32", layout=layout, seed=request.param)


@pytest.fixture(autouse=True)
def master_port(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))


def test_two_ranks_give_the_single_process_logits_and_greedy_tokens(ckpt_dir):
    cfg = open_checkpoint(ckpt_dir).config
    assert cfg.n_groups in (2, 4) and cfg.num_experts == 2 * cfg.n_groups
    single = load_model(ckpt_dir, dtype="float32")
    options = dict(max_new_tokens=12, stop_ids=())
    expected = run_generation(single, IDS, **options).generated_ids

    (logits, stats0), (nothing, stats1) = distributed.run_on_ranks(str(ckpt_dir), 2, distributed.logits_job, (IDS,))
    assert nothing is None
    torch.testing.assert_close(logits, single(torch.tensor([IDS])), atol=1e-5, rtol=0)
    ref = reference_logits(open_checkpoint(ckpt_dir), cfg, IDS)  # float64
    torch.testing.assert_close(logits[0].double(), ref, atol=1e-4, rtol=0)
    # each rank held and ran only its half of the experts: exactly half of the picks, every layer
    assert (stats0.experts, stats1.experts) == ((0, cfg.num_experts // 2), (cfg.num_experts // 2, cfg.num_experts))
    pairs = len(IDS) * cfg.num_hidden_layers * cfg.num_experts_per_tok // 2
    assert stats0.token_expert_pairs == stats1.token_expert_pairs == pairs
    assert stats0.topk_token_expert_pairs + stats1.topk_token_expert_pairs == 2 * pairs
    assert stats0.all_reduces == cfg.num_hidden_layers

    result = distributed.generate_on_ranks(str(ckpt_dir), 2, IDS, None, options)
    assert result.generated_ids == expected and len(expected) == 12
    assert [r.rank for r in result.ep.ranks] == [0, 1]
    assert isinstance(result.ep, distributed.EPSummary) and all(isinstance(r, distributed.RankStats) for r in result.ep.ranks)
    ep = result.to_dict()["ep"]  # the --json section: per-rank figures with their derived per-token times
    assert ep["token_expert_pairs"] == [r.token_expert_pairs for r in result.ep.ranks]
    assert all(r["peak_memory_bytes"] > 0 and "routed_expert_seconds_per_token" in r for r in ep["ranks"])


def test_a_convert_ep_split_runs_as_the_whole_checkpoint(ckpt_dir, tmp_path):
    split = tmp_path / "split"
    run = subprocess.run([str(MOGE), "convert", str(ckpt_dir), str(split), "--ep", "2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert not (split / "config.json").exists() and (split / "rank-1" / "config.json").exists()
    whole = distributed.run_on_ranks(str(ckpt_dir), 2, distributed.logits_job, (IDS,))
    ranks = distributed.run_on_ranks(str(split), 2, distributed.logits_job, (IDS,))
    assert torch.equal(ranks[0][0], whole[0][0])  # the same experts on the same ranks: the same bits
    assert ranks[1][1].experts == whole[1][1].experts
    with pytest.raises(UsageError, match="split into 2 ranks .* run it with --ep 2"):
        distributed.open_source(str(split), 4)
    with pytest.raises(UsageError, match="run it with --ep 2"):
        distributed.open_source(str(split), None)


def test_a_rank_holds_only_its_experts(ckpt_dir):
    whole = load_model(ckpt_dir, dtype="float32")
    E = whole.config.num_experts
    part = load_model(ckpt_dir, dtype="float32", experts=(E // 2, E))
    moe, whole_moe = part.layers[0].mlp, whole.layers[0].mlp
    assert moe.gate_up.shape[0] == moe.down.shape[0] == E // 2
    assert torch.equal(moe.gate_up, whole_moe.gate_up[E // 2 :]) and torch.equal(moe.down, whole_moe.down[E // 2 :])
    assert torch.equal(moe.gate, whole_moe.gate)  # the router is whole on every rank


def test_the_whole_step_c_decode_declines_under_ep(ckpt_dir):
    from moge_kernels import decode_step

    model = load_model(ckpt_dir, dtype="float32")
    model.layers[0].mlp.expert_parallel = lambda *args: None
    assert decode_step.plan(model) is None


def test_ep_that_does_not_divide_the_groups_is_refused_before_spawning(tmp_path):
    d = write_checkpoint(_config(4), tmp_path / "g4", dtype="float32", tokenizer=False)
    with pytest.raises(UsageError, match="4 expert groups cannot be split evenly over 3 ranks"):
        distributed.check_checkpoint(open_checkpoint(d), 3)
    t0 = time.monotonic()
    run = subprocess.run([str(MOGE), "generate", str(d), "--prompt-ids", "1,2", "-n", "2", "--ep", "3"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "choose one of 1, 2, 4" in run.stderr and "Traceback" not in run.stderr
    assert time.monotonic() - t0 < 30


def _children() -> set[int]:
    return {int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()}


@pytest.mark.parametrize("fault", ["1:load", "1:exit"])
def test_a_rank_that_fails_stops_every_rank_with_one_error(ckpt_dir, monkeypatch, fault):
    monkeypatch.setenv(distributed.FAULT_ENV, fault)
    before = _children()
    t0 = time.monotonic()
    with pytest.raises(MogeError) as e:
        distributed.run_on_ranks(str(ckpt_dir), 2, distributed.logits_job, (IDS,), timeout_s=120)
    assert time.monotonic() - t0 < 30  # the parent saw it; not the process group's 120 s timeout
    assert "rank 1 of 2" in str(e.value)
    if fault == "1:load":
        assert isinstance(e.value, CheckpointError) and "injected load failure" in str(e.value)
    else:
        assert "stopped (exit code 9)" in str(e.value)
    assert _children() <= before  # no rank left running


def test_generate_cli_with_ep_exits_2_on_a_failed_rank_and_prints_ranks_on_success(ckpt_dir, monkeypatch):
    args = [str(MOGE), "generate", str(ckpt_dir), "--prompt-ids", ",".join(map(str, IDS)), "-n", "4", "--dtype", "f32", "--ep", "2", "--json"]
    ok = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    single = json.loads(subprocess.run(args[:-3] + ["--json"], capture_output=True, text=True, timeout=120).stdout)
    assert out["generated_ids"] == single["generated_ids"] and out["finish_reason"] == single["finish_reason"]
    ranks = out["ep"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["peak_memory_bytes"] > 0 for r in ranks)
    assert out["ep"]["token_expert_pairs"][0] == out["ep"]["token_expert_pairs"][1] > 0
    assert sum(out["ep"]["topk_token_expert_pairs"]) == sum(out["ep"]["token_expert_pairs"])

    env = dict(os.environ, **{distributed.FAULT_ENV: "0:exit"})
    failed = subprocess.run(args[:-1], capture_output=True, text=True, timeout=120, env=env)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("error: expert parallel run stopped: rank 0 of 2 stopped")


def test_profile_with_ep_reports_every_rank_and_decodes_the_single_process_tokens(ckpt_dir):
    ids = ",".join(map(str, IDS))
    run = subprocess.run([str(MOGE), "profile", str(ckpt_dir), "--prompt-ids", ids, "-n", "3", "--dtype", "f32", "--ep", "2", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    single = run_generation(load_model(ckpt_dir, dtype="float32"), IDS, max_new_tokens=3, stop_ids=())
    assert report["generated_ids"] == single.generated_ids
    assert report["prefill"]["tokens"] == len(IDS) and report["decode"]["tokens"] == 2
    assert [r["rank"] for r in report["ep"]["ranks"]] == [0, 1]
    assert report["ep"]["token_expert_pairs"][0] == report["ep"]["token_expert_pairs"][1]
    refused = subprocess.run([str(MOGE), "profile", str(ckpt_dir), "--prompt-ids", ids, "--ep", "2", "--weights"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "drop --weights" in refused.stderr


def test_ep_on_a_model_without_routed_experts_is_refused():
    dense = dataclasses.replace(MoGEConfig.from_name("tiny-moge"), num_experts=0, intermediate_size=64)
    with pytest.raises(UsageError, match="this model has none"):
        distributed.check_world(dense, 2)


def test_topk_counterfactual_is_counted_on_the_device_as_routing_stats_counts_it():
    """ExpertShare counts plain top-k picks on the logits' device (no host read per layer) with the same ties
    (to the lowest index) as routing_stats.global_topk over softmax probabilities."""
    from moge_cli.routing_stats import global_topk

    g = torch.Generator().manual_seed(0)
    N, E, H, I, k, first, stop = 9, 8, 16, 8, 4, 2, 6
    logits = torch.randint(-2, 3, (N, E), generator=g).float()  # many ties
    stats = distributed.RankStats(0, (1, 3), (first, stop))
    share = distributed.ExpertShare(stats, (0, k), k, lambda y: None, True)
    ids = torch.randint(0, stop - first, (N, k), generator=g) + first
    gate_up, down = torch.randn(stop - first, 2 * I, H, generator=g), torch.randn(stop - first, H, I, generator=g)
    for _ in range(2):  # two layers
        share(torch.randn(N, H, generator=g), logits, ids, torch.full((N, k), 1 / k), gate_up, down)
    topk = global_topk(torch.softmax(logits, dim=-1).numpy(), k)
    assert isinstance(share.topk_pairs, torch.Tensor) and int(share.topk_pairs) == 2 * int(((topk >= first) & (topk < stop)).sum())
