"""CUDA implementations of the attention ops, registered with ``torch.library.register_kernel``.

The fixed feature maps (elu, relu, taylor2) come from the reference code in ``rewriter.attention.feature_map``, FAVOR+
from its Triton kernel (``favor.py``); the cores run in Triton: the chunked linear kernel, and for Scatterbrain and the
windowed hybrids the block-sparse window kernel with the linear kernel's off-band sums in its epilogue.
The sparse ops (window, block top-k, strided) run their own layout code with ``sparse_attention_core`` (the Triton
block-sparse kernel) as their core. ``rewriter::window_triton`` is the window op as a ``torch.library.triton_op``:
its layout traces with dynamic lengths and its launch goes through ``wrap_triton``, so an AOTInductor package of a
CUDA program compiles the block-sparse kernel in (``rewriter.compile`` lowers ``rewriter::window`` to it on CUDA);
``rewriter::exact_triton`` likewise is exact attention with a key mask on the band kernel with no band.
LSH keeps its reference on CUDA: its rounds subtract a per-pair duplicate count inside the softmax, which the
block-sparse kernel does not take.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .._contract import drop_full_mask as _drop_full_mask
from . import triton_available, use_reference


CUDA_KERNELS: dict = {}     # op name -> CUDA implementation, filled by @cuda_kernel in registration order


def cuda_kernel(op_name: str, fn=None):
    """Declare `fn` the CUDA implementation of the custom op `op_name` ("rewriter::..."). Kernel modules in
    ``rewriter.attention.triton`` declare theirs with this; ``register_cuda_kernels`` registers them all."""
    def declare(f):
        CUDA_KERNELS[op_name] = f
        return f
    return declare(fn) if fn is not None else declare


def _kernel_dtype(q: Tensor) -> torch.dtype:
    # Half-precision inputs run the tensor-core products in that precision (fp32 accumulation); fp32 inputs in
    # fp32 (tf32 products on CUDA).
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _performer_features_cuda(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float, features: int,
                             seed: int, dt: torch.dtype):
    """FAVOR+ features of q and k from the Triton feature kernel (``favor.favor_features``), phi in the kernels'
    dtype `dt`; PyTorch's feature map above its feature limit."""
    from ..feature_map import _cached_projection, _performer_features
    from .favor import MAX_FEATURES, favor_features
    if features > MAX_FEATURES:
        phi_q, phi_k, log_q, log_k = _performer_features(q, k, key_mask, scale, features, seed)
        return phi_q.to(dt), phi_k.to(dt), log_q, log_k
    return favor_features(q, k, key_mask, scale, _cached_projection(features, q.shape[-1], seed), dt)


@cuda_kernel("rewriter::performer")
def performer_attention_cuda(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                             features: int, seed: int = 0) -> Tensor:
    from .._contract import check_qkv
    from ..feature_map import _check_features
    from .linear_attention import chunked_linear_attention
    check_qkv(q, k, v, key_mask)
    key_mask = _drop_full_mask(key_mask)
    _check_features(features)
    dt = _kernel_dtype(q)
    phi_q, phi_k, _, _ = _performer_features_cuda(q, k, key_mask, scale, features, seed, dt)
    return chunked_linear_attention(phi_q, phi_k, v.to(dt), causal, key_mask, normalise=True).to(q.dtype)


