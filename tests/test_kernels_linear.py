"""Triton kernels for the linear ops, run by the Triton interpreter on CPU tensors (tiny shapes)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from rewriter.kernels.binary_linear import binary_linear_triton  # noqa: E402
from rewriter.kernels.lowrank_linear import FUSED_MAX_M, lowrank_linear_fused  # noqa: E402
from rewriter.ops.binary_linear import binarize_weight, binary_linear  # noqa: E402

f64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return ((a.to(f64) - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tiling,M", [("gemv", 1), ("decode", 1), ("decode", 5), ("prefill", 3), ("prefill", 130),
                                      (None, 1), (None, 16), (None, 17)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_binary_kernel_matches_reference_op(tiling, M, with_bias):
    out_f, in_f = 45, 203  # in not a multiple of 8, out not a multiple of any tile
    W = torch.randn(out_f, in_f, generator=gen(M))
    d = binarize_weight(W)
    bias = torch.randn(out_f, generator=gen(100 + M)) if with_bias else None
    x = torch.randn(M, in_f, generator=gen(200 + M))
    ref = binary_linear(x.to(f64), d["packed"], d["alpha"].to(f64), d["mu"].to(f64),
                        None if bias is None else bias.to(f64), in_f)
    out = torch.full((M, out_f), float("nan"))  # poisoned: every element must be written
    y = binary_linear_triton(x, d["packed"], d["alpha"], d["mu"], bias, in_f, tiling=tiling, out=out)
    assert torch.isfinite(y).all()
    assert rel(y, ref) < 1e-5


def test_binary_kernel_keeps_leading_dims_and_rejects_bad_args():
    d = binarize_weight(torch.randn(20, 16, generator=gen(1)))
    x = torch.randn(2, 3, 16, generator=gen(2))
    y = binary_linear_triton(x, d["packed"], d["alpha"], d["mu"], None, 16)
    assert y.shape == (2, 3, 20)
    ref = binary_linear(x.to(f64), d["packed"], d["alpha"].to(f64), d["mu"].to(f64), None, 16)
    assert rel(y, ref) < 1e-5
    with pytest.raises(ValueError, match="tiling"):
        binary_linear_triton(x, d["packed"], d["alpha"], d["mu"], None, 16, tiling="fast")
    with pytest.raises(ValueError, match="packed"):
        binary_linear_triton(torch.randn(3, 24), d["packed"], d["alpha"], d["mu"], None, 24)
    with pytest.raises(ValueError, match="out must be"):
        binary_linear_triton(x, d["packed"], d["alpha"], d["mu"], None, 16, out=torch.empty(6, 21))


@pytest.mark.parametrize("M,shares", [(1, None), (4, 1), (16, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_lowrank_kernel_matches_float64(M, shares, with_bias):
    out_f, in_f, rank = 150, 70, 21  # rank not a multiple of the rank block, out split unevenly across shares
    A = torch.randn(rank, in_f, generator=gen(M)) * in_f ** -0.5
    B = torch.randn(out_f, rank, generator=gen(10 + M)) * rank ** -0.5
    bias = torch.randn(out_f, generator=gen(20 + M)) if with_bias else None
    x = torch.randn(M, in_f, generator=gen(30 + M))
    ref = (x.to(f64) @ A.to(f64).T) @ B.to(f64).T
    if bias is not None:
        ref = ref + bias.to(f64)
    y = lowrank_linear_fused(x, A, B, bias, shares=shares, block_k=32, block_n=32)
    assert y.shape == (M, out_f) and y.dtype == x.dtype
    assert rel(y, ref) < 1e-5


def test_fused_lowrank_rejects_bad_args():
    A = torch.randn(8, 24, generator=gen(1))
    B = torch.randn(40, 8, generator=gen(2))
    with pytest.raises(ValueError, match="at most"):
        lowrank_linear_fused(torch.randn(2, FUSED_MAX_M, 24), A, B)
    with pytest.raises(ValueError, match="need x"):
        lowrank_linear_fused(torch.randn(1, 23), A, B)
