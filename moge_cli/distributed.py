"""Expert parallelism on torch.distributed: N ranks on this machine, each holding the replicated parts of the
model (embeddings, attention, norms, router, shared expert, lm_head) and the routed experts of G/N groups.

`run_on_ranks` spawns the ranks (torch.multiprocessing, spawn start method; gloo on the CPU, NCCL on CUDA with
one GPU per rank: untested) and watches them: a rank that fails or dies stops them all, with one error, as
soon as the parent sees it. Each rank loads only its experts' bytes (`loader.load_model(experts=...)`), puts
an `ExpertShare` in every MoE layer and runs a job (`generate_job`, `logits_job`).

Every rank routes every token (same weights, same inputs: same picks). MoGE's pick columns are group-major,
so rank r's picks are columns r*k/N .. (r+1)*k/N - 1: every token sends exactly k/N picks to every rank. A rank
computes those, and one all-reduce per MoE layer sums the routed output over the ranks before the shared
expert is added. kernels/step.c's whole-step decode cannot all-reduce mid-step, so under expert parallelism
every step runs op by op (kernels/decode_step.plan declines).

Under `torchrun --nproc-per-node N -m moge_cli ...` (its variables in the environment: `launched_world`) nothing is
spawned: this process is one rank (`run_this_rank`), joins the group with init_method env://, and only rank 0
returns the result (the others return None and print nothing). A rank that fails prints its one `error:` line and
exits non-zero; torchrun then stops the other ranks (and the process group's timeout bounds any wait).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from moge_cli.errors import CheckpointError, MogeError, UsageError, describe_error

RANK_TIMEOUT_S = 60.0  # the process group's timeout: a collective waiting longer than this fails
FAULT_ENV = "MOGE_EP_TEST_FAULT"  # tests only: "RANK:load" raises while that rank loads, "RANK:exit" kills it before its first forward
DIED = "died"  # a failure without a report: the process ended
GRACE_S = 1.0  # after the first failure, how long to wait for the other ranks' reports (to name the cause)


# ---- launched by torchrun ------------------------------------------------------------------------
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env() -> dict[str, int] | None:
    """{"rank", "world", "local_rank"} when this process is one rank of a torchrun launch (all of TORCHRUN_ENV set), else None."""
    if not all(os.environ.get(name) for name in TORCHRUN_ENV):
        return None
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]), "local_rank": int(os.environ["LOCAL_RANK"])}


def launched_world(ep: int | None) -> int | None:
    """The number of ranks: --ep, or under torchrun WORLD_SIZE (--ep may be omitted; given, it must match)."""
    env = torchrun_env()
    if env is None or ep is None or ep == env["world"]:
        return ep if env is None else env["world"]
    if env["rank"] != 0:  # the same refusal on every rank: rank 0 says it
        raise SystemExit(2)
    raise UsageError(f"--ep {ep}, but torchrun started {env['world']} ranks (WORLD_SIZE); give --ep {env['world']} or omit --ep")


# ---- checks before spawning ----------------------------------------------------------------------
def check_world(cfg, world: int) -> None:
    """--ep N must give every rank whole groups of a MoE model."""
    if world < 1:
        raise UsageError(f"--ep must be at least 1, got {world}")
    if not cfg.num_experts:
        raise UsageError("--ep splits routed experts, and this model has none (num_experts is 0)")
    if cfg.n_groups % world:
        divisors = [d for d in range(1, cfg.n_groups + 1) if cfg.n_groups % d == 0]
        raise UsageError(
            f"--ep {world}: the {cfg.n_groups} expert groups cannot be split evenly over {world} ranks; "
            f"choose one of {', '.join(map(str, divisors))}"
        )


def check_checkpoint(ckpt, world: int) -> None:
    """A whole float checkpoint of a MoE model whose groups split evenly over `world` ranks (open Checkpoint)."""
    cfg = ckpt.config
    if cfg.extra.get("moge_ep") is not None:
        raise UsageError(
            f"{ckpt.root}: this is one rank directory of `moge convert --ep`; --ep runs a whole checkpoint "
            f"(give the checkpoint it was converted from, or merge the rank directories with moge convert)"
        )
    check_world(cfg, world)


def open_source(path: str, world: int | None, revision: str | None = None):
    """(open checkpoint whose config and tokenizer the ranks use, the path the ranks load), after the checks that
    need no rank: a whole checkpoint (check_checkpoint; a repo id resolves to its directory), or the top of a
    `convert --ep` split of exactly `world` ranks (its rank-0 directory is the checkpoint returned). world None: one
    process (a split is refused)."""
    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.ep import is_ep_dir, read_ep_plan

    if not is_ep_dir(path):
        ckpt = open_checkpoint(path, revision=revision)
        if world is not None:
            check_checkpoint(ckpt, world)
        return ckpt, str(ckpt.root)
    plan = read_ep_plan(Path(path))
    n = plan["world_size"]
    if world != n:
        raise UsageError(
            f"{path}: an expert-parallel split into {n} ranks (moge convert --ep {n}); run it with --ep {n}, "
            f"or merge it with moge convert to run it on another number of ranks"
        )
    return open_checkpoint(Path(path) / plan["ranks"][0]["path"]), str(path)


def rank_slice(cfg, rank: int, world: int) -> dict[str, tuple[int, int]]:
    """Rank `rank`'s groups, experts and pick columns, each as (first, stop)."""
    g, e, k = cfg.n_groups // world, cfg.num_experts // world, cfg.num_experts_per_tok // world
    return {"groups": (rank * g, (rank + 1) * g), "experts": (rank * e, (rank + 1) * e), "columns": (rank * k, (rank + 1) * k)}