@cuda_kernel("rewriter::linear")
def linear_attention_cuda(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                          feature_map: str, window: int = 0, sinks: int = 0) -> Tensor:
    from .._contract import check_qkv
    from ..feature_map import _check_linear_budget, _fixed_features, sparse_plus_lowrank_attention
    from .linear_attention import chunked_linear_attention
    check_qkv(q, k, v, key_mask)
    key_mask = _drop_full_mask(key_mask)
    _check_linear_budget(feature_map, window, sinks)
    phi_q, phi_k = _fixed_features(feature_map, q, k, scale)
    dt = _kernel_dtype(q)
    if window:
        # the hybrid: the window kernel over the band + sinks, the linear kernel off it (Scatterbrain's kernels)
        from .scatterbrain import scatterbrain_attention_triton
        return scatterbrain_attention_triton(q.to(dt), k.to(dt), v.to(dt), key_mask, causal, scale, phi_q.to(dt),
                                             phi_k.to(dt), window, sinks).to(q.dtype)
    if sinks:
        return sparse_plus_lowrank_attention(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks)
    return chunked_linear_attention(phi_q.to(dt), phi_k.to(dt), v.to(dt), causal, key_mask,
                                    normalise=True).to(q.dtype)


@cuda_kernel("rewriter::scatterbrain")
def scatterbrain_attention_cuda(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
                                scale: float, features: int, window: int, sinks: int = 0, seed: int = 0) -> Tensor:
    from .._contract import check_qkv
    from ..feature_map import _check_scatterbrain_budget
    from .scatterbrain import scatterbrain_attention_triton
    check_qkv(q, k, v, key_mask)
    key_mask = _drop_full_mask(key_mask)
    _check_scatterbrain_budget(features, window, sinks)
    dt = _kernel_dtype(q)
    phi_q, phi_k, log_q, log_k = _performer_features_cuda(q, k, key_mask, scale, features, seed, dt)
    return scatterbrain_attention_triton(q.to(dt), k.to(dt), v.to(dt), key_mask, causal, scale, phi_q, phi_k,
                                         window, sinks, log_phi_q=log_q, log_phi_k=log_k).to(q.dtype)


