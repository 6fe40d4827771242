"""Causal GQA attention with neox RoPE over a preallocated KV cache, in float32."""

# B batch, T new tokens, S cache positions, D head_dim, nH heads, nKV kv heads.

from __future__ import annotations

import torch
import torch.nn.functional as F

from moge_kernels import native


def attention(
    qkv: torch.Tensor,
    n_heads: int,
    n_kv: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    start: int | torch.Tensor = 0,
) -> torch.Tensor:
    """o [B, T, nH*D] in qkv's dtype for qkv [B, T, nH + 2 nKV, D] (rows q, k, v) at positions start..start+T-1.

    cos, sin [T, 1, D] float32 (signed sin: rope tables' rows); k_cache, v_cache [B, nKV, S, D] (one layer's)
    receive this call's k and v at start.., or None (then k and v are rounded to qkv's dtype as the cache would).
    One token with a cache runs kernels/cpu.c (rotation, cache write and attention), else torch in float32.
    start may be a [1] int64 tensor on qkv's device (one token, with a cache; cos and sin then are the whole
    tables [P, D]): nothing reads it on the host, so the step can be captured once and replayed (cuda_graph.py).
    """
    if isinstance(start, torch.Tensor):
        return _attention_at(qkv, n_heads, n_kv, cos, sin, k_cache, v_cache, start)
    B, T, _, D = qkv.shape
    nH, nKV = n_heads, n_kv
    if k_cache is not None and B * T == 1 and (o := native.attend_vec(qkv, cos[0, 0], sin[0, 0], k_cache, v_cache, start, nH)) is not None:
        return o.view(B, T, nH * D)
    qk = apply_rope(qkv[:, :, : nH + nKV].float(), cos, sin)  # [B, T, nH+nKV, D], q and k heads at once
    q, k, v = qk[:, :, :nH].transpose(1, 2), qk[:, :, nH:].transpose(1, 2), qkv[:, :, nH + nKV :].transpose(1, 2)
    if k_cache is None:  # q [B, nH, T, D], k and v [B, nKV, T, D]; round k and v like the cache would
        k, v = k.to(qkv.dtype).float(), v.float()
    else:
        k_cache.narrow(2, start, T).copy_(k)
        v_cache.narrow(2, start, T).copy_(v)
        k, v = k_cache.narrow(2, 0, start + T).float(), v_cache.narrow(2, 0, start + T).float()  # [B, nKV, S, D]
    o = _attend(q, k, v, start)  # [B, nH, T, D] float32
    return o.transpose(1, 2).reshape(B, T, nH * D).to(qkv.dtype)


def _attention_at(qkv, n_heads: int, n_kv: int, cos_table, sin_table, k_cache, v_cache, pos: torch.Tensor) -> torch.Tensor:
    """attention for one token at position pos ([1] int64 on the device): its RoPE rows picked, its k and v
    written and every cache position masked by pos on the device. The whole cache [S] is read each step (the
    op-by-op path reads 0..pos): a captured step cannot change shape with the position."""
    B, T, _, D = qkv.shape  # B = T = 1
    nH, nKV = n_heads, n_kv
    cos, sin = cos_table.index_select(0, pos)[:, None], sin_table.index_select(0, pos)[:, None]  # [1, 1, D]
    qk = apply_rope(qkv[:, :, : nH + nKV].float(), cos, sin)  # [1, 1, nH+nKV, D]
    q, k, v = qk[:, :, :nH].transpose(1, 2), qk[:, :, nH:].transpose(1, 2), qkv[:, :, nH + nKV :].transpose(1, 2)
    k_cache.index_copy_(2, pos, k.to(k_cache.dtype))  # [B, nKV, S, D] at position pos
    v_cache.index_copy_(2, pos, v)
    S = k_cache.shape[2]
    seen = (torch.arange(S, device=pos.device) <= pos)[None]  # [1, S]: keys 0..pos
    q = q.reshape(B, nKV, nH // nKV, D)  # the query heads of a kv head as its query rows
    o = F.scaled_dot_product_attention(q, k_cache.float(), v_cache.float(), attn_mask=seen)  # [B, nKV, nH/nKV, D]
    return o.reshape(B, T, nH * D).to(qkv.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, n, D] float32, tables [T, 1, D]: x*cos + rotate_half(x)*sin, rotating halves (neox), not pairs."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal GQA attention of queries at positions start.. over keys 0..S-1, all float32."""
    B, nH, T, D = q.shape
    nKV, S = k.shape[1], k.shape[2]
    if T == 1:  # one query sees every key: fold the query heads of a kv head into its query rows
        # reshape, not view: CUDA's SDPA may return a non-contiguous tensor here (issue 16)
        return F.scaled_dot_product_attention(q.reshape(B, nKV, nH // nKV, D), k, v).reshape(B, nH, 1, D)
    if nKV != nH:  # GQA: each kv head serves nH/nKV query heads
        k, v = k.repeat_interleave(nH // nKV, dim=1), v.repeat_interleave(nH // nKV, dim=1)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # is_causal aligns the mask top-left; queries that continue a cache need it bottom-right.
    mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(start, start + T, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask [T, S]
