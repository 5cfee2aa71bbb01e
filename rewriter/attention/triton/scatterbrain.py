"""Scatterbrain forward (sparse + low rank), the CUDA form of ``feature_map.sparse_plus_lowrank_attention``.

The weight is exp(scale q.k) on the support S (window band + sinks, causal, padding) and phi(q).phi(k) elsewhere.
Two kernels and no correction term: the chunked linear kernel sums phi(q).phi(k) [v, 1] over the allowed keys off
S only (``chunked_linear_attention(outside=(left, right, sinks))``: a lagged causal prefix, and for bidirectional
attention the suffix past the band), and the band kernel (``window_attention.py``) walks S as the window op does
and adds those low-rank sums in its epilogue, scaled by exp(r_i) (r_i = log_phi_q_i + log_phi_k, the features' log
offsets) against its own running max. So Scatterbrain costs the window op plus one linear-attention pass.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._contract import check_qkv, window_extents
from .linear_attention import chunked_linear_attention
from .window_attention import band_attention


def scatterbrain_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float,
    phi_q: Tensor, phi_k: Tensor, window: int, sinks: int = 0,
    log_phi_q: Tensor | None = None, log_phi_k: Tensor | None = None, block: int = 64,
    support_max_offset: Tensor | None = None,
) -> Tensor:
    """Same contract as ``sparse_plus_lowrank_attention`` (window >= 1); (B, H, Lq, Dv) in q's dtype. Also the
    linear hybrids' kernel: fixed maps (no log offsets) and learned maps (support_max_offset, the per-head gain).
    `block` (the ops' layout block) is validated but does not change the result; the band kernel picks its tiles."""
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0 tokens; got window={window}, sinks={sinks}")
    if block < 16 or block > 128 or block & (block - 1):
        raise ValueError(f"block must be a power of two in 16..128; got {block}")
    if causal and Lk < Lq:
        raise ValueError(f"causal attention needs Lk >= Lq (bottom-right aligned); got Lq={Lq}, Lk={Lk}")
    left, right = window_extents(window, causal)
    num_lr, den_lr = chunked_linear_attention(phi_q.to(q.dtype), phi_k.to(q.dtype), v, causal, key_mask,
                                              outside=(left, right, sinks))
    if support_max_offset is not None:
        if log_phi_q is not None or log_phi_k is not None:
            raise ValueError("support_max_offset replaces the log offsets; pass one or the other")
        rlog = support_max_offset.float().reshape(H)
    else:
        rlog = torch.zeros(B, H, Lq, dtype=torch.float32, device=q.device)
    if log_phi_q is not None:
        rlog = rlog + log_phi_q.float()
    if log_phi_k is not None:
        rlog = rlog + log_phi_k.float().repeat_interleave(H // Hkv, dim=1)[:, :, None]
    out, _ = band_attention(q, k, v, key_mask, causal, scale, left, right, sinks, lowrank=(num_lr, den_lr, rlog))
    return out
