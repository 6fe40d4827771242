"""Runtime benchmark: moge's model vs the memory-bandwidth ceiling and Hugging Face transformers.

    python bench/bench_runtime.py [--checkpoint DIR] [--dtypes float32 bfloat16] [--repeats 3]

Writes the random "bench-0.47b" checkpoint (bf16) to a temporary directory unless --checkpoint
names one, then for each dtype runs one worker process (so peak RSS is per dtype) that measures,
at batch 1: decode tokens/s (prompt 8, 64 greedy new tokens), prefill tokens/s (512 tokens), the
read bandwidth (a float32 sum over a buffer much bigger than the caches), the same with
kernels/cpu.c switched off (MOGE_NATIVE=0: torch ops only), the same for a
same-shaped Qwen2-MoE in transformers holding the same weights (a bench-only extra:
`pip install transformers`), and peak RSS. Prints a markdown table. The machine may be shared:
the engines' runs alternate and every number is the best of --repeats runs. The machine's read
rate can also move between runs, so each of ours' decode runs is also set against the read
bandwidth measured just before it (paired shares of the ceiling, per repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRESET = "bench-0.47b"
BANDWIDTH_BYTES = 1 << 30  # 4x-plus any last-level cache


# ---- measurements (worker process) ---------------------------------------------------------------
def _best(fn, repeats: int) -> float:
    """Smallest wall time of `repeats` calls of fn (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(repeats: int, warm: bool = True) -> float:
    """Bytes/s of a float32 sum over a 1 GiB buffer: the best of max(repeats, 5) sums, or with
    warm=False of 3 (beside one decode run: the machine's read rate of that moment), after one untimed."""
    import torch

    buf = torch.ones(BANDWIDTH_BYTES // 4)
    t = _best(lambda: buf.sum(), max(repeats, 5) if warm else 3)
    del buf
    return BANDWIDTH_BYTES / t


def active_bytes(model) -> int:
    """Weight bytes one decode step reads: all but the embedding table, routed experts at k/E."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if name == "embed_tokens":
            continue
        if name.endswith(("mlp.gate_up", "mlp.down")):
            n = n * cfg.num_experts_per_tok // cfg.num_experts
        total += n
    return total


def decode_seconds(step, prompt, new_tokens: int) -> float:
    """Wall time of new_tokens greedy decode steps after the prompt (prompt prefill not counted).

    step(ids, state) -> (logits [1, T, V], state), with state None at the start of a sequence.
    """
    logits, state = step(prompt, None)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = step(nxt, state)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t


def prefill_seconds(step, ids) -> float:
    t = time.perf_counter()
    step(ids, None)
    return time.perf_counter() - t


def _kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def load_ours(path: str, dtype: str, max_len: int):
    """(step function, load and size facts, the model) for moge's model."""
    import torch

    from moge_cli.loader import load_model

    torch.empty(16, dtype=getattr(torch, dtype)).copy_(torch.ones(16, dtype=torch.bfloat16))  # code pages
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass
    base = _kib("VmRSS")
    t = time.perf_counter()
    model = load_model(path, dtype=dtype)
    load_s = time.perf_counter() - t
    load_peak = _kib("VmHWM") - base
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def step(ids, cache):
        if cache is None:
            cache = model.new_cache(batch_size=1, max_len=max_len)
        return model(ids, cache=cache), cache

    info = dict(load_s=load_s, load_peak_bytes=load_peak, model_bytes=model_bytes, active_bytes=active_bytes(model))
    info["process_peak_bytes"] = _kib("VmHWM")
    return step, info, model


def qwen2_moe_config(cfg, dtype: str):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.shared_expert_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, use_cache=True, torch_dtype=dtype,
    )  # fmt: skip


def qwen2_moe_state_dict(model) -> dict:
    """Our loaded model's weights under Qwen2-MoE names, so both engines run the same weights.

    Qwen2-MoE has no o_proj bias and no router_scale (dropped), and a shared-expert gate (left at
    zero: a constant 0.5); same shapes and FLOPs, and the same router logits, so similar routing.
    """
    cfg = model.config
    nH, nKV, D, Is = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.shared_expert_intermediate_size
    sd = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm, "lm_head.weight": model.lm_head}
    for L, layer in enumerate(model.layers):
        p, a, m = f"model.layers.{L}.", layer.self_attn, layer.mlp
        for proj, w, b in zip("qkv", a.qkv_weight.split([nH * D, nKV * D, nKV * D]), a.qkv_bias.split([nH * D, nKV * D, nKV * D])):
            sd[f"{p}self_attn.{proj}_proj.weight"], sd[f"{p}self_attn.{proj}_proj.bias"] = w, b
        sd.update({
            f"{p}self_attn.o_proj.weight": a.o_weight,
            f"{p}input_layernorm.weight": layer.input_layernorm,
            f"{p}post_attention_layernorm.weight": layer.post_attention_layernorm,
            f"{p}mlp.gate.weight": m.gate,
            f"{p}mlp.experts.gate_up_proj": m.gate_up,
            f"{p}mlp.experts.down_proj": m.down,
            f"{p}mlp.shared_expert.gate_proj.weight": m.shared_w13[:Is],
            f"{p}mlp.shared_expert.up_proj.weight": m.shared_w13[Is:],
            f"{p}mlp.shared_expert.down_proj.weight": m.shared_w2,
            f"{p}mlp.shared_expert_gate.weight": m.gate.new_zeros(1, cfg.hidden_size),
        })  # fmt: skip
    return sd


