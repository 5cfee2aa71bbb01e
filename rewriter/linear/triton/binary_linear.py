"""Triton kernels for rewriter::binary_linear: y = alpha * (x sign^T) + mu * sum(x) + bias.

The weight stays bit-packed in memory (uint8 (out, ceil(in/8)), bit j of byte k = column 8k + j, 1 = +1).
Three kernels:

    split-K GEMV (M <= 16, the default there): register-only. Rows whose byte count is a multiple of 4 are
        read through an int32 view of the same bytes (bit b of word q = column 32 q + b, little-endian; no
        repacking); others assemble words from bytes. Each program takes BLOCK_N output rows and one K slice;
        for each of the 32 bit positions (unrolled, constant shifts) it adds x where the bit is set
        (x . sign = 2 (x . bit) - sum(x)): on sm_90 one LOP3 into a predicate and one predicated FADD per
        weight, the test shared by every row of x. A 2-D grid (output blocks x K slices, about 4 programs per
        multiprocessor) keeps out = 4096 busy; each slice applies the (linear) epilogue to its partial sums,
        stores them in fp32, and the last program of an output block to arrive (an atomic counter per block,
        reset by that program) adds them up in slice order and writes y. One launch, deterministic.
    bit-plane (dot-based, M <= 16): per packed tile, one tl.dot per bit position j with the columns 8 kb + j
        of x; bits stay 0/1.
    tile (M > 16, "prefill"; also "decode" tiles for M <= 16): the (BLOCK_N, BLOCK_KB, 8) bits are reshaped
        to a (BLOCK_N, 8 BLOCK_KB) +-1 tile and multiplied with one tl.dot, accumulating in fp32.
The dot-based kernels read 80-170 GB/s of packed weights on an H200, 0.2-0.9x cuBLAS bf16
(benchmarks/results/linear_h200.json): their expanded bits cross shared memory as 16-bit values.
benchmarks/linear.py sweeps the split-K GEMV's knobs (block_n, block_w, programs per SM, num_warps) against
cuBLAS and a device-to-device copy of the packed bytes.
"""
from __future__ import annotations

import math

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


