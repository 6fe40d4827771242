"""A/B of builds of the C kernels (kernels/_cpu*.so) on one model, in one process, round-robin.

    python bench/ab_kernels.py CHECKPOINT A.so B.so [C.so ...] [--tokens 200] [--rounds 8]

Build each variant and keep a copy of its .so, for example:

    pip install --no-build-isolation --no-deps -e . && cp kernels/_cpu*.so /tmp/a.so
    (change kernels/*.c)
    pip install --no-build-isolation --no-deps -e . && cp kernels/_cpu*.so /tmp/b.so

Each .so is loaded as its own module; every round decodes --tokens tokens (the cache reset every
60 positions) with each build in turn, through the model's whole-step C call. On a shared machine
whose memory speed moves by 20-30% from minute to minute, separate processes (A, then B) cannot
resolve a 5% change; adjacent runs in one process can. Prints each build's median tokens/s and
the median over rounds of its ratio to the first build in the same round. A name ending in
"avx2.so" runs that build with its AVX-512 dot products off.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time



def load_build(path: str):
    spec = importlib.util.spec_from_file_location("moge_kernels._cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if path.endswith("avx2.so"):
        module.set_avx512(False)
    return module


def decode_rate(model, cache, tokens: int) -> float:
    import torch

    nxt = torch.tensor([[5]])
    cache.reset()
    model(nxt, cache=cache)
    t = time.perf_counter()
    for _ in range(tokens):
        if cache.length >= 60:
            cache.reset()
        nxt = model(nxt, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return tokens / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("builds", nargs="+", help="kernels/_cpu*.so copies; the first is the baseline")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)

    import torch

    from moge_kernels import native
    from moge_cli.loader import load_model

    builds = [load_build(b) for b in args.builds]
    model = load_model(args.checkpoint, dtype=args.dtype)  # quantized checkpoints load with the native kernels
    cache = model.new_cache(1, 64)
    rates: list[list[float]] = [[] for _ in builds]
    with torch.inference_mode():
        for _ in range(args.rounds):
            for i, build in enumerate(builds):
                native._cpu = build
                model._plan = False  # rebuilt (and checked) by this build
                rates[i].append(decode_rate(model, cache, args.tokens))
    for name, r in zip(args.builds, rates):
        ratio = statistics.median(x / y for x, y in zip(r, rates[0]))
        print(f"{name}: median {statistics.median(r):.1f} tok/s, {ratio:.3f}x the first build ({' '.join(f'{v:.0f}' for v in r)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
