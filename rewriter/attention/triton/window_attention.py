"""Band attention forward in Triton: the window op's CUDA kernel (window band + sinks, causal or bidirectional,
key padding), and the sparse part of Scatterbrain and the windowed linear hybrids (low-rank sums off the band added
in the epilogue).

Same numbers as the block-sparse kernel on the window op's band layout (``block_sparse_attention.py``), built for
speed on long sequences:
- no layout tensor: a program derives its key tiles from its query positions (the sink tiles, then the band's
  tiles), so the loads of K/V do not wait on a loaded block index and the loop pipelines;
- three loops over the band: the edge tiles on either side with the token-level predicate, the interior tiles
  (every pair allowed for every row of the program) without it, as FlashAttention's causal kernels split off the
  diagonal; with a key mask a tile is interior only inside its batch row's run of real keys (``mask_span``: left or
  right padding, or a mask of all ones, as compiled programs always pass), every tile takes the predicate otherwise;
- GQA: one program takes HEADS_PER_PROGRAM query heads of one KV head (rows = heads x positions), so each K/V tile
  is loaded once for them, and with fewer positions per program the band's edge tiles waste fewer products;
- the scale goes into the exponent with one FMA (scores in log2 units), the P.V product accumulates in place.
Rows that see no key give zeros and lse = -inf, as everywhere.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._contract import check_qkv
from .block_sparse_attention import launchable, lowrank_buffers, merge_lowrank, normalised_output, pair_allowed

_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _band_step(q, k_base, v_base, s_kn, s_vn, kt, q_pos, key_ok_base, m_i, l_i, acc, qk_scale,
               window_left, window_right, sinks, Lk, offs_d, offs_dv,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SINKS: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One key tile (index kt) of the online softmax; MASKED tiles apply the token-level predicate."""
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        in_range = offs_n < Lk
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :],
                    mask=in_range[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :],
                    mask=in_range[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    elif EVEN_D:
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :])
    else:
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=offs_d[None, :] < HEAD_D, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :], mask=offs_dv[None, :] < HEAD_DV, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        key_ok = offs_n < Lk
        if HAS_MASK:
            key_ok = key_ok & (tl.load(key_ok_base + offs_n, mask=offs_n < Lk, other=0) != 0)
        allowed = pair_allowed(q_pos, offs_n, key_ok, window_left, window_right, sinks,
                               CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS)
        s = tl.where(allowed, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with no allowed key so far keep m = -inf: subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _band_fwd(
    Q, K, V, Out, Lse, KeyMask, MaskSpan, LrNum, LrDen, LrLog,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh, s_nb, s_nh, s_nm, s_mb,
    H, Hkv, group, Lq, Lk, qk_scale, window_left, window_right, sinks,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LOWRANK: tl.constexpr, LOWRANK_GAIN: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # a float argument arrives as fp64 when Inductor launches the kernel (the window_triton op inside torch.compile or
    # an AOTI package); in fp64 the running max and rescale would turn the fp32 accumulator of tl.dot into fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    POS: tl.constexpr = BLOCK_M // HEADS          # query positions per program
    EVEN_D: tl.constexpr = (PAD_D == HEAD_D) and (PAD_DV == HEAD_DV)
    qtile = tl.program_id(0)
    pid = tl.program_id(1)                         # (batch, kv head, pack of query heads)
    packs = group // HEADS
    b = pid // (Hkv * packs)
    hkv = (pid // packs) % Hkv
    h0 = hkv * group + (pid % packs) * HEADS

    rows = tl.arange(0, BLOCK_M)
    head = h0 + rows // POS
    pos = qtile * POS + rows % POS                 # query index
    row_ok = pos < Lq
    offs_d = tl.arange(0, PAD_D)
    offs_dv = tl.arange(0, PAD_DV)
    q = tl.load(Q + b * s_qb + head[:, None] * s_qh + pos[:, None] * s_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    q_pos = pos + (Lk - Lq)                        # bottom-right aligned key positions of the queries

    # the program's query positions [p_first, p_last] and the keys any of them may see
    p_first = qtile * POS + (Lk - Lq)
    p_last = tl.minimum(qtile * POS + POS, Lq) - 1 + (Lk - Lq)
    lo = 0
    if WINDOW_LEFT:
        lo = tl.maximum(p_first - window_left, 0)
    hi = Lk - 1
    if CAUSAL:
        hi = tl.minimum(hi, p_last)
    if WINDOW_RIGHT:
        hi = tl.minimum(hi, p_last + window_right)
    sink_tiles = 0
    if HAS_SINKS:
        sink_tiles = (sinks + BLOCK_N - 1) // BLOCK_N
    band_end = hi // BLOCK_N + 1                   # one past the last key tile
    sink_end = tl.minimum(sink_tiles, band_end)
    band_start = tl.maximum(lo // BLOCK_N, sink_end)
    # interior tiles: every (row, key) pair allowed, whichever row
    x = Lk - 1
    if CAUSAL:
        x = tl.minimum(x, p_first)
    if WINDOW_RIGHT:
        x = tl.minimum(x, p_first + window_right)
    in_hi = (x + 1) // BLOCK_N
    in_lo = band_start
    if WINDOW_LEFT:
        in_lo = tl.maximum(in_lo, (p_last - window_left + BLOCK_N - 1) // BLOCK_N)
    if HAS_MASK:
        # padding: tiles holding a padded key take the predicate. Where the batch row's real keys are one run (left
        # or right padding, or none) the tiles inside it stay interior, else every tile takes the predicate
        span_first = tl.load(MaskSpan + b * 3)
        span_last = tl.load(MaskSpan + b * 3 + 1)
        one_run = tl.load(MaskSpan + b * 3 + 2) != 0
        in_hi = tl.where(one_run, tl.minimum(in_hi, (span_last + 1) // BLOCK_N), in_lo)
        in_lo = tl.where(one_run, tl.maximum(in_lo, (span_first + BLOCK_N - 1) // BLOCK_N), in_lo)
    in_lo = tl.minimum(in_lo, band_end)
    in_hi = tl.minimum(tl.maximum(in_hi, in_lo), band_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, PAD_DV], tl.float32)
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    mask_base = KeyMask + b * s_mb
    for kt in range(0, sink_end):
        m_i, l_i, acc = _band_step(q, k_base, v_base, s_kn, s_vn, kt, q_pos, mask_base, m_i, l_i, acc, qk_scale,
                                   window_left, window_right, sinks, Lk, offs_d, offs_dv, True, CAUSAL, HAS_MASK,
                                   WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, BLOCK_N, HEAD_D, HEAD_DV, EVEN_D,
                                   DOT_PRECISION)
    for kt in range(band_start, in_lo):
        m_i, l_i, acc = _band_step(q, k_base, v_base, s_kn, s_vn, kt, q_pos, mask_base, m_i, l_i, acc, qk_scale,
                                   window_left, window_right, sinks, Lk, offs_d, offs_dv, True, CAUSAL, HAS_MASK,
                                   WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, BLOCK_N, HEAD_D, HEAD_DV, EVEN_D,
                                   DOT_PRECISION)
    for kt in range(in_lo, in_hi):
        m_i, l_i, acc = _band_step(q, k_base, v_base, s_kn, s_vn, kt, q_pos, mask_base, m_i, l_i, acc, qk_scale,
                                   window_left, window_right, sinks, Lk, offs_d, offs_dv, False, CAUSAL, HAS_MASK,
                                   WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, BLOCK_N, HEAD_D, HEAD_DV, EVEN_D,
                                   DOT_PRECISION)
    for kt in range(in_hi, band_end):
        m_i, l_i, acc = _band_step(q, k_base, v_base, s_kn, s_vn, kt, q_pos, mask_base, m_i, l_i, acc, qk_scale,
                                   window_left, window_right, sinks, Lk, offs_d, offs_dv, True, CAUSAL, HAS_MASK,
                                   WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, BLOCK_N, HEAD_D, HEAD_DV, EVEN_D,
                                   DOT_PRECISION)

    if HAS_LOWRANK:       # the low-rank sums over the keys off the band (Scatterbrain, the linear hybrids)
        m_i, l_i, acc = merge_lowrank(m_i, l_i, acc, LrNum, LrDen, LrLog,
                                      b * s_nb + head[:, None] * s_nh + pos[:, None] * s_nm + offs_dv[None, :],
                                      b * s_lb + head * s_lh + pos, head, row_ok,
                                      row_ok[:, None] & (offs_dv[None, :] < HEAD_DV), LOWRANK_GAIN)
    out, lse = normalised_output(m_i, l_i, acc)
    tl.store(Out + b * s_ob + head[:, None] * s_oh + pos[:, None] * s_om + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    tl.store(Lse + b * s_lb + head * s_lh + pos, lse, mask=row_ok)


# (block_m, block_n, num_warps, num_stages) by head dim for half precision; fp32 inputs (tests, tf32 off) take
# small tiles. From benchmarks/attention.py's config sweep on the H200 (attention_h200_v5.json, window 1024 + 64
# sinks, 32K and 64K): 64-row programs of one warpgroup beat 128 rows on two (1.67 vs 1.76 ms at 32K, D = 128;
# 0.96 vs 1.26 ms at D = 64), except bidirectional GQA (1.55 vs 1.58 ms). D = 256 is not measured.
CONFIGS = {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 4, 2)}
FP32_CONFIG = (32, 32, 4, 1)
MAX_HEADS_PER_PROGRAM = 4


def default_config(D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if dtype in (torch.float32, torch.float64):
        return FP32_CONFIG
    for d in sorted(CONFIGS):
        if D <= d:
            return CONFIGS[d]
    raise ValueError(f"head dims up to 256 are supported; got {D}")


# Exact attention (no band: the exact_triton op of compiled programs, and the eager exact op where SDPA has no flash
# path) on the same kernel, from benchmarks/attention.py --ops exact on the H100 (attention_exact_h100.json, 32K,
# 32 query / 8 KV heads, bf16): 128-row programs beat the band's 64 (D = 64, causal: 9.82 vs 11.91 ms, cuDNN 9.51;
# not causal 19.27 vs 20.18; D = 128 (128, 128, 8, 3), causal: 16.81 vs 18.23, not causal 31.92 vs 35.07).
EXACT_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 128, 8, 3)}


def exact_config(D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """The tiles of attention over every key (no band) for head dim D."""
    if dtype in (torch.float32, torch.float64):
        return FP32_CONFIG
    return next((EXACT_CONFIGS[d] for d in sorted(EXACT_CONFIGS) if D <= d), None) or default_config(D, dtype)


def heads_per_program(group: int, block_m: int, limit: int = MAX_HEADS_PER_PROGRAM) -> int:
    """The largest power of two dividing the GQA group, at most `limit`, leaving >= 16 positions per program."""
    h = 1
    while h * 2 <= limit and group % (h * 2) == 0 and block_m // (h * 2) >= 16:
        h *= 2
    return h


def mask_span(key_mask: Tensor) -> Tensor:
    """(B, 3) int32 per batch row of the (B, Lk) key mask: its first and last real key (Lk and -1 when none) and 1
    when the real keys between them are all real (one run: left, right or no padding), else 0. Traceable with
    symbolic lengths (no reduction over an empty dim: a sentinel column)."""
    real = key_mask.to(torch.bool)
    B, Lk = real.shape
    idx = torch.arange(Lk, device=real.device, dtype=torch.int32).expand(B, Lk)
    first = torch.cat([torch.where(real, idx, Lk), torch.full((B, 1), Lk, dtype=torch.int32, device=real.device)],
                      1).amin(1)
    last = torch.cat([torch.where(real, idx, -1), torch.full((B, 1), -1, dtype=torch.int32, device=real.device)],
                     1).amax(1)
    one_run = real.sum(1, dtype=torch.int32) == last - first + 1
    return torch.stack([first, last, one_run.to(torch.int32)], 1).contiguous()


def band_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float,
    window_left: int, window_right: int, sinks: int = 0,
    lowrank: tuple[Tensor, Tensor, Tensor] | None = None, config: tuple[int, int, int, int] | None = None,
    heads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) float32) of attention over the band
    [q - window_left, q + window_right] (-1: unlimited on that side) plus the first `sinks` keys, causal and key
    padding applied, queries bottom-right aligned (positions arange(Lq) + Lk - Lq): the block-sparse kernel's result
    on ``band_layout``. lowrank: as ``block_sparse_attention``'s. config = (block_m, block_n, num_warps, num_stages);
    heads = query heads per program (a divisor of the GQA group; default ``heads_per_program``)."""
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv = v.shape[-1]
    if max(D, Dv) > 256:
        raise ValueError(f"head dims up to 256 are supported; got D={D}, Dv={Dv}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0; got {sinks}")
    block_m, block_n, warps, stages = config or default_config(max(D, Dv), q.dtype)
    group = H // Hkv
    heads = heads or heads_per_program(group, block_m)
    if group % heads or block_m % heads or block_m // heads < 1:
        raise ValueError(f"heads per program must divide the GQA group ({group}) and block_m ({block_m}); got {heads}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else out
    span = mask_span(key_mask) if key_mask is not None else out
    lr_num, lr_den, lr_log = lowrank_buffers(lowrank, (B, H, Lq, Dv), lse)
    positions = block_m // heads
    grid = (triton.cdiv(Lq, positions), B * Hkv * (group // heads))
    launchable(_band_fwd)[grid](
        q, k, v, out, lse, mask, span, lr_num, lr_den, lr_log,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), *(lr_num.stride()[:3] if lowrank is not None else (0, 0, 0)),
        mask.stride(0) if key_mask is not None else 0,
        H, Hkv, group, Lq, Lk, scale * _LOG2E, window_left, window_right, sinks,
        CAUSAL=causal, HAS_MASK=key_mask is not None, HAS_LOWRANK=lowrank is not None,
        LOWRANK_GAIN=lowrank is not None and lowrank[2].dim() == 1,
        WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=window_right >= 0, HAS_SINKS=sinks > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, HEADS=heads, HEAD_D=D, HEAD_DV=Dv,
        PAD_D=max(16, triton.next_power_of_2(D)), PAD_DV=max(16, triton.next_power_of_2(Dv)),
        DOT_PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out, lse
