"""Expert-parallel benchmark: `moge profile --ep N` against one process on the same checkpoint.

    python bench/bench_ep.py [--checkpoint DIR] [--dtypes bfloat16 float32] [--ep 2] [--repeats 3]

Writes the random "bench-0.47b" checkpoint (bf16) to a temporary directory unless --checkpoint names one.
Per dtype and repeat, alternating: one fresh single-process worker (this file, --worker) that loads the
model and decodes greedily twice, on the normal whole-step C path and op by op (model._plan = None: what
every --ep rank runs), then `moge profile PATH --ep N --json` (its `ep` field: per-rank peak memory, routed
expert and all-reduce time per token, token-expert pairs MoGE against plain top-k). Best of --repeats for
speeds, the last repeat for the rest. Peak memory is each process's peak RSS; the expected per-rank peak is
the worker's RSS before loading + the replicated tensors + 1/N of the routed experts (from the checkpoint's
tensor headers, scaled to the loaded dtype). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_runtime import bench_checkpoint  # bench/ is on sys.path when a bench runs as a script

ROOT = Path(__file__).resolve().parents[1]
PRESET = "bench-0.47b"


# ---- expectations from the checkpoint's headers ---------------------------------------------------
def weight_bytes(path: str, dtype: str) -> dict[str, int]:
    """{"replicated": bytes, "routed": bytes} of the model loaded in `dtype` (element counts x its size)."""
    import torch

    from moge_cli.checkpoint import open_checkpoint

    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    out = {"replicated": 0, "routed": 0}
    ckpt = open_checkpoint(path)
    for name, info in ckpt.tensors.items():
        n = 1
        for d in info.shape:
            n *= d
        out["routed" if ".mlp.experts." in name else "replicated"] += n * size
    ckpt.close()
    return out


# ---- the single-process worker --------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status (per process image: not inherited
    through fork + exec from the parent, unlike ru_maxrss)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(path: str, dtype: str, ids: list[int], new_tokens: int) -> dict:
    """Load once; decode on the C path and op by op (after one short warm-up each); decode tok/s and peak RSS."""
    import torch  # noqa: F401  (in the base RSS, as in every rank)

    from moge_cli.generate import run_generation
    from moge_cli.loader import load_model

    base = _status_bytes("VmRSS")
    model = load_model(path, dtype=dtype)
    paths = {"c_path": False, "op_by_op": None}  # model._plan: False = build kernels/step.c's plan, None = declined
    out = {"base_rss_bytes": base}
    for name, plan in paths.items():
        model._plan = plan
        run_generation(model, ids, max_new_tokens=4, stop_ids=())  # warm-up
    for name, plan in paths.items():
        model._plan = plan
        r = run_generation(model, ids, max_new_tokens=new_tokens, stop_ids=())
        out[name] = {"decode_tok_s": r.decode_tokens_per_s, "generated_ids": r.generated_ids}
    out["peak_rss_bytes"] = _status_bytes("VmHWM")
    return out


def run_single(path: str, dtype: str, ids: list[int], new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--checkpoint", path, "--worker", dtype, "--ids", ",".join(map(str, ids)), "--new-tokens", str(new_tokens)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_ep(path: str, dtype: str, ids: list[int], new_tokens: int, world: int) -> dict:
    """`moge profile PATH --ep N --json`."""
    cmd = [sys.executable, "-m", "moge_cli", "profile", path, "--prompt-ids", ",".join(map(str, ids)), "-n", str(new_tokens),
           "--ep", str(world), "--dtype", dtype, "--json"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {run.returncode}\n{run.stderr}")
    return json.loads(run.stdout)


def measure(path: str, dtype: str, args) -> dict:
    """Alternating single-process and --ep runs; best decode speeds, the last runs' memory and per-rank stats."""
    import random

    from moge_cli.config import MoGEConfig

    cfg = MoGEConfig.from_file(Path(path) / "config.json")
    ids = random.Random(0).sample(range(cfg.vocab_size), args.prompt)
    best = {"c_path": 0.0, "op_by_op": 0.0, "ep": 0.0}
    for i in range(args.repeats):
        print(f"  {dtype}: repeat {i + 1}/{args.repeats}", file=sys.stderr)
        single = run_single(path, dtype, ids, args.new_tokens)
        ep = run_ep(path, dtype, ids, args.new_tokens, args.ep)
        best["c_path"] = max(best["c_path"], single["c_path"]["decode_tok_s"])
        best["op_by_op"] = max(best["op_by_op"], single["op_by_op"]["decode_tok_s"])
        best["ep"] = max(best["ep"], ep["decode"]["tokens_per_s"])
    ids_of = {"C path": single["c_path"]["generated_ids"], "op by op": single["op_by_op"]["generated_ids"], "--ep": ep["generated_ids"]}
    same = {f"{a} = {b}": _agree(ids_of[a], ids_of[b]) for a, b in (("C path", "op by op"), ("op by op", "--ep"))}
    return {"dtype": dtype, "best": best, "single": single, "ep": ep["ep"], "last_ep_tok_s": ep["decode"]["tokens_per_s"], "same_tokens": same,
            "weights": weight_bytes(path, dtype), "config": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}}  # fmt: skip


