"""Exact attention with a key-padding mask instead of a dense (B, 1, Lq, Lk) one.

    rewriter::exact_attention(q, k, v, key_mask?, causal, scale) -> (B, H, Lq, Dv)

Captured HF programs attend through SDPA with the mask HF materialised from `attention_mask` (padding & causal):
a (B, 1, L, L) bool that SDPA cannot hand to its flash / cuDNN kernels (and that costs L^2 bytes to build).
The op keeps attention exact and takes the (B, Lk) key mask: when every key is real (an unpadded batch) it calls
SDPA with is_causal (the flash path, on CUDA and on the CPU), otherwise SDPA with the mask built from the key
mask. Conventions of ``_common.py``: queries sit at key positions Lk - Lq .., GQA by kv-head groups, rows with
no real key give 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._contract import AttentionCost, allowed_mask, check_qkv, drop_full_mask, exact_attention_cost, expand_kv


@torch.library.custom_op("rewriter::exact_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale) -> Tensor"))
def exact_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
                    scale: float) -> Tensor:
    """Exact softmax attention over the real keys (and, if causal, the earlier positions)."""
    return exact_attention_impl(q, k, v, key_mask, causal, scale)


def exact_attention_impl(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
                         scale: float) -> Tensor:
    """The op's body on every device (SDPA picks flash / cuDNN on CUDA). The all-real check is the contract's (the kernels use it too),
    remembered per mask tensor, so a forward through many layers checks its shared mask once."""
    check_qkv(q, k, v, key_mask)
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    key_mask = drop_full_mask(key_mask)
    k, v = expand_kv(k, H), expand_kv(v, H)
    if key_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Lq > 0, scale=scale)
    allowed = allowed_mask(Lq, Lk, causal, key_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))   # no real key: 0, not NaN


@exact_attention.register_fake
def _exact_attention_fake(q, k, v, key_mask, causal, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def exact_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool,
               elem_bytes: int = 4) -> AttentionCost:
    """Exact attention's cost (the dense score entries; causal halves them)."""
    return exact_attention_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes)
