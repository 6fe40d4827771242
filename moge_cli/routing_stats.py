"""Routing statistics: expert load, group load, entropy, and the MoGE paper's Imbalance Score.

Pure functions over router probabilities and picks (numpy), so they are tested on constructed cases.
Legend: T tokens, E experts, G groups, D devices, k picks per token.

    IS(X) = (max_i T_i(X) - min_i T_i(X)) / |X|

T_i = number of (token, expert) activations on device i; whole groups are placed on devices
(device i holds groups i*G/D .. (i+1)*G/D - 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def device_of_expert(num_experts: int, n_groups: int, devices: int) -> np.ndarray:
    """[E] device index of every expert when whole groups are spread evenly over `devices`."""
    if devices <= 0 or n_groups % devices:
        raise ValueError(f"{devices} devices cannot each hold whole groups of the {n_groups}; choose a divisor of {n_groups}")
    group = np.arange(num_experts) // (num_experts // n_groups)  # [E]
    return group // (n_groups // devices)


def imbalance_score(expert_counts: np.ndarray, device_of: np.ndarray, num_tokens: int) -> float:
    """(max_i T_i - min_i T_i) / num_tokens, T_i = activations of the experts on device i."""
    if num_tokens == 0:
        return 0.0
    per_device = np.bincount(device_of, weights=expert_counts, minlength=int(device_of.max()) + 1)  # [D]
    return float(per_device.max() - per_device.min()) / num_tokens


def global_topk(probs: np.ndarray, k: int) -> np.ndarray:
    """[T, k] plain top-k expert ids over all experts (ties to the lowest index): the counterfactual router."""
    order = np.argsort(-probs, axis=-1, kind="stable")  # stable: equal probs keep index order
    return order[:, :k]


def entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def layer_routing_stats(
    probs: np.ndarray, expert_ids: np.ndarray, *, n_groups: int, num_experts_per_tok: int, devices: int | None = None
) -> dict[str, Any]:
    """Statistics of one layer.

    probs: [T, E] router softmax (float32); expert_ids: [T, k] the model's own picks.
    devices: how many devices whole groups are placed on (default: one group per device).
    """
    num_tokens, num_experts = probs.shape
    devices = devices or n_groups
    device_of = device_of_expert(num_experts, n_groups, devices)
    counts = np.bincount(expert_ids.reshape(-1), minlength=num_experts)  # [E]
    topk_counts = np.bincount(global_topk(probs, num_experts_per_tok).reshape(-1), minlength=num_experts)  # [E]
    group_counts = counts.reshape(n_groups, -1).sum(axis=1)  # [G]
    is_moge = imbalance_score(counts, device_of, num_tokens)
    is_topk = imbalance_score(topk_counts, device_of, num_tokens)
    return {
        "tokens": int(num_tokens),
        "expert_counts": counts.tolist(),
        "group_counts": group_counts.tolist(),
        "topk_expert_counts": topk_counts.tolist(),
        "min": int(counts.min()) if num_experts else 0,
        "max": int(counts.max()) if num_experts else 0,
        "mean": float(counts.mean()) if num_experts else 0.0,
        "never_picked": np.flatnonzero(counts == 0).tolist(),
        "entropy_bits": entropy_bits(counts),
        "max_entropy_bits": math.log2(num_experts),
        "devices": devices,
        "imbalance_moge": is_moge,
        "imbalance_topk": is_topk,
        # how many times more imbalanced top-k is than MoGE; None when MoGE is perfectly balanced (IS = 0)
        "imbalance_ratio": (is_topk / is_moge) if is_moge > 0 else None,
    }
