"""Chunked linear attention (forward): the CUDA core of performer / linear / hedgehog attention and of Scatterbrain's
low-rank part.

Computes, like ``rewriter.attention.feature_map.linear_attention_core``,
    num_i = sum over allowed j of (phi_q_i . phi_k_j) v_j,   den_i = sum over allowed j of phi_q_i . phi_k_j
in fp32, with allowed = causal (j <= i + Lk - Lq) and padding, and optionally the normalised output num / den
(0 where den <= 0) in the features' dtype. Never builds Lq x Lk.

Two kernels, as chunked linear attention is computed in Lightning Attention-2 and fla's chunk kernels:
1. `_chunk_states`, one program per (batch x kv head, feature tile, value tile, segment): the prefix states
   S_c = sum_{j < cC} phi_k_j^T v_j (F x Dv) and z_c = sum_{j < cC} phi_k_j, c = 0 .. NC, are cut into segments
   of chunks walked in parallel, in two passes: the first stores each segment's total (fp32), PyTorch turns them
   into the carry into each segment (their running sum), the second walks each segment again from its carry and
   stores every prefix state (features' dtype) before adding a chunk (one (F x C) x (C x Dv) product each).
   With 32 walks (kv heads x tiles) one serial walk measured 0.70 ms against 0.43 ms cut (causal, L = 32K, D = 64,
   H200, attention_h200_v4.json). Bidirectional needs only the totals.
2. `_chunk_output`, one program per (query chunk, batch x query head, value tile), all in parallel: query row i sits
   at key-aligned position p = i + Lk - Lq; it reads the prefix state of the chunk holding its threshold and adds
   masked (C x C) products with the (at most two) key chunks the thresholds of its chunk fall in. Query head h
   reads kv head h // (H / Hkv): grouped heads never expand K/V.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _chunk_states(
    pk_ptr, v_ptr, kmask_ptr, s_ptr, z_ptr, seg_ptr, segz_ptr,
    HKV, Lk, F, DV, NC, key_start, CPS, N_DV,
    sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, skm_b, ss_bh, ss_c, ss_f, sz_bh, sz_c, sg_bh, sg_s, sg_f, sgz_bh, sgz_s,
    CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREFIXES: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Segment `seg` of the state indices 0 .. NC (chunks seg CPS .. (seg + 1) CPS - 1). Without PREFIXES (first
    pass) the segment's total of phi_k_j^T v_j and phi_k_j over keys key_start <= j goes to seg_ptr / segz_ptr
    (fp32). With PREFIXES (second pass) seg_ptr / segz_ptr hold the carry into each segment (the running sum of
    the totals before it): the walk starts from it and stores the prefix state before each chunk."""
    bh = tl.program_id(0)
    fb = tl.program_id(1) // N_DV
    db = tl.program_id(1) % N_DV
    seg = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    offs_c = tl.arange(0, CHUNK)
    offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_dv = db * BLOCK_DV + tl.arange(0, BLOCK_DV)
    f_valid = offs_f < F
    dv_valid = offs_dv < DV
    fd_valid = f_valid[:, None] & dv_valid[None, :]
    # z once per feature tile (value tile 0). A block comparison, not `f_valid & (db == 0)`: a scalar folded into a
    # block mask becomes an int32 mask in triton's interpreter, which loads and stores reject.
    z_valid = f_valid & ((offs_f * 0 + db) == 0)
    pk_base = pk_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    s_base = s_ptr + bh * ss_bh + offs_f[:, None] * ss_f + offs_dv[None, :]
    z_base = z_ptr + bh * sz_bh + offs_f
    seg_at = seg_ptr + bh * sg_bh + seg * sg_s + offs_f[:, None] * sg_f + offs_dv[None, :]
    segz_at = segz_ptr + bh * sgz_bh + seg * sgz_s + offs_f
    if PREFIXES:
        state = tl.load(seg_at, mask=fd_valid, other=0.0)
        z = tl.load(segz_at, mask=f_valid, other=0.0)
    else:
        state = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
        z = tl.zeros([BLOCK_F], tl.float32)
    first = seg * CPS
    for c in range(first, tl.minimum(first + CPS, NC + 1)):
        if PREFIXES:
            tl.store(s_base + c * ss_c, state.to(s_ptr.dtype.element_ty), mask=fd_valid)
            tl.store(z_base + c * sz_c, z, mask=z_valid)
        keys = c * CHUNK + offs_c
        k_valid = (keys < Lk) & (keys >= key_start)          # also empty for c = NC
        if HAS_KEY_MASK:
            k_valid = k_valid & (tl.load(kmask_ptr + b * skm_b + keys, mask=k_valid, other=0) != 0)
        pk = tl.load(pk_base + keys[:, None] * sk_l + offs_f[None, :], mask=k_valid[:, None] & f_valid[None, :],
                     other=0.0)
        v = tl.load(v_base + keys[:, None] * sv_l + offs_dv[None, :], mask=k_valid[:, None] & dv_valid[None, :],
                    other=0.0)
        state += tl.dot(tl.trans(pk), v, input_precision=DOT_PRECISION)
        z += tl.sum(pk.to(tl.float32), 0)
    if not PREFIXES:
        tl.store(seg_at, state, mask=fd_valid)
        tl.store(segz_at, z, mask=z_valid)


