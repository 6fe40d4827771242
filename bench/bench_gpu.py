"""GPU benchmark (issue 16): moge against transformers' Qwen2-MoE on the same shapes, on the same device, in one run.

    python bench/bench_gpu.py [--device cuda] [--small] [--json FILE] [--new-tokens 32] [--prefill 512] [--repeats 3] [--shape TEXT]

Shapes: the 0.47B bench model (bench-0.47b: 64 experts in 8 groups, hidden 1024, 8 layers) and a Pangu-width
slice (the 72B config with 2 layers: hidden 5120, 64 experts of 1344, shared 5376, vocab 153376, 40 / 8 heads
of 128). `--small` shrinks both (a smoke test: `--device cpu --small` runs in under a minute).
Engines, all at batch 1 with random weights:
  moge bf16          the model built on the device and filled in place (what load_model builds)
  moge bf16 op by op the same model with no whole-step plan: every op launched from Python (on CUDA: no
                     graph replay; on the CPU: no kernels/step.c step), to show what the graph gains
  moge int8 / int4   a compressed-tensors checkpoint (per channel int8; int4 g128 asymmetric, as `moge quantize`
                     writes by default) of random integers, written to a temp dir and loaded by load_model
  transformers       Qwen2-MoE of the same shape holding moge bf16's weights (bench_runtime.load_transformers), with
                     each experts implementation it has ("eager", "grouped_mm")
Measured per engine: decode tokens/s (prompt 8, --new-tokens greedy tokens, argmax on the device) and prefill
tokens/s (--prefill tokens), each the first call of a fresh engine ("first") and the best of --repeats
("warm"). The copy bandwidth (torch copy of a 1 GiB buffer; 2 GiB on CUDA; read + write bytes / s) is
measured in the same run; a decode's share of the ceiling = tokens/s x the weight bytes one token reads
(all but the embedding table, routed experts at k/E) / bandwidth. Prints a table, writes --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import load_transformers  # noqa: E402  (the same Qwen2-MoE build as the CPU bench)

from moge_cli.config import MoGEConfig  # noqa: E402
from moge_cli.errors import MogeError  # noqa: E402
from moge_cli.loader import load_model  # noqa: E402
from moge_cli.model import MoGEForCausalLM  # noqa: E402
from moge_cli.names import KINDS, PER_EXPERT, kind_of_name, module_of, parameter_sources, expected_tensors  # noqa: E402
from moge_cli.quant_format import PACKED, SCALE, SHAPE, ZERO_POINT, packed_cols, quantization_config  # noqa: E402
from moge_converters.quantize_plan import QuantOptions, fit_scheme, selected  # noqa: E402

ROUTED = re.compile(r"\.mlp\.(gate_up|down)(\.|$)")  # routed expert stacks (float, or a QLinear's tensors)
PROMPT = 8


def shapes(small: bool) -> dict[str, MoGEConfig]:
    bench = MoGEConfig.from_name("bench-0.47b")
    pangu = dataclasses.replace(MoGEConfig.from_name("pangu-pro-moe-72b"), num_hidden_layers=2)
    if not small:
        return {"0.47b": bench, "pangu-width 2 layers": pangu}
    return {
        "0.47b small": dataclasses.replace(bench, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=256, vocab_size=2048),
        "pangu-width small": dataclasses.replace(pangu, hidden_size=640, num_attention_heads=5, num_key_value_heads=1, moe_intermediate_size=128,
                                                 shared_expert_intermediate_size=512, vocab_size=4096, num_hidden_layers=1),
    }  # fmt: skip


# ---- the device ------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Read + write bytes / s of the best of `repeats` torch copies of an nbytes buffer."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i:
            best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best


# ---- the engines: step(ids [1, T], state) -> (logits [1, T, V], state) ------------------------------------
def random_model(cfg: MoGEConfig, dtype: str, device: str) -> MoGEForCausalLM:
    """moge's model with random weights, built on the device (norms and router_scale 1, biases 0)."""
    model = MoGEForCausalLM.from_config(cfg, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm", "norm", "router_scale")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.tie_weights()


def quantized_checkpoint(model: MoGEForCausalLM, bits: int, out: Path) -> Path:
    """A compressed-tensors checkpoint of `model`'s shape: the modules `moge quantize --bits N` picks get random
    integers (zero points 0) and scales of a weight of std ~0.02; everything else is the model's own tensor."""
    from safetensors.torch import save_file

    cfg, device = model.config, model.device
    scheme = QuantOptions(bits=bits).scheme()
    sources, shapes_ = parameter_sources(cfg, PER_EXPERT), expected_tensors(cfg, PER_EXPERT)
    tensors, schemes = {}, {}
    g = torch.Generator(device=device).manual_seed(1)
    for param, names in sources.items():
        flat, offset = model.get_parameter(param).detach().reshape(-1), 0
        for name in names:
            shape = shapes_[name]
            numel = math.prod(shape)
            if not selected(name, shape, QuantOptions(bits=bits)):
                tensors[name] = flat[offset : offset + numel].view(shape).cpu().contiguous()
            else:
                n, k = shape
                s = fit_scheme(scheme, k)
                m = module_of(name)
                schemes[m] = s
                tensors[f"{m}.{PACKED}"] = torch.randint(-(2**31), 2**31 - 1, (n, packed_cols(k, bits)), dtype=torch.int32, device=device, generator=g).cpu()
                tensors[f"{m}.{SCALE}"] = torch.full((n, s.groups(k)), 0.02 / (74 if bits == 8 else 4.6), dtype=torch.bfloat16)
                tensors[f"{m}.{SHAPE}"] = torch.tensor([n, k], dtype=torch.int64)
                if not s.symmetric:
                    tensors[f"{m}.{ZERO_POINT}"] = torch.full((packed_cols(n, bits), s.groups(k)), -2004318072, dtype=torch.int32)  # 0x88888888: zero 0
            offset += numel
    linear = [module_of(n) for n, s in shapes_.items() if n.endswith(".weight") and len(s) == 2 and KINDS[kind_of_name(n)].quantizable
              and kind_of_name(n) != "embed"]  # fmt: skip
    config = cfg.to_dict() | {"quantization_config": quantization_config(schemes, linear)}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"))
    return out


def moge_engine(model, max_len: int):
    """step(ids, state): state None starts a new sequence in the engine's one KV cache, reset rather than made anew:
    on CUDA the decode step is captured as a graph once per cache, which belongs in the first call's figure only."""
    cache = model.new_cache(batch_size=1, max_len=max_len)

    def step(ids, state):
        if state is None:
            cache.reset()
        return model(ids, cache=cache), cache

    return step


def transformers_engines(cfg: MoGEConfig, ours: MoGEForCausalLM, device: str) -> dict:
    """{name: (prepare, step)} for a Qwen2-MoE of the same shape holding our weights, per experts implementation."""
    return {f"transformers {impl}": engine for impl, engine in load_transformers(cfg, "bfloat16", ours, device).items()}


def active_bytes(model) -> int:
    """Weight bytes one decode step reads: every parameter but the embedding table, routed experts at k/E."""
    cfg, total = model.config, 0
    for name, p in model.named_parameters():
        if name == "embed_tokens":
            continue
        n = p.numel() * p.element_size()
        total += n * cfg.num_experts_per_tok // cfg.num_experts if ROUTED.search(name) else n
    return total


# ---- measurements ------------------------------------------------------------------------------------------
def decode_seconds(step, prompt, new_tokens: int, device: str) -> float:
    logits, state = step(prompt, None)
    token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1] on the device
    sync(device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = step(token, state)
        token = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return time.perf_counter() - t


def prefill_seconds(step, ids, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    step(ids, None)
    sync(device)
    return time.perf_counter() - t


def measure(prepare, step, prompt, prefill_ids, args) -> dict:
    """First call of a fresh engine (prefill, then one decode run), then the best of --repeats."""
    prepare()
    first_prefill = prefill_seconds(step, prefill_ids, args.device)
    first_decode = decode_seconds(step, prompt, args.new_tokens, args.device)
    decode = prefill = math.inf
    for _ in range(args.repeats):
        prepare()
        decode = min(decode, decode_seconds(step, prompt, args.new_tokens, args.device))
        prefill = min(prefill, prefill_seconds(step, prefill_ids, args.device))
    n, T = args.new_tokens, prefill_ids.shape[1]
    return {"decode_first_tok_s": n / first_decode, "decode_tok_s": n / decode, "prefill_first_tok_s": T / first_prefill, "prefill_tok_s": T / prefill}


def bench_shape(cfg: MoGEConfig, args, bandwidth: float, tmp: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=g).to(args.device)
    prefill_ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=g).to(args.device)
    max_len = max(args.prefill, PROMPT + args.new_tokens) + 1
    out: dict = {"engines": {}, "active_bytes": {}, "errors": {}}

    def run(name: str, prepare, step, model=None) -> None:
        try:
            out["engines"][name] = measure(prepare, step, prompt, prefill_ids, args)
            if model is not None:
                out["active_bytes"][name] = active_bytes(model)
        except (MogeError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:  # a path this build cannot run: report, go on
            out["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"  {name}: {out['engines'].get(name) or out['errors'][name]}", file=sys.stderr)

    ours = random_model(cfg, "bfloat16", args.device)
    run("moge bf16", lambda: None, moge_engine(ours, max_len), ours)
    op_by_op = moge_engine(ours, max_len)  # the same weights with no whole-step plan (model._plan None):
    run("moge bf16 op by op", lambda: setattr(ours, "_plan", None), op_by_op, ours)  # no CUDA graph (nor C step)
    if not args.no_transformers:
        try:
            for name, (prepare, step) in transformers_engines(cfg, ours, args.device).items():
                run(name, prepare, step)
        except Exception as e:  # noqa: BLE001 - not installed, or a version whose layout differs: the moge rows still run
            out["errors"]["transformers"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    for bits in (8, 4):
        path = quantized_checkpoint(ours, bits, tmp / f"{id(cfg)}-int{bits}")
        try:
            model = load_model(path, device=args.device)
        except MogeError as e:
            out["errors"][f"moge int{bits}"] = f"load: {e}"
            print(f"  moge int{bits}: {out['errors'][f'moge int{bits}']}", file=sys.stderr)
            continue
        run(f"moge int{bits}", lambda: None, moge_engine(model, max_len), model)
        del model
    del ours
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for name, e in out["engines"].items():
        read = out["active_bytes"].get(name, out["active_bytes"].get("moge bf16", 0))  # transformers holds moge bf16's weights
        e["ceiling_share"] = e["decode_tok_s"] * read / bandwidth if read else None
    return out


# ---- report ----------------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = [f"device {result['device']} ({result['device_name']}), copy bandwidth {result['bandwidth_bytes_s'] / 1e9:.0f} GB/s; "
             f"batch 1, decode {result['args']['new_tokens']} tokens after {PROMPT}, prefill {result['args']['prefill']} tokens, "
             f"warm = best of {result['args']['repeats']}"]  # fmt: skip
    for shape, r in result["shapes"].items():
        engines = r["engines"]
        hf = [e for n, e in engines.items() if n.startswith("transformers")]
        best_decode = max((e["decode_tok_s"] for e in hf), default=None)
        best_prefill = max((e["prefill_tok_s"] for e in hf), default=None)
        bf16 = engines.get("moge bf16", {}).get("decode_tok_s")
        lines += ["", f"{shape}", f"{'engine':<24}{'decode first':>13}{'warm':>10}{'x HF best':>10}{'x bf16':>8}{'ceiling':>9}"
                  f"{'prefill first':>15}{'warm':>10}{'x HF best':>10}"]  # fmt: skip
        for name, e in engines.items():
            share = f"{e['ceiling_share']:.0%}" if e.get("ceiling_share") is not None else "-"
            lines.append(
                f"{name:<24}{e['decode_first_tok_s']:>13.1f}{e['decode_tok_s']:>10.1f}{_ratio(e['decode_tok_s'], best_decode):>10}"
                f"{_ratio(e['decode_tok_s'], bf16):>8}{share:>9}{e['prefill_first_tok_s']:>15.1f}{e['prefill_tok_s']:>10.1f}"
                f"{_ratio(e['prefill_tok_s'], best_prefill):>10}"
            )
        lines += [f"{name:<24}not run: {why}" for name, why in r["errors"].items()]
    return "\n".join(lines)


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="shrunk shapes: a smoke test")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 32; --small 8)")
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 512; --small 64)")
    p.add_argument("--repeats", type=int, default=None, help="warm runs, best kept (default 3; --small 2)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--shape", action="append", default=[], help="only shapes whose name holds this text (repeatable)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (8 if args.small else 32)
    args.prefill = args.prefill or (64 if args.small else 512)
    args.repeats = args.repeats or (2 if args.small else 3)
    on_cuda = args.device.startswith("cuda")
    bandwidth = copy_bandwidth(args.device, (2 << 30) if on_cuda else (256 << 20 if args.small else 1 << 30))
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if on_cuda else "cpu",
        "torch": torch.__version__,
        "bandwidth_bytes_s": bandwidth,
        "args": {k: getattr(args, k) for k in ("new_tokens", "prefill", "repeats", "small")},
        "shapes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        for name, cfg in shapes(args.small).items():
            if args.shape and not any(s in name for s in args.shape):
                continue
            print(f"{name} ({time.strftime('%X')}):", file=sys.stderr)
            result["shapes"][name] = bench_shape(cfg, args, bandwidth, Path(tmp))
            if args.json:  # after every shape: a run cut short still leaves what it measured
                args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
