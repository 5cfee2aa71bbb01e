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

from ..linear.triton.fused import _rounded

BLOCK_R = 16


@triton.jit
def _rotary_kernel(X, C, S, Y, R, H, L,
                   s_xb, s_xh, s_xl, s_xd, s_cb, s_ch, s_cl, s_cd, s_sb, s_sh, s_sl, s_sd,
                   D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // (H * L)
    h = (rows // L) % H
    pos = rows % L
    d = tl.arange(0, PAD_D)
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)
    ok = (rows < R)[:, None] & (d < D)[None, :]
    x_row = (b * s_xb + h * s_xh + pos * s_xl)[:, None]
    x = tl.load(X + x_row + d[None, :] * s_xd, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(X + x_row + partner[None, :] * s_xd, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + (b * s_cb + h * s_ch + pos * s_cl)[:, None] + d[None, :] * s_cd, mask=ok, other=0.0)
    s = tl.load(S + (b * s_sb + h * s_sh + pos * s_sl)[:, None] + d[None, :] * s_sd, mask=ok, other=0.0)
    rot = tl.where((d < half)[None, :], -xp, xp)                        # rotate_half (negation is exact)
    first = _rounded(x * c.to(tl.float32), Y.dtype.element_ty)         # each product in the result dtype,
    second = _rounded(rot * s.to(tl.float32), Y.dtype.element_ty)
    y = _rounded(first + second, Y.dtype.element_ty)                   # then their sum
    tl.store(Y + rows[:, None] * D + d[None, :], y.to(Y.dtype.element_ty), mask=ok)


def rotary_triton(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, D), cos / sin broadcastable to it -> contiguous (B, H, L, D) in the promoted dtype."""
    B, H, L, D = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype),
                      device=x.device)
    R = B * H * L
    if R == 0:
        return out
    c, s = cos.expand(x.shape), sin.expand(x.shape)
    _rotary_kernel[(triton.cdiv(R, BLOCK_R),)](
        x, c, s, out, R, H, L, *x.stride(), *c.stride(), *s.stride(),
        D=D, PAD_D=max(16, triton.next_power_of_2(D)), BLOCK_R=BLOCK_R, num_warps=1, enable_fp_fusion=False)
    return out


@triton.jit
def _rotary_kv_write_kernel(K, C, S, V, KC, VC, Slot, R, H, L,
                            s_kb, s_kh, s_kl, s_kd, s_cb, s_ch, s_cl, s_cd, s_sb, s_sh, s_sl, s_sd,
                            s_vb, s_vh, s_vl, s_vd, s_kcb, s_kch, s_kcs, s_kcd, s_vcb, s_vch, s_vcs, s_vcd,
                            D: tl.constexpr, PAD_D: tl.constexpr, DV: tl.constexpr, PAD_DV: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    """Rows (b, h, l): k rotated as _rotary_kernel rotates it into k_cache[b, h, slot[l]], v into v_cache's."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // (H * L)
    h = (rows // L) % H
    pos = rows % L
    live = rows < R
    dest = tl.load(Slot + pos, mask=live, other=0)
    d = tl.arange(0, PAD_D)
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)
    ok = live[:, None] & (d < D)[None, :]
    k_row = (b * s_kb + h * s_kh + pos * s_kl)[:, None]
    x = tl.load(K + k_row + d[None, :] * s_kd, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(K + k_row + partner[None, :] * s_kd, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + (b * s_cb + h * s_ch + pos * s_cl)[:, None] + d[None, :] * s_cd, mask=ok, other=0.0)
    s = tl.load(S + (b * s_sb + h * s_sh + pos * s_sl)[:, None] + d[None, :] * s_sd, mask=ok, other=0.0)
    rot = tl.where((d < half)[None, :], -xp, xp)
    first = _rounded(x * c.to(tl.float32), KC.dtype.element_ty)
    second = _rounded(rot * s.to(tl.float32), KC.dtype.element_ty)
    y = _rounded(first + second, KC.dtype.element_ty)
    tl.store(KC + (b * s_kcb + h * s_kch + dest * s_kcs)[:, None] + d[None, :] * s_kcd, y.to(KC.dtype.element_ty),
             mask=ok)
    dv = tl.arange(0, PAD_DV)
    okv = live[:, None] & (dv < DV)[None, :]
    val = tl.load(V + (b * s_vb + h * s_vh + pos * s_vl)[:, None] + dv[None, :] * s_vd, mask=okv, other=0.0)
    tl.store(VC + (b * s_vcb + h * s_vch + dest * s_vcs)[:, None] + dv[None, :] * s_vcd, val, mask=okv)


def rotary_kv_write_triton(k_cache: Tensor, v_cache: Tensor, slot: Tensor, k: Tensor, v: Tensor, cos: Tensor,
                           sin: Tensor) -> None:
    """k_cache[:, :, slot] = rotary(k, cos, sin) (in k_cache's dtype, the rotation's), v_cache[:, :, slot] = v."""
    B, H, L, D = k.shape
    R = B * H * L
    if R == 0:
        return
    c, s = cos.expand(k.shape), sin.expand(k.shape)
    DV = v.shape[-1]
    _rotary_kv_write_kernel[(triton.cdiv(R, BLOCK_R),)](
        k, c, s, v, k_cache, v_cache, slot, R, H, L, *k.stride(), *c.stride(), *s.stride(), *v.stride(),
        *k_cache.stride(), *v_cache.stride(), D=D, PAD_D=max(16, triton.next_power_of_2(D)), DV=DV,
        PAD_DV=max(16, triton.next_power_of_2(DV)), BLOCK_R=BLOCK_R, num_warps=1, enable_fp_fusion=False)
