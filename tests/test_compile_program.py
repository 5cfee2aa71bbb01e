"""torch.compile of a captured program's module: one graph (fullgraph=True), equal to the eager program."""
import pytest
import torch

from rewriter.capture import capture

from conftest import model_inputs, tiny_model


@pytest.fixture(scope="module")
def bert_program():
    return capture(tiny_model("bert"))


def test_module_has_no_metadata_asserts(bert_program):
    """torch.export leaves aten._assert_tensor_metadata after every .to(); the module handed out has none (they pin
    the capture's device and break torch.compile's graph)."""
    from rewriter.program import strip_metadata_asserts

    class Cast(torch.nn.Module):
        def forward(self, x):
            return x.to(torch.float32) * 2

    gm = torch.export.export(Cast(), (torch.ones(2, dtype=torch.float64),)).module()
    assert any("_assert_tensor_metadata" in str(n.target) for n in gm.graph.nodes)      # what export leaves
    assert not any("_assert_tensor_metadata" in str(n.target) for n in strip_metadata_asserts(gm).graph.nodes)
    assert torch.equal(gm(torch.ones(2, dtype=torch.float64)), torch.full((2,), 2.0))
    assert not any("_assert_tensor_metadata" in str(n.target) for n in bert_program.module().graph.nodes)


def test_compiled_program_equals_eager(bert_program):
    # aot_eager: dynamo's capture (where the graph broke) and AOT autograd, without inductor's C++ build time
    # (CI has 2 cores); fullgraph=True fails on any graph break.
    torch._dynamo.reset()
    gm = bert_program.module()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    for batch, seq in [(2, 11), (3, 29)]:
        inputs = model_inputs("bert", batch, seq)
        with torch.no_grad():
            got = compiled(**inputs)[0]
        ref = bert_program.run(**inputs)[0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _hf_heads(batch: int, heads: int, length: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """(B, h, L, D) viewed from (B, L, h, D) memory: the layout HF's attention layers hand to attention."""
    return torch.randn(batch, length, heads, dim, generator=g).transpose(1, 2)


def test_attention_ops_return_their_fakes_layout_on_hf_heads():
    """Every attention op's result has its fake's strides when q / k / v come in HF's transposed layout (SDPA's
    output follows its inputs' layout, which broke Inductor's stride check on captured programs)."""
    import rewriter.attention  # noqa: F401  (defines the ops)
    ops = torch.ops.rewriter
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D, F = 2, 4, 2, 19, 16, 4
    q, k, v = _hf_heads(B, H, L, D, g), _hf_heads(B, Hkv, L, D, g), _hf_heads(B, Hkv, L, D, g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :4] = 0
    maps = (torch.randn(H, F, D, generator=g) * 0.1, torch.zeros(H, F), torch.randn(Hkv, F, D, generator=g) * 0.1,
            torch.zeros(Hkv, F), torch.zeros(H))
    cases = [(ops.exact_attention, (q, k, v, None, True, 0.25)), (ops.exact_attention, (q, k, v, mask, False, 0.25)),
             (ops.window, (q, k, v, mask, True, 0.25, 6, 1, 4)), (ops.block_topk, (q, k, v, mask, True, 0.25, 0.5, 4)),
             (ops.strided, (q, k, v, mask, True, 0.25, 2, 1, 1, 4)), (ops.lsh, (q, k, v, mask, True, 0.25, 2, 4)),
             (ops.performer, (q, k, v, mask, True, 0.25, 8)), (ops.linear, (q, k, v, mask, True, 0.25, "elu")),
             (ops.scatterbrain, (q, k, v, mask, True, 0.25, 8, 4)), (ops.hedgehog, (q, k, v, mask, True, 0.25, *maps, 4, 1))]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_faketensor",))
        assert op.default(*args).is_contiguous(), op


def test_inductor_compiles_a_captured_program():
    """torch.compile with Inductor (the default backend) of a captured Llama (exact attention at every site, batch 1:
    SDPA's flash path, HF's transposed heads), equal to the program; it failed on the op's strides before."""
    from conftest import tiny_model
    torch._dynamo.reset()
    program = capture(tiny_model("llama"))
    assert any("exact_attention" in str(n.target) for n in program.ep.graph.nodes)
    compiled = torch.compile(program.module(), fullgraph=True)
    for batch, seq in [(1, 23), (2, 31)]:
        inputs = model_inputs("llama", batch, seq)
        with torch.no_grad():
            got = compiled(**inputs)[0]
        torch.testing.assert_close(got, program.run(**inputs)[0], atol=1e-5, rtol=1e-5)