@triton.jit
def _gemv_words(acc, xsum, x_ptr, w_ptr, m3, n3, q, K, KB, KW, stride_xm, stride_wn,
                MASKED: tl.constexpr, WORD_LOADS: tl.constexpr):
    """Adds x . bit for the words q (1, 1, BLOCK_W) of rows n3 to acc and the x of those columns to xsum.
    Unmasked blocks (all 32 q + 31 < K) load without predicates; rows past N and M were clamped to real rows
    by the caller, and their results are never stored."""
    if WORD_LOADS:
        # int32 view of the packed bytes: bit b of word q is column 32 q + b (little-endian bytes)
        if MASKED:
            words = tl.load(w_ptr + n3 * stride_wn + q, mask=q < KW, other=0)
        else:
            words = tl.load(w_ptr + n3 * stride_wn + q)
    else:
        # rows not a multiple of 4 bytes: assemble each word from its (up to) 4 bytes
        words = tl.zeros(q.shape, dtype=tl.int32) + tl.zeros(n3.shape, dtype=tl.int32)
        for i in tl.static_range(4):
            kb = 4 * q + i
            if MASKED:
                byte = tl.load(w_ptr + n3 * stride_wn + kb, mask=kb < KB, other=0)
            else:
                byte = tl.load(w_ptr + n3 * stride_wn + kb)
            words |= byte.to(tl.int32) << (8 * i)
    # one unrolled step per bit position: the shifts are constants, so each bit test is one LOP3 into a
    # predicate and the select-add a predicated FADD (sm_90 SASS); up to M = 4 the test is shared in registers
    # by the rows of x, at M = 16 Triton hands the bits to the accumulator's layout through shared memory
    for b in tl.static_range(32):
        k = 32 * q + b
        if MASKED:
            # columns past K (padding bits of the last byte, words past the row) read x = 0
            xb = tl.load(x_ptr + m3 * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        else:
            xb = tl.load(x_ptr + m3 * stride_xm + k).to(tl.float32)
        xsum += xb
        acc = tl.where(((words >> b) & 1) != 0, acc + xb, acc)
    return acc, xsum


# sizes vary per shape and split; specialising on them would recompile for each (only the strides matter)
@triton.jit(do_not_specialize=["M", "N", "K", "KB", "KW", "words_per_split", "split_k"])
def _binary_splitk_gemv_kernel(
    x_ptr, w_ptr, alpha_ptr, mu_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, KB, KW, words_per_split, split_k,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, WORD_LOADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (n, s): outputs n BLOCK_N.. for all M <= BLOCK_M rows of x, over words s words_per_split..
    (words_per_split is a multiple of BLOCK_W). With SPLIT (split_k > 1) each program stores its partial outputs and
    the last program of an output block to arrive adds them up."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    # every tile is 3-D (M, N, words) so that words, bits, x and the accumulator share one register layout
    # (2-D tiles broadcast to 3-D make Triton convert each bit mask through shared memory)
    m3 = tl.minimum(offs_m, M - 1)[:, None, None]
    n3 = tl.minimum(offs_n, N - 1)[None, :, None]
    w3 = tl.arange(0, BLOCK_W)[None, None, :]
    # sum(sign * x) = 2 sum(bit * x) - sum(x): the inner loop only adds x where a bit is set
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M, 1, BLOCK_W), dtype=tl.float32)
    w_start = pid_k * words_per_split
    w_end = tl.minimum(w_start + words_per_split, KW)
    # blocks whose columns are all < K run unmasked; the rest (at most one block per split) masked
    full_end = w_start + tl.maximum(tl.minimum(w_end, K // 32) - w_start, 0) // BLOCK_W * BLOCK_W
    for q0 in range(w_start, full_end, BLOCK_W):
        acc, xsum = _gemv_words(acc, xsum, x_ptr, w_ptr, m3, n3, q0 + w3, K, KB, KW, stride_xm, stride_wn,
                                False, WORD_LOADS)
    for q0 in range(full_end, w_end, BLOCK_W):
        acc, xsum = _gemv_words(acc, xsum, x_ptr, w_ptr, m3, n3, q0 + w3, K, KB, KW, stride_xm, stride_wn,
                                True, WORD_LOADS)
    s = tl.sum(acc, axis=2)
    sx = tl.sum(xsum, axis=2)
    _splitk_store(s, sx, offs_m, offs_n, mmask, nmask, alpha_ptr, mu_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N,
                  pid_n, pid_k, split_k, stride_ym, HAS_BIAS, SPLIT)


@triton.jit
def _splitk_store(s, sx, offs_m, offs_n, mmask, nmask, alpha_ptr, mu_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N,
                  pid_n, pid_k, split_k, stride_ym, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """The split-K GEMVs' epilogue: s (BLOCK_M, BLOCK_N) the sums of x over set bits and sx (BLOCK_M, 1) the sum of x
    over this program's K slice -> y = alpha (2 s - sx) + mu sx (+ bias). With SPLIT each program stores its partial
    outputs and the last program of an output block to arrive adds them up in slice order."""
    alpha = tl.load(alpha_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    mu = tl.load(mu_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # the epilogue is linear in (s, sx), so each K slice applies it to its own partial sums
    y = alpha * (2.0 * s - sx) + mu * sx
    ymask = mmask[:, None] & nmask[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if not SPLIT:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        part_ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs + pid_k * M * N, y, mask=ymask)
        # all threads' partials are written before one thread's acq_rel increment publishes them (the
        # pattern of a barrier then a release by one thread); the last arriver reads them through L2
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            # summed in split order, so the result does not depend on the order of arrival
            total = tl.zeros(y.shape, dtype=tl.float32)
            for split in range(split_k):
                total += tl.load(part_ptrs + split * M * N, mask=ymask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=ymask)
            # back to 0 for the next launch on this stream
            tl.atomic_xchg(count_ptr + pid_n, 0)


@triton.jit
def _nibble_lut_kernel(x_ptr, lut_ptr, K, G, BLOCK_G: tl.constexpr):
    """lut (G, 16) float32, G = 8 x 32-column words: lut[g, n] = sum over i < 4 of bit i of n times x[4 g + i]
    (x of one row; columns past K read 0, so entry 0 of every table is 0)."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    n = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_G, 16), dtype=tl.float32)
    for i in tl.static_range(4):
        col = 4 * g + i
        xi = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
        acc += tl.where(((n >> i) & 1)[None, :] != 0, xi[:, None], 0.0)
    tl.store(lut_ptr + g[:, None] * 16 + n[None, :], acc, mask=(g < G)[:, None])


@triton.jit(do_not_specialize=["N", "KW", "words_per_split", "split_k"])
def _binary_lut_gemv_kernel(
    lut_ptr, w_ptr, alpha_ptr, mu_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
    N, KW, words_per_split, split_k, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
):
    """M = 1 split-K GEMV through nibble tables (T-MAC's lookup, from global memory / L1): for each 4-column nibble of
    a packed word, one gathered load of the partial sum of the x columns whose bits are set (lut, _nibble_lut_kernel)
    and one add, instead of a bit test and an add per weight. The tile's lanes run over output rows, so the 32 lanes
    of a gather read the same 16-entry table (one L1 wavefront); each thread loads BLOCK_W consecutive words of its
    row. Same epilogue as _binary_splitk_gemv_kernel (sum(x) of the slice from the tables' entry 15)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    n2 = tl.minimum(offs_n, N - 1)[:, None]
    w2 = tl.arange(0, BLOCK_W)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    xsum = tl.zeros((1, BLOCK_W), dtype=tl.float32)
    w_start = pid_k * words_per_split
    w_end = tl.minimum(w_start + words_per_split, KW)
    for q0 in range(w_start, w_end, BLOCK_W):
        q = q0 + w2
        q_ok = q < w_end
        # unsigned, so that a nibble needs no sign extension on its way into the 64-bit address
        words = tl.load(w_ptr + n2 * stride_wn + q, mask=q_ok, other=0).to(tl.uint32, bitcast=True)
        tables = lut_ptr + tl.minimum(q, KW - 1) * 128            # 8 nibble tables of 16 entries per word
        for j in tl.static_range(8):
            acc += tl.load(tables + (16 * j) + ((words >> (4 * j)) & 15))
            xsum += tl.load(tables + (16 * j + 15), mask=q_ok, other=0.0)
    s = tl.sum(acc, axis=1)[None, :]
    sx = tl.sum(xsum, axis=1)[:, None]
    offs_m = tl.arange(0, 1)
    _splitk_store(s, sx, offs_m, offs_n, offs_m < 1, nmask, alpha_ptr, mu_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
                  1, N, pid_n, pid_k, split_k, stride_ym, HAS_BIAS, SPLIT)


GEMV_MAX_M = 16  # the split-K GEMV serves M <= GEMV_MAX_M (one block of x rows); the tile kernel above
# (kernel, BLOCK_M, BLOCK_N, BLOCK_KB, num_warps, num_stages) of the dot-based kernels: best of sweeps on an H200
_TILINGS = {
    "bitplane": ("bitplane", 16, 32, 128, 4, 3),
    "decode": ("tile", 16, 32, 64, 4, 3),
    "prefill": ("tile", 128, 128, 8, 8, 3),
}
_KERNELS = {"bitplane": _binary_bitplane_kernel, "tile": _binary_tile_kernel}
# split-K GEMV defaults by rows of x (the first entry whose bound >= M); benchmarks/linear.py sweeps these
# knobs on the GPU. M = 1: the sweep's best on the H200 at 4096 x 4096 (128 x 16 words, split 8: 6.7 us against
# cuBLAS bf16's 14.5 us; 512 x 4 took 9.1 us; benchmarks/results/linear_h200_v4_splitk_partial.json). M = 4 and
# 16 were chosen from sm_90 SASS (2.4 and 2.7 instructions per weight and row; (64, 8) needs 254 registers at
# M = 16, (128, 8) spills) and measured slower than cuBLAS (0.74x and 0.29x at 4096 x 4096).
GEMV_DEFAULTS = {
    1: {"block_n": 128, "block_w": 16, "programs_per_sm": 4, "num_warps": 4, "num_stages": 3},
    4: {"block_n": 256, "block_w": 4, "programs_per_sm": 4, "num_warps": 4, "num_stages": 3},
    16: {"block_n": 32, "block_w": 8, "programs_per_sm": 4, "num_warps": 4, "num_stages": 3},
}
# M up to which binary_linear_triton (tiling None) takes the split-K GEMV; the "decode" tile kernel above it
# (up to 16), then "prefill". At 4096 x 4096 on the H200 the split-K GEMV took 50 us at M = 16 where the decode
# tile kernel took about 26 us (linear_h200.json: 0.56x cuBLAS) and a memory-bound tile costs about the same at
# M = 4 (untimed there), so the GEMV serves M <= 4.
GEMV_DISPATCH_MAX_M = 4
_INTERPRETER_SMS = 4  # pretend multiprocessor count on CPU (Triton interpreter), so split-K is exercised
_sm_counts: dict = {}
_counters: dict = {}


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


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


def gemv_split(N: int, K: int, block_n: int, block_w: int, programs_per_sm: float, sms: int) -> tuple[int, int]:
    """(split_k, words_per_split) giving about programs_per_sm * sms programs: K's 32-column words are cut
    into split_k slices of words_per_split words (a multiple of block_w)."""
    words = triton.cdiv(K, 32)
    want = max(1, math.ceil(programs_per_sm * sms / triton.cdiv(N, block_n)))
    words_per_split = triton.cdiv(triton.cdiv(words, min(want, triton.cdiv(words, block_w))), block_w) * block_w
    return triton.cdiv(words, words_per_split), words_per_split


def _split_counters(device: torch.device, n: int) -> Tensor:
    """int32 arrival counters, zero between launches (the last program of each output block resets its
    counter), shared by the launches on one device: concurrent split-K GEMVs on two streams of a device are
    not supported. Buffers are never freed, as a captured CUDA graph may hold one. A first use inside a graph
    capture gets a fresh zeroed buffer for that call (cached memory would be zeroed only when replayed)."""
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=device)
    buffers = _counters.setdefault(device, [])
    if buffers and buffers[-1].numel() >= n:
        return buffers[-1]
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    buffers.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


def _word_loads(packed: Tensor) -> bool:
    """The packed rows can be read as int32 words in place (a multiple of 4 bytes per row, 4-byte aligned)."""
    KB = packed.shape[1]
    return KB % 4 == 0 and packed.stride(1) == 1 and packed.stride(0) % 4 == 0 and packed.data_ptr() % 4 == 0


def _split_buffers(split_k: int, M: int, N: int, n_blocks: int, out: Tensor) -> tuple[Tensor, Tensor]:
    """The split-K GEMVs' float32 partials (split_k, M, N) and arrival counters; `out` stands in for both (never
    read) when there is one slice."""
    if split_k == 1:
        return out, out
    return (torch.empty((split_k, M, N), dtype=torch.float32, device=out.device),
            _split_counters(out.device, n_blocks))


def gemv_defaults(M: int) -> dict:
    """launch_binary_gemv keywords for M rows of x (1 <= M <= GEMV_MAX_M)."""
    return GEMV_DEFAULTS[min(bound for bound in GEMV_DEFAULTS if bound >= M)]


def launch_binary_gemv(x2: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None, out: Tensor,
                       block_n: int = 512, block_w: int = 4, programs_per_sm: float = 4, split_k: int | None = None,
                       num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """Split-K GEMV for x2 (M <= GEMV_MAX_M, in) into out (M, out_features). block_n: output rows per program;
    block_w: 32-bit words (32 columns each) per step; split_k: K slices (None: about programs_per_sm programs
    per multiprocessor). alpha, mu (and bias) contiguous (out_features,), out row-contiguous in x's dtype. Rows
    whose packed bytes are a multiple of 4 are read as int32 words (a view, no copy); others from bytes."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    N, KB = packed.shape
    if not 1 <= M <= GEMV_MAX_M:
        raise ValueError(f"the split-K GEMV takes 1 <= M <= {GEMV_MAX_M} rows of x; got {M}")
    for name, v in (("block_n", block_n), ("block_w", block_w)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two; got {v}")
    KW = triton.cdiv(K, 32)
    if split_k is None:
        split_k, words_per_split = gemv_split(N, K, block_n, block_w, programs_per_sm, _sm_count(x2.device))
    else:
        if not 1 <= split_k <= KW:
            raise ValueError(f"split_k must be in [1, {KW}] (the 32-column words of in_features); got {split_k}")
        words_per_split = triton.cdiv(triton.cdiv(KW, split_k), block_w) * block_w
        split_k = triton.cdiv(KW, words_per_split)
    word_loads = _word_loads(packed)
    w = packed.view(torch.int32) if word_loads else packed
    n_blocks = triton.cdiv(N, block_n)
    parts, counters = _split_buffers(split_k, M, N, n_blocks, out)
    _binary_splitk_gemv_kernel[(n_blocks, split_k)](
        x2, w, alpha, mu, bias if bias is not None else alpha, out, parts, counters,
        M, N, K, KB, KW, words_per_split, split_k,
        x2.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, WORD_LOADS=word_loads, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n,
        BLOCK_W=block_w, SPLIT=split_k > 1, num_warps=num_warps, num_stages=num_stages,
    )
    return out


LUT_GROUPS_PER_PROGRAM = 64     # nibble tables built per program of _nibble_lut_kernel


def launch_binary_lut_gemv(x2: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None, out: Tensor,
                           block_n: int = 128, block_w: int = 4, programs_per_sm: float = 4, num_warps: int = 4,
                           num_stages: int = 3) -> Tensor:
    """The nibble-table GEMV (_binary_lut_gemv_kernel) for one row of x: two launches, the tables of x (16 floats
    per 4 columns, 16 bytes per column: 229 KB at 14336 inputs) then the GEMV over the packed words. Rows whose
    packed bytes are not a multiple of 4 are refused (ValueError: the int32 view is what the lanes load)."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    N, KB = packed.shape
    if M != 1:
        raise ValueError(f"the nibble-table GEMV takes one row of x; got {M}")
    if not _word_loads(packed):
        raise ValueError(f"the nibble-table GEMV reads int32 words: packed rows of a multiple of 4 bytes; got {KB}")
    KW = KB // 4
    groups = KW * 8
    lut = torch.empty(groups, 16, dtype=torch.float32, device=x2.device)
    _nibble_lut_kernel[(triton.cdiv(groups, LUT_GROUPS_PER_PROGRAM),)](x2, lut, K, groups,
                                                                       BLOCK_G=LUT_GROUPS_PER_PROGRAM)
    split_k, words_per_split = gemv_split(N, KW * 32, block_n, block_w, programs_per_sm, _sm_count(x2.device))
    w = packed.view(torch.int32)
    n_blocks = triton.cdiv(N, block_n)
    parts, counters = _split_buffers(split_k, 1, N, n_blocks, out)
    _binary_lut_gemv_kernel[(n_blocks, split_k)](
        lut, w, alpha, mu, bias if bias is not None else alpha, out, parts, counters,
        N, KW, words_per_split, split_k, w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT=split_k > 1, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def binary_linear_triton(x: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None,
                         in_features: int, tiling: str | None = None, out: Tensor | None = None) -> Tensor:
    """Same contract as rewriter::binary_linear. tiling: "splitk" (the split-K GEMV, M <= GEMV_MAX_M), "lut" (the
    nibble-table GEMV, M = 1, untimed: not a default), "bitplane", "decode", "prefill" or None (splitk for M <=
    GEMV_DISPATCH_MAX_M, decode up to GEMV_MAX_M, prefill above; splitk with gemv_defaults(M)). out: optional
    (M, out_features) buffer in x's dtype to write into."""
    if x.shape[-1] != in_features or packed.dim() != 2 or packed.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"x (..., {in_features}) and packed (out, {(in_features + 7) // 8}) expected; "
                         f"got x {tuple(x.shape)}, packed {tuple(packed.shape)}")
    if tiling is not None and tiling not in ("splitk", "lut") and tiling not in _TILINGS:
        raise ValueError(f"tiling must be one of {sorted(['splitk', 'lut', *_TILINGS])} or None; got {tiling!r}")
    N = packed.shape[0]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a row-contiguous ({M}, {N}) {x.dtype} tensor; got {tuple(out.shape)} {out.dtype}")
    if tiling == "splitk" and M > GEMV_MAX_M:
        raise ValueError(f"tiling 'splitk' takes at most {GEMV_MAX_M} rows of x; got {M}")
    if M > 0:
        if tiling is None:
            tiling = "splitk" if M <= GEMV_DISPATCH_MAX_M else "decode" if M <= GEMV_MAX_M else "prefill"
        args = (x2, packed.contiguous(), alpha.contiguous(), mu.contiguous(), bias, out)
        if tiling == "splitk":
            launch_binary_gemv(*args, **gemv_defaults(M))
        elif tiling == "lut":
            launch_binary_lut_gemv(*args)
        else:
            launch_binary_linear(*args, *_TILINGS[tiling])
    return out.reshape(*x.shape[:-1], N)
