"""Pure compute kernels: MoGE routing, routed-expert and dense MLP compute, slow references."""

# T tokens, E experts, G groups, K' picks per group, k = G*K', H hidden, I intermediate.

from kernels.experts import DECODE_MAX_PAIRS, dense_mlp, moe_decode, moe_experts, moe_prefill
from kernels.reference import dense_mlp_reference, expert_reference, moe_reference, route_reference
from kernels.routing import route

__all__ = [
    "DECODE_MAX_PAIRS",
    "route",
    "moe_experts",
    "moe_decode",
    "moe_prefill",
    "dense_mlp",
    "route_reference",
    "moe_reference",
    "dense_mlp_reference",
    "expert_reference",
]
