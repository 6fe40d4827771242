"""Slow, obviously-right float64 forward pass written straight from the fact sheet, for tests."""

# T tokens, V vocab, H hidden, D head_dim, nH heads, nKV kv heads, E experts, G groups, K' picks per group.

from __future__ import annotations

import math
from typing import Any

import torch

from moge_cli.config import MoGEConfig
from moge_cli.names import PER_EXPERT_RE, expert_name, stacked_name, tensor_name


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
        layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        if proj == "down_proj":
            return self._get(stacked_name(layer, "down_proj"))[e]
        gate_up = self._get(stacked_name(layer, "gate_up_proj"))[e]  # [2I, H]
        half = gate_up.shape[0] // 2
        return gate_up[:half] if proj == "gate_proj" else gate_up[half:]

    def _has(self, name: str) -> bool:
        return name in (self.source.tensors if hasattr(self.source, "tensors") else self.source)

    def _get(self, name: str) -> torch.Tensor:
        t = self.source.tensor(name) if hasattr(self.source, "tensors") else self.source[name]
        return t.double()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_speeds(cfg: MoGEConfig, seq_len: int) -> tuple[list[float], float]:
    """(rotation speed of each pair i of dims, factor on cos and sin), one dim at a time from the formulas
    of Hugging Face's RoPE types; seq_len: the length of the forward call (dynamic NTK reads it)."""
    D, theta, r = cfg.head_dim, cfg.rope_theta, cfg.rope
    plain = [theta ** (-2 * i / D) for i in range(D // 2)]
    if r is None:
        return plain, 1.0
    if r.rope_type == "linear":  # positions divided by factor
        return [w / r.factor for w in plain], 1.0
    if r.rope_type == "dynamic":  # NTK: a larger base once the sequence outgrows max_position_embeddings
        M = cfg.max_position_embeddings
        base = theta * (r.factor * max(seq_len, M) / M - (r.factor - 1)) ** (D / (D - 2))
        return [base ** (-2 * i / D) for i in range(D // 2)], 1.0
    # yarn: dims turning more than beta_fast times over the original context keep their speed, those turning
    # fewer than beta_slow times are slowed by factor, a straight ramp between
    def dim_of(turns: float) -> float:
        return D * math.log(r.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(r.beta_fast), dim_of(r.beta_slow)
    if r.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, D - 1)
    hi = hi + 0.001 if lo == hi else hi
    speeds = []
    for i, w in enumerate(plain):
        t = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        speeds.append((1 - t) * w + t * w / r.factor)

    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    if r.attention_factor is not None:
        mscale = r.attention_factor
    elif r.mscale and r.mscale_all_dim:
        mscale = m(r.factor, r.mscale) / m(r.factor, r.mscale_all_dim)
    else:
        mscale = m(r.factor)
    return speeds, mscale


def rope(vec: torch.Tensor, pos: int, speeds: list[float], mscale: float = 1.0) -> torch.Tensor:
    """neox RoPE of one head vector [D]: rotate the pairs (i, i + D/2) by pos * speeds[i], scaled by mscale."""
    half = vec.shape[0] // 2
    angle = pos * torch.tensor(speeds, dtype=torch.float64)
    cos, sin = angle.cos() * mscale, angle.sin() * mscale
    x1, x2 = vec[:half], vec[half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin])


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    g = gate @ x
    return down @ (g * torch.sigmoid(g) * (up @ x))


def attention(x: torch.Tensor, W: _Weights, L: int, cfg: MoGEConfig, seq_lens: list[int]) -> torch.Tensor:
    """Causal GQA over x [T, H]: one query position and one head at a time; position s is rotated at
    length seq_lens[s] (the end of the forward call that ran it)."""
    T, D, nH, nKV = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    speeds = [rope_speeds(cfg, seq_lens[s]) for s in range(T)]
    proj = {n: x @ W(tensor_name(f"{n}_proj", L)).T + W(tensor_name(f"{n}_bias", L)) for n in "qkv"}
    out = torch.zeros(T, nH * D, dtype=torch.float64)
    for h in range(nH):
        kv = h // (nH // nKV)  # the kv head this query head shares
        keys = [rope(proj["k"][s, kv * D : (kv + 1) * D], s, *speeds[s]) for s in range(T)]
        for t in range(T):
            q = rope(proj["q"][t, h * D : (h + 1) * D], t, *speeds[t])
            scores = torch.stack([q @ keys[s] / math.sqrt(D) for s in range(t + 1)])
            probs = torch.softmax(scores, dim=0)
            out[t, h * D : (h + 1) * D] = sum(probs[s] * proj["v"][s, kv * D : (kv + 1) * D] for s in range(t + 1))
    return out @ W(tensor_name("o_proj", L)).T + W(tensor_name("o_bias", L))


def moe(x: torch.Tensor, W: _Weights, L: int, cfg: MoGEConfig) -> torch.Tensor:
    """One token x [H]: softmax over all E, top K' per group (ties: lowest index), weights p*scale, + shared."""
    probs = torch.softmax(W(tensor_name("router_gate", L)) @ x, dim=0)  # [E]
    scale = W(tensor_name("router_scale", L)).reshape(-1)  # [E]
    per_group = cfg.experts_per_group
    y = torch.zeros_like(x)
    for g in range(cfg.n_groups):
        group = range(g * per_group, (g + 1) * per_group)
        for e in sorted(group, key=lambda e: (-probs[e].item(), e))[: cfg.picks_per_group]:
            expert = swiglu(x, *(W(expert_name(L, e, proj)) for proj in ("gate_proj", "up_proj", "down_proj")))
            y += probs[e] * scale[e] * expert
    if cfg.shared_expert_intermediate_size == 0:  # no shared expert
        return y
    return y + swiglu(x, W(tensor_name("shared_gate", L)), W(tensor_name("shared_up", L)), W(tensor_name("shared_down", L)))


def dense(x: torch.Tensor, W: _Weights, L: int) -> torch.Tensor:
    return swiglu(x, W(tensor_name("dense_gate", L)), W(tensor_name("dense_up", L)), W(tensor_name("dense_down", L)))


def reference_logits(ckpt_or_state: Any, cfg: MoGEConfig | None, ids: Any, calls: list[int] | None = None) -> torch.Tensor:
    """float64 logits [T, V] of one sequence of token ids, from a Checkpoint or a {name: tensor} dict.

    calls: the sizes of the forward calls the tokens are fed in through a KV cache (default: one call of all
    T; [1] * T: one token at a time). They change the logits only under dynamic NTK scaling, where a call
    ending at position e rotates its tokens at length e."""
    cfg = cfg if cfg is not None else ckpt_or_state.config
    W = _Weights(ckpt_or_state)
    ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
    calls = calls or [len(ids)]
    if sum(calls) != len(ids) or min(calls) < 1:
        raise ValueError(f"calls {calls} do not split {len(ids)} tokens")
    ends = torch.tensor(calls).cumsum(0).tolist()
    seq_lens = [end for end, n in zip(ends, calls) for _ in range(n)]  # [T]: each position's call end
    eps = cfg.rms_norm_eps
    x = W(tensor_name("embed"))[ids]  # [T, H]
    for L in range(cfg.num_hidden_layers):
        h = x + attention(rms_norm(x, W(tensor_name("input_norm", L)), eps), W, L, cfg, seq_lens)
        n = rms_norm(h, W(tensor_name("post_attention_norm", L)), eps)
        if cfg.num_experts == 0 or L in cfg.mlp_only_layers:
            x = h + torch.stack([dense(n[t], W, L) for t in range(len(ids))])
        else:
            x = h + torch.stack([moe(n[t], W, L, cfg) for t in range(len(ids))])
    head = W(tensor_name("embed" if cfg.tie_word_embeddings else "lm_head"))  # tied: the embedding
    return rms_norm(x, W(tensor_name("norm")), eps) @ head.T  # [T, V]


__all__ = ["reference_logits"]