# ---- one rank's share of the MoE layers -----------------------------------------------------------
@dataclass
class RankStats:
    """What one rank measured over its MoE layers (times summed over layers; pairs: token-expert pairs)."""

    rank: int
    groups: tuple[int, int]
    experts: tuple[int, int]
    tokens: int = 0  # tokens through the model (counted at the first MoE layer)
    routed_expert_seconds: float = 0.0
    all_reduce_seconds: float = 0.0
    all_reduces: int = 0
    token_expert_pairs: int = 0  # this rank's picks (MoGE routing)
    topk_token_expert_pairs: int = 0  # picks that would land on this rank under plain top-k routing
    peak_memory_bytes: int = 0  # this rank's process, set when its job is done

    @property
    def routed_expert_seconds_per_token(self) -> float:  # per token through the model (prompt tokens included)
        return self.routed_expert_seconds / max(self.tokens, 1)

    @property
    def all_reduce_seconds_per_token(self) -> float:
        return self.all_reduce_seconds / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"], d["experts"] = list(self.groups), list(self.experts)
        d["routed_expert_seconds_per_token"] = self.routed_expert_seconds_per_token
        d["all_reduce_seconds_per_token"] = self.all_reduce_seconds_per_token
        return d


@dataclass
class EPSummary:
    """The `ep` section of --json: how the ranks ran, and each rank's RankStats in rank order."""

    world_size: int
    backend: str  # gloo | nccl
    decode_path: str
    ranks: list[RankStats]

    @property
    def token_expert_pairs(self) -> list[int]:  # per rank: its MoGE picks
        return [r.token_expert_pairs for r in self.ranks]

    @property
    def topk_token_expert_pairs(self) -> list[int]:  # per rank: what plain top-k routing would have given it
        return [r.topk_token_expert_pairs for r in self.ranks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size, "backend": self.backend, "decode_path": self.decode_path,
            "token_expert_pairs": self.token_expert_pairs, "topk_token_expert_pairs": self.topk_token_expert_pairs,
            "ranks": [r.to_dict() for r in self.ranks],
        }  # fmt: skip