def load_transformers(cfg, dtype: str, ours, device: str = "cpu") -> dict:
    """{experts implementation: (prepare, step)} for a same-shaped Qwen2-MoE holding our model's weights (bench_gpu: on a device)."""
    import torch
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2MoeForCausalLM(qwen2_moe_config(cfg, dtype)).to(getattr(torch, dtype)).eval()
    missing, unexpected = model.load_state_dict(qwen2_moe_state_dict(ours), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    impls = ["eager", "grouped_mm"] if hasattr(model, "set_experts_implementation") else ["default"]

    import inspect

    new_api = "cache" in inspect.signature(model.forward).parameters  # v5.24 renamed past_key_values

    def step(ids, past):
        with torch.inference_mode():
            if new_api:
                out = model(input_ids=ids, cache=past, use_cache=True)
                return out.logits, out.cache
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.logits, out.past_key_values

    def prepare(impl: str):
        return lambda: impl == "default" or model.set_experts_implementation(impl)

    return {impl: (prepare(impl), step) for impl in impls}


def worker(path: str, dtype: str, args) -> dict:
    """Loads both engines, then alternates their runs so both see the same machine load; best of repeats."""
    import torch

    from moge_cli.config import MoGEConfig

    cfg = MoGEConfig.from_file(Path(path) / "config.json")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g)
    prefill_ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=g)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"dtype": dtype, "threads": torch.get_num_threads(), "bandwidth": read_bandwidth(args.repeats)}
    out["args"] = {k: getattr(args, k) for k in ("prompt", "new_tokens", "prefill", "repeats")}
    step, out["ours"], model = load_ours(path, dtype, max(args.prefill, args.prompt + args.new_tokens + 4))
    def native(flag: str):  # kernels/cpu.c on ("1") or off ("0": the torch path it replaces)
        return lambda: os.environ.__setitem__("MOGE_NATIVE", flag)

    engines = {"ours": (native("1"), step), "ours, torch ops only (MOGE_NATIVE=0)": (native("0"), step)}  # name -> (prepare, step)
    if not args.no_transformers:
        try:
            import transformers

            out["transformers_version"] = transformers.__version__
            engines.update({f"transformers {k}": v for k, v in load_transformers(cfg, dtype, model).items()})
        except ImportError:
            print("transformers is not installed (pip install transformers): skipping it", file=sys.stderr)
    decode = {name: float("inf") for name in engines}
    prefill = dict(decode)
    paired = []  # per repeat: ours' decode bytes/s over the read bandwidth measured just before it
    for name, (prepare, fn) in engines.items():  # warm-up (one-time allocations, lazy init)
        prepare()
        decode_seconds(fn, prompt, 4)
        prefill_seconds(fn, prefill_ids[:, :32])
    for _ in range(args.repeats):
        for name, (prepare, fn) in engines.items():
            try:
                prepare()
                bandwidth = read_bandwidth(1, warm=False) if name == "ours" else None
                seconds = decode_seconds(fn, prompt, args.new_tokens)
                decode[name] = min(decode[name], seconds)
                if bandwidth:
                    paired.append(out["ours"]["active_bytes"] * args.new_tokens / seconds / bandwidth)
                prefill[name] = min(prefill[name], prefill_seconds(fn, prefill_ids))
            except Exception as e:  # an experts implementation this build cannot run: report, go on
                print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
        out["bandwidth"] = max(out["bandwidth"], read_bandwidth(1))
    out["paired_share"] = paired
    out["engines"] = {
        name: {"decode_tok_s": args.new_tokens / decode[name], "prefill_tok_s": args.prefill / prefill[name]}
        for name in engines
    }
    return out


