"""Exact attention with a key-padding mask instead of a dense (B, 1, Lq, Lk) one.

    rewriter::exact_attention(q, k, v, key_mask?, causal, scale, window=0, alibi=None, softcap=0.0) -> (B, H, Lq, Dv)

HF models attend through SDPA with the mask HF materialised from `attention_mask` (padding & causal): a
(B, 1, L, L) bool that SDPA cannot hand to its flash / cuDNN kernels (and that costs L^2 bytes to build). Capture
turns every such site into this op (rewriter.capture), the canonical attention node every pass reads. It keeps
attention exact and takes the (B, Lk) key mask: when every key is real (an unpadded batch) it calls
SDPA with is_causal (the flash path, on CUDA and on the CPU), otherwise SDPA with the mask built from the key
mask. Conventions of ``_contract.py``: queries sit at key positions Lk - Lq .., GQA by kv-head groups, rows with
no real key give 0. `softcap` (last, so programs written before it load with its default) keeps a model's logit
softcapping, cap * tanh(scale q.k / cap) before the bias and the mask (Gemma2); SDPA cannot, so those sites take
the dense form here and the block-sparse Triton kernel on CUDA (rewriter.attention.triton.registry).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _onnx as ox
from ._contract import (AttentionConfig, AttentionCost, AttentionMethod, alibi_bias, allowed_mask, check_qkv,
                        check_softcap, drop_full_mask, empty_output, exact_attention_cost, expand_kv, masked_softmax_attention,
                        register_method)


@torch.library.custom_op("rewriter::exact_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, int window=0, "
    "float[]? alibi=None, float softcap=0.0) -> Tensor"))
def exact_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
                    scale: float, window: int = 0, alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """Exact softmax attention over the real keys (and, if causal, the earlier positions), keeping the model's own
    sliding window (`window` > 0: keys with i - j < window), ALiBi bias (`alibi`: per-head slopes, score units) and
    logit softcap (`softcap` > 0: scores cap * tanh(scores / cap) before the bias and mask)."""
    return exact_attention_impl(q, k, v, key_mask, causal, scale, window, alibi, softcap).contiguous()


def exact_attention_impl(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
                         scale: float, window: int = 0, alibi: Optional[list[float]] = None,
                         softcap: float = 0.0) -> Tensor:
    """The op's body on every device (SDPA picks flash / cuDNN on CUDA). The all-real check is the contract's (the
    kernels use it too), remembered per mask tensor, so a forward through many layers checks its shared mask once.
    A window or ALiBi bias goes into SDPA as an additive float mask (no flash path for those sites); a softcap, which
    SDPA cannot apply, takes the dense softmax in fp32 (float64 stays float64)."""
    check_qkv(q, k, v, key_mask)
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    check_softcap(softcap)
    if alibi and len(alibi) != H:
        raise ValueError(f"alibi has {len(alibi)} slopes for {H} query heads")
    key_mask = drop_full_mask(key_mask)
    if softcap > 0:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        allowed = allowed_mask(Lq, Lk, causal, key_mask, q.device, window=max(window, 0))
        bias = alibi_bias(alibi, Lq, Lk, q.device, acc) if alibi else None
        return masked_softmax_attention(q.to(acc), k.to(acc), v.to(acc), allowed, scale, bias,
                                        softcap).to(q.dtype)
    # SDPA reads kv-head groups itself (enable_gqa): its flash path (CPU and CUDA) is then ~2x faster on the CPU than
    # on repeated heads; CUDA's masked (memory-efficient) kernels do not take enable_gqa, so masks get repeated heads
    gqa = k.shape[1] != H
    plain = window <= 0 and not alibi
    if plain and key_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Lq > 0, scale=scale, enable_gqa=gqa)
    if gqa and q.is_cuda:
        k, v, gqa = expand_kv(k, H), expand_kv(v, H), False
    return masked_sdpa(q, k, v, key_mask, causal, scale, window, alibi, enable_gqa=gqa)


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                window: int = 0, alibi: Optional[list[float]] = None, enable_gqa: bool = False) -> Tensor:
    """SDPA on the allowed-mask (key padding, causal, window) with the ALiBi bias as an additive float mask; a query
    row with no real key gives 0, not NaN. Also the traceable body of AOTInductor packages (rewriter.compile)."""
    Lq, Lk = q.shape[2], k.shape[2]
    allowed = allowed_mask(Lq, Lk, causal, key_mask, q.device, window=max(window, 0))
    if alibi:
        bias = alibi_bias(alibi, Lq, Lk, q.device, torch.float32)
        attn_mask = torch.where(allowed, bias, torch.full((), float("-inf"), device=q.device)).to(q.dtype)
    else:
        attn_mask = allowed
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


@exact_attention.register_fake
def _exact_attention_fake(q, k, v, key_mask, causal, scale, window=0, alibi=None, softcap=0.0):
    check_softcap(softcap)
    return empty_output(q, v)


def _keep_semantics(site, kwargs: dict) -> tuple[dict | None, str]:
    """Exact attention keeps a causal sliding window, an ALiBi bias and a logit softcap
    (AttentionSite.exact_arguments); anything else is refused."""
    args, why = site.exact_arguments()
    if args is None:
        return None, why
    window, alibi, softcap = args
    return {**kwargs, "window": window, "alibi": alibi, "softcap": softcap}, f"keeps the model's {site.semantics()}"


def exact_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool,
               elem_bytes: int = 4, window: int = 0, alibi=None, softcap: float = 0.0) -> AttentionCost:
    """Exact attention's cost (the dense score entries; causal halves them). The model's own window is the model's
    cost too, so it is counted as what it replaces: the same SDPA over the dense mask."""
    return exact_attention_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes)


# --------------------------------------------------------------------------------------------------------------
# ONNX translations (onnxscript, opset 18; helpers in _onnx.py)
# --------------------------------------------------------------------------------------------------------------

def translate_exact_attention(q, k, v, key_mask=None, causal=False, scale=1.0, window=0, alibi=None, softcap=0.0):
    """Dense softmax attention over the real keys (and, if causal, positions <= the query's; with the model's
    window, keys with i - j < window; with a softcap, scores cap * tanh(scores / cap); with ALiBi, + slope_h * (j - i));
    rows with no key: 0."""
    op = ox._op()
    qa, ka, va, (_, d, dv) = ox._heads_fp32(q, k, v)
    s = ox._softcapped(op.Mul(op.MatMul(qa, op.Transpose(ka, perm=[0, 1, 3, 2])), ox._float(scale)), softcap)
    allowed = None
    if causal or window > 0 or alibi:
        lq, lk = ox._dim(qa, 2), ox._dim(ka, 2)
        q_pos = op.Add(op.Range(ox._int(0), op.Squeeze(lq, ox._ints([0])), ox._int(1)), op.Sub(lk, lq))
        k_pos = op.Range(ox._int(0), op.Squeeze(lk, ox._ints([0])), ox._int(1))
        dist = op.Sub(op.Unsqueeze(q_pos, ox._ints([1])), op.Unsqueeze(k_pos, ox._ints([0])))   # (Lq, Lk): i - j
    if causal:
        allowed = op.LessOrEqual(op.Unsqueeze(k_pos, ox._ints([0])), op.Unsqueeze(q_pos, ox._ints([1])))   # (Lq, Lk)
    if window > 0:
        inside = op.Less(dist, ox._int(window))
        allowed = inside if allowed is None else op.And(allowed, inside)
    if alibi:
        slopes = op.Constant(value_floats=[float(a) for a in alibi])                        # (H,)
        bias = op.Mul(op.Reshape(slopes, ox._ints([-1, 1, 1])), op.Neg(op.Cast(dist, to=1)))   # (H, Lq, Lk)
        s = op.Add(s, bias)
    if key_mask is not None:
        real = op.Unsqueeze(key_mask, ox._ints([1, 2]))                                      # (B, 1, 1, Lk)
        allowed = real if allowed is None else op.And(allowed, real)
    if allowed is not None:
        s = op.Where(allowed, s, ox._float(-math.inf))
    p = op.Exp(op.Sub(s, ox._finite_row_max(s)))
    return op.CastLike(ox._normalise(op.MatMul(p, ox._with_ones(va)), dv), q)


@dataclass
class ExactAttentionConfig(AttentionConfig):
    pass


register_method(AttentionMethod(
    name="exact-attention", config=ExactAttentionConfig, op=torch.ops.rewriter.exact_attention.default,
    budget=lambda c, L: ({}, {}), cost=exact_cost, reference=exact_attention_impl, onnx=translate_exact_attention,
    onnx_quadratic=True, colour="#d9d9d9", compose=_keep_semantics, exact=True,
    summary=("exact attention on the key-padding mask, the canonical attention every captured program holds "
             "(as a pass: a no-op kept so that recipes naming it replay)")))
