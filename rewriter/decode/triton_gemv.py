"""Triton kernels for the decode step's matrix-vector products (decode/gemv.py): one row x (batch-1 decode) times
weights (N, K) stored as nn.Linear stores them, rows of K contiguous.

    _gemv_kernel: up to three weights that read the same x (q, k and v projections) in one launch; program p takes
        BLOCK_N rows of one weight (the weights' row blocks laid end to end over the grid) and streams them through
        K in BLOCK_K steps, fp32 accumulation, the result rounded once to x's dtype (as cuBLAS does) into its columns
        of one output (N0 + N1 + N2,).
    _swiglu_gemv_kernel: SwiGLU's gate and up projections and silu(gate) * up in one launch: each program reads the
        same BLOCK_N rows of both weights and writes silu(g) * u, rounding where rewriter::silu_mul rounds (g and u to
        x's dtype, silu in fp32 with expf, rounded, then the product).

At batch 1 the step's time is these products reading 2 GB of weights; cuBLAS ran them at about 58% of HBM peak on the
H100 (the k / v projections, 2 MB each, at about 12%: too few blocks in flight), and as one launch per weight. Here
each launch has a program per two rows (gemv_config), so small projections fill the GPU too.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ..linear.triton.fused import _gdc_wait, _rounded, pdl_launch

GEMV_MAX_M = 1            # rows of x the kernels take (batch-1 decode); more: cuBLAS (below)
MAX_WEIGHTS = 3
# (kind, N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages); kind "gemv" (N: all weights' rows) or "swiglu" (N: one
# weight's rows). The fastest of benchmarks/gemv.py's second sweep on an H100 (gemv_h100_v2.json; the 1.1B Llama's
# shapes; the decode run kv_h100_v6.json used these): one to four rows per program and K in steps of 1024-2048 read
# 0.55-0.99 of the copy bandwidth (cuBLAS: 0.23-0.85); the first sweep's best (gemv_h100.json) were within 2%.
# With x of 4 rows the same kernels (then one reduction per K step) ran at 0.29-0.44 of it, slower than cuBLAS on
# every shape, so batches above 1 stay on cuBLAS.
GEMV_CONFIGS: dict[tuple[str, int, int], tuple[int, int, int, int]] = {
    ("gemv", 3072, 2048): (2, 1024, 4, 3),        # q, k, v
    ("gemv", 2048, 2048): (1, 1024, 2, 3),        # o
    ("gemv", 2048, 8192): (4, 2048, 8, 3),        # down
    ("gemv", 32000, 2048): (1, 2048, 4, 2),       # LM head
    ("swiglu", 8192, 2048): (1, 1024, 4, 3),      # gate and up
}


def gemv_config(kind: str, n: int, k: int) -> tuple[int, int, int, int]:
    """The launch of x (1, k) times n weight rows: the table's entry for that shape, else two rows per program and
    K in steps of up to 1024 (512 for SwiGLU's two weights), as the table's shapes ran fastest."""
    hit = GEMV_CONFIGS.get((kind, n, k))
    if hit is not None:
        return hit
    block_k = max(16, min(512 if kind == "swiglu" else 1024, triton.next_power_of_2(k)))
    return 2, block_k, 8 if k >= 8192 else 4, 3


@triton.jit
def _weights(w_ptr, n0, N, K, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Rows n0 .. n0 + BLOCK_N of w (N, K), columns k0 .. k0 + BLOCK_K (zeros past N and K)."""
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = k0 + tl.arange(0, BLOCK_K)
    rows = w_ptr + rn.to(tl.int64)[:, None] * K
    if EVEN_K:
        return tl.load(rows + rk[None, :], mask=(rn < N)[:, None], other=0.0)
    return tl.load(rows + rk[None, :], mask=(rn < N)[:, None] & (rk < K)[None, :], other=0.0)


@triton.jit
def _x_block(X, K, k0, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """x[k0 .. k0 + BLOCK_K] in fp32 (zeros past K)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        return tl.load(X + rk).to(tl.float32)
    return tl.load(X + rk, mask=rk < K, other=0.0).to(tl.float32)


@triton.jit
def _row_block(X, w_ptr, w_first, n0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               HAS_FIRST: tl.constexpr):
    """x (K,) times rows n0 .. n0 + BLOCK_N of w (N, K): (BLOCK_N,) fp32. The products accumulate elementwise over
    the K steps and are reduced once at the end. HAS_FIRST: w_first holds the first K step's weights (_weights at
    k0 = 0, loaded before x could be read, PDL); the sums are the same in either case."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    start = 0
    if HAS_FIRST:
        acc += w_first.to(tl.float32) * _x_block(X, K, 0, BLOCK_K, EVEN_K)[None, :]
        start = BLOCK_K
    for k0 in range(start, K, BLOCK_K):
        acc += _weights(w_ptr, n0, N, K, k0, BLOCK_N, BLOCK_K, EVEN_K).to(tl.float32) * \
            _x_block(X, K, k0, BLOCK_K, EVEN_K)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit(do_not_specialize=["N0", "N1", "N2", "P0", "P1"])     # a 1 would become a constant in one branch only
def _gemv_kernel(X, W0, W1, W2, Y, K, N0, N1, N2, P0, P1,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_GDC: tl.constexpr):
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
    if USE_GDC:     # the first weights while the kernel before finishes, then wait for x
        w_first = _weights(w_ptr, n0, N, K, 0, BLOCK_N, BLOCK_K, EVEN_K)
        _gdc_wait()
    else:
        w_first = 0.0
    y = _rounded(_row_block(X, w_ptr, w_first, n0, N, K, BLOCK_N, BLOCK_K, EVEN_K, USE_GDC), Y.dtype.element_ty)
    rn = n0 + tl.arange(0, BLOCK_N)
    tl.store(Y + col + rn, y.to(Y.dtype.element_ty), mask=rn < N)


@triton.jit
def _swiglu_gemv_kernel(X, WG, WU, Y, K, N, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        LIBDEVICE_EXP: tl.constexpr, USE_GDC: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    DT: tl.constexpr = Y.dtype.element_ty
    if USE_GDC:     # both weights' first blocks while the kernel before finishes, then wait for x
        g_first = _weights(WG, n0, N, K, 0, BLOCK_N, BLOCK_K, EVEN_K)
        u_first = _weights(WU, n0, N, K, 0, BLOCK_N, BLOCK_K, EVEN_K)
        _gdc_wait()
    else:
        g_first = 0.0
        u_first = 0.0
    g = _rounded(_row_block(X, WG, g_first, n0, N, K, BLOCK_N, BLOCK_K, EVEN_K, USE_GDC), DT)
    u = _rounded(_row_block(X, WU, u_first, n0, N, K, BLOCK_N, BLOCK_K, EVEN_K, USE_GDC), DT)
    if LIBDEVICE_EXP:    # expf, as torch's CUDA silu (the interpreter has only tl.exp)
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    silu = _rounded(tl.math.div_rn(g, 1.0 + e), DT)
    y = _rounded(silu * u, DT)
    rn = n0 + tl.arange(0, BLOCK_N)
    tl.store(Y + rn, y.to(DT), mask=rn < N)


def _vector(x: Tensor) -> Tensor:
    if x.numel() != x.shape[-1]:
        raise ValueError(f"the gemv kernels take one row of x; got {tuple(x.shape)}")
    return x.reshape(-1).contiguous()


def gemv_triton(x: Tensor, weights: list[Tensor], config: tuple[int, int, int, int] | None = None) -> Tensor:
    """cat([x @ w.T for w in weights], -1) for x (..., K) of one row and 1-3 contiguous weights of x's dtype
    (fp16 / bf16 / fp32)."""
    K = x.shape[-1]
    xv = _vector(x)
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"the gemv kernel takes 1-{MAX_WEIGHTS} weights; got {len(weights)}")
    ns = [w.shape[0] for w in weights]
    y = torch.empty(sum(ns), dtype=x.dtype, device=x.device)
    if sum(ns):
        block_n, block_k, warps, stages = config or gemv_config("gemv", sum(ns), K)
        ws = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))
        ns3 = ns + [0] * (MAX_WEIGHTS - len(ns))
        blocks = [triton.cdiv(n, block_n) for n in ns3]
        _gemv_kernel[(sum(blocks),)](xv, *ws, y, K, *ns3, blocks[0], blocks[1], BLOCK_N=block_n, BLOCK_K=block_k,
                                     EVEN_K=K % block_k == 0, num_warps=warps, num_stages=stages,
                                     **pdl_launch(x.device))
    return y.reshape(*x.shape[:-1], sum(ns))


def swiglu_gemv_triton(x: Tensor, w_gate: Tensor, w_up: Tensor,
                       config: tuple[int, int, int, int] | None = None) -> Tensor:
    """silu(x @ w_gate.T) * (x @ w_up.T) with rewriter::silu_mul's roundings, x (..., K) of one row."""
    K = x.shape[-1]
    xv = _vector(x)
    N = w_gate.shape[0]
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    if N:
        block_n, block_k, warps, stages = config or gemv_config("swiglu", N, K)
        _swiglu_gemv_kernel[(triton.cdiv(N, block_n),)](
            xv, w_gate, w_up, y, K, N, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
            LIBDEVICE_EXP=os.environ.get("TRITON_INTERPRET") != "1", num_warps=warps, num_stages=stages,
            **pdl_launch(x.device))
    return y.reshape(*x.shape[:-1], N)
