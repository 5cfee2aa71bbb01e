"""CUDA implementation of ``rewriter::hedgehog``: the learned feature maps in PyTorch (a matmul and two softmaxes
per token), then the chunked linear-attention Triton kernel on the features. The window hybrid keeps its reference,
as the fixed-map hybrid does (the band + low-rank correction has no kernel yet)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .registry import _kernel_dtype, cuda_kernel


@cuda_kernel("rewriter::hedgehog")
def hedgehog_attention_cuda(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                            q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, window_gain: Tensor,
                            window: int = 0, sinks: int = 0) -> Tensor:
    from .._contract import check_qkv, drop_full_mask
    from ..feature_map import _acc_dtype, _check_window_sinks, _normalise
    from ..hedgehog import _check_maps, hedgehog_features, hedgehog_reference
    from .linear_attention import chunked_linear_attention
    if window or sinks:
        return hedgehog_reference(q, k, v, key_mask, causal, scale, q_weight, q_bias, k_weight, k_bias, window_gain,
                                  window, sinks)
    check_qkv(q, k, v, key_mask)
    _check_maps(q, k, q_weight, q_bias, k_weight, k_bias, window_gain)
    _check_window_sinks(window, sinks)
    key_mask = drop_full_mask(key_mask)
    dt, acc = _kernel_dtype(q), _acc_dtype(q)
    phi_q = hedgehog_features(q.to(acc), q_weight, q_bias).to(dt)
    phi_k = hedgehog_features(k.to(acc), k_weight, k_bias).to(dt)
    num, den = chunked_linear_attention(phi_q, phi_k, v.to(dt), causal, key_mask)
    return _normalise(num, den).to(q.dtype)
