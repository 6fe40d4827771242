"""First prefill in a process against a warm one (issue 16: "the prefill a user sees is the first one").

    python bench/bench_first_prefill.py [--checkpoint DIR] [--dtypes bfloat16 float32] [--rounds 5]

`moge generate` prefills once per process, so the prefill a user waits for is a process's first. Each
measurement is a fresh worker process that loads the random bench-0.47b checkpoint (written to a
temporary directory unless --checkpoint names one) and prefills --prompts different prompts of --tokens
tokens, then the same prompts again: "first" is the process's first prefill, "Nth" the last of the
first pass (new prompts, so new per-expert row counts), "warm" the median of the second pass (every
GEMM shape seen before). Variants, alternated inside every round so both see the same machine load:

  base         per-expert row counts as they come (experts.ROW_STEPS_PER_OCTAVE = 0), malloc as glibc
               sets it (hugepages.keep_freed = False): the code before
  ours         rows padded to a few sizes per octave (the default ROW_STEPS_PER_OCTAVE), malloc as glibc sets it
  steps8       rows padded to 8 sizes per octave (less padding, more shapes)
  ours+malloc  ours, with glibc malloc keeping freed memory: what moge runs (load_model calls
               hugepages.keep_freed_memory(): fewer first-touch page faults)

Reported per dtype and variant, as the median over rounds with the spread [min-max]: tokens/s of the
first, Nth and warm prefills, first / warm (time; the target is <= 1.10 for bf16), warm against base's
warm in the same round, the extra rows padding computed (ours), page faults of the first prefill, and
peak RSS (VmHWM) of the worker after all prefills.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_runtime import bench_checkpoint  # bench/ is on sys.path when a bench runs as a script

ROOT = Path(__file__).resolve().parents[1]
PRESET = "bench-0.47b"
# name -> (ROW_STEPS_PER_OCTAVE, None: the kernels' default; glibc malloc keeps freed memory)
VARIANTS = {"base": (0, False), "ours": (None, False), "steps8": (8, False), "ours+malloc": (None, True)}


# ---- worker (one fresh process per measurement) -------------------------------------------------
def _kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(path: str, dtype: str, variant: str, args) -> dict:
    import torch

    from moge_cli import hugepages
    from moge_cli.loader import load_model
    from moge_kernels import experts

    if args.threads:
        torch.set_num_threads(args.threads)
    steps, keep_freed = VARIANTS[variant]
    if steps is not None:
        experts.ROW_STEPS_PER_OCTAVE = steps
    hugepages.keep_freed = keep_freed  # load_model calls hugepages.keep_freed_memory()
    rows = {"real": 0, "padded": 0}
    padded_rows = experts.padded_rows

    def counting(n: int) -> int:  # counts the rows the GEMMs compute against the pairs they serve
        m = padded_rows(n)
        rows["real"] += n
        rows["padded"] += m
        return m

    experts.padded_rows = counting
    model = load_model(path, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=g) for _ in range(args.prompts)]
    rss_before = _kib("VmRSS")
    seconds, cpu, faults = [], [], []
    for ids in prompts + prompts:  # first pass: new prompts; second: the same again (warm)
        f, c, t = _faults(), time.process_time(), time.perf_counter()
        model(ids)
        seconds.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        faults.append(_faults() - f)
        if len(seconds) == 1:
            rows_first = dict(rows)
            hwm_first = _kib("VmHWM")
    n = args.prompts
    return {
        "dtype": dtype, "variant": variant, "threads": torch.get_num_threads(), "seconds": seconds, "faults": faults,
        "first": seconds[0], "nth": seconds[n - 1], "warm": statistics.median(seconds[n:]), "cpu": cpu,
        "first_cpu": cpu[0], "warm_cpu": statistics.median(cpu[n:]),
        "padding": rows_first["padded"] / max(1, rows_first["real"]) - 1,
        "first_growth": hwm_first - rss_before, "peak_rss": _kib("VmHWM"),
    }  # fmt: skip


# ---- driver ---------------------------------------------------------------------------------------
def run_worker(path: str, dtype: str, variant: str, seed: int, args) -> dict:
    cmd = [sys.executable, __file__, "--checkpoint", path, "--worker", f"{dtype}:{variant}", "--seed", str(seed)]
    cmd += ["--prompts", str(args.prompts), "--tokens", str(args.tokens), "--threads", str(args.threads)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        sys.stderr.write(run.stderr)
        raise SystemExit(run.returncode)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def table(results: list[dict], args) -> str:
    rows = [
        "| dtype | variant | first tok/s | Nth tok/s | warm tok/s | first / warm | first / warm, CPU time | warm vs base "
        "| warm vs base, CPU time | padded rows | faults, first | faults, warm | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tok = args.tokens
    for dtype in args.dtypes:
        base = {r["round"]: r for r in results if r["dtype"] == dtype and r["variant"] == "base"}
        for variant in VARIANTS:
            rs = [r for r in results if r["dtype"] == dtype and r["variant"] == variant]
            if not rs:
                continue
            speedup = [base[r["round"]]["warm"] / r["warm"] for r in rs if r["round"] in base]
            speedup_cpu = [base[r["round"]]["warm_cpu"] / r["warm_cpu"] for r in rs if r["round"] in base]
            rows.append(
                f"| {dtype} | {variant} | {_spread([tok / r['first'] for r in rs], '.0f')} "
                f"| {_spread([tok / r['nth'] for r in rs], '.0f')} | {_spread([tok / r['warm'] for r in rs], '.0f')} "
                f"| **{_spread([r['first'] / r['warm'] for r in rs], '.2f')}** "
                f"| {_spread([r['first_cpu'] / r['warm_cpu'] for r in rs], '.2f')} "
                f"| {_spread(speedup, '.2f') if speedup else '-'} | {_spread(speedup_cpu, '.2f') if speedup else '-'} "
                f"| {_spread([100 * r['padding'] for r in rs], '.1f')}% "
                f"| {_spread([r['faults'][0] / 1000 for r in rs], '.0f')}k "
                f"| {_spread([statistics.median(r['faults'][args.prompts:]) / 1000 for r in rs], '.0f')}k "
                f"| {statistics.median(r['peak_rss'] for r in rs) / 2**20:.0f} MiB |"
            )
    r = results[0]
    notes = (
        f"\n{tok}-token prefills, {args.prompts} prompts then the same again, {r['threads']} threads, "
        f"{args.rounds} rounds (fresh process each); median [min-max] over rounds. first / warm: time of the "
        f"process's first prefill over the median of its second pass (wall time; and CPU time, which other load "
        f"moves less, though a thread spinning at a barrier burns it too). warm vs base: base's warm time over "
        f"this variant's in the same round (>1: faster). padded rows: extra GEMM rows of the first prefill."
    )
    return "\n".join(rows) + notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help=f"an existing {PRESET} checkpoint (default: write one to a temp dir)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--variants", nargs="+", default=["base", "ours"], choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # dtype:variant: run one worker, print JSON
    args = p.parse_args(argv)

    if args.worker:
        dtype, variant = args.worker.split(":")
        print(json.dumps(worker(args.checkpoint, dtype, variant, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="moge-bench-") as tmp:
        path = bench_checkpoint(args.checkpoint, tmp)
        results = []
        for rnd in range(args.rounds):
            for dtype in args.dtypes:
                turn = rnd % len(args.variants)
                variants = args.variants[turn:] + args.variants[:turn]  # each round another variant goes first
                for variant in variants:
                    r = run_worker(path, dtype, variant, args.seed + rnd, args)
                    r["round"] = rnd
                    results.append(r)
                    print(
                        f"round {rnd} {dtype} {variant}: first {args.tokens / r['first']:.0f} tok/s, "
                        f"warm {args.tokens / r['warm']:.0f}, first/warm {r['first'] / r['warm']:.2f}, "
                        f"CPU time {r['first_cpu'] / r['warm_cpu']:.2f} "
                        f"(load {os.getloadavg()[0]:.1f})",
                        file=sys.stderr,
                    )
    if args.json:
        print(json.dumps(results, indent=1))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