@dataclass
class Speed:
    """Tokens through one phase (prefill or decode), its seconds and rate."""

    tokens: int
    seconds: float
    tokens_per_s: float


@dataclass
class EPProfileReport:
    """`moge profile --ep N`: prefill and greedy decode speed on N ranks, and the per-rank statistics."""

    model: str
    device: str
    prompt_tokens: int
    prefill: Speed
    decode: Speed
    generated_ids: list[int]
    ep: EPSummary

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ep": self.ep.to_dict()}


class ExpertShare:
    """MoE.expert_parallel of one layer: this rank's picks through its experts, then one all-reduce."""

    def __init__(self, stats: RankStats, columns: tuple[int, int], k: int, all_reduce: Callable, counts_tokens: bool) -> None:
        self.stats, self.columns, self.k = stats, slice(*columns), k
        self.first, self.stop = stats.experts
        self.all_reduce, self.counts_tokens = all_reduce, counts_tokens
        self.topk_pairs = None  # int64 scalar on the model's device: summed there, read once at the end (settle)

    def __call__(self, x, logits, expert_ids, weights, gate_up, down):  # x [N, H], logits [N, E], ids / weights [N, k]
        import torch

        from moge_kernels.ops import moe

        s = self.stats
        t0 = time.perf_counter()
        y = moe(x, expert_ids[:, self.columns] - self.first, weights[:, self.columns].contiguous(), gate_up, down).contiguous()
        t1 = time.perf_counter()
        self.all_reduce(y)  # [N, H]: the routed output of every rank's experts
        t2 = time.perf_counter()
        s.routed_expert_seconds += t1 - t0
        s.all_reduce_seconds += t2 - t1
        s.all_reduces += 1
        s.tokens += x.shape[0] if self.counts_tokens else 0
        s.token_expert_pairs += expert_ids[:, self.columns].numel()
        # plain top-k over all experts (ties to the lowest index: routing_stats.global_topk), counted on the
        # device: no host read per layer (on CUDA each would be a sync inside the decode step)
        topk = torch.argsort(-logits.float(), dim=-1, stable=True)[:, : self.k]  # [N, k]; softmax keeps the order
        here = ((topk >= self.first) & (topk < self.stop)).sum()
        self.topk_pairs = here if self.topk_pairs is None else self.topk_pairs + here
        return y


def load_share(path: str, rank: int, world: int, *, dtype=None, device="cpu"):
    """(model holding rank `rank`'s experts with an ExpertShare in every MoE layer, its RankStats); needs an
    initialised default process group."""
    import torch.distributed as dist

    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.ep import is_ep_dir
    from moge_cli.loader import load_model

    if is_ep_dir(path):
        model, where = _load_split_rank(Path(path), rank, world, dtype=dtype, device=device)
    else:
        ckpt = open_checkpoint(path)
        check_checkpoint(ckpt, world)
        where = rank_slice(ckpt.config, rank, world)
        model = load_model(ckpt, dtype=dtype, device=device, experts=where["experts"])
    stats = RankStats(rank, where["groups"], where["experts"])
    first = True
    for layer in model.layers:
        if hasattr(layer.mlp, "expert_parallel"):
            layer.mlp.expert_parallel = ExpertShare(stats, where["columns"], model.config.num_experts_per_tok, dist.all_reduce, first)
            first = False
    model._plan = False  # rebuilt (declined) at the first decode step
    return model, stats


def settle(model, stats: RankStats, device) -> RankStats:
    """stats with what is read once at the end: the top-k pairs the layers counted on the device, and this
    process's peak memory."""
    from moge_cli.profiling import peak_memory_bytes

    shares = [layer.mlp.expert_parallel for layer in model.layers if getattr(layer.mlp, "expert_parallel", None) is not None]
    stats.topk_token_expert_pairs = sum(int(s.topk_pairs) for s in shares if s.topk_pairs is not None)
    stats.peak_memory_bytes = peak_memory_bytes(device)
    return stats


