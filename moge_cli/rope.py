"""RoPE frequencies and cos / sin tables, with Hugging Face's rope_scaling types: linear, dynamic (NTK) and YaRN.

The one place the model's rotation tables are built: the torch path, the one-token C kernels and the
whole-step C plan (kernels/step.c) all read rows of `rope_tables`, so a scaling reaches every path.
Formulas follow transformers.modeling_rope_utils (written here from its definitions, in float64):
  linear   inv_freq / factor
  dynamic  theta' = theta * (factor * s / M - (factor - 1)) ** (D / (D - 2)) for s = max(seq_len, M),
           M = max_position_embeddings, where seq_len is the last position of the forward call + 1
  yarn     per frequency, a ramp between inv_freq (fast dims, extrapolated) and inv_freq / factor (slow dims,
           interpolated) over the dims that turn beta_fast..beta_slow times in the original context;
           cos and sin are multiplied by attention_factor (default 0.1 ln(factor) + 1)
Dynamic NTK depends on the length being run: a one-token step at position p rotates with seq_len p + 1 (row p of
the table), a forward call over positions a..b-1 past M rotates all of them with seq_len b (`call_rows`). Keys
already in the cache keep the rotation they were written with, as in transformers' cached generation.
Dimension letters: P positions, D head_dim.
"""

from __future__ import annotations

import math

import torch

from moge_cli.config import MoGEConfig, RopeScaling


def _exponents(head_dim: int) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim  # [D/2]: 2i / D


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(cfg: MoGEConfig) -> float:
    """The factor on cos and sin: YaRN's, 1 for every other type."""
    r = cfg.rope
    if r is None or r.rope_type != "yarn":
        return 1.0
    if r.attention_factor is not None:
        return r.attention_factor
    if r.mscale and r.mscale_all_dim:
        return yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    return yarn_mscale(r.factor)


def _yarn(inv: torch.Tensor, r: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    def dim_turning(turns: float) -> float:  # the (fractional) dim that turns `turns` times over the original context
        return head_dim * math.log(r.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(r.beta_fast), dim_turning(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # [D/2]: 0 fast .. 1 slow
    return inv / r.factor * ramp + inv * (1 - ramp)


def inv_freq(cfg: MoGEConfig, seq_len: int | None = None) -> torch.Tensor:
    """float64 [D/2] rotation speeds of each pair of dims; seq_len only matters to dynamic scaling."""
    D, theta, r = cfg.head_dim, cfg.rope_theta, cfg.rope
    if r is not None and r.rope_type == "dynamic":
        return _dynamic(cfg, torch.tensor([seq_len or 0], dtype=torch.float64))[0]
    inv = theta ** -_exponents(D)
    if r is None:
        return inv
    if r.rope_type == "linear":
        return inv / r.factor
    return _yarn(inv, r, D, theta)


def _dynamic(cfg: MoGEConfig, seq_lens: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK speeds [P, D/2] for each of seq_lens [P] (float64)."""
    D, M, factor = cfg.head_dim, cfg.max_position_embeddings, cfg.rope.factor
    s = seq_lens.clamp(min=M)
    base = cfg.rope_theta * (factor * s / M - (factor - 1)) ** (D / (D - 2))  # [P]
    return base[:, None] ** -_exponents(D)[None, :]


def _tables(angles: torch.Tensor, scale: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [P, D] float32 from angles [P, D/2] (float64)."""
    cos, sin = angles.cos() * scale, angles.sin() * scale
    return torch.cat([cos, cos], -1).float().to(device), torch.cat([-sin, sin], -1).float().to(device)


def rope_tables(cfg: MoGEConfig, positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [positions, D] float32 for neox RoPE (angles in float64: long positions stay exact).

    Row p is the rotation of a token at position p when it is the last one of its forward call: the
    one-token decode steps read it. The sin table's first half is negated so that
    rotate_half(x) * sin == roll(x, D/2) * signed_sin.
    """
    pos = torch.arange(positions, dtype=torch.float64)
    if cfg.rope is not None and cfg.rope.rope_type == "dynamic":
        angles = pos[:, None] * _dynamic(cfg, pos + 1)  # [P, D/2]: each row at its own length
    else:
        angles = pos[:, None] * inv_freq(cfg)[None, :]
    return _tables(angles, attention_factor(cfg), device)


def call_rows(cfg: MoGEConfig, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and signed sin [end - start, D] of a forward call over positions start..end-1 whose rows differ from
    rope_tables' (dynamic scaling past max_position_embeddings: every row at seq_len end), else None."""
    r = cfg.rope
    if r is None or r.rope_type != "dynamic" or end - start < 2 or end <= cfg.max_position_embeddings:
        return None
    pos = torch.arange(start, end, dtype=torch.float64)
    return _tables(pos[:, None] * inv_freq(cfg, end)[None, :], 1.0, device)


__all__ = ["rope_tables", "call_rows", "inv_freq", "attention_factor"]
