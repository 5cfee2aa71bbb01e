"""Exact fused ops for the elementwise work around a transformer block's linears, each the model's own arithmetic
step for step (the reference is the definition), so a program holding them computes what the model computes:

    rewriter::rms_norm(Tensor x, Tensor weight, float eps) -> Tensor
        weight * (x.float() * rsqrt(mean(x.float()^2, -1, keepdim) + eps)).to(x.dtype)
        HF's LlamaRMSNorm (Qwen2, Mistral and others copy it): the cast back to x's dtype comes BEFORE the weight
        multiply, which runs in torch's promoted dtype of (weight, x).
    rewriter::silu_mul(Tensor gate, Tensor up) -> Tensor
        silu(gate) * up: SwiGLU's act_fn(gate_proj(x)) * up_proj(x) (silu rounded to gate's dtype, then the product
        in the promoted dtype).

In eager aten these are eight and two memory-bound kernels (an RMSNorm of a bf16 (L, H) row block reads and writes
fp32 copies of it several times); on CUDA each op is one Triton kernel that reads its inputs once and writes its
output once (``linear/triton/fused.py``, registered from ``attention/triton/registry.py``). Inductor (AOTInductor
packages, torch.compile) fuses the same aten graph itself: there the ops lower to their references
(``rewriter.compile.lowerings``). The `fuse` pass (``passes/fuse.py``) puts them in place of the matched patterns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The fused ops compute what transformers' own modules compute: an HF folder or a decode bundle written from a program
# holding them is the model's own (``backends/torch_backend.py``, ``hf.py`` treat them as absent).
MODEL_OPS = ("rewriter::rms_norm", "rewriter::silu_mul")


def _check_rms_norm(x: Tensor, weight: Tensor) -> None:
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm needs x (..., H) and weight (H,); got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"rms_norm takes floating-point tensors; got {x.dtype} and {weight.dtype}")


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's LlamaRMSNorm.forward, op for op (the op's definition; its CPU body and AOTInductor lowering)."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


@torch.library.custom_op("rewriter::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype), contiguous."""
    _check_rms_norm(x, weight)
    return rms_norm_reference(x, weight, eps).contiguous()


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


def _check_silu_mul(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul needs gate and up of one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if not gate.is_floating_point() or not up.is_floating_point():
        raise ValueError(f"silu_mul takes floating-point tensors; got {gate.dtype} and {up.dtype}")


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up as LlamaMLP computes it (the op's definition)."""
    return F.silu(gate) * up


@torch.library.custom_op("rewriter::silu_mul", mutates_args=())
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, contiguous."""
    _check_silu_mul(gate, up)
    return silu_mul_reference(gate, up).contiguous()


@silu_mul.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))
