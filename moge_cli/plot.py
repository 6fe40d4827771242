"""`moge profile --plot`: expert-load heatmap (layers x experts, group boundaries) beside per-layer IS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moge_cli.errors import UsageError


def check_plot_target(path: str | Path) -> None:
    """UsageError now, before a long profile, if the plot cannot be drawn or written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'moge-toolkit[plot]'") from None
    parent = Path(path).parent
    if not parent.is_dir():
        raise UsageError(f"--plot {path}: the directory {parent} does not exist")


def plot_routing(report: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: left, share of activations per expert per layer; right, IS of MoGE vs top-k."""
    check_plot_target(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = report["routing"]["layers"]
    if not layers:
        raise UsageError("--plot: the model has no MoE layers to plot")
    counts = np.array([l["expert_counts"] for l in layers], dtype=float)  # [L, E]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n_experts = counts.shape[1]
    n_groups = len(layers[0]["group_counts"])
    per_group = n_experts // n_groups

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 0.35 * len(layers) + 2.5), gridspec_kw={"width_ratios": [3, 1]})
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    for g in range(1, n_groups):
        ax.axvline(g * per_group - 0.5, color="white", linewidth=1.5)
    ax.set_xlabel(f"expert ({n_groups} groups of {per_group}; white lines = group boundaries)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(l["layer"]) for l in layers])
    ax.set_title(f"expert load: share of activations ({layers[0]['tokens']} tokens)")
    fig.colorbar(im, ax=ax, fraction=0.03)

    y = np.arange(len(layers))
    topk = bx.barh(y - 0.2, [l["imbalance_topk"] for l in layers], height=0.4, label="plain top-k", color="tab:red")
    moge = bx.barh(y + 0.2, [l["imbalance_moge"] for l in layers], height=0.4, label="MoGE", color="tab:blue")
    for bars in (topk, moge):  # MoGE's bars are often 0 wide: print the values
        bx.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    bx.set_yticks(y, [str(l["layer"]) for l in layers])
    bx.invert_yaxis()
    bx.set_xlabel(f"Imbalance Score over {report['routing']['devices']} devices")
    bx.set_title("IS per layer (lower is better)")
    bx.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