@triton.jit
def _prefix_term(pq, t, t_min, pk_base, v_base, kmask_base, s_base, z_base, ss_c, sz_c, sk_l, sv_l, Lk, NC, key_start, offs_c, offs_f, offs_dv, f_valid, dv_valid,
                 CHUNK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(num, den) of each query row over the keys key_start <= j <= t_row, for rows whose thresholds t run from t_min
    to t_min + CHUNK - 1: the stored state of the chunk holding t_min, plus masked products with the (at most two)
    key chunks the thresholds fall in."""
    first = tl.minimum(tl.maximum(t_min, 0) // CHUNK, NC)
    state = tl.load(s_base + first * ss_c, mask=f_valid[:, None] & dv_valid[None, :], other=0.0)
    z = tl.load(z_base + first * sz_c, mask=f_valid, other=0.0)
    num = tl.dot(pq, state.to(pq.dtype), input_precision=DOT_PRECISION)
    den = tl.sum(pq.to(tl.float32) * z[None, :], 1)
    t_max = t_min + CHUNK - 1
    last = tl.minimum(tl.where(t_max >= 0, t_max // CHUNK, -1), NC - 1)
    for kc in range(first, last + 1):
        keys = kc * CHUNK + offs_c
        k_valid = (keys < Lk) & (keys >= key_start)
        if HAS_KEY_MASK:
            k_valid = k_valid & (tl.load(kmask_base + keys, mask=k_valid, other=0) != 0)
        pk = tl.load(pk_base + keys[:, None] * sk_l + offs_f[None, :], mask=k_valid[:, None] & f_valid[None, :],
                     other=0.0)
        v = tl.load(v_base + keys[:, None] * sv_l + offs_dv[None, :], mask=k_valid[:, None] & dv_valid[None, :],
                    other=0.0)
        scores = tl.dot(pq, tl.trans(pk), input_precision=DOT_PRECISION)
        scores = tl.where(keys[None, :] <= t[:, None], scores, 0.0)
        num += tl.dot(scores.to(pq.dtype), v, input_precision=DOT_PRECISION)
        den += tl.sum(scores, 1)
    return num, den


@triton.jit
def _chunk_output(
    pq_ptr, pk_ptr, v_ptr, kmask_ptr, s_ptr, z_ptr, out_ptr, num_ptr, den_ptr,
    H, GROUP, Lq, Lk, F, DV, NC, key_start, lag_a, lag_b,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, skm_b, ss_bh, ss_c, ss_f, sz_bh, sz_c,
    so_b, so_h, so_l, sn_b, sn_h, sn_l, sd_b, sd_h,
    CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr, MODE: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, NORMALISE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One chunk of query rows. Keys are allowed from key_start on (and by the key mask); with p = i + Lk - Lq the
    query's key-aligned position, MODE 0 (causal, lag_a = 0) sums keys j <= p - lag_a, MODE 1 every key, MODE 2 the
    keys outside [p - lag_a + 1, p - lag_b] (every key, plus those j <= p - lag_a, minus those j <= p - lag_b)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    db = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    bhk = b * (H // GROUP) + hk
    offs_c = tl.arange(0, CHUNK)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = db * BLOCK_DV + tl.arange(0, BLOCK_DV)
    f_valid = offs_f < F
    dv_valid = offs_dv < DV
    rows = c * CHUNK + offs_c
    r_valid = rows < Lq
    pq = tl.load(pq_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + offs_f[None, :],
                 mask=r_valid[:, None] & f_valid[None, :], other=0.0)
    pk_base = pk_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    kmask_base = kmask_ptr + b * skm_b
    s_base = s_ptr + bhk * ss_bh + offs_f[:, None] * ss_f + offs_dv[None, :]
    z_base = z_ptr + bhk * sz_bh + offs_f
    pos = rows + (Lk - Lq)
    p_min = c * CHUNK + (Lk - Lq)
    args = (pk_base, v_base, kmask_base, s_base, z_base, ss_c, sz_c, sk_l, sv_l, Lk, NC, key_start, offs_c, offs_f,
            offs_dv, f_valid, dv_valid)
    if MODE == 0:
        num, den = _prefix_term(pq, pos - lag_a, p_min - lag_a, *args, CHUNK, HAS_KEY_MASK, DOT_PRECISION)
    else:
        state = tl.load(s_base + NC * ss_c, mask=f_valid[:, None] & dv_valid[None, :], other=0.0)
        z = tl.load(z_base + NC * sz_c, mask=f_valid, other=0.0)
        num = tl.dot(pq, state.to(pq.dtype), input_precision=DOT_PRECISION)
        den = tl.sum(pq.to(tl.float32) * z[None, :], 1)
        if MODE == 2:
            num_a, den_a = _prefix_term(pq, pos - lag_a, p_min - lag_a, *args, CHUNK, HAS_KEY_MASK, DOT_PRECISION)
            num_b, den_b = _prefix_term(pq, pos - lag_b, p_min - lag_b, *args, CHUNK, HAS_KEY_MASK, DOT_PRECISION)
            num += num_a - num_b
            den += den_a - den_b
    if NORMALISE:
        positive = den > 0
        out = tl.where(positive[:, None], num / tl.where(positive, den, 1.0)[:, None], 0.0)
        tl.store(out_ptr + b * so_b + h * so_h + rows[:, None] * so_l + offs_dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=r_valid[:, None] & dv_valid[None, :])
    else:
        tl.store(num_ptr + b * sn_b + h * sn_h + rows[:, None] * sn_l + offs_dv[None, :], num,
                 mask=r_valid[:, None] & dv_valid[None, :])
        # Only the first value tile writes den. A scalar `if`, not `r_valid & (db == 0)`: a scalar comparison folded
        # into a block mask becomes an int32 mask in triton 3.9's interpreter, which loads and stores reject.
        if db == 0:
            tl.store(den_ptr + b * sd_b + h * sd_h + rows, den, mask=r_valid)


MAX_FEATURES = 256      # the output kernel holds a query chunk's whole feature row (C x F) in registers


def chunked_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, key_mask: Tensor | None = None,
                             chunk: int = 64, normalise: bool = False, outside: tuple[int, int, int] | None = None,
                             num_warps: int = 4, segments: int | None = None,
                             output_stages: int = 2) -> tuple[Tensor, Tensor] | Tensor:
    """(num (B, H, Lq, Dv) fp32, den (B, H, Lq) fp32) of linear attention; phi_q (B, H, Lq, F), phi_k (B, Hkv, Lk, F),
    v (B, Hkv, Lk, Dv); query head h reads kv head h // (H // Hkv). The caller divides (den <= 0 -> 0); with
    normalise=True the kernel does, and returns num / den (0 where den <= 0) in phi_q's dtype.

    outside=(left, right, sinks): sum only over the allowed keys outside a window support, the low-rank part of
    Scatterbrain / the linear hybrids: keys j with j < p - left or j > p + right (p = i + Lk - Lq; causal has
    right = 0 and no j > p) and j >= sinks.

    output_stages: the output kernel's software-pipeline depth. Its key loop has one or two iterations, so the
    buffers of 3 stages (Triton's default) buy little and hold 144 KiB of shared memory at F = Dv = 128: one program
    per SM (benchmarks/results/kernel_resources_sm90.json). 2 stages on the H200 (linear_stages_h200.json, causal,
    D = 128): 1.12 -> 0.95 ms at 32K with 32 kv heads, 0.82 -> 0.63 ms with 8; at 16K 0.58 -> 0.49 ms, but 0.41 ->
    0.44 ms with 8 kv heads."""
    if phi_q.dim() != 4 or phi_k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"phi_q, phi_k, v must be 4-D; got {tuple(phi_q.shape)}, {tuple(phi_k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Lq, F = phi_q.shape
    Hkv, Lk, Dv = phi_k.shape[1], phi_k.shape[2], v.shape[-1]
    if phi_k.shape[0] != B or phi_k.shape[3] != F or tuple(v.shape[:3]) != (B, Hkv, Lk) or H % Hkv:
        raise ValueError(f"incompatible phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, v {tuple(v.shape)}")
    if causal and Lk < Lq:
        raise ValueError(f"causal linear attention needs Lk >= Lq (bottom-right aligned); got Lq={Lq}, Lk={Lk}")
    if key_mask is not None and tuple(key_mask.shape) != (B, Lk):
        raise ValueError(f"key_mask must be (B, Lk) = ({B}, {Lk}); got {tuple(key_mask.shape)}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16; got {chunk}")
    if outside is not None and (min(outside) < 0 or (causal and outside[1] != 0)):
        raise ValueError(f"outside must be (left >= 0, right >= 0, sinks >= 0), right 0 when causal; got {outside}")
    if F > MAX_FEATURES:
        # num and den are sums over features: wider maps (taylor2: 1 + D + D^2) run in feature slices, summed
        num, den = (sum(parts) for parts in zip(*(
            chunked_linear_attention(phi_q[..., f:f + MAX_FEATURES], phi_k[..., f:f + MAX_FEATURES], v, causal,
                                     key_mask, chunk, outside=outside, num_warps=num_warps, segments=segments)
            for f in range(0, F, MAX_FEATURES))))
        if not normalise:
            return num, den
        positive = den > 0
        return torch.where(positive[..., None], num / torch.where(positive, den, 1.0)[..., None],
                           0.0).to(phi_q.dtype)
    dev = phi_q.device
    # One dtype for the tensor-core products: v follows the features.
    v = v.to(phi_q.dtype)
    phi_k = phi_k.to(phi_q.dtype)
    phi_q, phi_k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (phi_q, phi_k, v))
    if normalise:
        out = torch.empty(B, H, Lq, Dv, dtype=phi_q.dtype, device=dev)
        num = den = out
    else:
        num = torch.empty(B, H, Lq, Dv, dtype=torch.float32, device=dev)
        den = torch.empty(B, H, Lq, dtype=torch.float32, device=dev)
        out = num
    if B * H * Lq == 0:
        return out if normalise else (num.zero_(), den.zero_())
    left, right, sinks = outside if outside is not None else (0, 0, 0)
    if causal:
        mode, lag_a, lag_b = 0, (left + 1 if outside is not None else 0), 0
    else:
        mode, lag_a, lag_b = (2, left + 1, -right) if outside is not None else (1, 0, 0)
    n_chunks = max(1, triton.cdiv(Lk, chunk))
    prefixes = mode != 1
    n_index = n_chunks + 1          # state indices 0 .. n_chunks (the last is the total)
    bf, bdv = min(64, max(16, triton.next_power_of_2(F))), min(64, max(16, triton.next_power_of_2(Dv)))
    tiles = triton.cdiv(F, bf) * triton.cdiv(Dv, bdv)
    if segments is None:
        # The state walk is serial within a segment; cutting it costs a second pass over K/V. Measured on the H200
        # (attention_h200_v4.json, causal, H = 32): with 128 walks (32 kv heads x 4 tiles, D = 128) one segment was
        # faster (0.57 vs 0.68 ms at 16K); with 32 walks (8 kv heads, or D = 64) about four programs per SM were
        # (0.39 vs 0.53 ms, 0.29 vs 0.36 ms at 16K).
        # Bidirectional attention needs only the totals (one pass), so it is always cut.
        walks = B * Hkv * tiles
        segments = 1 if prefixes and walks >= 96 else max(1, min(n_index, triton.cdiv(528, walks)))
    per_segment = triton.cdiv(n_index, max(1, min(segments, n_index)))
    segments = triton.cdiv(n_index, per_segment)
    seg_s = torch.empty(B * Hkv, segments, F, Dv, dtype=torch.float32, device=dev)
    seg_z = torch.empty(B * Hkv, segments, F, dtype=torch.float32, device=dev)
    if key_mask is not None:
        kmask = key_mask.to(torch.int8).contiguous()
        skm_b = kmask.stride(0)
    else:
        kmask, skm_b = seg_z, 0
    precision = "ieee" if phi_q.dtype in (torch.float32, torch.float64) else "tf32"

    def walk(states, zs, prefixes):
        _chunk_states[(B * Hkv, tiles, segments)](
            phi_k, v, kmask, states, zs, seg_s, seg_z, Hkv, Lk, F, Dv, n_chunks, sinks, per_segment,
            triton.cdiv(Dv, bdv),
            phi_k.stride(0), phi_k.stride(1), phi_k.stride(2), v.stride(0), v.stride(1), v.stride(2), skm_b,
            states.stride(0), states.stride(1), states.stride(2), zs.stride(0), zs.stride(1),
            seg_s.stride(0), seg_s.stride(1), seg_s.stride(2), seg_z.stride(0), seg_z.stride(1),
            CHUNK=chunk, BLOCK_F=bf, BLOCK_DV=bdv, PREFIXES=prefixes, HAS_KEY_MASK=key_mask is not None,
            DOT_PRECISION=precision, num_warps=num_warps,
        )

    if prefixes:
        if segments > 1:    # segment totals, then the carry into each segment (the running sum before it)
            walk(seg_s, seg_z, False)
            seg_s.copy_(seg_s.cumsum(1) - seg_s)
            seg_z.copy_(seg_z.cumsum(1) - seg_z)
        else:
            seg_s.zero_()
            seg_z.zero_()
        # the walk again from each carry, storing every prefix state (in the features' dtype)
        states = torch.empty(B * Hkv, n_index, F, Dv, dtype=phi_q.dtype, device=dev)
        zs = torch.empty(B * Hkv, n_index, F, dtype=torch.float32, device=dev)
        walk(states, zs, True)
    else:
        walk(seg_s, seg_z, False)
        states = seg_s.sum(1, keepdim=True).to(phi_q.dtype)
        zs = seg_z.sum(1, keepdim=True)
    block_f = max(16, triton.next_power_of_2(F))
    block_dv = min(128 if block_f <= 128 else 64, max(16, triton.next_power_of_2(Dv)))
    _chunk_output[(triton.cdiv(Lq, chunk), B * H, triton.cdiv(Dv, block_dv))](
        phi_q, phi_k, v, kmask, states, zs, out, num, den, H, H // Hkv, Lq, Lk, F, Dv,
        n_chunks if prefixes else 0, sinks, lag_a, lag_b,
        phi_q.stride(0), phi_q.stride(1), phi_q.stride(2), phi_k.stride(0), phi_k.stride(1), phi_k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), skm_b, states.stride(0), states.stride(1), states.stride(2),
        zs.stride(0), zs.stride(1), out.stride(0), out.stride(1), out.stride(2),
        num.stride(0), num.stride(1), num.stride(2), 0 if normalise else den.stride(0),
        0 if normalise else den.stride(1),
        CHUNK=chunk, BLOCK_F=block_f, BLOCK_DV=block_dv, MODE=mode, HAS_KEY_MASK=key_mask is not None,
        NORMALISE=normalise, DOT_PRECISION=precision, num_warps=num_warps, num_stages=output_stages,
    )
    return out if normalise else (num, den)
