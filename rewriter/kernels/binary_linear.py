"""Triton kernels for rewriter::binary_linear: y = alpha * (x sign^T) + mu * sum(x) + bias.

The weight stays bit-packed in memory (uint8 (out, ceil(in/8)), bit j of byte k = column 8k + j, 1 = +1);
each program loads a tile of packed bytes, expands the bits to 0/1 in registers in x's dtype (exact for any
float type) and feeds tl.dot, accumulating in fp32; x . sign = 2 (x . bit) - sum(x). The row sum of x for the mu term is accumulated in the
same loop, so alpha, mu and bias are applied once in the epilogue.

Two tilings of one kernel:
    decode  (M <= 16): BLOCK_M = 16, narrow output tiles (32 rows) and long K steps, so that many programs
            stream disjoint packed rows; the kernel is bound by reading packed bytes.
    prefill (M > 16):  128 x 128 output tiles, K steps of 64 columns (8 bytes): a tile is expanded to the
            tensor-core dtype in registers and multiplied with tl.dot; the kernel is bound by arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _binary_linear_kernel(
    x_ptr, packed_ptr, alpha_ptr, mu_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_pn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # column k lives in bit k % 8 of byte k // 8: each byte is loaded once per bit (same cache line, so the
    # extra loads cost no DRAM traffic) and the tile comes out in the dot's layout without a reshape
    byte_of_k = offs_k // 8
    bit_of_k = offs_k % 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        kmask = k < K
        p = tl.load(packed_ptr + offs_n[:, None] * stride_pn + (k0 // 8 + byte_of_k)[None, :],
                    mask=(offs_n[:, None] < N) & kmask[None, :], other=0)
        bits = ((p >> bit_of_k[None, :].to(tl.uint8)) & 1).to(x_ptr.dtype.element_ty)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
        # x . sign = 2 (x . bit) - sum(x): the 0/1 bits need no +-1 conversion
        acc += tl.dot(xt, tl.trans(bits))
        xsum += tl.sum(xt.to(tl.float32), axis=1)
    nmask = offs_n < N
    alpha = tl.load(alpha_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    y = (2.0 * acc - xsum[:, None]) * alpha[None, :] + xsum[:, None] * mu[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & nmask[None, :])


DECODE_MAX_M = 16
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K is a multiple of 8
_DECODE = (16, 32, 512, 4, 3)
_PREFILL = (128, 128, 64, 8, 3)


def launch_binary_linear(x2: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None, out: Tensor,
                         block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> Tensor:
    """Run the kernel with explicit tiles on x2 (M, in) contiguous rows into out (M, out_features)."""
    M, K = x2.shape
    N = packed.shape[0]
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _binary_linear_kernel[grid](
        x2, packed, alpha, mu, bias if bias is not None else alpha, out,
        M, N, K,
        x2.stride(0), packed.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def binary_linear_triton(x: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None,
                         in_features: int, tiling: str | None = None, out: Tensor | None = None) -> Tensor:
    """Same contract as rewriter::binary_linear. tiling: "decode", "prefill" or None (decode when M <= 16).
    out: optional (M, out_features) buffer in x's dtype to write into."""
    if x.shape[-1] != in_features or packed.dim() != 2 or packed.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"x (..., {in_features}) and packed (out, {(in_features + 7) // 8}) expected; "
                         f"got x {tuple(x.shape)}, packed {tuple(packed.shape)}")
    if tiling not in (None, "decode", "prefill"):
        raise ValueError(f"tiling must be 'decode', 'prefill' or None; got {tiling!r}")
    N = packed.shape[0]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a row-contiguous ({M}, {N}) {x.dtype} tensor; got {tuple(out.shape)} {out.dtype}")
    if M > 0:
        if tiling is None:
            tiling = "decode" if M <= DECODE_MAX_M else "prefill"
        block_m, block_n, block_k, warps, stages = _DECODE if tiling == "decode" else _PREFILL
        launch_binary_linear(x2, packed.contiguous(), alpha.contiguous(), mu.contiguous(), bias, out,
                             block_m, block_n, block_k, warps, stages)
    return out.reshape(*x.shape[:-1], N)
