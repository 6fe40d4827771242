"""MoGE router: softmax over all experts, then top-K' inside every contiguous expert group."""

# T tokens, E experts, G groups, K' picks per group, k = G*K'.

from __future__ import annotations

import torch

from moge_kernels import native


def route(
    logits: torch.Tensor,
    n_groups: int,
    picks_per_group: int,
    router_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick K' experts in each of G groups per token.

    logits [T, E] (any float dtype), router_scale [E] or [1, E].
    Returns expert_ids [T, k] int64 and weights [T, k] float32, with k = G*K'.
    Columns are group-major; inside a group by descending probability, ties to the
    lowest expert index. weight = softmax(logits)[e] * router_scale[e], not renormalised.
    """
    T, E = _check(logits, n_groups, picks_per_group, router_scale)
    if T == 1 and (one := native.route_vec(logits, n_groups, picks_per_group, router_scale)) is not None:  # kernels/cpu.c
        return one
    per_group = E // n_groups
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    # A stable descending sort keeps equal probabilities in index order, so ties go to
    # the lowest expert index on every device; torch.topk gives no such guarantee.
    _, order = torch.sort(probs.view(T, n_groups, per_group), dim=-1, descending=True, stable=True)
    offsets = torch.arange(0, E, per_group, device=logits.device).view(1, n_groups, 1)
    expert_ids = (order[..., :picks_per_group] + offsets).reshape(T, n_groups * picks_per_group)  # [T, k]
    scale = router_scale.reshape(E).to(device=probs.device, dtype=torch.float32)
    weights = probs.gather(1, expert_ids) * scale[expert_ids]  # [T, k]
    return expert_ids, weights


def _check(logits: torch.Tensor, n_groups: int, picks_per_group: int, router_scale: torch.Tensor) -> tuple[int, int]:
    if not logits.is_floating_point():
        raise TypeError(f"route: logits must be a float tensor [T, E], got {tuple(logits.shape)} {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be a float tensor [T, E], got {tuple(logits.shape)} {logits.dtype}")
    T, E = logits.shape
    if n_groups <= 0 or E % n_groups:
        raise ValueError(f"route: n_groups ({n_groups}) must be a positive divisor of the expert count ({E})")
    if not 0 < picks_per_group <= E // n_groups:
        raise ValueError(
            f"route: picks_per_group ({picks_per_group}) must be in 1..{E // n_groups} (experts per group)"
        )
    if router_scale.numel() != E or router_scale.dim() > 2:
        raise ValueError(f"route: router_scale must hold E = {E} values ([E] or [1, E]), got {tuple(router_scale.shape)}")
    return T, E