def _load_split_rank(root: Path, rank: int, world: int, *, dtype, device):
    """(model, rank_slice) from rank `rank`'s directory of a `convert --ep` split: its experts are named by local id."""
    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.ep import ep_info, local_expected, read_ep_plan
    from moge_cli.loader import load_model

    plan = read_ep_plan(root)
    ckpt = open_checkpoint(root / plan["ranks"][rank]["path"])
    where = rank_slice(ckpt.config, rank, world)
    first, stop = where["experts"]
    info = ep_info(ckpt.config)
    if info is None or (info["rank"], info["world_size"], info["experts"]) != (rank, world, list(range(first, stop))):
        raise CheckpointError(
            f"{ckpt.root}: config.json moge_ep is {info}; rank {rank} of {world} must hold experts {first}..{stop - 1} "
            f"(whole groups in rank order, as moge convert --ep writes them)"
        )
    n = stop - first
    model = load_model(ckpt, dtype=dtype, device=device, experts=(0, n), narrow=lambda expected: local_expected(expected, n))
    return model, where


# ---- jobs a rank runs ------------------------------------------------------------------------------
def generate_job(model, rank: int, ids: list[int], tokenizer_root: str | None, options: dict[str, Any]):
    """run_generation on this rank (every rank runs the same steps); rank 0's GenerationResult, None elsewhere."""
    from moge_cli.generate import run_generation

    tokenizer = None
    if tokenizer_root is not None:
        from moge_cli.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_root)
    result = run_generation(model, ids, tokenizer=tokenizer, **options)
    return result if rank == 0 else None


def logits_job(model, rank: int, ids: list[int]):
    """Float32 logits [1, T, V] of one forward over ids (rank 0; None elsewhere)."""
    import torch

    logits = model(torch.tensor([ids]))
    return logits if rank == 0 else None


