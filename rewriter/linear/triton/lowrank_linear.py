"""Fused low-rank linear for small M: y = (x A^T) B^T + bias with A (r, in), B (out, r).

The grid splits the rank: program (j, s) computes t_j = x A_j^T for its slice of BLOCK_R rank components
(kept in registers, never written to memory), then multiplies t_j by the matching columns of B for its share
s of the outputs and atomically adds into an fp32 output. A is read once per output share (mostly from L2),
B exactly once. fp32 atomics make the summation order, and so the last bits of y, vary between runs.

Measured on an H200 (benchmarks/results/linear_h200.json, bf16, rank = 25% of min(out, in)): this kernel is
2.5-5x slower than two cuBLAS linears at M = 1 and 16 (33-94 us against 13-20 us); two cuBLAS linears reach
0.50-0.66 of the ideal FLOP ratio. Use two aten.linear calls for the low-rank pass; this kernel is kept as
the measured starting point for a fused small-M path (its parallelism is only r / BLOCK_R x shares programs,
each a long serial K loop, which is the first thing to change).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _lowrank_linear_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr,
    M, N, K, R, n_per_share,
    stride_xm, stride_ar, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_nb = tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rmask = offs_r < R
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k[None, :] < K), other=0.0)
        at = tl.load(a_ptr + offs_r[:, None] * stride_ar + k[None, :], mask=rmask[:, None] & (k[None, :] < K), other=0.0)
        t += tl.dot(xt, tl.trans(at))
    # round the intermediate to the input dtype, as the two-linear form does
    t_in = t.to(x_ptr.dtype.element_ty)
    n_start = pid_s * n_per_share
    n_end = tl.minimum(n_start + n_per_share, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + offs_nb
        nmask = n < n_end
        bt = tl.load(b_ptr + n[:, None] * stride_bn + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
        part = tl.dot(t_in, tl.trans(bt))
        tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + n[None, :], part, mask=mmask[:, None] & nmask[None, :])


FUSED_MAX_M = 16
_BLOCK_R, _BLOCK_K, _BLOCK_N = 16, 256, 64


def _shares(r_blocks: int, N: int, block_n: int, device: torch.device) -> int:
    """Output shares per rank block: enough programs for about four per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(4 * sms, r_blocks), triton.cdiv(N, block_n)))


def lowrank_linear_fused(x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None = None, shares: int | None = None,
                         block_r: int = _BLOCK_R, block_k: int = _BLOCK_K, block_n: int = _BLOCK_N,
                         num_warps: int = 4) -> Tensor:
    """(x A^T) B^T + bias with the fused kernel; x (..., in) with at most FUSED_MAX_M rows.
    shares (outputs split per rank block) defaults to about four programs per multiprocessor."""
    R, K = A.shape
    N = B.shape[0]
    if x.shape[-1] != K or B.shape[1] != R:
        raise ValueError(f"need x (..., in), A (r, in), B (out, r); got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > FUSED_MAX_M:
        raise ValueError(f"the fused kernel takes at most {FUSED_MAX_M} rows; got {M}")
    A, B = A.contiguous(), B.contiguous()
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if bias is None else bias.float().expand(M, N).contiguous()
    if M == 0:
        return y.to(x.dtype).reshape(*x.shape[:-1], N)
    r_blocks = triton.cdiv(R, block_r)
    shares = _shares(r_blocks, N, block_n, x.device) if shares is None else shares
    n_per_share = triton.cdiv(triton.cdiv(N, shares), block_n) * block_n
    grid = (r_blocks, triton.cdiv(N, n_per_share))
    _lowrank_linear_kernel[grid](
        x2, A, B, y, M, N, K, R, n_per_share,
        x2.stride(0), A.stride(0), B.stride(0), y.stride(0),
        BLOCK_M=16, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
