"""Every attention pass end to end: tiny BERT, GPT-2, Llama (GQA) and ViT and the real MiniLM; the written
.pt2 runs at a sequence length other than the calibration's and matches the in-memory program; limits that
must hold (a window covering the sequence is exact)."""
import pytest
import torch

from rewriter import load_program, make_pass, optimize
from rewriter.pipeline import PASSES, get_pass
from rewriter.passes.attention import AttentionPass

from conftest import ARCHS, model_inputs

get_pass("window")
ATTENTION_PASSES = sorted(n for n, c in PASSES.items() if issubclass(c, AttentionPass))
# small budgets that fit sequences of ~16-40 tokens
OPTIONS = {
    "window": {"window": 8, "sinks": 2, "block": 16},
    "block-topk": {"density": 0.5, "block": 8},
    "strided": {"stride": 2, "block": 8},
    "lsh": {"n_hashes": 2, "bucket_size": 8},
    "performer": {"features": 16},
    "linear": {"feature_map": "elu", "window": 4},
    "scatterbrain": {"features": 16, "window": 6, "sinks": 1},
    "exact-attention": {},
    "hedgehog": {"window": 4, "features": 4, "steps": 5},
}


# a method not listed above runs with its row of the per-method test matrix (no edit here to add a method)
from test_attention_registry import MATRIX  # noqa: E402
OPTIONS.update({name: dict(opts) for name, (opts, _) in MATRIX.items() if name not in OPTIONS})


def test_every_attention_pass_has_test_options():
    assert set(ATTENTION_PASSES) == set(OPTIONS)


# Two methods per program (layer 0 and layer 1 of the tiny models), so every method meets every architecture in
# half the captures.
PAIRS = [("window", "block-topk"), ("strided", "lsh"), ("performer", "linear"), ("scatterbrain", "window"),
         ("exact-attention", "hedgehog")]
PAIRS += [("exact-attention", m) for m in sorted(set(ATTENTION_PASSES) - {x for p in PAIRS for x in p})]   # new ones


def test_pairs_cover_every_method():
    assert {m for pair in PAIRS for m in pair} == set(ATTENTION_PASSES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_pass_end_to_end(pair, arch, tiny_folders, tmp_path):
    out = tmp_path / "out"
    passes = [make_pass(name, {**OPTIONS[name], "layers": str(layer)}) for layer, name in enumerate(pair)]
    res = optimize(tiny_folders[arch], passes, out=out, samples=2, seq_len=24)
    for layer, entry in enumerate(res.report["passes"]):
        if entry["pass"] == "exact-attention":      # capture already made every site exact: a no-op that says so
            assert entry["sites_changed"] == 0 and "already exact since capture" in entry["notes"][0]
            assert entry["metrics"]["relative_error"] < 1e-5
            continue
        assert entry["sites_changed"] == 1 and entry["sites"][0]["layer"] == layer
        site = entry["sites"][0]
        assert 0 <= site["attention_rel_error"] < 10 and 0 <= site["density"] <= 1
        assert site["flops_ratio"] > 0
        assert entry["metrics"]["relative_error"] < 10
    assert not res.report["weight_only"] and (out / "hf" / "config.json").exists(), res.report.get("notes")
    program = load_program(out)
    seq = 37 if arch != "vit" else None
    inputs = model_inputs(arch, 3, seq or 0, seed=9)
    got = program.run(**inputs)[0]
    torch.testing.assert_close(got, res.program.run(**inputs)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()
    ops = {str(n.target) for n in program.ep.graph.nodes if n.op == "call_function"}
    for name in pair:
        assert f"rewriter.{PASSES[name].op_name}.default" in ops, "the approximation op must be in the saved program"
    assert "aten.scaled_dot_product_attention.default" not in ops


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_window_covering_sequence_is_exact(arch, tiny_folders):
    res = optimize(tiny_folders[arch], [make_pass("window", {"window": 128, "sinks": 0, "block": 16})],
                   samples=2, seq_len=24)
    assert res.report["final"]["relative_error"] < 1e-5
    for site in res.report["passes"][0]["sites"]:
        assert site["attention_rel_error"] < 1e-6


def test_sites_share_one_key_mask(tiny_folders):
    """Every rewritten layer reads the same `attention_mask != 0` tensor (so the CUDA ops' all-real check is made
    once per forward), and it is computed before the first layer."""
    res = optimize(tiny_folders["llama"], [make_pass("window", {"window": 8, "sinks": 2, "block": 16})],
                   samples=2, seq_len=24)
    graph = res.program.module().graph
    ops = [n for n in graph.nodes if n.op == "call_function" and "rewriter.window." in str(n.target)]
    assert len(ops) >= 2
    masks = {n.args[3] for n in ops}
    assert len(masks) == 1
    (mask,) = masks
    assert mask.target is torch.ops.aten.ne.Scalar and mask.args[0].target == "attention_mask"
    order = {n: i for i, n in enumerate(graph.nodes)}
    assert order[mask] < min(order[n] for n in ops)


def test_scatterbrain_covering_window_is_exact(tiny_folders):
    res = optimize(tiny_folders["gpt2"], [make_pass("scatterbrain", {"features": 8, "window": 128})],
                   samples=2, seq_len=24)
    assert res.report["final"]["relative_error"] < 1e-5


def test_layer_filter_keeps_other_layers_exact(tiny_folders):
    res = optimize(tiny_folders["bert"], [make_pass("performer", {"features": 8, "layers": "1"})], samples=2, seq_len=16)
    sites = res.report["passes"][0]["sites"]
    assert [s["layer"] for s in sites] == [1]
    gm = res.program.module()
    exact = [n for n in gm.graph.nodes if n.target is torch.ops.rewriter.exact_attention.default]
    assert len(exact) == 1 and exact[0].meta["nn_module_stack"] and not any(
        "scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("name", ATTENTION_PASSES)
def test_minilm_real_text(name, minilm_program, tmp_path):
    opts = {k: v for k, v in OPTIONS[name].items() if k != "block"}
    res = optimize(minilm_program, [make_pass(name, opts)], samples=2, seq_len=64)
    m = res.report["final"]
    assert 0 < m["embedding_cosine"] <= 1 + 1e-9
    if name == "exact-attention":       # a no-op since capture: the output is the model's
        assert res.report["passes"][0]["summary"] == {"sites": 6, "already_exact": 6}
        assert m["relative_error"] < 1e-6
        return
    assert len(res.report["passes"][0]["sites"]) == 6
