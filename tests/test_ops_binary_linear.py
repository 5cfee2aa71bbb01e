import pytest
import torch

from rewriter.linear.binary import (
    binarize_weight, binarized_weight, binary_linear, binary_linear_bytes, pack_signs, unpack_signs,
)

f64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def oracle_binarized(W):
    """The definition, row by row in float64: alpha * sign(W - mu) + mu, sign(0) = +1."""
    W = W.to(f64)
    rows = []
    for w in W:
        mu = w.sum() / w.numel()
        d = w - mu
        alpha = d.abs().sum() / w.numel()
        rows.append(alpha * torch.where(d >= 0, 1.0, -1.0).to(f64) + mu)
    return torch.stack(rows)


@pytest.mark.parametrize("in_features", [1, 7, 8, 13, 17, 64])
def test_pack_unpack_round_trip(in_features):
    W = torch.randn(5, in_features, generator=gen(in_features))
    W[0, 0] = 0.0  # zero counts as +1
    packed = pack_signs(W)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (in_features + 7) // 8)
    expected = torch.where(W >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed, in_features), expected)


def test_pack_bit_order_is_little_endian_along_in():
    W = -torch.ones(1, 10)
    W[0, 0] = W[0, 3] = W[0, 9] = 1.0
    assert pack_signs(W).tolist() == [[1 + 8, 2]]


def test_unpack_rejects_mismatched_sizes():
    packed = pack_signs(torch.randn(2, 13))
    for bad in (8, 17, 0):
        with pytest.raises(ValueError, match="does not fit"):
            unpack_signs(packed, bad)
    with pytest.raises(ValueError, match="uint8"):
        unpack_signs(packed.to(torch.int32), 13)


def test_binarize_matches_definition():
    W = torch.randn(9, 21, generator=gen(1), dtype=f64) + torch.linspace(-1, 1, 9, dtype=f64)[:, None]
    d = binarize_weight(W)
    assert d["residual_a"] is None and d["in_features"] == 21
    assert torch.allclose(binarized_weight(d["packed"], d["alpha"], d["mu"], 21), oracle_binarized(W), atol=1e-12)
    # alpha is the least-squares scale for the chosen signs: no other scale does better
    D = W - d["mu"][:, None]
    signs = unpack_signs(d["packed"], 21, f64)
    best = ((D - d["alpha"][:, None] * signs) ** 2).sum(1)
    for factor in (0.9, 1.1):
        assert (best < ((D - factor * d["alpha"][:, None] * signs) ** 2).sum(1)).all()


def test_residual_rank_full_reproduces_w_and_error_falls_with_rank():
    W = torch.randn(12, 20, generator=gen(2), dtype=f64)
    errors = []
    for r in (0, 2, 6, 12):
        d = binarize_weight(W, residual_rank=r)
        approx = binarized_weight(d["packed"], d["alpha"], d["mu"], 20)
        if r:
            assert d["residual_a"].shape == (r, 20) and d["residual_b"].shape == (12, r)
            approx = approx + d["residual_b"] @ d["residual_a"]
        errors.append((W - approx).norm().item())
    assert errors[-1] < 1e-12
    assert errors[0] > errors[1] > errors[2] > errors[3]
    with pytest.raises(ValueError, match="residual_rank"):
        binarize_weight(W, residual_rank=13)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (f64, 1e-12)])
def test_binary_linear_equals_dense_binarized_linear(dtype, tol):
    W = torch.randn(24, 37, generator=gen(3), dtype=f64)
    bias = torch.randn(24, generator=gen(4))
    d = binarize_weight(W)
    x = torch.randn(2, 5, 37, generator=gen(5)).to(dtype)
    y = torch.ops.rewriter.binary_linear(x, d["packed"], d["alpha"].to(dtype), d["mu"].to(dtype), bias.to(dtype), 37)
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    # oracle: float64 x W_b^T + b from the definition, with the op's (rounded) alpha, mu, bias
    Wb = oracle_binarized(W)
    ref = x.to(f64) @ Wb.T + bias.to(dtype).to(f64)
    assert ((y.to(f64) - ref).norm() / ref.norm()).item() < tol
    y_nobias = binary_linear(x, d["packed"], d["alpha"].to(dtype), d["mu"].to(dtype), None, 37)
    ref = x.to(f64) @ Wb.T
    assert ((y_nobias.to(f64) - ref).norm() / ref.norm()).item() < tol


def test_binary_linear_rejects_bad_arguments():
    d = binarize_weight(torch.randn(6, 10))
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="in_features"):
        binary_linear(torch.randn(3, 9), d["packed"], d["alpha"], d["mu"], None, 10)
    with pytest.raises(ValueError, match="alpha"):
        binary_linear(x, d["packed"], d["alpha"][:5], d["mu"], None, 10)
    with pytest.raises(ValueError, match="packed"):
        binary_linear(torch.randn(3, 20), d["packed"], d["alpha"], d["mu"], None, 20)


def test_binary_linear_exports_with_dynamic_batch_and_seq():
    W = torch.randn(16, 19, generator=gen(6))
    d = binarize_weight(W, residual_rank=3)

    class BinaryLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", d["packed"])
            self.register_buffer("alpha", d["alpha"])
            self.register_buffer("mu", d["mu"])
            self.register_buffer("bias", torch.randn(16, generator=gen(7)))
            self.register_buffer("ra", d["residual_a"])
            self.register_buffer("rb", d["residual_b"])

        def forward(self, x):
            y = torch.ops.rewriter.binary_linear(x, self.packed, self.alpha, self.mu, self.bias, 19)
            return y + torch.nn.functional.linear(torch.nn.functional.linear(x, self.ra), self.rb)

    layer = BinaryLayer()
    x = torch.randn(2, 8, 19, generator=gen(8))
    batch, seq = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=256)
    ep = torch.export.export(layer, (x,), dynamic_shapes=({0: batch, 1: seq},), strict=False)
    assert any(n.target is torch.ops.rewriter.binary_linear.default for n in ep.graph.nodes)
    x2 = torch.randn(5, 33, 19, generator=gen(9))
    y = ep.module()(x2)
    assert y.shape == (5, 33, 16)
    Wd = oracle_binarized(W) + d["residual_b"].to(f64) @ d["residual_a"].to(f64)
    ref = x2.to(f64) @ Wd.T + layer.bias.to(f64)
    assert torch.allclose(y.to(f64), ref, atol=1e-4)


def test_binary_linear_bytes():
    info = binary_linear_bytes(4096, 4100, residual_rank=0, value_bytes=2)
    assert info["sign_bytes"] == 4096 * 513
    assert info["scale_bytes"] == 2 * 4096 * 2
    assert info["bytes"] == 4096 * 513 + 4 * 4096
    assert info["dense_bytes"] == 4096 * 4100 * 2
    with_residual = binary_linear_bytes(4096, 4096, residual_rank=64)
    assert with_residual["residual_bytes"] == 64 * 8192 * 2
    assert with_residual["bytes_ratio"] == pytest.approx(with_residual["bytes"] / (4096 * 4096 * 2))
    with pytest.raises(ValueError):
        binary_linear_bytes(0, 8)