# ---- report --------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    rows = [
        "| dtype | engine | decode tok/s | ours/this | % of ceiling | prefill tok/s | ours/this |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ours = r["engines"]["ours"]
        ceiling = r["bandwidth"] / r["ours"]["active_bytes"]
        rows.append(
            f"| {r['dtype']} | bandwidth ceiling ({r['bandwidth'] / 1e9:.1f} GB/s / "
            f"{r['ours']['active_bytes'] / 1e6:.0f} MB) | {ceiling:.1f} | {ours['decode_tok_s'] / ceiling:.2f} | 100% | | |"
        )
        for name, e in r["engines"].items():
            rows.append(
                f"| {r['dtype']} | {name} | {e['decode_tok_s']:.1f} | {ours['decode_tok_s'] / e['decode_tok_s']:.2f}x "
                f"| {e['decode_tok_s'] / ceiling:.0%} | {e['prefill_tok_s']:.1f} "
                f"| {ours['prefill_tok_s'] / e['prefill_tok_s']:.2f}x |"
            )
    rss = ["", "| dtype | model | load: peak RSS growth | load time | process peak RSS after load |", "|---|---|---|---|---|"]
    for r in results:
        o = r["ours"]
        rss.append(
            f"| {r['dtype']} | {o['model_bytes'] / 2**20:.0f} MiB | {o['load_peak_bytes'] / 2**20:.0f} MiB "
            f"({o['load_peak_bytes'] / o['model_bytes']:.2f}x model) | {o['load_s']:.1f} s "
            f"| {o['process_peak_bytes'] / 2**20:.0f} MiB |"
        )
    shares = ["", "| dtype | ours' decode / the read bandwidth measured just before it, per repeat | median |", "|---|---|---|"]
    for r in results:
        p = r["paired_share"]
        shares.append(f"| {r['dtype']} | {' '.join(f'{v:.0%}' for v in p)} | {statistics.median(p):.0%} |")
    shares.append("")
    r = results[0]
    notes = (
        f"\nbatch 1; decode: prompt {r['args']['prompt']}, {r['args']['new_tokens']} greedy tokens; prefill: "
        f"{r['args']['prefill']} tokens; {r['threads']} threads; best of {r['args']['repeats']}; "
        f"transformers {r.get('transformers_version', 'not run')}. Ceiling = read bandwidth (float32 sum over "
        f"1 GiB) / weight bytes a decode step reads (all but the embedding table; routed experts at k/E)."
    )
    return "\n".join(rows + rss + shares) + notes


def bench_checkpoint(given: str | None, tmp: str, **write) -> str:
    """--checkpoint's directory if given, else the random bench-0.47b checkpoint written into tmp (bf16, no
    tokenizer; `write`: other write_checkpoint options). Every bench that needs the model starts here."""
    if given is not None:
        return given
    from moge_cli.config import MoGEConfig
    from moge_cli.synthetic import write_checkpoint

    print(f"writing the random {PRESET} checkpoint (bf16) ...", file=sys.stderr)
    return str(write_checkpoint(MoGEConfig.from_name(PRESET), Path(tmp) / PRESET, **({"tokenizer": False} | write)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help=f"an existing {PRESET} checkpoint (default: write one to a temp dir)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # dtype: run one worker, print JSON
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.checkpoint, args.worker, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="moge-bench-") as tmp:
        path = bench_checkpoint(args.checkpoint, tmp)
        results = []
        for dtype in args.dtypes:
            print(f"benchmarking {dtype} ...", file=sys.stderr)
            cmd = [sys.executable, __file__, "--checkpoint", path, "--worker", dtype] + _passthrough(args)
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            sys.stderr.write(run.stderr)
            if run.returncode:
                return run.returncode
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=1))
    print(table(results))
    return 0


def _passthrough(args) -> list[str]:
    out = ["--repeats", str(args.repeats), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
    out += ["--prefill", str(args.prefill), "--threads", str(args.threads)] + (["--no-transformers"] if args.no_transformers else [])
    return out


if __name__ == "__main__":
    sys.exit(main())
