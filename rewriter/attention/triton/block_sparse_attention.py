"""Block-sparse flash attention forward in Triton: the CUDA core of every sparse attention op.

Same contract as ``rewriter.attention.block_sparse.block_sparse_attention_reference`` (layout kv_index/kv_count with
broadcastable batch/head dims, token-level predicate: padding, causal on positions, window band, sinks; score
modifications: logit softcap, then ALiBi bias). One program per (query block, batch x head) runs an online softmax
(FlashAttention-2) over the key blocks its query block lists, accumulating in fp32. The kernel block is the layout
block.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._contract import check_qkv, check_softcap
from ..block_sparse import check_alibi, num_blocks

_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def pair_allowed(q_pos, k_pos, key_ok, window_left, window_right, sinks,
                 CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SINKS: tl.constexpr):
    """The layout's token-level predicate on a (query rows, key columns) tile: padding, causal, window, sinks."""
    qp = q_pos[:, None]
    kp = k_pos[None, :]
    allowed = key_ok[None, :] & (qp == qp)
    if CAUSAL:
        allowed = allowed & (kp <= qp)
    if WINDOW_LEFT or WINDOW_RIGHT:
        in_window = kp == kp
        if WINDOW_LEFT:
            in_window = in_window & (kp >= qp - window_left)
        if WINDOW_RIGHT:
            in_window = in_window & (kp <= qp + window_right)
        if HAS_SINKS:
            in_window = in_window | (kp < sinks)
        allowed = allowed & in_window
    return allowed


@triton.jit
def softcap_log2(s, cap_log2):
    """cap * tanh(x / cap) on scores s in the kernel's log2 units (x = s / log2(e); cap_log2 = cap * log2(e)). tanh
    from exp2 (libdevice's tanh does not run in the interpreter): its absolute error, ~1e-7 of the cap, is the size
    of the fp32 rounding of scores that large."""
    a = tl.abs(s) / cap_log2
    e = tl.exp2(a * -2.8853900817779268)                   # exp(-2 |x / cap|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(s < 0, -t, t) * cap_log2


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax (FlashAttention-2), scores s in log2 units (-inf where not allowed):
    returns the running (max, sum, output accumulator) with the tile's values v added."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows that have seen no key yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def merge_lowrank(m_i, l_i, acc, LrNum, LrDen, LrLog, num_offs, row_offs, gain_offs, row_ok, num_mask,
                  LOWRANK_GAIN: tl.constexpr):
    """Scatterbrain / the linear hybrids: add the low-rank sums over the keys off the support (num, den at num_offs /
    row_offs), whose true scale is exp(r) (natural log, per row), to the running (max, sum, accumulator) in log2
    units: both parts rescaled to the larger of the two stabilisers. LOWRANK_GAIN (learned maps, LoLCATs' hybrid):
    r = the row's largest exact score (0 without one) + the head's gain at gain_offs."""
    if LOWRANK_GAIN:
        r2 = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.load(LrLog + gain_offs) * 1.4426950408889634
    else:
        r2 = tl.load(LrLog + row_offs, mask=row_ok, other=0.0) * 1.4426950408889634
    lr_num = tl.load(LrNum + num_offs, mask=num_mask, other=0.0)
    lr_den = tl.load(LrDen + row_offs, mask=row_ok, other=0.0)
    top = tl.maximum(m_i, r2)
    w_exact = tl.exp2(m_i - top)
    w_low = tl.exp2(r2 - top)
    return top, l_i * w_exact + lr_den * w_low, acc * w_exact[:, None] + lr_num * w_low[:, None]


