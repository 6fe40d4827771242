"""`torchrun --nproc-per-node 2 -m moge_cli generate ... --ep 2`: each process is one rank (no spawning), rank 0 prints."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moge_cli.config import MoGEConfig
from moge_cli.synthetic import write_checkpoint

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
ARGS = ["--prompt-ids", "1,2,3", "-n", "6", "--json"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    cfg = dataclasses.replace(MoGEConfig.from_name("tiny-moge"), num_experts=4, num_experts_per_tok=2, num_expert_groups=2)
    return write_checkpoint(cfg, tmp_path_factory.mktemp("g2"), dtype="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**clean, **env})


def _torchrun(*args: str, **env: str) -> subprocess.CompletedProcess:
    return _run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "moge_cli", *args], **env)


def test_torchrun_ranks_print_one_result_with_the_single_process_tokens(ckpt_dir):
    single = _run([sys.executable, "-m", "moge_cli", "generate", str(ckpt_dir), *ARGS])
    assert single.returncode == 0, single.stderr
    run = _torchrun("generate", str(ckpt_dir), *ARGS, "--ep", "2")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)  # exactly one JSON object: rank 1 printed nothing
    assert out["generated_ids"] == json.loads(single.stdout)["generated_ids"]
    assert [r["rank"] for r in out["ep"]["ranks"]] == [0, 1]
    assert out["ep"]["token_expert_pairs"][0] == out["ep"]["token_expert_pairs"][1] > 0


def test_torchrun_refuses_an_ep_other_than_its_world_size(ckpt_dir):
    run = _torchrun("generate", str(ckpt_dir), "--prompt-ids", "1,2,3", "-n", "2", "--ep", "4")
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --ep 4, but torchrun started 2 ranks (WORLD_SIZE); give --ep 2 or omit --ep"]


def test_a_failing_torchrun_rank_ends_every_rank_with_its_error(ckpt_dir):
    run = _torchrun("generate", str(ckpt_dir), "--prompt-ids", "1,2,3", "-n", "2", MOGE_EP_TEST_FAULT="1:load")
    assert run.returncode != 0 and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "error: expert parallel run stopped: rank 1 of 2: injected load failure (MOGE_EP_TEST_FAULT=1:load)" in errors
    assert not any("unexpected" in line for line in errors)  # rank 0 points at rank 1's line, not at gloo's lost connection
