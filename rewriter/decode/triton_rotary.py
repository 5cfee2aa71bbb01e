"""rewriter::rotary on CUDA: x * cos + rotate_half(x) * sin in one Triton kernel (decode/rotary.py).

A program takes BLOCK_R rows (b, h, l) of x (B, H, L, D), any strides, and cos / sin expanded to x's shape (stride 0
on their broadcast dims). It rounds as the aten ops do: both products rounded to the result dtype, then their sum
(no FMA contraction; bf16 rounded by its bits, linear/triton/fused._rounded, as the interpreter truncates its casts),
so the result equals the reference bit for bit."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..linear.triton.fused import _gdc_wait, _rounded, pdl_launch

BLOCK_R = 16


@triton.jit
def _rotated(X, C, S, b, h, pos, ok, j, Idx, s_ih, GROUP,
             s_xb, s_xh, s_xl, s_xd, s_cb, s_ch, s_cl, s_cd, s_sb, s_sh, s_sl, s_sd,
             D: tl.constexpr, HAS_IDX: tl.constexpr, DT: tl.constexpr):
    """Channels j of rows (b, h, pos) of rotary(x): channel idx[h // GROUP, j] with HAS_IDX (ThinK's kept
    channels), else j; fp32 values rounded to DT as the aten ops round (each product, then the sum)."""
    if HAS_IDX:
        d = tl.load(Idx + (h // GROUP)[:, None] * s_ih + j[None, :], mask=ok, other=0)
    else:
        d = j[None, :] + 0 * h[:, None]
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)
    x_row = (b * s_xb + h * s_xh + pos * s_xl)[:, None]
    x = tl.load(X + x_row + d * s_xd, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(X + x_row + partner * s_xd, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + (b * s_cb + h * s_ch + pos * s_cl)[:, None] + d * s_cd, mask=ok, other=0.0)
    s = tl.load(S + (b * s_sb + h * s_sh + pos * s_sl)[:, None] + d * s_sd, mask=ok, other=0.0)
    rot = tl.where(d < half, -xp, xp)                                  # rotate_half (negation is exact)
    first = _rounded(x * c.to(tl.float32), DT)                         # each product in the result dtype,
    second = _rounded(rot * s.to(tl.float32), DT)
    return _rounded(first + second, DT)                                # then their sum


@triton.jit
def _rotary_kernel(X, C, S, Y, Idx, R, H, L, GROUP, s_ih,
                   s_xb, s_xh, s_xl, s_xd, s_cb, s_ch, s_cl, s_cd, s_sb, s_sh, s_sl, s_sd,
                   D: tl.constexpr, DK: tl.constexpr, PAD_DK: tl.constexpr, HAS_IDX: tl.constexpr,
                   BLOCK_R: tl.constexpr, USE_GDC: tl.constexpr):
    """Rows (b, h, l) of x (B, H, L, D) rotated into Y (B, H, L, DK): all D channels, or with HAS_IDX the DK channels
    idx[h // GROUP] (rotary then ThinK's gather of the kept channels, one kernel)."""
    if USE_GDC:
        _gdc_wait()
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // (H * L)
    h = (rows // L) % H
    pos = rows % L
    j = tl.arange(0, PAD_DK)
    ok = (rows < R)[:, None] & (j < DK)[None, :]
    y = _rotated(X, C, S, b, h, pos, ok, j, Idx, s_ih, GROUP, s_xb, s_xh, s_xl, s_xd, s_cb, s_ch, s_cl, s_cd,
                 s_sb, s_sh, s_sl, s_sd, D, HAS_IDX, Y.dtype.element_ty)
    tl.store(Y + rows[:, None] * DK + j[None, :], y.to(Y.dtype.element_ty), mask=ok)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def rotary_triton(x: Tensor, cos: Tensor, sin: Tensor, channels: Tensor | None = None, group: int = 1) -> Tensor:
    """x (B, H, L, D), cos / sin broadcastable to it -> contiguous (B, H, L, D) in the promoted dtype; with channels
    (H / group, DK) long: (B, H, L, DK), head h's channels channels[h // group] of the rotated x."""
    B, H, L, D = x.shape
    DK = D if channels is None else channels.shape[-1]
    out = torch.empty(B, H, L, DK, dtype=torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype),
                      device=x.device)
    R = B * H * L
    if R == 0:
        return out
    c, s = cos.expand(x.shape), sin.expand(x.shape)
    idx = x if channels is None else channels
    _rotary_kernel[(triton.cdiv(R, BLOCK_R),)](
        x, c, s, out, idx, R, H, L, group, idx.stride(0) if channels is not None else 0,
        *x.stride(), *c.stride(), *s.stride(), D=D, DK=DK, PAD_DK=_pad(DK), HAS_IDX=channels is not None,
        BLOCK_R=BLOCK_R, num_warps=1, enable_fp_fusion=False, **pdl_launch(x.device))
    return out


@triton.jit
def _rotary_kv_write_kernel(K, C, S, V, KC, VC, Slot, Idx, R, H, L, s_ih,
                            s_kb, s_kh, s_kl, s_kd, s_cb, s_ch, s_cl, s_cd, s_sb, s_sh, s_sl, s_sd,
                            s_vb, s_vh, s_vl, s_vd, s_kcb, s_kch, s_kcs, s_kcd, s_vcb, s_vch, s_vcs, s_vcd,
                            D: tl.constexpr, DK: tl.constexpr, PAD_DK: tl.constexpr, HAS_IDX: tl.constexpr,
                            DV: tl.constexpr, PAD_DV: tl.constexpr, BLOCK_R: tl.constexpr, USE_GDC: tl.constexpr):
    """Rows (b, h, l): k rotated as _rotary_kernel rotates it (with HAS_IDX only head h's kept channels idx[h]) into
    k_cache[b, h, slot[l]], v into v_cache's."""
    if USE_GDC:
        _gdc_wait()
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // (H * L)
    h = (rows // L) % H
    pos = rows % L
    live = rows < R
    dest = tl.load(Slot + pos, mask=live, other=0)
    j = tl.arange(0, PAD_DK)
    ok = live[:, None] & (j < DK)[None, :]
    y = _rotated(K, C, S, b, h, pos, ok, j, Idx, s_ih, 1, s_kb, s_kh, s_kl, s_kd, s_cb, s_ch, s_cl, s_cd,
                 s_sb, s_sh, s_sl, s_sd, D, HAS_IDX, KC.dtype.element_ty)
    tl.store(KC + (b * s_kcb + h * s_kch + dest * s_kcs)[:, None] + j[None, :] * s_kcd, y.to(KC.dtype.element_ty),
             mask=ok)
    dv = tl.arange(0, PAD_DV)
    okv = live[:, None] & (dv < DV)[None, :]
    val = tl.load(V + (b * s_vb + h * s_vh + pos * s_vl)[:, None] + dv[None, :] * s_vd, mask=okv, other=0.0)
    tl.store(VC + (b * s_vcb + h * s_vch + dest * s_vcs)[:, None] + dv[None, :] * s_vcd, val, mask=okv)


def rotary_kv_write_triton(k_cache: Tensor, v_cache: Tensor, slot: Tensor, k: Tensor, v: Tensor, cos: Tensor,
                           sin: Tensor, channels: Tensor | None = None) -> None:
    """k_cache[:, :, slot] = rotary(k, cos, sin) (in k_cache's dtype, the rotation's; with channels (H, DK) only
    head h's channels[h]), v_cache[:, :, slot] = v."""
    B, H, L, D = k.shape
    R = B * H * L
    if R == 0:
        return
    c, s = cos.expand(k.shape), sin.expand(k.shape)
    DK = D if channels is None else channels.shape[-1]
    DV = v.shape[-1]
    idx = k if channels is None else channels
    _rotary_kv_write_kernel[(triton.cdiv(R, BLOCK_R),)](
        k, c, s, v, k_cache, v_cache, slot, idx, R, H, L, idx.stride(0) if channels is not None else 0,
        *k.stride(), *c.stride(), *s.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        D=D, DK=DK, PAD_DK=_pad(DK), HAS_IDX=channels is not None, DV=DV, PAD_DV=_pad(DV), BLOCK_R=BLOCK_R,
        num_warps=1 if max(_pad(DK), _pad(DV)) <= 128 else 4, enable_fp_fusion=False,   # MLA's latent: 448 values
        **pdl_launch(k.device))


@triton.jit
def _matmul_rotary_kernel(X, W, C, S, Y, Hkv, G, N, ROPE,
                          s_xb, s_xh, s_xg, s_xd, s_wh, s_wd, s_wn, s_cb, s_ch, s_cg, s_cd, s_sb, s_sh, s_sg, s_sd,
                          D: tl.constexpr, PAD_G: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_GDC: tl.constexpr):
    """Program (b * Hkv + h, column block): y = x[b, h] @ w[h] for BLOCK_N of the N columns (the G rows of KV head
    h padded to PAD_G for tl.dot), rounded to Y's dtype as the matmul rounds, then the first ROPE columns rotated as
    _rotated rotates (partner column j +- ROPE / 2 of the same product). The weights are loaded before waiting on
    the kernel before (no kernel of the step writes them)."""
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    offs_g = tl.arange(0, PAD_G)
    offs_d = tl.arange(0, PAD_D)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    half = ROPE // 2
    w = tl.load(W + h * s_wh + offs_d[:, None] * s_wd + offs_n[None, :] * s_wn,
                mask=d_ok[:, None] & (offs_n < N)[None, :], other=0.0)
    partner = tl.where(offs_n < half, offs_n + half, offs_n - half)
    rope = offs_n < ROPE
    wp = tl.load(W + h * s_wh + offs_d[:, None] * s_wd + partner[None, :] * s_wn,
                 mask=d_ok[:, None] & rope[None, :], other=0.0)                     # no traffic past the RoPE part
    if USE_GDC:
        _gdc_wait()
    g_ok = offs_g < G
    x = tl.load(X + b * s_xb + h * s_xh + offs_g[:, None] * s_xg + offs_d[None, :] * s_xd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    DT: tl.constexpr = Y.dtype.element_ty
    if UPCAST:      # bf16: exact in tf32's 10-bit mantissa (the interpreter's bf16 dot returns garbage, triton 3.9)
        x = x.to(tl.float32)
        w = w.to(tl.float32)
        wp = wp.to(tl.float32)
    y = _rounded(tl.dot(x, w, input_precision=DOT_PRECISION), DT)
    if tl.program_id(1) * BLOCK_N < ROPE:
        yp = _rounded(tl.dot(x, wp, input_precision=DOT_PRECISION), DT)
        ok = g_ok[:, None] & rope[None, :]
        c = tl.load(C + b * s_cb + h * s_ch + offs_g[:, None] * s_cg + offs_n[None, :] * s_cd, mask=ok, other=0.0)
        s = tl.load(S + b * s_sb + h * s_sh + offs_g[:, None] * s_sg + offs_n[None, :] * s_sd, mask=ok, other=0.0)
        rot = tl.where((offs_n < half)[None, :], -yp, yp)                       # rotate_half
        rotated = _rounded(_rounded(y * c.to(tl.float32), DT) + _rounded(rot * s.to(tl.float32), DT), DT)
        y = tl.where(rope[None, :], rotated, y)
    tl.store(Y + ((b * Hkv + h) * G + offs_g)[:, None] * N + offs_n[None, :], y.to(DT),
             mask=g_ok[:, None] & (offs_n < N)[None, :])


MATMUL_ROTARY_BLOCK_N = 64


def matmul_rotary_triton(x: Tensor, w: Tensor, cos: Tensor, sin: Tensor, rope: int) -> Tensor:
    """x (B, Hkv, G, D), w (Hkv, D, N), cos / sin broadcastable to (B, Hkv, G, rope), all one dtype -> contiguous
    (B, Hkv, G, N): x @ w with its first `rope` columns rotated (rotary.matmul_rotary)."""
    B, Hkv, G, D = x.shape
    N = w.shape[-1]
    out = torch.empty(B, Hkv, G, N, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    shape = (B, Hkv, G, rope)
    c, s = cos.expand(shape), sin.expand(shape)
    _matmul_rotary_kernel[(B * Hkv, triton.cdiv(N, MATMUL_ROTARY_BLOCK_N))](
        x, w, c, s, out, Hkv, G, N, rope, *x.stride(), *w.stride(), *c.stride(), *s.stride(),
        D=D, PAD_G=_pad(G), PAD_D=_pad(D), BLOCK_N=MATMUL_ROTARY_BLOCK_N,
        UPCAST=x.dtype == torch.bfloat16, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
        enable_fp_fusion=False, **pdl_launch(x.device))
    return out
