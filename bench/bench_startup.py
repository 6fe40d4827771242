"""Start-up cost of `moge --help` and `moge load --json` on the 72B skeleton, as ratios to `python -c "import json"`.

    python bench/bench_startup.py [--repeat 15]

Each command runs as a fresh process; we keep the best wall time and the best CPU time (user+sys,
which is steadier on a shared machine) of --repeat runs. Also checks that neither imports torch.
Bytecode caching is left on (PYTHONDONTWRITEBYTECODE is dropped from the children's environment)
and every command runs once before timing, as on a user's machine after the first call.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moge_cli.synthetic import write_skeleton
from moge_cli.config import MoGEConfig


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_best(cmd: list[str], repeat: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of `repeat` runs of cmd, after one warm-up run."""
    subprocess.run(cmd, stdout=subprocess.DEVNULL, env=ENV)
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, env=ENV, check=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    return best_wall, best_cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="moge-skel-"))
    try:
        skel = write_skeleton(MoGEConfig.from_name("pangu-pro-moe-72b"), tmp / "72b")
        script = Path(py).parent / "moge"  # the console script users run; `python -m moge_cli` where it is not installed
        moge = [str(script)] if script.exists() else [py, "-m", "moge_cli"]
        cases = {
            "python -c 'import json' (baseline)": [py, "-c", "import json"],
            "moge --help": [*moge, "--help"],
            "moge load 72B-skeleton --json": [*moge, "load", str(skel), "--json"],
            "moge load 72B-skeleton (rich summary)": [*moge, "load", str(skel)],
        }
        probe = "import sys, runpy; sys.argv=['moge','load',sys.argv[1],'--json']\ntry: runpy.run_module('moge_cli', run_name='__main__')\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
        torch_loaded = subprocess.run([py, "-c", probe, str(skel)], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results = {name: run_best(cmd, args.repeat) for name, cmd in cases.items()}
        base_wall, base_cpu = next(iter(results.values()))
        print(f"| command | best wall | x baseline | best CPU | x baseline |\n|---|---|---|---|---|")
        for name, (wall, cpu) in results.items():
            print(f"| {name} | {wall * 1000:.0f} ms | {wall / base_wall:.1f}x | {cpu * 1000:.0f} ms | {cpu / max(base_cpu, 1e-3):.1f}x |")
        print(f"\ntorch imported by `moge load`: {torch_loaded}; cpus: {os.cpu_count()}; target: load under 5x baseline")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
