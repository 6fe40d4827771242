"""Slow, obviously-right float64 twins of the kernels, for tests."""

# T tokens, E experts, G groups, K' picks per group, k = G*K', H hidden, I intermediate.

from __future__ import annotations

import math

import torch


def route_reference(
    logits: torch.Tensor,
    n_groups: int,
    picks_per_group: int,
    router_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of route: python loops over tokens and groups, float64 softmax, explicit tie rule."""
    T, E = logits.shape
    per_group = E // n_groups
    scale = router_scale.reshape(E).double().tolist()
    ids, weights = [], []
    for row in logits.double().tolist():
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        total = sum(exps)
        p = [v / total for v in exps]
        row_ids = []
        for g in range(n_groups):
            group = range(g * per_group, (g + 1) * per_group)
            # highest probability first; equal probabilities: lowest expert index first
            row_ids += sorted(group, key=lambda e: (-p[e], e))[:picks_per_group]
        ids.append(row_ids)
        weights.append([p[e] * scale[e] for e in row_ids])
    k = n_groups * picks_per_group
    return (
        torch.tensor(ids, dtype=torch.int64).reshape(T, k),
        torch.tensor(weights, dtype=torch.float64).reshape(T, k),
    )


def expert_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert in float64: x [H], w13 [2I, H] (gate rows first), w2 [H, I] -> [H]."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    I = w13.shape[0] // 2
    gate, up = w13[:I] @ x, w13[I:] @ x  # [I] each
    return w2 @ (gate * torch.sigmoid(gate) * up)


def dense_mlp_reference(x: torch.Tensor, w13, w2: torch.Tensor) -> torch.Tensor:
    """Twin of dense_mlp: one token at a time in float64, result in x's dtype."""
    if isinstance(w13, (tuple, list)):
        w13 = torch.cat([w13[0], w13[1]])
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        out[t] = expert_reference(x[t].cpu(), w13.cpu(), w2.cpu())
    return out.to(device=x.device, dtype=x.dtype)


def moe_reference(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Twin of moe_experts: loops over tokens and their picks in float64, result in x's dtype."""
    xc, ids, w = x.cpu(), expert_ids.cpu().tolist(), weights.cpu().double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            out[t] += w[t, j] * expert_reference(xc[t], gate_up[e].cpu(), down[e].cpu())
    return out.to(device=x.device, dtype=x.dtype)
