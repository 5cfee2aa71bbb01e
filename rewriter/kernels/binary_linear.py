"""Triton kernels for rewriter::binary_linear: y = alpha * (x sign^T) + mu * sum(x) + bias.

The weight stays bit-packed in memory (uint8 (out, ceil(in/8)), bit j of byte k = column 8k + j, 1 = +1);
programs load tiles of packed bytes, expand bits in registers to x's dtype (exact for any float type) and
feed tl.dot, accumulating in fp32. The row sum of x for the mu term is accumulated in the same loop, so
alpha, mu and bias are applied once in the epilogue. Two kernels, each used where it measured faster on an
H200 (benchmarks/results/linear_h200_*.json):

    bit-plane (M = 1):  per packed tile, one dot per bit position j with the columns 8 kb + j of x (strided
                        loads of the tiny x); bits stay 0/1 and x . sign = 2 (x . bit) - sum(x). No reshape.
    tile (M > 1):       the (BLOCK_N, BLOCK_KB, 8) bits are reshaped to a (BLOCK_N, 8 BLOCK_KB) +-1 tile and
                        multiplied with one tl.dot; "decode" tiles (16 x 32 outputs, 512 columns a step) for
                        M <= 16, "prefill" tiles (128 x 128, 64 columns a step) above.
Neither is bound by the packed bytes: on an H200 they read 80-170 GB/s of packed weights, 0.2-0.9x the speed
of cuBLAS bf16 (benchmarks/results/linear_h200.json). The expanded bits reach tl.dot through shared memory,
so each weight still crosses shared memory as a 16-bit value. Next steps: a register-only reduction for
M = 1 (no tl.dot, no shared memory) and split-K where out_features gives fewer programs than multiprocessors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _binary_tile_kernel(
    x_ptr, packed_ptr, alpha_ptr, mu_ptr, bias_ptr, y_ptr,
    M, N, K, KB,
    stride_xm, stride_pn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
):
    BLOCK_K: tl.constexpr = BLOCK_KB * 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_KB)
    offs_k = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kb0 in range(0, KB, BLOCK_KB):
        kb = kb0 + offs_kb
        p = tl.load(packed_ptr + offs_n[:, None] * stride_pn + kb[None, :],
                    mask=(offs_n[:, None] < N) & (kb[None, :] < KB), other=0).to(tl.int32)
        bits = (p[:, :, None] >> shifts[None, None, :]) & 1
        signs = tl.reshape(bits * 2 - 1, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
        k = kb0 * 8 + offs_k
        # columns past K (padding bits of the last byte) read x = 0 and contribute nothing
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        acc += tl.dot(xt, tl.trans(signs))
        xsum += tl.sum(xt.to(tl.float32), axis=1)
    nmask = offs_n < N
    alpha = tl.load(alpha_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    y = acc * alpha[None, :] + xsum[:, None] * mu[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & nmask[None, :])


@triton.jit
def _binary_bitplane_kernel(
    x_ptr, packed_ptr, alpha_ptr, mu_ptr, bias_ptr, y_ptr,
    M, N, K, KB,
    stride_xm, stride_pn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_KB)
    mmask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kb0 in range(0, KB, BLOCK_KB):
        kb = kb0 + offs_kb
        p = tl.load(packed_ptr + offs_n[:, None] * stride_pn + kb[None, :],
                    mask=(offs_n[:, None] < N) & (kb[None, :] < KB), other=0)
        # one dot per bit position: bit j of byte kb pairs with column 8 kb + j, so no reshape of the
        # unpacked tile is needed; x . sign = 2 (x . bit) - sum(x) keeps the bits as 0/1
        for j in tl.static_range(8):
            bits = ((p >> j) & 1).to(x_ptr.dtype.element_ty)
            k = kb * 8 + j
            # columns past K (padding bits of the last byte) read x = 0 and contribute nothing
            xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k[None, :] < K), other=0.0)
            acc += tl.dot(xj, tl.trans(bits))
            xsum += tl.sum(xj.to(tl.float32), axis=1)
    nmask = offs_n < N
    alpha = tl.load(alpha_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    y = (2.0 * acc - xsum[:, None]) * alpha[None, :] + xsum[:, None] * mu[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


DECODE_MAX_M = 16
# (kernel, BLOCK_M, BLOCK_N, BLOCK_KB, num_warps, num_stages): best of sweeps on an H200
_TILINGS = {
    "gemv": ("bitplane", 16, 32, 128, 4, 3),
    "decode": ("tile", 16, 32, 64, 4, 3),
    "prefill": ("tile", 128, 128, 8, 8, 3),
}
_KERNELS = {"bitplane": _binary_bitplane_kernel, "tile": _binary_tile_kernel}


def launch_binary_linear(x2: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None, out: Tensor,
                         kernel: str, block_m: int, block_n: int, block_kb: int, num_warps: int, num_stages: int) -> Tensor:
    """Run one kernel ("bitplane" or "tile") with explicit tiles on x2 (M, in) into out (M, out_features)."""
    M, K = x2.shape
    N = packed.shape[0]
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _KERNELS[kernel][grid](
        x2, packed, alpha, mu, bias if bias is not None else alpha, out,
        M, N, K, packed.shape[1],
        x2.stride(0), packed.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KB=block_kb,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def binary_linear_triton(x: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None,
                         in_features: int, tiling: str | None = None, out: Tensor | None = None) -> Tensor:
    """Same contract as rewriter::binary_linear. tiling: "gemv", "decode", "prefill" or None (gemv for M = 1,
    decode for M <= 16, prefill above). out: optional (M, out_features) buffer in x's dtype to write into."""
    if x.shape[-1] != in_features or packed.dim() != 2 or packed.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"x (..., {in_features}) and packed (out, {(in_features + 7) // 8}) expected; "
                         f"got x {tuple(x.shape)}, packed {tuple(packed.shape)}")
    if tiling is not None and tiling not in _TILINGS:
        raise ValueError(f"tiling must be one of {sorted(_TILINGS)} or None; got {tiling!r}")
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
            tiling = "gemv" if M == 1 else "decode" if M <= DECODE_MAX_M else "prefill"
        launch_binary_linear(x2, packed.contiguous(), alpha.contiguous(), mu.contiguous(), bias, out, *_TILINGS[tiling])
    return out.reshape(*x.shape[:-1], N)