@triton.jit
def normalised_output(m_i, l_i, acc):
    """(out, lse) from the running softmax state: zeros and lse = -inf for rows that saw no key. m_i is in log2
    units scaled by log2(e); lse is the natural log of sum exp(scale q.k)."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Lse, KvIndex, KvCount, KeyMask, QPos, KPos, Alibi, LrNum, LrDen, LrLog,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh, s_nb, s_nh, s_nm,
    s_ib, s_ih, s_iq, s_cb, s_ch, s_mb, s_qpb, s_qph, s_kpb, s_kph,
    H, group, Lq, Lk, qk_scale, window_left, window_right, sinks, cap_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LOWRANK: tl.constexpr, LOWRANK_GAIN: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)      # fp64 when Inductor launches it (see window_attention._band_fwd)
    cap_log2 = tl.cast(cap_log2, tl.float32)
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // group

    offs_m = qblock * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, PAD_D)
    offs_dv = tl.arange(0, PAD_DV)
    row_ok = offs_m < Lq
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    if HAS_POS:
        q_pos = tl.load(QPos + b * s_qpb + h * s_qph + offs_m, mask=row_ok, other=0)
    else:
        q_pos = offs_m + (Lk - Lq)

    q_first = qblock * BLOCK + (Lk - Lq)
    q_last = tl.minimum(qblock * BLOCK + BLOCK, Lq) - 1 + (Lk - Lq)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, PAD_DV], tl.float32)

    if HAS_ALIBI:
        slope = tl.load(Alibi + h) * 1.4426950408889634      # score units -> the kernel's log2 units
    count = tl.load(KvCount + b * s_cb + h * s_ch + qblock)
    index_row = KvIndex + b * s_ib + h * s_ih + qblock * s_iq
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    for slot in range(0, count):
        kblock = tl.load(index_row + slot)
        offs_n = kblock * BLOCK + tl.arange(0, BLOCK)
        key_ok = offs_n < Lk
        if HAS_MASK:
            key_ok = key_ok & (tl.load(KeyMask + b * s_mb + offs_n, mask=key_ok, other=0) != 0)
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :],
                    mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < HEAD_D), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :],
                    mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:
            s = softcap_log2(s, cap_log2)
        if HAS_ALIBI:
            if HAS_POS:
                bias_k = tl.load(KPos + b * s_kpb + h * s_kph + offs_n, mask=offs_n < Lk, other=0)
            else:
                bias_k = offs_n
            s = s + slope * (bias_k[None, :] - q_pos[:, None]).to(tl.float32)

        # Interior blocks (every pair allowed) skip the predicate; known only with default positions, no padding
        k_first = kblock * BLOCK
        k_last = k_first + BLOCK - 1
        interior = k_last < Lk
        if HAS_POS or HAS_MASK:
            interior = k_last < 0
        if CAUSAL:
            interior = interior & (k_last <= q_first)
        if WINDOW_LEFT:
            interior = interior & ((k_first >= q_last - window_left) | (k_last < sinks))
        if WINDOW_RIGHT:
            interior = interior & (k_last <= q_first + window_right)
        if not interior:
            if HAS_POS:
                k_pos = tl.load(KPos + b * s_kpb + h * s_kph + offs_n, mask=offs_n < Lk, other=0)
            else:
                k_pos = offs_n
            allowed = pair_allowed(q_pos, k_pos, key_ok, window_left, window_right, sinks,
                                   CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS)
            s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    if HAS_LOWRANK:
        row_offs = b * s_lb + h * s_lh + offs_m
        m_i, l_i, acc = merge_lowrank(m_i, l_i, acc, LrNum, LrDen, LrLog,
                                      b * s_nb + h * s_nh + offs_m[:, None] * s_nm + offs_dv[None, :], row_offs, h,
                                      row_ok, row_ok[:, None] & (offs_dv[None, :] < HEAD_DV), LOWRANK_GAIN)
    out, lse = normalised_output(m_i, l_i, acc)
    tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    tl.store(Lse + b * s_lb + h * s_lh + offs_m, lse, mask=row_ok)


def launchable(kernel):
    """`kernel` through ``torch.library.wrap_triton``, so that a ``torch.library.triton_op`` launching it is traced by
    Inductor and compiled into an AOTInductor package (outside tracing it launches as usual); the interpreter's
    kernels (TRITON_INTERPRET=1) are launched as they are."""
    from triton.runtime.jit import JITFunction
    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def _broadcast_strides(x: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    if x.dim() != len(shape) or any(s not in (1, t) for s, t in zip(x.shape, shape)):
        raise ValueError(f"{name} must broadcast to {shape}; got {tuple(x.shape)}")
    return x.expand(shape)


def lowrank_buffers(lowrank: tuple[Tensor, Tensor, Tensor] | None, shape: tuple[int, int, int, int],
                    dummy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (num, den, log) low-rank sums as the kernels read them: fp32, contiguous (den and log then share lse's
    strides); `dummy` three times when absent."""
    if lowrank is None:
        return dummy, dummy, dummy
    B, H, Lq, Dv = shape
    lr_num, lr_den, lr_log = lowrank
    if tuple(lr_num.shape) != (B, H, Lq, Dv) or tuple(lr_den.shape) != (B, H, Lq) or \
            tuple(lr_log.shape) not in ((B, H, Lq), (H,)):
        raise ValueError(f"lowrank must be (num (B, H, Lq, Dv), den (B, H, Lq), log (B, H, Lq) or (H,)) = "
                         f"({(B, H, Lq, Dv)}, ...); got {[tuple(x.shape) for x in lowrank]}")
    return lr_num.float().contiguous(), lr_den.float().contiguous(), lr_log.float().contiguous()


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, kv_count: Tensor, block: int,
    key_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
    window_left: int = -1, window_right: int = -1, sinks: int = 0,
    q_pos: Tensor | None = None, k_pos: Tensor | None = None, alibi: Tensor | None = None, softcap: float = 0.0,
    lowrank: tuple[Tensor, Tensor, Tensor] | None = None, num_warps: int | None = None, num_stages: int = 2,
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) float32; -inf and zeros where a row saw no key).

    lowrank=(num (B, H, Lq, Dv), den (B, H, Lq), r), fp32: weights off the layout's support (Scatterbrain, the
    linear hybrids) whose true sums are exp(r) num and exp(r) den; the output is then (sum over the support of
    e^s v + e^r num) / (sum of e^s + e^r den), 0 where that denominator is 0. r is a (B, H, Lq) log scale, or an
    (H,) gain g: then r = the row's largest score over the support (0 if none) + g_h (learned maps' hybrid)."""
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    check_alibi(alibi, H)
    check_softcap(softcap)
    Dv = v.shape[-1]
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 for the Triton kernel; got {block}")
    if max(D, Dv) > 256:
        raise ValueError(f"head dims up to 256 are supported; got D={D}, Dv={Dv}")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos and k_pos must be given together (or neither)")
    scale = D ** -0.5 if scale is None else scale
    nqb = num_blocks(Lq, block)
    if kv_index.dim() != 4 or kv_index.shape[2] != nqb:
        raise ValueError(f"kv_index must be (B or 1, H or 1, {nqb}, K); got {tuple(kv_index.shape)}")
    K_slots = kv_index.shape[-1]
    kv_index = _broadcast_strides(kv_index.to(torch.int32), (B, H, nqb, K_slots), "kv_index")
    kv_count = _broadcast_strides(kv_count.to(torch.int32), (B, H, nqb), "kv_count")
    if kv_index.stride(3) != 1:
        kv_index = kv_index.contiguous()
    if kv_count.stride(2) != 1:
        kv_count = kv_count.contiguous()

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else out  # dummy pointer when absent
    if q_pos is not None:
        qp = _broadcast_strides(q_pos.to(torch.int32), (B, H, Lq), "q_pos")
        kp = _broadcast_strides(k_pos.to(torch.int32), (B, H, Lk), "k_pos")
        qp = qp if qp.stride(2) == 1 else qp.contiguous()
        kp = kp if kp.stride(2) == 1 else kp.contiguous()
    else:
        qp = kp = lse
    slopes = alibi.to(device=q.device, dtype=torch.float32).contiguous() if alibi is not None else lse
    lr_num, lr_den, lr_log = lowrank_buffers(lowrank, (B, H, Lq, Dv), lse)
    grid = (nqb, B * H)
    launchable(_block_sparse_fwd)[grid](
        q, k, v, out, lse, kv_index, kv_count, mask, qp, kp, slopes, lr_num, lr_den, lr_log,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), *(lr_num.stride()[:3] if lowrank is not None else (0, 0, 0)),
        kv_index.stride(0), kv_index.stride(1), kv_index.stride(2), kv_count.stride(0), kv_count.stride(1),
        mask.stride(0) if key_mask is not None else 0,
        qp.stride(0) if q_pos is not None else 0, qp.stride(1) if q_pos is not None else 0,
        kp.stride(0) if q_pos is not None else 0, kp.stride(1) if q_pos is not None else 0,
        H, H // Hkv, Lq, Lk, scale * _LOG2E, window_left, window_right, sinks, float(softcap) * _LOG2E,
        CAUSAL=causal, HAS_MASK=key_mask is not None, HAS_POS=q_pos is not None, HAS_ALIBI=alibi is not None,
        HAS_SOFTCAP=softcap > 0, HAS_LOWRANK=lowrank is not None,
        LOWRANK_GAIN=lowrank is not None and lowrank[2].dim() == 1,
        WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=window_right >= 0, HAS_SINKS=sinks > 0,
        BLOCK=block, HEAD_D=D, HEAD_DV=Dv,
        PAD_D=max(16, triton.next_power_of_2(D)), PAD_DV=max(16, triton.next_power_of_2(Dv)),
        DOT_PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        num_warps=num_warps or (4 if block <= 64 else 8), num_stages=num_stages,
    )
    return out, lse
