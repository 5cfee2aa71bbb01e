"""CUDA implementation of ``rewriter::hedgehog``: the learned feature maps in PyTorch (a matmul and two softmaxes
per token), then the chunked linear-attention Triton kernel on the features; the window hybrid (LoLCATs) runs the
window kernel on the band with the linear kernel's sums off it added in its epilogue (see scatterbrain.py)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .registry import _kernel_dtype, cuda_kernel


@cuda_kernel("rewriter::hedgehog")
def hedgehog_attention_cuda(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                            q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, window_gain: Tensor,
                            window: int = 0, sinks: int = 0) -> Tensor:
    from .._contract import check_qkv, drop_full_mask
    from ..feature_map import _acc_dtype, _check_window_sinks
    from ..hedgehog import _check_maps, hedgehog_features, hedgehog_reference
    from .linear_attention import chunked_linear_attention
    if sinks and not window:
        return hedgehog_reference(q, k, v, key_mask, causal, scale, q_weight, q_bias, k_weight, k_bias, window_gain,
                                  window, sinks)
    check_qkv(q, k, v, key_mask)
    _check_maps(q, k, q_weight, q_bias, k_weight, k_bias, window_gain)
    _check_window_sinks(window, sinks)
    key_mask = drop_full_mask(key_mask)
    dt, acc = _kernel_dtype(q), _acc_dtype(q)
    phi_q = hedgehog_features(q.to(acc), q_weight, q_bias).to(dt)
    phi_k = hedgehog_features(k.to(acc), k_weight, k_bias).to(dt)
    if window:
        # LoLCATs' hybrid: the window kernel over the band + sinks, the linear kernel off it, one normaliser
        from .scatterbrain import scatterbrain_attention_triton
        return scatterbrain_attention_triton(q.to(dt), k.to(dt), v.to(dt), key_mask, causal, scale, phi_q, phi_k,
                                             window, sinks, support_max_offset=window_gain).to(q.dtype)
    return chunked_linear_attention(phi_q, phi_k, v.to(dt), causal, key_mask, normalise=True).to(q.dtype)
