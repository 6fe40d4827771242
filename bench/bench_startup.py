"""Start-up cost of `moge --help`, `moge load --json` on the 72B skeleton and `moge convert` of the tiny
fixture (bytes only: nothing cast), as ratios to `python -c "import json"`.

    python bench/bench_startup.py [--repeat 15] [--before PYTHONPATH]

Each command runs as a fresh process; we keep the best wall time, the best CPU time (user+sys,
which is steadier on a shared machine) and the peak RSS of --repeat runs. Also checks that neither
`load --json` nor a layout change imports torch. Bytecode caching is left on (PYTHONDONTWRITEBYTECODE
is dropped from the children's environment) and every command runs once before timing, as on a user's
machine after the first call. --before times the load --json and convert rows again with PYTHONPATH set to a directory
holding another checkout's packages (moge_cli, moge_converters, moge_kernels links), in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
TORCH_PROBE = "import sys, runpy; sys.argv=['moge', *sys.argv[1:]]\ntry: runpy.run_module('moge_cli', run_name='__main__')\nexcept SystemExit: pass\nprint('torch' in sys.modules)"


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of one run of cmd."""
    t0 = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, env, file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if code := os.waitstatus_to_exitcode(status):
        raise subprocess.CalledProcessError(code, cmd)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def run_best(cmd: list[str], repeat: int, env: dict[str, str] = ENV) -> tuple[float, float, int]:
    """(best wall seconds, best CPU seconds, lowest peak RSS bytes) of `repeat` runs of cmd, after one warm-up run."""
    run_once(cmd, env)
    runs = [run_once(cmd, env) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--before", help="PYTHONPATH of another checkout: its load --json and convert rows are timed too")
    args = ap.parse_args()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="moge-skel-"))
    try:
        script = Path(py).parent / "moge"  # the console script users run; `python -m moge_cli` where it is not installed
        moge = [str(script)] if script.exists() else [py, "-m", "moge_cli"]
        # written by a child: this process stays small (no torch), as a child's peak RSS counts its parent's until exec
        skel = Path(subprocess.run([*moge, "fixture", "pangu-pro-moe-72b", str(tmp / "72b"), "--skeleton"], capture_output=True, text=True, check=True).stdout.strip())
        stacked = ["convert", str(FIXTURE), str(tmp / "out"), "--layout", "stacked", "--force", "-q"]
        dry = ["convert", str(FIXTURE), str(tmp / "dry"), "--layout", "stacked", "--dry-run"]
        cases = {
            "python -c 'import json' (baseline)": ([py, "-c", "import json"], ENV),
            "moge --help": ([*moge, "--help"], ENV),
            "moge load 72B-skeleton --json": ([*moge, "load", str(skel), "--json"], ENV),
            "moge load 72B-skeleton (rich summary)": ([*moge, "load", str(skel)], ENV),
            "moge convert tiny-moge --layout stacked": ([*moge, *stacked], ENV),
            "moge convert tiny-moge --layout stacked --dry-run": ([*moge, *dry], ENV),
        }
        if args.before:
            before = {**ENV, "PYTHONPATH": args.before}
            cases["moge load 72B-skeleton --json (--before)"] = ([*moge, "load", str(skel), "--json"], before)
            cases["moge convert tiny-moge --layout stacked (--before)"] = ([*moge, *stacked], before)
            cases["moge convert tiny-moge --layout stacked --dry-run (--before)"] = ([*moge, *dry], before)
        probes = {"load --json": ["load", str(skel), "--json"], "convert --layout stacked": stacked}
        torch_loaded = {k: subprocess.run([py, "-c", TORCH_PROBE, *a], capture_output=True, text=True).stdout.strip().splitlines()[-1] for k, a in probes.items()}
        results = {name: run_best(cmd, args.repeat, env) for name, (cmd, env) in cases.items()}
        base_wall, base_cpu, _ = next(iter(results.values()))
        print("| command | best wall | x baseline | best CPU | x baseline | peak RSS |\n|---|---|---|---|---|---|")
        for name, (wall, cpu, rss) in results.items():
            print(f"| {name} | {wall * 1000:.0f} ms | {wall / base_wall:.1f}x | {cpu * 1000:.0f} ms | {cpu / max(base_cpu, 1e-3):.1f}x | {rss / 2**20:.0f} MiB |")
        imported = "; ".join(f"`moge {k}`: {v}" for k, v in torch_loaded.items())
        print(f"\ntorch imported by {imported}; cpus: {os.cpu_count()}; target: load under 5x baseline")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
