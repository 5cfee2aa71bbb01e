"""Binarised linear layers (BiPFT-style), signs packed 8 per byte.

Form chosen, per output row o of W (out, in):
    mu_o    = mean_j W[o, j]                      (row mean)
    alpha_o = mean_j |W[o, j] - mu_o|             (scale)
    W_b     = alpha_o * sign(W[o, j] - mu_o) + mu_o, with sign(0) = +1
Why: centring on the row mean balances the signs, and for fixed signs alpha = mean|D| is the least-squares
scale of D = W - mu (argmin_a ||D - a sign(D)||^2). The mean stays exact and costs one reduction of x:
    x W_b^T = alpha * (x sign^T) + mu * sum(x).
An optional rank-r residual W - W_b ~ B A (svd_factors) is applied by the pass as two plain linears added to
the output; at full rank it reproduces W.

Packing: bit j of byte k in row o is 1 when column 8k + j has a sign of +1 (little-endian bit order); the
padding bits of the last byte are 0 and are ignored (in_features says how many columns are real).

    rewriter::binary_linear(Tensor x, Tensor packed, Tensor alpha, Tensor mu, Tensor? bias, int in_features) -> Tensor
"""
from __future__ import annotations

import torch
from torch import Tensor

from .lowrank import svd_factors

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_signs(W: Tensor) -> Tensor:
    """uint8 (out, ceil(in/8)): bit j of byte k is 1 where W[:, 8k + j] >= 0."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in); got shape {tuple(W.shape)}")
    out_features, in_features = W.shape
    nbytes = (in_features + 7) // 8
    bits = torch.zeros(out_features, nbytes * 8, dtype=torch.uint8, device=W.device)
    bits[:, :in_features] = (W >= 0).to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=W.device)
    return (bits.view(out_features, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """+-1 of shape (out, in_features) in `dtype` from pack_signs' output."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor; got {packed.dtype} of shape {tuple(packed.shape)}")
    if not 0 < in_features <= packed.shape[1] * 8 or in_features <= (packed.shape[1] - 1) * 8:
        raise ValueError(f"in_features={in_features} does not fit {packed.shape[1]} packed bytes per row")
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[..., None] >> shifts) & 1
    bits = bits.reshape(packed.shape[0], -1)[:, :in_features]
    return (bits * 2 - 1).to(dtype)


def binarize_weight(W: Tensor, residual_rank: int = 0) -> dict:
    """Binarise W (out, in). Returns packed (uint8), alpha (out,), mu (out,) in W's dtype, in_features, and
    residual_a (r, in), residual_b (out, r) (None when residual_rank is 0) with W ~ W_b + residual_b @ residual_a."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in); got shape {tuple(W.shape)}")
    out_features, in_features = W.shape
    full = min(out_features, in_features)
    if isinstance(residual_rank, bool) or not isinstance(residual_rank, int) or not 0 <= residual_rank <= full:
        raise ValueError(f"residual_rank must be an int in [0, {full}]; got {residual_rank!r}")
    Wd = W.to(torch.float64)
    mu = Wd.mean(dim=1)
    centred = Wd - mu[:, None]
    alpha = centred.abs().mean(dim=1)
    packed = pack_signs(centred)
    residual_a = residual_b = None
    if residual_rank:
        W_b = binarized_weight(packed, alpha, mu, in_features)
        residual_a, residual_b = svd_factors(Wd - W_b, residual_rank)
        residual_a, residual_b = residual_a.to(W.dtype), residual_b.to(W.dtype)
    return {
        "packed": packed, "alpha": alpha.to(W.dtype), "mu": mu.to(W.dtype), "in_features": in_features,
        "residual_a": residual_a, "residual_b": residual_b,
    }


def binarized_weight(packed: Tensor, alpha: Tensor, mu: Tensor, in_features: int) -> Tensor:
    """The dense W_b = alpha * sign + mu in alpha's dtype (for references and error measurement)."""
    signs = unpack_signs(packed, in_features, alpha.dtype)
    return alpha[:, None] * signs + mu[:, None]


def _check_binary_args(x: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None, in_features: int) -> None:
    out_features = packed.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal in_features ({in_features})")
    if packed.dim() != 2 or packed.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"packed must be (out, ceil({in_features}/8)); got {tuple(packed.shape)}")
    for name, t in (("alpha", alpha), ("mu", mu), ("bias", bias)):
        if t is not None and t.shape != (out_features,):
            raise ValueError(f"{name} must be ({out_features},); got {tuple(t.shape)}")


@torch.library.custom_op("rewriter::binary_linear", mutates_args=())
def binary_linear(x: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None, in_features: int) -> Tensor:
    """y = alpha * (x sign^T) + mu * sum(x) + bias, in x's dtype; accumulates in fp32 (fp64 for fp64 x)."""
    return binary_linear_reference(x, packed, alpha, mu, bias, in_features)


def binary_linear_reference(x: Tensor, packed: Tensor, alpha: Tensor, mu: Tensor, bias: Tensor | None,
                            in_features: int) -> Tensor:
    """The op's reference body (any device; the CUDA kernel's fallback)."""
    _check_binary_args(x, packed, alpha, mu, bias, in_features)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    signs = unpack_signs(packed, in_features, acc)
    y = (xa @ signs.T) * alpha.to(acc) + xa.sum(-1, keepdim=True) * mu.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


@binary_linear.register_fake
def _(x, packed, alpha, mu, bias, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def binary_linear_bytes(out_features: int, in_features: int, residual_rank: int = 0, value_bytes: int = 2) -> dict[str, float]:
    """Storage of packed signs + alpha + mu (+ rank-r residual factors) against the dense weight, in bytes."""
    if min(out_features, in_features, value_bytes) < 1 or residual_rank < 0:
        raise ValueError("out_features, in_features and value_bytes must be >= 1 and residual_rank >= 0")
    signs = out_features * ((in_features + 7) // 8)
    scales = 2 * out_features * value_bytes
    residual = residual_rank * (in_features + out_features) * value_bytes
    total = signs + scales + residual
    dense = out_features * in_features * value_bytes
    return {"sign_bytes": float(signs), "scale_bytes": float(scales), "residual_bytes": float(residual),
            "bytes": float(total), "dense_bytes": float(dense), "bytes_ratio": total / dense}
