"""Triton kernels for the exact fused ops (``rewriter.linear.fused``): each reads its inputs once and writes its output
once, and rounds where the reference rounds, so it matches the reference to its last bit except where the reference's
own fp32 reduction order or transcendental differs (a mean's summation order, rsqrt, exp). Divisions are IEEE
(tl.math.div_rn: Triton's `/` is the approximate div.full.f32), as torch's:

    rms_norm: one program per block of rows, each row whole in registers (H up to RMS_MAX_H, else the reference);
        sum of squares in fp32, / H (torch's CPU mean divides, its CUDA mean multiplies by 1 / H: equal
        for H a power of two), + eps, rsqrt, x * r rounded to x's dtype, times the weight in fp32 rounded to
        the output dtype (a product of two 16-bit values is exact in fp32, so that last step is bit-exact).
    silu_mul: elementwise over the flattened tensors; silu = g / (1 + expf(-g)) in fp32 (as torch's CUDA silu, with
        libdevice's expf; the interpreter runs tl.exp) rounded to gate's dtype, then the product in fp32 rounded to the
        output dtype.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

RMS_MAX_H = 16384            # widest row one program holds in registers
PDL_MIN_CAPABILITY = 9       # programmatic dependent launch: Hopper (sm_90) and later
_ROW_ELEMENTS = 4096         # rows per program: about this many elements per block
_SILU_BLOCK = 2048


def pdl(device: torch.device) -> bool:
    """Whether the decode step's kernels launch with programmatic dependent launch (PDL) on `device`: a CUDA device of
    compute capability 9 or more, outside torch.compile's tracing (its kernel wrapper does not take the launch
    option), unless REWRITER_PDL=0. A kernel launched so may start while the kernel before it finishes; each of
    them (USE_GDC) first loads only what no earlier kernel writes (the GEMVs' first weight block), then waits
    (gdc_wait: the previous kernel done and its writes visible) before it reads anything else or writes, and
    then lets the next kernel launch (gdc_launch_dependents). In a CUDA graph the next kernel's launch and
    weight reads then overlap the previous kernel's tail."""
    if device.type != "cuda" or os.environ.get("REWRITER_PDL", "1") == "0" or torch.compiler.is_compiling():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= \
        PDL_MIN_CAPABILITY


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_launch(device: torch.device) -> dict:
    """The constexpr and launch option of a USE_GDC kernel: {USE_GDC, launch_pdl} when pdl(device), else USE_GDC
    False only."""
    return {"USE_GDC": True, "launch_pdl": True} if pdl(device) else {"USE_GDC": False}


@triton.jit
def _gdc_wait():
    """griddepcontrol: wait for the kernel before (complete, its writes visible), then let the next one launch."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (to nearest, ties to even, as torch rounds), returned in fp32. bfloat16 by its bits,
    as c10::BFloat16 rounds (NaN kept): Triton's interpreter truncates fp32 -> bf16 casts, the GPU rounds; this is
    the same on both."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, M, H, stride_xm, stride_ym, eps, res_ptr, sum_ptr,
                     BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, HAS_RES: tl.constexpr, USE_GDC: tl.constexpr):
    """HAS_RES: x + res (one dtype, contiguous rows) rounded to that dtype as torch's add rounds, stored to sum_ptr,
    is the row normalised (the decode step's residual add and the next RMSNorm)."""
    if USE_GDC:
        _gdc_wait()
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < M
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xf = _rounded(xf + res, x_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows[:, None] * H + cols[None, :], xf.to(x_ptr.dtype.element_ty), mask=mask)
    squares = tl.sum(xf * xf, axis=1)
    variance = tl.math.div_rn(squares, tl.zeros_like(squares) + H)     # IEEE division (`/` is div.full)
    r = tl.math.rsqrt(variance + eps)       # libdevice rsqrtf on CUDA, as torch.rsqrt there
    normed = _rounded(xf * r[:, None], x_ptr.dtype.element_ty)          # .to(x.dtype), as the reference
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = _rounded(w[None, :] * normed, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, y_ptr, N, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    if LIBDEVICE_EXP:    # expf, as torch's CUDA silu calls it (tl.exp is a bare ex2.approx; the interpreter has only it)
        e = libdevice.exp(-gf)
    else:
        e = tl.exp(-gf)
    silu = _rounded(tl.math.div_rn(gf, 1.0 + e), gate_ptr.dtype.element_ty)    # silu(gate) in gate's dtype
    y = _rounded(silu * u, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rewriter::rms_norm with the Triton kernel: x (..., H) of a KERNEL_DTYPES dtype, H <= RMS_MAX_H."""
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"rms_norm needs weight ({H},); got {tuple(weight.shape)}")
    if H > RMS_MAX_H or x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the rms_norm kernel takes H <= {RMS_MAX_H} and fp16 / bf16 / fp32; got H = {H}, "
                         f"{x.dtype}, {weight.dtype}")
    x2 = x.reshape(-1, H).contiguous()
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if M == 0 or H == 0:
        return y
    block_h = triton.next_power_of_2(H)
    block_m = max(1, min(16, _ROW_ELEMENTS // block_h))
    warps = 4 if block_h <= 1024 else 8 if block_h <= 4096 else 16
    # no FMA contraction: the squares are rounded before they are summed, as torch's pow then mean round them
    _rms_norm_kernel[(triton.cdiv(M, block_m),)](x2, weight.contiguous(), y, M, H, x2.stride(0), H, float(eps),
                                                x2, y, BLOCK_M=block_m, BLOCK_H=block_h, HAS_RES=False,
                                                num_warps=warps, enable_fp_fusion=False, **pdl_launch(x.device))
    return y


def add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + residual, rms_norm(x + residual)) in one kernel: x and residual of one shape and KERNEL_DTYPES dtype."""
    H = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype or weight.shape != (H,) or H > RMS_MAX_H \
            or x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the add_rms_norm kernel takes x and residual of one shape and fp16 / bf16 / fp32 dtype, "
                         f"H <= {RMS_MAX_H}; got {tuple(x.shape)} {x.dtype}, {tuple(residual.shape)} "
                         f"{residual.dtype}, weight {tuple(weight.shape)}")
    x2, r2 = x.reshape(-1, H).contiguous(), residual.reshape(-1, H).contiguous()
    M = x2.shape[0]
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if M == 0 or H == 0:
        return total, y
    block_h = triton.next_power_of_2(H)
    block_m = max(1, min(16, _ROW_ELEMENTS // block_h))
    warps = 4 if block_h <= 1024 else 8 if block_h <= 4096 else 16
    _rms_norm_kernel[(triton.cdiv(M, block_m),)](x2, weight.contiguous(), y, M, H, H, H, float(eps), r2, total,
                                                BLOCK_M=block_m, BLOCK_H=block_h, HAS_RES=True, num_warps=warps,
                                                enable_fp_fusion=False, **pdl_launch(x.device))
    return total, y


def silu_mul_triton(gate: Tensor, up: Tensor) -> Tensor:
    """rewriter::silu_mul with the Triton kernel: gate and up of one shape, KERNEL_DTYPES."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul needs gate and up of one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype not in KERNEL_DTYPES or up.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the silu_mul kernel takes fp16 / bf16 / fp32; got {gate.dtype}, {up.dtype}")
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = y.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, _SILU_BLOCK),)](g, u, y, n, BLOCK=_SILU_BLOCK, num_warps=8,
                                                         LIBDEVICE_EXP=os.environ.get("TRITON_INTERPRET") != "1")
    return y
