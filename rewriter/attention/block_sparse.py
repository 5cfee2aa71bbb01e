"""Block-sparse attention: the one reference that every sparse method lowers to.

Layout (shared with the Triton kernel in ``rewriter.attention.triton``):
    block     int: query blocks and key blocks are `block` tokens (the last one may be short)
    kv_index  (B', H', nQB, K) int32: for each query block the key blocks it visits, ascending;
              slots past kv_count are ignored. B' is B or 1 and H' is H or 1 (broadcast).
    kv_count  (B', H', nQB) int32: how many slots of kv_index are used.
Inside a visited block a token-level predicate still applies:
    key_mask[b, j] (padding), causal (k_pos <= q_pos), window_left / window_right (-1 = unlimited:
    q_pos - window_left <= k_pos <= q_pos + window_right), except that keys with k_pos < sinks always pass
    the window test (never the causal or padding test).
q_pos / k_pos (B, H, Lq) / (B, H, Lk) int64 give each token's original position when the sequence was
permuted (LSH sorts tokens by bucket); by default q_pos = arange(Lq) + (Lk - Lq) and k_pos = arange(Lk).

The reference gathers only the visited key blocks: memory and FLOPs scale with the density, never L x L.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._contract import check_qkv


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


def _pad_to(x: Tensor, dim: int, size: int, value=0) -> Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = extra
    return torch.cat([x, x.new_full(pad_shape, value)], dim=dim)


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, kv_count: Tensor, block: int,
    key_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
    window_left: int = -1, window_right: int = -1, sinks: int = 0,
    q_pos: Tensor | None = None, k_pos: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) float32; -inf where a row saw no key)."""
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv = v.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = num_blocks(Lq, block), num_blocks(Lk, block)
    K = kv_index.shape[-1]
    group = H // Hkv
    dev = q.device

    kv_index = kv_index.to(torch.long).expand(B, H, nqb, K)
    slot_used = torch.arange(K, device=dev) < kv_count.to(torch.long).expand(B, H, nqb)[..., None]
    kv_index = torch.where(slot_used, kv_index, torch.zeros_like(kv_index))

    # Key side, padded to whole blocks and viewed per block: (B, Hkv, nkb, block, *)
    kb = _pad_to(k.to(acc), 2, nkb * block).view(B, Hkv, nkb, block, D)
    vb = _pad_to(v.to(acc), 2, nkb * block).view(B, Hkv, nkb, block, Dv)
    if k_pos is None:
        k_pos = torch.arange(Lk, device=dev).expand(B, H, Lk)
    if q_pos is None:
        q_pos = (torch.arange(Lq, device=dev) + (Lk - Lq)).expand(B, H, Lq)
    kvalid = torch.ones(B, Lk, dtype=torch.bool, device=dev) if key_mask is None else key_mask.to(torch.bool)
    kvalid = _pad_to(kvalid, 1, nkb * block, False).view(B, 1, nkb, block).expand(B, H, nkb, block)
    kposb = _pad_to(k_pos.expand(B, H, Lk), 2, nkb * block).view(B, H, nkb, block)

    # Gather visited blocks for each query block: (B, H, nqb, K*block, *)
    head_kv = torch.arange(H, device=dev) // group
    bi = torch.arange(B, device=dev)[:, None, None, None]
    hi = torch.arange(H, device=dev)[None, :, None, None]
    kg = kb[bi, head_kv[None, :, None, None], kv_index].reshape(B, H, nqb, K * block, D)
    vg = vb[bi, head_kv[None, :, None, None], kv_index].reshape(B, H, nqb, K * block, Dv)
    ok = (kvalid[bi, hi, kv_index] & slot_used[..., None]).reshape(B, H, nqb, K * block)
    kp = kposb[bi, hi, kv_index].reshape(B, H, nqb, K * block)

    qb = _pad_to(q.to(acc), 2, nqb * block).view(B, H, nqb, block, D)
    qp = _pad_to(q_pos.expand(B, H, Lq), 2, nqb * block).view(B, H, nqb, block)

    s = torch.matmul(qb, kg.transpose(-1, -2)) * scale            # (B, H, nqb, block, K*block)
    allowed = ok[..., None, :].expand(B, H, nqb, block, K * block)
    qpe, kpe = qp[..., :, None], kp[..., None, :]
    if causal:
        allowed = allowed & (kpe <= qpe)
    in_window = torch.ones_like(allowed)
    if window_left >= 0:
        in_window = in_window & (kpe >= qpe - window_left)
    if window_right >= 0:
        in_window = in_window & (kpe <= qpe + window_right)
    if sinks > 0:
        in_window = in_window | (kpe < sinks)
    allowed = allowed & in_window

    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vg) / den.clamp_min(torch.finfo(acc).tiny)
    lse = (m + torch.log(den)).squeeze(-1)                           # -inf where den == 0
    out = out.reshape(B, H, nqb * block, Dv)[:, :, :Lq]
    lse = lse.reshape(B, H, nqb * block)[:, :, :Lq]
    return out.to(q.dtype), lse.to(torch.float32)
