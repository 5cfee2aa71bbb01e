"""Every registered attention method is complete: config, budget, op with a fake, reference, cost, ONNX translation,
a pass, and an entry in the per-method test matrix below (a new method fails here until it has all of them)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rewriter  # noqa: F401  (registers the methods)
from rewriter.attention import METHODS, AttentionConfig
from rewriter.attention._contract import AttentionCost
from rewriter.pipeline import PASSES

TESTS = Path(__file__).resolve().parent

# The per-method test matrix: options small enough for a 40-token check here, and the test file that compares the
# method's op with an oracle written from its definition.
MATRIX = {
    "exact-attention": ({}, "test_exact_attention.py"),
    "window": ({"window": 8, "sinks": 2, "block": 16}, "test_ops_sparse_attention.py"),
    "block-topk": ({"density": 0.5, "block": 16}, "test_ops_sparse_attention.py"),
    "strided": ({"stride": 2, "block": 16}, "test_ops_sparse_attention.py"),
    "lsh": ({"n_hashes": 2, "bucket_size": 16}, "test_ops_sparse_attention.py"),
    "performer": ({"features": 16}, "test_ops_lowrank_attention.py"),
    "linear": ({"feature_map": "elu", "window": 8, "sinks": 2}, "test_ops_lowrank_attention.py"),
    "scatterbrain": ({"features": 16, "window": 8}, "test_ops_lowrank_attention.py"),
    "hedgehog": ({"window": 8, "features": 4, "steps": 2}, "test_hedgehog.py"),
}


def test_every_method_has_a_row_in_the_matrix():
    assert set(METHODS) == set(MATRIX), "add the method to MATRIX (and its test file)"
    for name, (_, test_file) in MATRIX.items():
        assert (TESTS / test_file).exists(), f"{name}: {test_file} is missing"


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_method_is_complete(name):
    m = METHODS[name]
    assert dataclasses.is_dataclass(m.config) and issubclass(m.config, AttentionConfig)
    assert PASSES[name].method is m and PASSES[name].config_class is m.config
    assert m.summary and m.colour.startswith("#") and callable(m.onnx)
    cfg = m.config(**MATRIX[name][0])
    cfg.validate()
    for options in m.candidates:
        m.config(**options).validate()
    kwargs, reported = m.budget(cfg, 40)
    assert set(kwargs) <= set(m.args) and isinstance(reported, dict)
    if m.density_knob:
        assert m.density_knob in kwargs and m.density_knob in reported

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 40, 8
    q, k, v = (torch.randn(B, h, L, D, generator=gen) for h in (H, Hkv, Hkv))
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, 33:] = False
    if m.fit is not None:                                # learned methods: their tensors come from the fit hook
        learned, info = m.fit(cfg, q, k, v, key_mask, True, D ** -0.5, kwargs)
        assert all(isinstance(t, torch.Tensor) for t in learned.values()) and isinstance(info, dict)
        kwargs = {**kwargs, **learned}
    args = m.positional(kwargs)
    out = m.op(q, k, v, key_mask, True, D ** -0.5, *args)
    assert out.shape == (B, H, L, D) and torch.isfinite(out).all()
    # the op on the CPU runs its reference, bit for bit, except the SDPA paths of window (per block of query rows,
    # sparse.window_attention_cpu), block-topk and strided (one call over the gathered blocks, sparse._layout_sdpa):
    # the same pairs, fp32 rounding apart
    atol, rtol = (2e-6, 1e-5) if name in ("window", "block-topk", "strided") else (0, 0)
    torch.testing.assert_close(out, m.reference(q, k, v, key_mask, True, D ** -0.5, **kwargs), rtol=rtol, atol=atol)
    with FakeTensorMode() as mode:                       # the fake: programs holding the op still export
        fq, fk, fv, fm = (mode.from_tensor(t) for t in (q, k, v, key_mask))
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        assert m.op(fq, fk, fv, fm, True, D ** -0.5, *fargs).shape == (B, H, L, D)
    cost = m.cost(B, H, Hkv, L, L, D, D, True, **kwargs)
    assert isinstance(cost, AttentionCost) and cost.flops > 0 and cost.dense_flops > 0
    if m.pairs is not None:
        pairs = m.pairs(q, k, key_mask, True, D ** -0.5, **kwargs)
        assert pairs.dtype == torch.bool and pairs.shape[-2:] == (L, L)


def test_one_spelling_per_method():
    """The pass name is the method's only spelling: its op is rewriter::<name with - -> _>, and registering a method
    whose op is named otherwise is refused."""
    from rewriter.attention._contract import register_method
    for name, m in METHODS.items():
        assert m.op_name == "rewriter::" + name.replace("-", "_")
    with pytest.raises(ValueError, match="rewriter::my_method"):
        register_method(dataclasses.replace(METHODS["window"], name="my-method"))
    assert "my-method" not in METHODS


def test_program_with_an_op_this_version_lacks_is_refused_by_name(tmp_path):
    """A .pt2 written when the ops were named <method>_attention loads with an error naming the op and the fix,
    not torch's deserialisation traceback."""
    import subprocess
    import sys
    from rewriter.errors import RewriterError
    from rewriter.safety import load_pt2

    # saved in a process that defines the old op name (this one does not)
    subprocess.run([sys.executable, "-c", f"""
import torch
lib = torch.library.Library("rewriter", "DEF")
lib.define("strided_attention(Tensor x) -> Tensor")
lib.impl("strided_attention", lambda x: x.clone(), "CompositeExplicitAutograd")
class M(torch.nn.Module):
    def forward(self, x):
        return torch.ops.rewriter.strided_attention(x)
torch.export.save(torch.export.export(M(), (torch.randn(3),)), {str(tmp_path / "old.pt2")!r})
"""], check=True)
    with pytest.raises(RewriterError, match=r"rewriter::strided_attention, .*earlier rewriter.*rewriter::strided\b"):
        load_pt2(tmp_path / "old.pt2")
