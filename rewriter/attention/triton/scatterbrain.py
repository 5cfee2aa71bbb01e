"""Scatterbrain forward (sparse + low rank), the CUDA form of ``lowrank_attention.sparse_plus_lowrank_attention``.

The weight is exp(scale q.k) on the support S (window band + sinks, causal, padding) and phi(q).phi(k) elsewhere:

    num_i = e^(r_i - m_i) lowrank_num_i + sum_{j in S} (e^(s_ij - m_i) - e^(r_i - m_i) phi_q_i.phi_k_j) v_j

(den the same with v_j = 1), where lowrank_* comes from the chunked linear kernel over every allowed key,
r_i = log_phi_q_i + log_phi_k (the features' log offsets) and m_i = max(r_i, max_{j in S} s_ij) keeps every
exponent <= 0. One program per (query block, batch x head) walks the band's key blocks once with m_i kept online
(flash style: the correction accumulators are rescaled by e^(m_old - m_new) whenever m grows, starting from
m = r_i), then combines with the low-rank terms. Rows with den <= 0 give 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._contract import check_qkv, window_extents
from ..block_sparse import num_blocks
from ..block_sparse import band_layout
from .linear_attention import chunked_linear_attention


@triton.jit
def _scatterbrain_fwd(
    q_ptr, k_ptr, v_ptr, pq_ptr, pk_ptr, rlog_ptr, lnum_ptr, lden_ptr, o_ptr, idx_ptr, cnt_ptr, kmask_ptr,
    H, GROUP, Lq, Lk, D, DV, F, scale, window_left, window_right, sinks,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, spq_b, spq_h, spq_l, spk_b, spk_h, spk_l,
    sr_b, sr_h, sn_b, sn_h, sn_l, sd_b, sd_h, so_b, so_h, so_l, si_q, skm_b,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_f = tl.arange(0, BLOCK_F)
    m_valid = offs_m < Lq
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :],
                mask=m_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    pq = tl.load(pq_ptr + b * spq_b + h * spq_h + offs_m[:, None] * spq_l + offs_f[None, :],
                 mask=m_valid[:, None] & (offs_f[None, :] < F), other=0.0)
    r = tl.load(rlog_ptr + b * sr_b + h * sr_h + offs_m, mask=m_valid, other=0.0)
    q_pos = offs_m + (Lk - Lq)

    m_i = r
    acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    count = tl.load(cnt_ptr + qb)
    for t in range(0, count):
        kb = tl.load(idx_ptr + qb * si_q + t)
        offs_k = kb * BLOCK + offs_n
        k_valid = offs_k < Lk
        if HAS_KEY_MASK:
            k_valid = k_valid & (tl.load(kmask_ptr + b * skm_b + offs_k, mask=k_valid, other=0) != 0)
        k = tl.load(k_ptr + b * sk_b + hk * sk_h + offs_k[:, None] * sk_l + offs_d[None, :],
                    mask=k_valid[:, None] & (offs_d[None, :] < D), other=0.0)
        pk = tl.load(pk_ptr + b * spk_b + hk * spk_h + offs_k[:, None] * spk_l + offs_f[None, :],
                     mask=k_valid[:, None] & (offs_f[None, :] < F), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        phi_dot = tl.dot(pq, tl.trans(pk), input_precision=DOT_PRECISION)
        in_s = k_valid[None, :] & m_valid[:, None]
        band = (offs_k[None, :] >= q_pos[:, None] - window_left) & (offs_k[None, :] <= q_pos[:, None] + window_right)
        in_s = in_s & (band | (offs_k[None, :] < sinks))
        if CAUSAL:
            in_s = in_s & (offs_k[None, :] <= q_pos[:, None])
        s = tl.where(in_s, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        rescale = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None]) - tl.exp(r - m_new)[:, None] * phi_dot
        p = tl.where(in_s, p, 0.0)
        v = tl.load(v_ptr + b * sv_b + hk * sv_h + offs_k[:, None] * sv_l + offs_dv[None, :],
                    mask=k_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        den = den * rescale + tl.sum(p, 1)
        m_i = m_new

    lowrank_weight = tl.exp(r - m_i)
    lnum = tl.load(lnum_ptr + b * sn_b + h * sn_h + offs_m[:, None] * sn_l + offs_dv[None, :],
                   mask=m_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lden = tl.load(lden_ptr + b * sd_b + h * sd_h + offs_m, mask=m_valid, other=0.0)
    num = lowrank_weight[:, None] * lnum + acc
    den = lowrank_weight * lden + den
    positive = den > 0
    out = tl.where(positive[:, None], num / tl.where(positive, den, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))


def scatterbrain_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float,
    phi_q: Tensor, phi_k: Tensor, window: int, sinks: int = 0,
    log_phi_q: Tensor | None = None, log_phi_k: Tensor | None = None, block: int = 64, num_warps: int = 4,
) -> Tensor:
    """Same contract as ``sparse_plus_lowrank_attention`` (window >= 1); (B, H, Lq, Dv) in q's dtype."""
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv, Fdim = v.shape[-1], phi_q.shape[-1]
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0 tokens; got window={window}, sinks={sinks}")
    if block < 16 or block > 128 or block & (block - 1):
        raise ValueError(f"block must be a power of two in 16..128; got {block}")
    if causal and Lk < Lq:
        raise ValueError(f"causal attention needs Lk >= Lq (bottom-right aligned); got Lq={Lq}, Lk={Lk}")
    dev = q.device
    num_lr, den_lr = chunked_linear_attention(phi_q, phi_k, v, causal, key_mask)
    rlog = torch.zeros(B, H, Lq, dtype=torch.float32, device=dev)
    if log_phi_q is not None:
        rlog = rlog + log_phi_q.float()
    if log_phi_k is not None:
        rlog = rlog + log_phi_k.float().repeat_interleave(H // Hkv, dim=1)[:, :, None]
    rlog = rlog.contiguous()
    left, right = window_extents(window, causal)
    kv_index, kv_count = band_layout(Lq, Lk, block, left, right, sinks, causal, dev)
    kv_index, kv_count = kv_index[0, 0], kv_count[0, 0]
    phi_q, phi_k = phi_q.to(q.dtype), phi_k.to(q.dtype)
    q, k, v, phi_q, phi_k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, phi_q, phi_k))
    if key_mask is not None:
        kmask = key_mask.to(torch.int8).contiguous()
        skm_b = kmask.stride(0)
    else:
        kmask, skm_b = kv_count, 0
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=dev)
    if B * H * Lq == 0:
        return out
    _scatterbrain_fwd[(num_blocks(Lq, block), B * H)](
        q, k, v, phi_q, phi_k, rlog, num_lr, den_lr, out, kv_index, kv_count, kmask,
        H, H // Hkv, Lq, Lk, D, Dv, Fdim, scale, left, right, sinks,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), phi_q.stride(0), phi_q.stride(1), phi_q.stride(2),
        phi_k.stride(0), phi_k.stride(1), phi_k.stride(2), rlog.stride(0), rlog.stride(1),
        num_lr.stride(0), num_lr.stride(1), num_lr.stride(2), den_lr.stride(0), den_lr.stride(1),
        out.stride(0), out.stride(1), out.stride(2), kv_index.stride(0), skm_b,
        BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        BLOCK_F=max(16, triton.next_power_of_2(Fdim)), CAUSAL=causal, HAS_KEY_MASK=key_mask is not None,
        DOT_PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32", num_warps=num_warps,
    )
    return out