# ---- spawning and watching the ranks --------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(path: str, world: int, job: Callable, job_args: tuple = (), *, dtype=None, device: str = "cpu",
                 threads: int | None = None, timeout_s: float = RANK_TIMEOUT_S) -> list[tuple[Any, dict[str, Any]]]:  # fmt: skip
    """Spawn `world` ranks on this machine; each loads its share of `path` and returns job(model, rank, *job_args).
    Returns [(job result, rank stats dict)] in rank order. A rank that raises or dies stops every rank and raises
    one MogeError naming it (the rank's own error class where it raised one). MASTER_PORT, when set, is the
    rendezvous port (else a free one). Under torchrun (torchrun_env): run_this_rank, None on ranks other than 0."""
    if torchrun_env() is not None:
        return run_this_rank(path, world, job, job_args, dtype=dtype, device=device, threads=threads, timeout_s=timeout_s)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    port = int(os.environ.get("MASTER_PORT") or free_port())
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    args = (world, port, str(path), dtype, device, threads, timeout_s, job, job_args, reports)
    procs = [ctx.Process(target=_rank_main, args=(rank, *args), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[Any, dict[str, Any]]] = {}
    try:
        failures = _watch(procs, reports, results, world)
    finally:
        _stop(procs)
    if failures:
        raise _failure(failures)
    return [results[r] for r in range(world)]


def run_this_rank(path: str, world: int, job: Callable, job_args: tuple = (), *, dtype=None, device: str = "cpu",
                  threads: int | None = None, timeout_s: float = RANK_TIMEOUT_S) -> list[tuple[Any, dict[str, Any]]] | None:  # fmt: skip
    """This process as one rank of a torchrun launch: join the group (env://), load this rank's share, run the job.
    Rank 0 returns [(job result, rank stats dict)] in rank order (every rank's stats, rank 0's result); the others
    None. A failure here raises MogeError "rank r of N: ..." (torchrun stops the other ranks when this one exits)."""
    import torch
    import torch.distributed as dist


    env = torchrun_env()
    rank = env["rank"]
    if env["world"] != world:
        raise UsageError(f"--ep {world}, but torchrun started {env['world']} ranks (WORLD_SIZE)")
    if threads:
        torch.set_num_threads(threads)
    backend = "gloo"
    if torch.device(device).type == "cuda":  # one GPU per rank (untested here)
        backend, device = "nccl", f"cuda:{env['local_rank']}"
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        _fault(rank, "load")
        model, stats = load_share(path, rank, world, dtype=dtype, device=device)
        _fault(rank, "exit")
        out = job(model, rank, *job_args)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(settle(model, stats, device), gathered, dst=0)
    except Exception as e:  # noqa: BLE001 - one line naming the rank; torchrun stops the others
        message, _ = describe_error(e)
        if not isinstance(e, MogeError) and "closed by peer" in str(e):  # gloo: another rank ended; its error says why
            message = "another rank stopped (its error line says why)"
        cls = type(e) if isinstance(e, MogeError) else MogeError
        try:
            error = cls(f"expert parallel run stopped: rank {rank} of {world}: {message}")
        except TypeError:
            error = MogeError(f"expert parallel run stopped: rank {rank} of {world}: {message}")
        raise error from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return None
    return [(out if r == 0 else None, gathered[r]) for r in range(world)]


def _watch(procs, reports, results: dict, world: int) -> list[tuple[int, Any, str]]:
    """Collect the ranks' reports until all are done or one fails (then GRACE_S more, for the others' reports);
    returns the failures seen: (rank, its MogeError, DIED or "error", message)."""
    failures: list[tuple[int, Any, str]] = []
    deadline = None
    while len(results) < world and (deadline is None or time.monotonic() < deadline):
        try:
            kind, rank, *rest = reports.get(timeout=0.05)
        except queue_module.Empty:
            for rank, p in enumerate(procs):
                if p.exitcode not in (None, 0) and rank not in results and all(f[0] != rank for f in failures):
                    failures.append((rank, DIED, f"rank {rank} of {world} stopped ({_exit_words(p.exitcode)})"))
            if failures and deadline is None:
                deadline = time.monotonic() + GRACE_S
            continue
        if kind == "done":
            results[rank] = tuple(rest)
        else:
            error, message = rest
            failures = [f for f in failures if f[0] != rank] + [(rank, error, f"rank {rank} of {world}: {message}")]
            deadline = deadline or time.monotonic() + GRACE_S
    return failures


def _failure(failures: list[tuple[int, Any, str]]) -> MogeError:
    """The one error to report: a rank's own MogeError first (the cause), then a rank that died, then the rest
    (the ranks left waiting on a dead peer report its closed connection)."""
    own = [f for f in failures if isinstance(f[1], MogeError)]
    died = [f for f in failures if f[1] is DIED]
    rank, error, message = (own or died or failures)[0]
    cls = type(error) if isinstance(error, MogeError) else MogeError
    try:
        return cls(f"expert parallel run stopped: {message}")
    except TypeError:
        return MogeError(f"expert parallel run stopped: {message}")


def _exit_words(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _stop(procs) -> None:
    """Let finished ranks exit; kill the rest (each by its own process)."""
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()) if p.exitcode is None else 0)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)


def _rank_main(rank: int, world: int, port: int, path: str, dtype, device: str, threads: int, timeout_s: float,
               job: Callable, job_args: tuple, reports) -> None:  # fmt: skip
    """One rank: join the process group, load this rank's share, run the job, report (result, stats)."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        backend = "gloo"
        if torch.device(device).type == "cuda":  # one GPU per rank (untested here)
            backend, device = "nccl", f"cuda:{rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        _fault(rank, "load")
        model, stats = load_share(path, rank, world, dtype=dtype, device=device)
        _fault(rank, "exit")
        out = job(model, rank, *job_args)
        dist.barrier()
        reports.put(("done", rank, out, settle(model, stats, device)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops every rank
        message, _ = describe_error(e)
        reports.put(("error", rank, e if isinstance(e, MogeError) else "error", message))
        reports.close()
        reports.join_thread()
        sys.exit(1)


def _fault(rank: int, where: str) -> None:
    """Tests only (FAULT_ENV): fail this rank at `where`, as a broken shard or a killed process would."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec != f"{rank}:{where}":
        return
    if where == "exit":
        os._exit(9)
    from moge_cli.errors import CheckpointError

    raise CheckpointError(f"injected load failure ({FAULT_ENV}={spec})")


