"""Quantization quality on fixtures/tiny-trained: reconstruction error and held-out perplexity per scheme.

    python bench/quantize_quality.py [--checkpoint fixtures/tiny-trained] [--text fixtures/tiny-trained/heldout.txt]

Runs `moge quantize --perplexity` for int8 and int4 (group sizes, symmetric / asymmetric), rtn, mse and
mse+calib (`--calib` on --calib-text, default fixtures/train_tiny.py: Python source like the
fixture's training text, not its held-out text), and prints the markdown table the README shows:
pooled relative Frobenius error and SQNR of the quantized weights, and perplexity before / after on
the held-out text.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCHEMES = [
    ("int8 per channel", dict(bits=8)),
    ("int4 g128 asym", dict(bits=4, group_size=128)),
    ("int4 g128 sym", dict(bits=4, group_size=128, symmetric=True)),
    ("int4 g64 asym", dict(bits=4, group_size=64)),
    ("int4 g32 asym", dict(bits=4, group_size=32)),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "fixtures" / "tiny-trained"))
    p.add_argument("--text", default=None, help="held-out text (default: heldout.txt in the checkpoint)")
    p.add_argument("--methods", nargs="+", default=["rtn", "mse", "mse+calib"])
    p.add_argument("--calib-text", default=str(ROOT / "fixtures" / "train_tiny.py"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    text = args.text or str(Path(args.checkpoint) / "heldout.txt")

    from moge_converters.quantize_pipeline import quantize_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="moge-qq-") as tmp:
        for label, opts in SCHEMES:
            for method in args.methods:
                calib = args.calib_text if method.endswith("+calib") else None
                out = Path(tmp) / f"{label}-{method}".replace(" ", "_")
                r = quantize_checkpoint(args.checkpoint, out, method=method.removesuffix("+calib"), calib=calib, eval_text=text, **opts)
                q, e = r.quality, r.eval
                rows.append({
                    "scheme": label, "method": method, "rel_error": q.overall["rel_error"], "sqnr_db": q.overall["sqnr_db"],
                    "components": {c: v["rel_error"] for c, v in q.components.items()},
                    "ppl_before": e.before, "ppl_after": e.after, "change": e.change, "tokens": e.tokens,
                    "bytes_out": r.bytes_out, "bytes_in": r.bytes_in,
                })  # fmt: skip
                print(f"{label} {method}: ppl {e.before:.4f} -> {e.after:.4f}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    out = [
        f"perplexity on {rows[0]['tokens']} held-out tokens; original {rows[0]['ppl_before']:.4f}",
        "",
        "| scheme | method | rel. error (all / attention / experts / shared) | SQNR dB | perplexity | change | size |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["components"]
        parts = " / ".join(f"{c[k]:.4f}" for k in ("attention", "routed_experts", "shared_experts") if k in c)
        out.append(
            f"| {r['scheme']} | {r['method']} | {r['rel_error']:.4f} ({parts}) | {r['sqnr_db']:.2f} | {r['ppl_after']:.4f} "
            f"| {100 * r['change']:+.2f}% | {r['bytes_out'] / r['bytes_in']:.2f}x |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