def _agree(a: list[int], b: list[int]) -> str:
    """'yes', or where two greedy sequences first differ."""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "yes" if first is None and len(a) == len(b) else f"from token {first}"


# ---- report --------------------------------------------------------------------------------------
def table(results: list[dict], args) -> str:
    mib = 2**20
    n = args.ep
    rows = [
        f"| dtype | single-process peak | per-rank peak (--ep {n}) | rank / single | expected (base + replicated + routed/{n}) "
        f"| expected / single | weights: replicated + routed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, w = r["single"], r["weights"]
        peaks = [x["peak_memory_bytes"] for x in r["ep"]["ranks"]]
        expected = s["base_rss_bytes"] + w["replicated"] + w["routed"] / n
        ratios = " / ".join(f"{p / s['peak_rss_bytes']:.2f}" for p in peaks)
        rows.append(
            f"| {r['dtype']} | {s['peak_rss_bytes'] / mib:.0f} MiB | {' / '.join(f'{p / mib:.0f}' for p in peaks)} MiB "
            f"| {ratios} | {expected / mib:.0f} MiB "
            f"(base {s['base_rss_bytes'] / mib:.0f}) | {expected / s['peak_rss_bytes']:.2f} "
            f"| {w['replicated'] / mib:.0f} + {w['routed'] / mib:.0f} MiB |"
        )
    rows += ["", f"| dtype | single, C path tok/s | single, op by op tok/s | --ep {n} tok/s | --ep / C path | --ep / op by op "
             f"| all-reduce ms/token (per rank) | all-reduce share of a decode step | routed experts ms/token (per rank) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        b, ranks = r["best"], r["ep"]["ranks"]
        ar = [x["all_reduce_seconds_per_token"] * 1e3 for x in ranks]
        ex = [x["routed_expert_seconds_per_token"] * 1e3 for x in ranks]
        step_ms = 1e3 / r["last_ep_tok_s"]  # the run the per-rank times come from
        layers = r["config"]["layers"]  # all-reduces per forward (every layer of bench-0.47b is MoE)
        share = [x["all_reduce_seconds"] * 1e3 / (x["all_reduces"] / layers) / step_ms for x in ranks]
        rows.append(
            f"| {r['dtype']} | {b['c_path']:.1f} | {b['op_by_op']:.1f} | {b['ep']:.1f} | {b['ep'] / b['c_path']:.2f}x "
            f"| {b['ep'] / b['op_by_op']:.2f}x | {' / '.join(f'{a:.2f}' for a in ar)} "
            f"| {' / '.join(f'{a:.0%}' for a in share)} | {' / '.join(f'{e:.2f}' for e in ex)} |"
        )
    rows += ["", "| dtype | token-expert pairs per rank, MoGE | same tokens, plain top-k | greedy tokens equal |", "|---|---|---|---|"]
    for r in results:
        ep = r["ep"]
        rows.append(f"| {r['dtype']} | {ep['token_expert_pairs']} | {ep['topk_token_expert_pairs']} | {'; '.join(f'{k}: {v}' for k, v in r['same_tokens'].items())} |")
    c = results[0]["config"]
    hidden_bytes = {"bfloat16": 2, "float32": 4}
    notes = (
        f"\n{PRESET}; batch 1; prompt {args.prompt} tokens, {args.new_tokens} greedy new tokens; best of {args.repeats} for speeds, "
        f"the last repeat for memory and per-rank times. Single process: torch's default threads; each rank: cpu_count / {n} threads. "
        f"Peak memory: peak RSS of each process (single: VmHWM; ranks: the ep field, ru_maxrss); 'base' is the single-process worker's "
        f"RSS after importing torch, before loading. All-reduce per MoE layer per token: hidden x dtype = "
        + ", ".join(f"{c['hidden']} x {hidden_bytes.get(r['dtype'], 0)} B ({r['dtype']})" for r in results)
        + f", {c['layers']} per token. All-reduce and routed-expert ms/token: the ep field's per-token figures (prompt tokens "
        f"counted). Share of a decode step: all-reduce time per forward (all_reduce_seconds / (all_reduces / layers)) / "
        f"(1000 / that run's --ep tok/s); the all-reduce time includes waiting for the other rank."
    )
    return "\n".join(rows) + notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help=f"an existing {PRESET} checkpoint (default: write one to a temp dir)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # dtype: one single-process run, print JSON
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.checkpoint, args.worker, [int(x) for x in args.ids.split(",")], args.new_tokens)))
        return 0
    with tempfile.TemporaryDirectory(prefix="moge-bench-ep-") as tmp:
        path = bench_checkpoint(args.checkpoint, tmp, max_shard_bytes=500_000_000, tokenizer=True)
        results = [measure(path, dtype, args) for dtype in args.dtypes]
    if args.json:
        print(json.dumps(results, indent=1))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
