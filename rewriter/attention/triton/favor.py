"""FAVOR+ positive random features in one Triton kernel: the CUDA form of ``feature_map("performer", ...)``.

Per row x (B, H, L, D): logits = W x' - |x'|^2 / 2 with x' = x s^1/2 (W the (m, D) projection, products in 3xTF32),
phi = exp(logits - c) / sqrt(m). Queries take c = their row max (returned as the (B, H, L) offset); keys take one c
per (batch, head), the max over real keys, so they run twice: a first launch stores each row's max (padding rows
-inf), PyTorch reduces it per head, a second launch writes phi (0 on padding keys). Each program holds a block of
rows and the whole W, so the projection is read once per block and the features never round-trip through memory
in fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _favor_features(
    x_ptr, w_ptr, kmask_ptr, off_ptr, phi_ptr, rowmax_ptr,
    H, L, D, F, sqrt_scale, norm,
    sx_b, sx_h, sx_l, sp_b, sp_h, sp_l, sr_b, sr_h, so_b, so_h, skm_b,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    MODE: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # MODE 0: query (row max offset, phi); 1: key row maxima only; 2: key phi against the per-head offset.
    lb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    r_valid = rows < L
    f_valid = offs_f < F
    x = tl.load(x_ptr + b * sx_b + h * sx_h + rows[:, None] * sx_l + offs_d[None, :],
                mask=r_valid[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * sqrt_scale
    wt = tl.load(w_ptr + offs_f[None, :] * D + offs_d[:, None], mask=f_valid[None, :] & (offs_d[:, None] < D),
                 other=0.0)
    logits = tl.dot(x, wt, input_precision=DOT_PRECISION) - 0.5 * tl.sum(x * x, 1)[:, None]
    logits = tl.where(f_valid[None, :], logits, float("-inf"))
    real = r_valid
    if HAS_KEY_MASK:
        real = real & (tl.load(kmask_ptr + b * skm_b + rows, mask=r_valid, other=0) != 0)
    if MODE == 1:
        tl.store(rowmax_ptr + b * sr_b + h * sr_h + rows, tl.where(real, tl.max(logits, 1), float("-inf")),
                 mask=r_valid)
    else:
        if MODE == 0:
            offset = tl.max(logits, 1)
            tl.store(rowmax_ptr + b * sr_b + h * sr_h + rows, offset, mask=r_valid)
            phi = tl.exp(logits - offset[:, None]) * norm
        else:
            c = tl.load(off_ptr + b * so_b + h * so_h)
            phi = tl.where(real[:, None], tl.exp(logits - c) * norm, 0.0)
        tl.store(phi_ptr + b * sp_b + h * sp_h + rows[:, None] * sp_l + offs_f[None, :],
                 phi.to(phi_ptr.dtype.element_ty), mask=r_valid[:, None] & f_valid[None, :])


MAX_FEATURES = 256


def _launch(x: Tensor, w: Tensor, key_mask: Optional[Tensor], offset: Optional[Tensor], phi: Optional[Tensor],
            rowmax: Tensor, scale: float, mode: int, block_l: int, precision: str) -> None:
    B, H, L, D = x.shape
    F = w.shape[0]
    if key_mask is not None:
        kmask = key_mask.to(torch.int8).contiguous()
        skm_b = kmask.stride(0)
    else:
        kmask, skm_b = rowmax, 0
    phi_t = phi if phi is not None else rowmax
    off_t = offset if offset is not None else rowmax
    _favor_features[(triton.cdiv(L, block_l), B * H)](
        x, w, kmask, off_t, phi_t, rowmax, H, L, D, F, math.sqrt(scale), 1.0 / math.sqrt(F),
        x.stride(0), x.stride(1), x.stride(2), *(phi.stride()[:3] if phi is not None else (0, 0, 0)),
        rowmax.stride(0), rowmax.stride(1), *(offset.stride() if offset is not None else (0, 0)), skm_b,
        BLOCK_L=block_l, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_F=max(16, triton.next_power_of_2(F)),
        MODE=mode, HAS_KEY_MASK=key_mask is not None,
        DOT_PRECISION=precision, num_warps=4 if F <= 128 else 8,
    )


def favor_features(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float, projection: Tensor,
                   dtype: torch.dtype, block_l: int = 64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(phi_q (B, H, Lq, m) in `dtype`, phi_k (B, Hkv, Lk, m) in `dtype`, log offset of q (B, H, Lq) fp32, log offset
    of k (B, Hkv) fp32): ``feature_map("performer")`` of q (role query) and k (role key) in one kernel each."""
    F, D = projection.shape
    if F > MAX_FEATURES:
        raise ValueError(f"the FAVOR+ feature kernel takes at most {MAX_FEATURES} features; got {F}")
    if q.shape[-1] != D or k.shape[-1] != D:
        raise ValueError(f"projection is (m, {D}); q and k have head dim {q.shape[-1]} / {k.shape[-1]}")
    w = projection.to(device=q.device, dtype=torch.float32).contiguous()
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    phi_q = torch.empty(B, H, Lq, F, dtype=dtype, device=q.device)
    log_q = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    phi_k = torch.empty(B, Hkv, Lk, F, dtype=dtype, device=q.device)
    rowmax_k = torch.empty(B, Hkv, Lk, dtype=torch.float32, device=q.device)
    # Products on the tensor cores: "ieee" (an FMA loop) measured 21.7 ms at L = 16K, D = 128, H = 32 on the H200
    # (PyTorch's feature map: 2.6 ms); tf32x3 (fp32-accurate) for fp32 features, one tf32 pass (logit error ~1e-3,
    # below the 2^-8 rounding of the stored features) for half-precision ones.
    precision = "tf32x3" if dtype in (torch.float32, torch.float64) else "tf32"
    if B * H * Lq:
        _launch(q, w, None, None, phi_q, log_q, scale, 0, block_l, precision)
    if B * Hkv * Lk == 0:
        return phi_q, phi_k, log_q, torch.zeros(B, Hkv, dtype=torch.float32, device=q.device)
    _launch(k, w, key_mask, None, None, rowmax_k, scale, 1, block_l, precision)
    log_k = rowmax_k.amax(dim=-1)
    log_k = torch.where(torch.isfinite(log_k), log_k, torch.zeros_like(log_k)).contiguous()
    _launch(k, w, key_mask, log_k, phi_k, rowmax_k, scale, 2, block_l, precision)
    return phi_q, phi_k, log_q, log_k