# ---- what the ranks measured ---------------------------------------------------------------------
def summary(stats: list[RankStats], device: str = "cpu") -> EPSummary:
    """The `ep` section: every rank's stats (rank order) and how they ran."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    return EPSummary(len(stats), backend, "op by op (the whole-step C decode cannot all-reduce mid-step)", stats)


def generate_on_ranks(path: str, world: int, ids: list[int], tokenizer_root: str | None, options: dict[str, Any], *,
                      dtype=None, device: str = "cpu", threads: int | None = None):  # fmt: skip
    """run_generation on `world` ranks: rank 0's GenerationResult, with summary() in result.ep (None on
    torchrun ranks other than 0)."""
    out = run_on_ranks(path, world, generate_job, (ids, tokenizer_root, options), dtype=dtype, device=device, threads=threads)
    if out is None:  # a torchrun rank other than 0
        return None
    result = out[0][0]
    result.ep = summary([stats for _, stats in out], device)
    return result


def profile_on_ranks(path: str, world: int, *, prompt: str | None = None, text_file=None, prompt_ids: list[int] | None = None,
                     decode: int = 32, dtype=None, device: str = "cpu", revision: str | None = None) -> EPProfileReport | None:  # fmt: skip
    """`moge profile --ep N`: prefill the prompt and decode `decode` greedy tokens on `world` ranks; speed and the
    per-rank statistics (summary()). The per-component timers, bandwidth and per-layer routing tables of a one-process
    profile are not measured here."""
    from moge_cli.profiling import prompt_tokens

    ckpt, ranks_path = open_source(path, world, revision)
    root = ckpt.root
    ckpt.close()
    ids, tok = prompt_tokens(root, prompt, text_file, prompt_ids)
    options = dict(max_new_tokens=decode, stop_ids=())
    result = generate_on_ranks(ranks_path, world, ids, str(root) if tok is not None else None, options, dtype=dtype, device=device)
    if result is None:  # a torchrun rank other than 0
        return None
    return EPProfileReport(
        model=str(path),
        device=device,
        prompt_tokens=len(ids),
        prefill=Speed(result.prefill_tokens, result.prefill_seconds, result.prefill_tokens_per_s),
        decode=Speed(result.decode_tokens, result.decode_seconds, result.decode_tokens_per_s),
        generated_ids=result.generated_ids,
        ep=result.ep,
    )


def rank_lines(ep: EPSummary) -> list[str]:
    """summary() as text: one line per rank, and the balance line (MoGE against plain top-k routing)."""
    lines = [f"expert parallel: {ep.world_size} ranks ({ep.backend}), decode {ep.decode_path}"]
    for r in ep.ranks:
        lines.append(
            f"rank {r.rank}: groups {r.groups[0]}..{r.groups[1] - 1}, experts {r.experts[0]}..{r.experts[1] - 1} | "
            f"peak memory {r.peak_memory_bytes / 1e6:.1f} MB | routed experts {r.routed_expert_seconds_per_token * 1e3:.3f} ms/token, "
            f"all-reduce {r.all_reduce_seconds_per_token * 1e3:.3f} ms/token ({r.all_reduces} all-reduces)"
        )
    lines.append(f"token-expert pairs per rank: MoGE {ep.token_expert_pairs}, plain top-k would give {ep.topk_token_expert_pairs}")
    return lines
