"""Triton kernels for the decode step's matrix-vector products (decode/gemv.py): a few rows x (M <= GEMV_MAX_M) times
weights (N, K) stored as nn.Linear stores them, rows of K contiguous.

    _gemv_kernel: up to three weights that read the same x (q, k and v projections) in one launch; program p takes
        BLOCK_N rows of one weight (the weights' row blocks laid end to end over the grid) and streams them through
        K in BLOCK_K steps, fp32 accumulation, the result rounded once to x's dtype (as cuBLAS does) into its columns
        of one output (M, N0 + N1 + N2).
    _swiglu_gemv_kernel: SwiGLU's gate and up projections and silu(gate) * up in one launch: each program reads the
        same BLOCK_N rows of both weights and writes silu(g) * u, rounding where rewriter::silu_mul rounds (g and u to
        x's dtype, silu in fp32 with expf, rounded, then the product).

At batch 1 the step's time is these products reading 2 GB of weights; cuBLAS ran them at about 58% of HBM peak on the
H100 (the k / v projections, 2 MB each, at about 12%: too few blocks in flight), and as one launch per weight. Here
each launch has several hundred programs of a few rows each (gemv_config), so small projections fill the GPU too.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ..linear.triton.fused import _rounded

GEMV_MAX_M = 4            # rows of x one launch takes (batch 1-4 decode); more: cuBLAS
MAX_WEIGHTS = 3
# (kind, N total, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages); kind "gemv" or "swiglu" (N: one weight's rows)
GEMV_CONFIGS: dict[tuple[str, int, int], tuple[int, int, int, int]] = {}


def gemv_config(kind: str, n: int, k: int, m: int = 1) -> tuple[int, int, int, int]:
    """The launch of a product of x (m, k) and n weight rows: the table's entry for that shape, else about four
    programs per SM (132 SMs on an H100) of 2-32 rows, K in steps of up to 512."""
    hit = GEMV_CONFIGS.get((kind, n, k))
    if hit is not None:
        return hit
    block_k = max(16, min(512, triton.next_power_of_2(k)))
    block_n = 32
    while block_n > 2 and triton.cdiv(n, block_n) < 528:
        block_n //= 2
    return block_n, block_k, 4, 3


@triton.jit
def _row_block(X, w_ptr, n0, N, M, K, s_xm,
               PAD_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """x (M, K) times rows n0 .. n0 + BLOCK_N of w (N, K): (BLOCK_N, PAD_M) fp32."""
    rn = n0 + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, PAD_M)
    nmask = rn < N
    mmask = rm < M
    rows = w_ptr + rn.to(tl.int64)[:, None] * K
    if PAD_M == 1:          # batch 1: products accumulate elementwise, one reduction at the end
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                w = tl.load(rows + rk[None, :], mask=nmask[:, None], other=0.0)
                x = tl.load(X + rk)
            else:
                kmask = rk < K
                w = tl.load(rows + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                x = tl.load(X + rk, mask=kmask, other=0.0)
            acc1 += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(acc1, axis=1)[:, None]
    else:
        acc = tl.zeros((BLOCK_N, PAD_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            w = tl.load(rows + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(X + rm[:, None] * s_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit(do_not_specialize=["N0", "N1", "N2", "P0", "P1"])     # a 1 would become a constant in one branch only
def _gemv_kernel(X, W0, W1, W2, Y, M, K, N0, N1, N2, P0, P1, s_xm, s_ym,
                 PAD_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    if pid < P0:
        w_ptr = W0
        n0 = pid * BLOCK_N
        N = N0
        col = N0 * 0
    elif pid < P0 + P1:
        w_ptr = W1
        n0 = (pid - P0) * BLOCK_N
        N = N1
        col = N0
    else:
        w_ptr = W2
        n0 = (pid - P0 - P1) * BLOCK_N
        N = N2
        col = N0 + N1
    acc = _row_block(X, w_ptr, n0, N, M, K, s_xm, PAD_M, BLOCK_N, BLOCK_K, EVEN_K)
    rn = n0 + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, PAD_M)
    y = _rounded(acc, Y.dtype.element_ty)
    tl.store(Y + rm[None, :].to(tl.int64) * s_ym + (col + rn)[:, None], y.to(Y.dtype.element_ty),
             mask=(rn < N)[:, None] & (rm < M)[None, :])


@triton.jit
def _swiglu_gemv_kernel(X, WG, WU, Y, M, K, N, s_xm, s_ym,
                        PAD_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        LIBDEVICE_EXP: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    DT: tl.constexpr = Y.dtype.element_ty
    g = _rounded(_row_block(X, WG, n0, N, M, K, s_xm, PAD_M, BLOCK_N, BLOCK_K, EVEN_K), DT)
    u = _rounded(_row_block(X, WU, n0, N, M, K, s_xm, PAD_M, BLOCK_N, BLOCK_K, EVEN_K), DT)
    if LIBDEVICE_EXP:    # expf, as torch's CUDA silu (the interpreter has only tl.exp)
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    silu = _rounded(tl.math.div_rn(g, 1.0 + e), DT)
    y = _rounded(silu * u, DT)
    rn = n0 + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, PAD_M)
    tl.store(Y + rm[None, :].to(tl.int64) * s_ym + rn[:, None], y.to(DT), mask=(rn < N)[:, None] & (rm < M)[None, :])


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def gemv_triton(x: Tensor, weights: list[Tensor], config: tuple[int, int, int, int] | None = None) -> Tensor:
    """cat([x @ w.T for w in weights], -1) for x (..., K) with at most GEMV_MAX_M rows, 1-3 contiguous weights of
    x's dtype (fp16 / bf16 / fp32)."""
    K = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    if not 1 <= len(weights) <= MAX_WEIGHTS or M > GEMV_MAX_M:
        raise ValueError(f"the gemv kernel takes 1-{MAX_WEIGHTS} weights and at most {GEMV_MAX_M} rows; got "
                         f"{len(weights)} and {M}")
    ns = [w.shape[0] for w in weights]
    y = torch.empty(M, sum(ns), dtype=x.dtype, device=x.device)
    if M and sum(ns):
        block_n, block_k, warps, stages = config or gemv_config("gemv", sum(ns), K, M)
        ws = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))
        ns3 = ns + [0] * (MAX_WEIGHTS - len(ns))
        blocks = [triton.cdiv(n, block_n) for n in ns3]
        _gemv_kernel[(sum(blocks),)](x2, *ws, y, M, K, *ns3, blocks[0], blocks[1], x2.stride(0), y.stride(0),
                                     PAD_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k,
                                     EVEN_K=K % block_k == 0, num_warps=warps, num_stages=stages)
    return y.reshape(*x.shape[:-1], sum(ns))


def swiglu_gemv_triton(x: Tensor, w_gate: Tensor, w_up: Tensor,
                       config: tuple[int, int, int, int] | None = None) -> Tensor:
    """silu(x @ w_gate.T) * (x @ w_up.T) with rewriter::silu_mul's roundings, x (..., K) of at most GEMV_MAX_M rows."""
    K = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    if M > GEMV_MAX_M:
        raise ValueError(f"the swiglu gemv kernel takes at most {GEMV_MAX_M} rows; got {M}")
    N = w_gate.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M and N:
        block_n, block_k, warps, stages = config or gemv_config("swiglu", N, K, M)
        _swiglu_gemv_kernel[(triton.cdiv(N, block_n),)](
            x2, w_gate, w_up, y, M, K, N, x2.stride(0), y.stride(0), PAD_M=triton.next_power_of_2(M),
            BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
            LIBDEVICE_EXP=os.environ.get("TRITON_INTERPRET") != "1", num_warps=warps, num_stages=stages)
    return y.reshape(*x.shape[:-1], N)
