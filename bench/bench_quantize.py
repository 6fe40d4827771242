"""Quantized decode benchmark: bfloat16 vs int8 / int4 (each kernel) on the bench-0.47b model, same run.

    python bench/bench_quantize.py [--checkpoint DIR] [--repeats 5] [--new-tokens 32]

Writes the random "bench-0.47b" checkpoint (bf16) to a temporary directory unless --checkpoint
names one, quantizes it with `moge quantize` (int8 per channel; int4 g128 asymmetric; rtn; with
--lm-head also both with the lm_head quantized: variants "int8+lm_head", "int4+lm_head"),
loads every variant into one process and measures batch-1 greedy decode tokens/s and prefill
tokens/s round-robin (each repeat times every variant once, so a shared machine's load hits them
alike); every number is the best of --repeats. Variants: bfloat16, and for int8 / int4 the
"native" kernels (kernels/cpu.c on the stored integers, whole decode steps in one C call), the
"torch" kernels (torch._weight_int8pack_mm / _weight_int4pack_mm_for_cpu, converted at load)
and "dequant" (dequantise the picked experts on the fly). Prints a markdown table with the
speed-up over bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_runtime import bench_checkpoint  # bench/ is on sys.path when a bench runs as a script


PRESET = "bench-0.47b"
QUANTS = {"int8": dict(bits=8), "int4": dict(bits=4, group_size=128)}


def set_avx512(on: bool) -> None:
    """The int8 / int4 dot products' AVX-512 versions on (where the CPU has them) or off (AVX2)."""
    from moge_kernels import native

    if native._cpu is not None:
        native._cpu.set_avx512(on)


def decode_time(model, prompt, new_tokens: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for new_tokens greedy decode steps after prefilling prompt [1, P]."""
    cache = model.new_cache(1, prompt.shape[1] + new_tokens + 1)
    logits = model(prompt, cache=cache)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        nxt = model(nxt, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t, time.process_time() - c


def prefill_time(model, ids) -> float:
    t = time.perf_counter()
    model(ids, cache=model.new_cache(1, ids.shape[1]))
    return time.perf_counter() - t


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(path: Path, qdirs: dict[str, Path], args) -> list[dict]:
    import torch

    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.loader import load_model, load_quantized
    from moge_cli.quant_format import quantization_of

    cfg_vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg_vocab, (1, args.prompt), generator=g)
    prefill_ids = torch.randint(0, cfg_vocab, (1, args.prefill), generator=g)
    models = {"bfloat16": load_model(path, dtype="bfloat16")}
    for q, qdir in qdirs.items():
        for kernel in args.kernels:
            ck = open_checkpoint(qdir)
            models[f"{q} {kernel}"] = load_quantized(ck, quantization_of(ck), dtype="bfloat16", kernel=kernel.removesuffix("-avx2"))
            ck.close()
    best = {k: {"decode": float("inf"), "cpu": float("inf"), "prefill": float("inf")} for k in models}
    walls: dict[str, list[float]] = {}  # per variant, each repeat's decode wall time
    for m in models.values():  # warm-up
        decode_time(m, prompt, 2)
    for r in range(args.repeats):
        for name, m in models.items():
            set_avx512(not name.endswith("-avx2"))
            wall, cpu = decode_time(m, prompt, args.new_tokens)
            best[name]["decode"] = min(best[name]["decode"], wall)
            walls.setdefault(name, []).append(wall)
            best[name]["cpu"] = min(best[name]["cpu"], cpu)
            if args.prefill:
                best[name]["prefill"] = min(best[name]["prefill"], prefill_time(m, prefill_ids))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    rows = []
    for name, m in models.items():
        modes = sorted({x.mode for x in m.modules() if type(x).__name__ == "QLinear"})
        rows.append({
            "variant": name, "modes": modes, "weight_bytes": weight_bytes(m),
            "decode_tok_s": args.new_tokens / best[name]["decode"],
            "decode_paired_vs_bf16": statistics.median(b / w for b, w in zip(walls["bfloat16"], walls[name])),
            "decode_cpu_ms_per_token": 1e3 * best[name]["cpu"] / args.new_tokens,
            "prefill_tok_s": args.prefill / best[name]["prefill"] if args.prefill else None,
        })  # fmt: skip
    return rows


def table(rows: list[dict], threads: int) -> str:
    b = rows[0]
    out = [
        "| variant | kernels | weights MB | decode tok/s | vs bf16 | vs bf16, paired | decode CPU ms/token | vs bf16 | prefill tok/s | vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["prefill_tok_s"]
        prefill = f"{p:.0f} | {p / b['prefill_tok_s']:.2f}x" if p else "- | -"
        out.append(
            f"| {r['variant']} | {', '.join(r['modes']) or '-'} | {r['weight_bytes'] / 1e6:.0f} | {r['decode_tok_s']:.1f} "
            f"| {r['decode_tok_s'] / b['decode_tok_s']:.2f}x | {r['decode_paired_vs_bf16']:.2f}x | {r['decode_cpu_ms_per_token']:.1f} "
            f"| {b['decode_cpu_ms_per_token'] / r['decode_cpu_ms_per_token']:.2f}x | {prefill} |"
        )
    return "\n".join(out) + (
        f"\n\n{threads} torch threads; best of the repeats, variants timed round-robin in one process; "
        "paired: the median over repeats of bf16's decode time / this variant's in the same repeat."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help=f"an existing bf16 {PRESET} checkpoint (default: write one to a temp dir)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=128, help="prefill length (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--kernels", nargs="+", default=["native", "torch", "dequant"], help="quantized kernels to time (native-avx2: native without its AVX-512 dot products)")
    p.add_argument("--lm-head", action="store_true", help="also time int8 / int4 with lm_head quantized too (moge quantize --lm-head)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from moge_converters.quantize_pipeline import quantize_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="moge-bench-q-") as tmp:
        path = Path(bench_checkpoint(args.checkpoint, tmp))
        qdirs = {}
        quants = [(q, opts, False) for q, opts in QUANTS.items()]
        quants += [(f"{q}+lm_head", opts, True) for q, opts in QUANTS.items()] if args.lm_head else []
        for q, opts, lm_head in quants:
            t = time.perf_counter()
            qdirs[q] = Path(tmp) / q
            r = quantize_checkpoint(path, qdirs[q], lm_head=lm_head, **opts)
            print(f"quantized {q} in {time.perf_counter() - t:.1f} s ({r.bytes_out / 1e6:.0f} MB)", file=sys.stderr)
        rows = run(path, qdirs, args)
    if args.json:
        print(json.dumps(rows, indent=1))
    print(table(rows, torch.get_num_threads()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