def sparse_attention_core(q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, kv_count: Tensor, block: int,
                          key_mask: Optional[Tensor] = None, causal: bool = False, scale: Optional[float] = None,
                          window_left: int = -1, window_right: int = -1, sinks: int = 0,
                          q_pos: Optional[Tensor] = None, k_pos: Optional[Tensor] = None,
                          alibi: Optional[Tensor] = None, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """The sparse ops' core on CUDA: same arguments and (out, lse) as ``block_sparse_attention_reference``.
    Falls back to the reference when REWRITER_ATTENTION_REFERENCE=1, Triton cannot run, or the block is not a
    power of two in 16..128."""
    from ..block_sparse import block_sparse_attention_reference
    args = (q, k, v, kv_index, kv_count, block, _drop_full_mask(key_mask), causal, scale, window_left, window_right,
            sinks, q_pos, k_pos, alibi, softcap)
    if use_reference() or not triton_available() or block < 16 or block > 128 or block & (block - 1):
        return block_sparse_attention_reference(*args)
    from .block_sparse_attention import block_sparse_attention
    return block_sparse_attention(*args)


def _sparse_op(impl_name: str):
    """The sparse op's own body (layout + predicate) with the Triton core."""
    def run(*args, **kwargs):
        from .. import sparse as sparse_attention
        return getattr(sparse_attention, impl_name)(*args, **kwargs, core=sparse_attention_core)
    run.__name__ = impl_name.replace("_impl", "_cuda")
    return run


for _op in ("block_topk", "strided"):
    cuda_kernel(f"rewriter::{_op}", _sparse_op(f"{_op}_attention_impl"))


@cuda_kernel("rewriter::window")
def window_attention_cuda(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                          window: int, sinks: int, block: int = 64, alibi: Optional[list[float]] = None,
                          softcap: float = 0.0) -> Tensor:
    """The band kernel (``window_attention.py``: tiles from the query positions, no layout); with ALiBi or a
    softcap, or head dims over 256, the block-sparse kernel on the band layout. Same numbers either way: the
    token-level predicate defines the result, the block only the granularity of the work."""
    from .. import sparse as sparse_attention
    from .._contract import check_qkv, window_extents
    if alibi or softcap > 0 or use_reference() or max(q.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
        return sparse_attention.window_attention_impl(q, k, v, key_mask, causal, scale, window, sinks, block, alibi,
                                                      softcap, core=sparse_attention_core)
    from .window_attention import band_attention
    check_qkv(q, k, v, key_mask)
    sparse_attention._check_window_budget(window, sinks, block)
    left, right = window_extents(window, causal)
    return band_attention(q, k, v, _drop_full_mask(key_mask), causal, scale, left, right, sinks)[0]


EXACT_SOFTCAP_BLOCK = 64


@cuda_kernel("rewriter::exact_attention")
def exact_attention_cuda(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                         window: int = 0, alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """Exact attention on CUDA: SDPA's flash / cuDNN path where it applies (every key real, or not causal-offset);
    in half precision the band kernel with no band (or the model's own window) where SDPA would need its masked
    kernels over an L x L mask (padded keys, a sliding window, Lq != Lk causal: 13.0 vs 42.8 ms for a left-padded
    32K prompt, 32 / 8 heads of 64, attention_exact_h100.json); with a logit softcap, which SDPA cannot apply, the
    block-sparse kernel over the blocks the model can see (every key block, or the band of its causal window), the
    cap (and ALiBi bias) applied in its block loop, never an L x L buffer. ALiBi without a softcap stays SDPA's."""
    from ..exact import exact_attention_impl
    if softcap <= 0:
        if not alibi and q.dtype in (torch.float16, torch.bfloat16) and not use_reference() \
                and max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_HEAD_DIM:
            from .._contract import check_qkv
            check_qkv(q, k, v, key_mask)
            mask = _drop_full_mask(key_mask)
            if mask is not None or window > 0 or (causal and q.shape[2] != k.shape[2]):
                return exact_triton(q, k, v, mask, causal, scale, window)
        return exact_attention_impl(q, k, v, key_mask, causal, scale, window, alibi)
    from .._contract import check_qkv, check_softcap
    from ..block_sparse import band_layout
    check_qkv(q, k, v, key_mask)
    check_softcap(softcap)
    if alibi and len(alibi) != q.shape[1]:
        raise ValueError(f"alibi has {len(alibi)} slopes for {q.shape[1]} query heads")
    left, right = (window - 1 if window > 0 else -1), (0 if causal else -1)
    kv_index, kv_count = band_layout(q.shape[2], k.shape[2], EXACT_SOFTCAP_BLOCK, left, right, 0, causal, q.device)
    slopes = torch.tensor(alibi, dtype=torch.float32, device=q.device) if alibi else None
    out, _ = sparse_attention_core(q, k, v, kv_index, kv_count, EXACT_SOFTCAP_BLOCK, key_mask, causal, scale,
                                   window_left=left, window_right=-1, sinks=0, alibi=slopes, softcap=softcap)
    return out


TRITON_BLOCKS = (16, 32, 64, 128)     # the block-sparse kernel's block sizes
TRITON_MAX_HEAD_DIM = 256


@torch.library.triton_op("rewriter::window_triton", mutates_args=())
def window_triton(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                  window: int, sinks: int, block: int) -> Tensor:
    """The window op (rewriter::window) on the Triton band kernel, for compiled packages: the kernel derives its key
    tiles from the lengths, so nothing comes from a cache or the data. Blocks outside TRITON_BLOCKS or head dims
    over TRITON_MAX_HEAD_DIM take the aten form."""
    from ...compile import _window_attention
    if block not in TRITON_BLOCKS or max(q.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
        return _window_attention(q, k, v, key_mask, causal, scale, window, sinks, block)
    from .._contract import window_extents
    from .window_attention import band_attention
    left, right = window_extents(window, causal)
    return band_attention(q, k, v, key_mask, causal, scale, left, right, sinks)[0]


@torch.library.triton_op("rewriter::exact_triton", mutates_args=())
def exact_triton(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                 window: int = 0) -> Tensor:
    """Exact attention (rewriter::exact_attention without ALiBi or softcap) on the Triton band kernel with no band
    limit, or the model's own window (keys with i - j < window), for compiled packages with a key mask: the compiled
    graph cannot skip an all-real mask as the op does, and SDPA's masked kernels read an L x L mask (a captured
    program compiled ran at 0.45x its eager program, issue 13). float64 and head dims over TRITON_MAX_HEAD_DIM take
    the aten form."""
    from ...compile import _exact_attention
    if q.dtype == torch.float64 or max(q.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
        return _exact_attention(q, k, v, key_mask, causal, scale, window)
    from .window_attention import band_attention, exact_config
    config = exact_config(max(q.shape[-1], v.shape[-1]), q.dtype) if window <= 0 else None
    return band_attention(q, k, v, key_mask, causal, scale, window - 1 if window > 0 else -1, -1, 0,
                          config=config)[0]


@cuda_kernel("rewriter::binary_linear")
def binary_linear_cuda(x: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Optional[Tensor],
                       in_features: int) -> Tensor:
    """The Triton kernels for half and single precision; float64 (e.g. an oracle computed on the GPU) takes the
    reference, which Triton's dots cannot run."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or use_reference():
        from ...linear.binary import binary_linear_reference
        return binary_linear_reference(x, packed, alpha, mu, bias, in_features)
    from ...linear.triton.binary_linear import binary_linear_triton
    return binary_linear_triton(x, packed, alpha, mu, bias, in_features)


@cuda_kernel("rewriter::rms_norm")
def rms_norm_cuda(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The one-pass Triton kernel for fp16 / bf16 / fp32 rows up to RMS_MAX_H wide; the reference otherwise."""
    from ...linear.fused import _check_rms_norm, rms_norm_reference
    from ...linear.triton.fused import KERNEL_DTYPES, RMS_MAX_H, rms_norm_triton
    _check_rms_norm(x, weight)
    if use_reference() or x.shape[-1] > RMS_MAX_H or x.dtype not in KERNEL_DTYPES \
            or weight.dtype not in KERNEL_DTYPES:
        return rms_norm_reference(x, weight, eps)
    return rms_norm_triton(x, weight, eps)


@cuda_kernel("rewriter::silu_mul")
def silu_mul_cuda(gate: Tensor, up: Tensor) -> Tensor:
    """The elementwise Triton kernel for fp16 / bf16 / fp32; the reference otherwise (float64)."""
    from ...linear.fused import _check_silu_mul, silu_mul_reference
    from ...linear.triton.fused import KERNEL_DTYPES, silu_mul_triton
    _check_silu_mul(gate, up)
    if use_reference() or gate.dtype not in KERNEL_DTYPES or up.dtype not in KERNEL_DTYPES:
        return silu_mul_reference(gate, up)
    return silu_mul_triton(gate, up)


_registered: set[str] = set()


def _contiguous_result(fn):
    """`fn` returning a contiguous result, the layout every op's fake declares (a no-op for the kernels, which
    allocate contiguous outputs; the attention ops' SDPA fallbacks follow their inputs' layout)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs).contiguous()
    return wrapped


def register_cuda_kernels() -> list[str]:
    """Register the Triton implementations for the CUDA dispatch key; returns the op names registered
    (none when Triton cannot run or REWRITER_ATTENTION_REFERENCE=1)."""
    if not triton_available() or use_reference():
        return []
    import importlib
    import pkgutil
    from ... import attention, linear  # noqa: F401  (define the ops)
    from .. import triton as package
    for module in pkgutil.iter_modules(package.__path__):   # kernel modules declare theirs with @cuda_kernel
        importlib.import_module(f"{package.__name__}.{module.name}")
    for name, fn in CUDA_KERNELS.items():
        if name not in _registered:                 # registering twice would stack a second kernel
            torch.library.register_kernel(name, "cuda", _contiguous_result(fn))   # the fakes' contiguous layout
            _registered.add(name)
    return list(CUDA_KERNELS)
