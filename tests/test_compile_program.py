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
