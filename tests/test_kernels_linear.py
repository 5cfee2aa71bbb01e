"""Triton kernels for the linear ops, run by the Triton interpreter on CPU tensors (tiny shapes).

Every test runs under the triton_interpreter fixture (tests/conftest.py): the interpreter is switched on per test,
never at import, so it cannot leak into the real compiles of tests/test_kernels_compile.py."""
import pytest
import torch

pytest.importorskip("triton")

import rewriter.linear.triton.binary_linear as binary_kernels  # noqa: E402
from rewriter.linear.triton.binary_linear import GEMV_MAX_M, binary_linear_triton, launch_binary_gemv  # noqa: E402
from rewriter.linear.triton.lowrank_linear import FUSED_MAX_M, lowrank_linear_fused  # noqa: E402
from rewriter.linear.binary import binarize_weight, binary_linear  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")

f64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return ((a.to(f64) - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tiling,M", [("bitplane", 1), ("decode", 1), ("decode", 5), ("prefill", 3), ("prefill", 130),
                                      ("splitk", 2), (None, 1), (None, 16), (None, 17)])
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



def binary_oracle(x, packed, alpha, mu, bias, in_f):
    """float64 y = alpha * (x sign^T) + mu * sum(x) + bias from the bits, independent of the op's code."""
    cols = torch.arange(in_f)
    bits = (packed.to(torch.int64)[:, cols // 8] >> (cols % 8)) & 1
    signs = (2 * bits - 1).to(f64)
    y = (x.to(f64) @ signs.T) * alpha.to(f64) + x.to(f64).sum(-1, keepdim=True) * mu.to(f64)
    return y if bias is None else y + bias.to(f64)


# in_f: 203 (bytes not a multiple of 4: word assembly from bytes, padding bits), 224 (int32 words, 7 words:
# not a multiple of block_w), 250 (int32 words, the last one part padding), 1000 (bytes path, several K
# slices), 1056 (33 words, masked last block)
@pytest.mark.parametrize("M,in_f,split_k,block_n,block_w", [
    (1, 203, None, 16, 2), (1, 224, 3, 16, 4), (2, 250, 2, 16, 2), (1, 1056, 5, 32, 4), (3, 224, 2, 16, 2),
    (3, 1000, None, 32, 4), (16, 203, 1, 16, 8), (16, 1056, 3, 16, 8), (5, 64, 2, 64, 1),
])
def test_splitk_gemv_matches_float64_oracle(M, in_f, split_k, block_n, block_w):
    out_f = 45  # not a multiple of block_n
    W = torch.randn(out_f, in_f, generator=gen(in_f + M))
    d = binarize_weight(W)
    bias = torch.randn(out_f, generator=gen(7 + M)) if M != 3 else None
    x = torch.randn(M, in_f, generator=gen(300 + M))
    ref = binary_oracle(x, d["packed"], d["alpha"], d["mu"], bias, in_f)
    out = torch.full((M, out_f), float("nan"))  # poisoned: every element must be written
    y = launch_binary_gemv(x, d["packed"], d["alpha"], d["mu"], bias, out, block_n=block_n, block_w=block_w,
                           split_k=split_k)
    assert torch.isfinite(y).all()
    assert rel(y, ref) < 1e-5


def test_splitk_gemv_resets_its_counters(monkeypatch):
    # the last program of each output block must leave its arrival counter at 0 for the next launch
    counters = torch.zeros(8, dtype=torch.int32)
    monkeypatch.setattr(binary_kernels, "_split_counters", lambda device, n: counters)
    d = binarize_weight(torch.randn(40, 128, generator=gen(3)))
    x = torch.randn(2, 128, generator=gen(4))
    ref = binary_oracle(x, d["packed"], d["alpha"], d["mu"], None, 128)
    for _ in range(2):
        y = launch_binary_gemv(x, d["packed"], d["alpha"], d["mu"], None, torch.full((2, 40), float("nan")),
                               block_n=16, block_w=1, split_k=4)
        assert rel(y, ref) < 1e-5
        assert counters.tolist() == [0] * 8


def test_splitk_gemv_rejects_bad_args():
    d = binarize_weight(torch.randn(20, 64, generator=gen(1)))
    args = (d["packed"], d["alpha"], d["mu"], None)
    with pytest.raises(ValueError, match="split_k"):
        launch_binary_gemv(torch.randn(1, 64), *args, torch.empty(1, 20), split_k=3)  # 64 columns = 2 words
    with pytest.raises(ValueError, match="power of two"):
        launch_binary_gemv(torch.randn(1, 64), *args, torch.empty(1, 20), block_n=24)
    with pytest.raises(ValueError, match="at most"):
        binary_linear_triton(torch.randn(GEMV_MAX_M + 1, 64), *args, 64, tiling="splitk")

@pytest.mark.parametrize("in_f,block_n,block_w,programs_per_sm", [
    (224, 16, 4, 4),     # 7 words: the last block of words masked
    (250, 32, 2, 8),     # the last word part padding (columns past K read 0 in the tables)
    (1056, 16, 4, 40),   # 33 words in several K slices (split-K epilogue and counters)
    (64, 64, 1, 1),      # one word per step, one slice
])
def test_lut_gemv_matches_float64_oracle(in_f, block_n, block_w, programs_per_sm, monkeypatch):
    """The nibble-table GEMV (M = 1): per 4 columns one gathered partial sum of x, same epilogue as the split-K
    GEMV; against the float64 oracle, every output written (poisoned buffer), counters left at 0."""
    counters = torch.zeros(8, dtype=torch.int32)
    monkeypatch.setattr(binary_kernels, "_split_counters", lambda device, n: counters)
    out_f = 45
    d = binarize_weight(torch.randn(out_f, in_f, generator=gen(in_f)))
    bias = torch.randn(out_f, generator=gen(9)) if in_f != 64 else None
    x = torch.randn(1, in_f, generator=gen(400 + in_f))
    ref = binary_oracle(x, d["packed"], d["alpha"], d["mu"], bias, in_f)
    for _ in range(2):
        y = binary_kernels.launch_binary_lut_gemv(x, d["packed"], d["alpha"], d["mu"], bias,
                                                  torch.full((1, out_f), float("nan")), block_n=block_n,
                                                  block_w=block_w, programs_per_sm=programs_per_sm)
        assert torch.isfinite(y).all() and rel(y, ref) < 1e-5
        assert counters.tolist() == [0] * 8
    y = binary_linear_triton(x, d["packed"], d["alpha"], d["mu"], bias, in_f, tiling="lut")
    assert rel(y, ref) < 1e-5
    with pytest.raises(ValueError, match="one row"):
        binary_kernels.launch_binary_lut_gemv(torch.randn(2, in_f), d["packed"], d["alpha"], d["mu"], None,
                                              torch.empty(2, out_f))
    odd = binarize_weight(torch.randn(4, 203, generator=gen(1)))        # 26 bytes per row: no int32 words
    with pytest.raises(ValueError, match="multiple of 4 bytes"):
        binary_kernels.launch_binary_lut_gemv(torch.randn(1, 203), odd["packed"], odd["alpha"], odd["mu"], None,
                                              torch.empty(1, 4))


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
