"""Slow, obviously-right float64 forward pass written straight from the fact sheet, for tests."""

# T tokens, V vocab, H hidden, D head_dim, nH heads, nKV kv heads, E experts, G groups, K' picks per group.

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from moge_cli.config import MoGEConfig
from moge_cli.names import PER_EXPERT_RE


class _Weights:
    """name -> float64 tensor from a Checkpoint or a plain state dict, per-expert names
    served from stacked tensors when the source is stacked."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __call__(self, name: str) -> torch.Tensor:
        if self._has(name):
            return self._get(name)
        m = PER_EXPERT_RE.match(name)  # a per-expert name, served from the stacked layout
        if m is None:
            raise KeyError(name)
        prefix, e, proj = f"model.layers.{m.group(1)}.mlp.experts", int(m.group(2)), m.group(3)
        if proj == "down_proj":
            return self._get(f"{prefix}.down_proj")[e]
        gate_up = self._get(f"{prefix}.gate_up_proj")[e]  # [2I, H]
        half = gate_up.shape[0] // 2
        return gate_up[:half] if proj == "gate_proj" else gate_up[half:]

    def _has(self, name: str) -> bool:
        return name in (self.source.tensors if hasattr(self.source, "tensors") else self.source)

    def _get(self, name: str) -> torch.Tensor:
        t = self.source.tensor(name) if hasattr(self.source, "tensors") else self.source[name]
        return t.double()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(vec: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """neox RoPE of one head vector [D]: rotate the pairs (i, i + D/2) by pos * theta^(-2i/D)."""
    half = vec.shape[0] // 2
    angle = pos * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / vec.shape[0])
    x1, x2 = vec[:half], vec[half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()])


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    g = gate @ x
    return down @ (g * torch.sigmoid(g) * (up @ x))


def attention(x: torch.Tensor, W: _Weights, p: str, cfg: MoGEConfig) -> torch.Tensor:
    """Causal GQA over x [T, H]: one query position and one head at a time."""
    T, D, nH, nKV = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    proj = {n: x @ W(f"{p}self_attn.{n}_proj.weight").T + W(f"{p}self_attn.{n}_proj.bias") for n in "qkv"}
    out = torch.zeros(T, nH * D, dtype=torch.float64)
    for h in range(nH):
        kv = h // (nH // nKV)  # the kv head this query head shares
        keys = [rope(proj["k"][s, kv * D : (kv + 1) * D], s, cfg.rope_theta) for s in range(T)]
        for t in range(T):
            q = rope(proj["q"][t, h * D : (h + 1) * D], t, cfg.rope_theta)
            scores = torch.stack([q @ keys[s] / math.sqrt(D) for s in range(t + 1)])
            probs = torch.softmax(scores, dim=0)
            out[t, h * D : (h + 1) * D] = sum(probs[s] * proj["v"][s, kv * D : (kv + 1) * D] for s in range(t + 1))
    return out @ W(f"{p}self_attn.o_proj.weight").T + W(f"{p}self_attn.o_proj.bias")


def moe(x: torch.Tensor, W: _Weights, p: str, cfg: MoGEConfig) -> torch.Tensor:
    """One token x [H]: softmax over all E, top K' per group (ties: lowest index), weights p*scale, + shared."""
    probs = torch.softmax(W(f"{p}mlp.gate.weight") @ x, dim=0)  # [E]
    scale = W(f"{p}mlp.router_scale").reshape(-1)  # [E]
    per_group = cfg.experts_per_group
    y = torch.zeros_like(x)
    for g in range(cfg.n_groups):
        group = range(g * per_group, (g + 1) * per_group)
        for e in sorted(group, key=lambda e: (-probs[e].item(), e))[: cfg.picks_per_group]:
            ex = f"{p}mlp.experts.{e}."
            expert = swiglu(x, W(ex + "gate_proj.weight"), W(ex + "up_proj.weight"), W(ex + "down_proj.weight"))
            y += probs[e] * scale[e] * expert
    sh = f"{p}mlp.shared_expert."
    return y + swiglu(x, W(sh + "gate_proj.weight"), W(sh + "up_proj.weight"), W(sh + "down_proj.weight"))


def dense(x: torch.Tensor, W: _Weights, p: str) -> torch.Tensor:
    return swiglu(x, W(f"{p}mlp.gate_proj.weight"), W(f"{p}mlp.up_proj.weight"), W(f"{p}mlp.down_proj.weight"))


def reference_logits(ckpt_or_state: Any, cfg: MoGEConfig | None, ids: Any) -> torch.Tensor:
    """float64 logits [T, V] of one sequence of token ids, from a Checkpoint or a {name: tensor} dict."""
    cfg = cfg if cfg is not None else ckpt_or_state.config
    W = _Weights(ckpt_or_state)
    ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
    eps = cfg.rms_norm_eps
    x = W("model.embed_tokens.weight")[ids]  # [T, H]
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        h = x + attention(rms_norm(x, W(p + "input_layernorm.weight"), eps), W, p, cfg)
        n = rms_norm(h, W(p + "post_attention_layernorm.weight"), eps)
        if L in cfg.mlp_only_layers:
            x = h + torch.stack([dense(n[t], W, p) for t in range(len(ids))])
        else:
            x = h + torch.stack([moe(n[t], W, p, cfg) for t in range(len(ids))])
    return rms_norm(x, W("model.norm.weight"), eps) @ W("lm_head.weight").T  # [T, V]


__all__ = ["reference_logits"]
