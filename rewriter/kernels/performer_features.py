"""FAVOR+ feature map in Triton: the CUDA form of ``lowrank_attention.feature_map("performer", ...)``.

logits = x' W^T - |x'|^2 / 2 with x' = x scale^(1/2); phi = exp(logits - c) / sqrt(m). Queries: c is the row max
(one pass writes phi and c). Keys: c is one max per (batch, head) over the real keys, so a first pass writes the row
maxima, torch reduces them over the real keys, and a second pass recomputes the logits and writes phi (padding keys
get phi = 0). The PyTorch reference spends ~10 elementwise passes over fp32 (B, H, L, m) tensors; here x is read
once per pass and only phi is written.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _performer_features_fwd(
    x_ptr, w_ptr, c_ptr, phi_ptr, rowmax_ptr, kmask_ptr,
    H, L, D, M, xscale, norm,
    sx_b, sx_h, sx_l, sc_b, sc_h, sp_b, sp_h, sp_l, sr_b, sr_h, skm_b,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MODE: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
):
    # MODE 0: queries (row max offset, write phi and the offset); 1: keys, write row maxima only;
    # 2: keys, write phi with the per-head offset c.
    lb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    l_valid = offs_l < L
    x = tl.load(x_ptr + b * sx_b + h * sx_h + offs_l[:, None] * sx_l + offs_d[None, :],
                mask=l_valid[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * xscale
    w = tl.load(w_ptr + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
                other=0.0)
    logits = tl.dot(x, tl.trans(w), input_precision="ieee") - 0.5 * tl.sum(x * x, 1)[:, None]
    logits = tl.where(offs_m[None, :] < M, logits, float("-inf"))
    if MODE == 1:
        tl.store(rowmax_ptr + b * sr_b + h * sr_h + offs_l, tl.max(logits, 1), mask=l_valid)
    else:
        if MODE == 0:
            c = tl.max(logits, 1)
            tl.store(rowmax_ptr + b * sr_b + h * sr_h + offs_l, c, mask=l_valid)
            phi = tl.exp(logits - c[:, None]) * norm
        else:
            c = tl.load(c_ptr + b * sc_b + h * sc_h)
            phi = tl.exp(logits - c) * norm
            if HAS_KEY_MASK:
                real = tl.load(kmask_ptr + b * skm_b + offs_l, mask=l_valid, other=0) != 0
                phi = tl.where(real[:, None], phi, 0.0)
        tl.store(phi_ptr + b * sp_b + h * sp_h + offs_l[:, None] * sp_l + offs_m[None, :],
                 phi.to(phi_ptr.dtype.element_ty), mask=l_valid[:, None] & (offs_m[None, :] < M))


def performer_features_triton(x: Tensor, projection: Tensor, scale: float, role: str,
                              key_mask: Tensor | None = None, out_dtype: torch.dtype | None = None,
                              block_l: int = 64, num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """phi (B, H, L, m) in `out_dtype` (default x's) and the log offset ((B, H, L) for queries, (B, H) for keys),
    the same contract as the reference feature map (fp32 arithmetic inside)."""
    if role not in ("query", "key"):
        raise ValueError(f"role must be 'query' or 'key'; got {role!r}")
    B, H, L, D = x.shape
    M = projection.shape[0]
    if projection.shape[1] != D:
        raise ValueError(f"projection must be (features, {D}); got {tuple(projection.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = projection.to(device=x.device, dtype=torch.float32).contiguous()
    phi = torch.empty(B, H, L, M, dtype=out_dtype or x.dtype, device=x.device)
    rowmax = torch.empty(B, H, L, dtype=torch.float32, device=x.device)
    if key_mask is not None:
        kmask = key_mask.to(torch.int8).contiguous()
        skm_b = kmask.stride(0)
    else:
        kmask, skm_b = rowmax, 0
    grid = (triton.cdiv(L, block_l), B * H)

    def launch(mode: int, c: Tensor) -> None:
        if B * H * L == 0:
            return
        _performer_features_fwd[grid](
            x, w, c, phi, rowmax, kmask, H, L, D, M, math.sqrt(scale), 1.0 / math.sqrt(M),
            x.stride(0), x.stride(1), x.stride(2), c.stride(0) if c.dim() == 2 else 0,
            c.stride(1) if c.dim() == 2 else 0, phi.stride(0), phi.stride(1), phi.stride(2),
            rowmax.stride(0), rowmax.stride(1), skm_b,
            BLOCK_L=block_l, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=max(16, triton.next_power_of_2(M)),
            MODE=mode, HAS_KEY_MASK=key_mask is not None, num_warps=num_warps,
        )

    if role == "query":
        launch(0, rowmax)
        return phi, rowmax
    launch(1, rowmax)
    per_key = rowmax
    if key_mask is not None:
        per_key = per_key.masked_fill(~key_mask[:, None, :].to(torch.bool), float("-inf"))
    c = per_key.amax(dim=-1) if L else torch.zeros(B, H, device=x.device)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c)).contiguous()
    launch(2, c)
    return phi, c
