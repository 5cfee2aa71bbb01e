"""Linear-layer passes end to end (tiny BERT, GPT-2 Conv1D, Llama, ViT; real MiniLM), exactness limits, .pt2
round trip, and activation-aware low-rank beating plain SVD on real activations."""
import pytest
import torch

from rewriter import load_program, make_pass, optimize

from conftest import ARCHS, model_inputs

OPTIONS = {
    "lowrank": {"ratio": 0.5},
    "sparse-lowrank": {"ratio": 0.3, "sparsity": 0.9},
    "binarize": {"residual_rank": 4},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_pass_end_to_end(name, arch, tiny_folders, tmp_path):
    out = tmp_path / "out"
    res = optimize(tiny_folders[arch], [make_pass(name, OPTIONS[name])], out=out, samples=2, seq_len=16)
    entry = res.report["passes"][0]
    assert entry["sites_changed"] > 0
    s = entry["summary"]
    assert s["bytes_after"] < s["bytes_before"]
    for site in entry["sites"]:
        assert 0 <= site["output_rel_error"] < 2
    program = load_program(out)
    inputs = model_inputs(arch, 2, 21, seed=3)
    torch.testing.assert_close(program.run(**inputs)[0], res.program.run(**inputs)[0], atol=1e-5, rtol=1e-5)
    names = {str(n.target) for n in program.ep.graph.nodes}
    if name == "binarize":
        assert "rewriter.binary_linear.default" in names
    # the dense weights are gone from the program
    assert res.report["after"]["bytes"] < res.report["before"]["bytes"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_rank_is_exact(arch, tiny_folders):
    res = optimize(tiny_folders[arch], [make_pass("lowrank", {"rank": 128, "include": ["*mlp*"]})], samples=2, seq_len=16)
    # full rank is never smaller, so nothing may be rewritten and the output is untouched
    assert res.report["passes"][0]["sites_changed"] == 0
    from rewriter.linear.lowrank import svd_factors
    W = torch.randn(48, 40, dtype=torch.float64)
    A, B = svd_factors(W, 40)
    torch.testing.assert_close(B @ A, W)


def test_binarize_full_residual_is_exact(tiny_folders):
    res = optimize(tiny_folders["bert"], [make_pass("binarize", {"residual_rank": 64, "include": ["*attention*"]})],
                   samples=2, seq_len=16)
    assert res.report["passes"][0]["sites_changed"] == 8
    assert res.report["final"]["relative_error"] < 1e-5


def test_whitened_beats_plain_svd_on_minilm(minilm_program):
    errs = {}
    for method in ("svd", "whitened"):
        res = optimize(minilm_program, [make_pass("lowrank", {"ratio": 0.5, "method": method, "layers": "0-1"})],
                       samples=4, seq_len=64)
        errs[method] = res.report["final"]["relative_error"]
        assert res.report["passes"][0]["sites_changed"] == 12
    assert errs["whitened"] < 0.7 * errs["svd"], errs
