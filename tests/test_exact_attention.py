"""rewriter::exact_attention (exact attention on the key-padding mask) against a float64 dense oracle, its
remembered all-real check, its ONNX translation in onnxruntime, and the canonical form of a captured real model."""
import pytest
import torch

import rewriter  # noqa: F401  (registers the ops)
from rewriter.attention import _contract as _common

f64 = torch.float64
op = torch.ops.rewriter.exact_attention


def qkv(seed, B=2, H=4, Hkv=2, Lq=13, Lk=13, D=8, Dv=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=dtype)
    return q, k, v


def oracle(q, k, v, key_mask, causal, scale):
    allowed = _common.allowed_mask(q.shape[2], k.shape[2], causal, key_mask, "cpu")
    return _common.masked_softmax_attention(q.to(f64), k.to(f64), v.to(f64), allowed, scale)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["none", "all-real", "right", "left"])
@pytest.mark.parametrize("Lq,Lk", [(13, 13), (5, 13)])
def test_matches_dense_oracle(causal, padding, Lq, Lk):
    q, k, v = qkv(Lq + Lk, Lq=Lq, Lk=Lk, Dv=6)
    key_mask = None if padding == "none" else torch.ones(2, Lk, dtype=torch.bool)
    if padding == "right":
        key_mask[1, Lk - 4:] = False
    if padding == "left":              # with causal and Lq == Lk, the first query rows of row 1 see no real key
        key_mask[1, :4] = False
    scale = 0.3
    out = op(q, k, v, key_mask, causal, scale)
    assert out.shape == (2, 4, Lq, 6) and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.to(f64), oracle(q, k, v, key_mask, causal, scale), atol=2e-6, rtol=1e-5)


def test_float64_and_bfloat16():
    q, k, v = qkv(3, dtype=f64)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, -2:] = False
    torch.testing.assert_close(op(q, k, v, mask, True, 0.4), oracle(q, k, v, mask, True, 0.4), atol=1e-12, rtol=1e-12)
    out16 = op(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, True, 0.4)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.to(f64), oracle(q, k, v, mask, True, 0.4), atol=3e-2, rtol=3e-2)


def test_bad_shapes_rejected():
    q, k, v = qkv(4)
    with pytest.raises(Exception):
        op(q, k, v, torch.ones(2, 7, dtype=torch.bool), True, 1.0)
    with pytest.raises(Exception):
        op(q[:, :3], k, v, None, True, 1.0)          # 3 query heads, 2 kv heads


def test_checks_each_mask_once(monkeypatch):
    """One all-real check per mask tensor: the layers of a forward share the mask, so one sync per forward."""
    calls = []
    real_all = torch.Tensor.all
    monkeypatch.setattr(torch.Tensor, "all", lambda self, *a, **kw: calls.append(1) or real_all(self, *a, **kw))
    q, k, v = qkv(5)
    mask = torch.ones(2, 13, dtype=torch.bool)
    for _ in range(4):
        op(q, k, v, mask, True, 0.5)
    assert len(calls) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_onnx_translation(causal, tmp_path):
    pytest.importorskip("onnxruntime")
    from test_onnx_backend import export_op
    args = (causal, 8 ** -0.5)
    diffs, info = export_op(tmp_path, op.default, args, 13, (11, 19), oracle)
    assert max(diffs) < 1e-5 and info["quadratic"]


def test_captured_minilm_is_exact_attention_and_exports(minilm_program, tmp_path):
    """Capture makes every attention site of the real MiniLM exact_attention on the key-padding mask (no SDPA on HF's
    dense mask left); the program with no pass exports to ONNX that onnxruntime runs, and the exact-attention pass
    is a no-op that says so."""
    pytest.importorskip("onnxruntime")
    from rewriter import make_pass, optimize
    from rewriter.backends.onnx import export_program
    graph_ops = [str(n.target) for n in minilm_program.ep.graph.nodes if n.op == "call_function"]
    assert graph_ops.count("rewriter.exact_attention.default") == 6
    assert "aten.scaled_dot_product_attention.default" not in graph_ops
    record = export_program(minilm_program, tmp_path / "captured.onnx")
    assert record["passed"] and record["max_abs_diff"] < 1e-4 and len(record["checks"]) == 3
    res = optimize(minilm_program, [make_pass("exact-attention", {})], samples=2, seq_len=32, out=tmp_path / "out",
                   export_onnx=True)
    entry = res.report["passes"][0]
    assert entry["sites_changed"] == 0 and entry["notes"][0].startswith("already exact since capture: 6 of 6")
    assert res.report["final"]["relative_error"] < 1e-6
    assert (tmp_path / "out" / "model.onnx").exists()
