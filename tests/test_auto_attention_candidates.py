"""auto-attention's learned (hedgehog), pruned and shared candidates. Rewritten heads against independent oracles (the
eager model with pruned heads' output-projection columns zeroed and a float64 attention handing layer l's map to
layer l+1; the hedgehog pass fitted on the same samples; the op on all heads), the per-head error spaces against
brute force and head-prune's own importance scores, the planner's constraints, replay, and the exports."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import model_inputs, tiny_model
from rewriter.analysis import analyze, head_errors
from rewriter.capture import capture
from rewriter.errors import RewriterError
from rewriter.load import LoadedModel
from rewriter.passes.auto_attention import LEARNED_CANDIDATES, AutoAttention, slice_learned
from rewriter.pipeline import Pipeline, make_pass
from rewriter.api import optimize, load_program
from test_heads import _real, _sharing_oracle

HH = "hedgehog(features=4,window=4,steps=20,lr=0.05)"
SITE = "encoder.layer.{}.attention.self"
O_PROJ = "encoder.layer.{}.attention.output.dense"


def _bert(layers: int = 3, seed: int = 3):
    """Tiny BERT (hidden 64, 4 heads of 16) with sharpened queries/keys, so heads are far from uniform."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                        vocab_size=120, max_position_embeddings=128, architectures=["BertModel"])
    model = tf.BertModel(cfg).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(6)
            layer.attention.self.key.weight.mul_(6)
    return model, capture(LoadedModel(model, model.config))


@pytest.fixture(scope="module")
def bert3():
    return _bert()


def _plan(**sites):
    return [{"site": SITE.format(layer), "heads": heads} for layer, heads in sites.items()]


def _replay(program, plan, calib):
    return Pipeline([make_pass("auto-attention", {"plan": plan})]).run(program, calib)


# --- error spaces ---------------------------------------------------------------------------------------------------

def test_head_errors_against_brute_force():
    g = torch.Generator().manual_seed(0)
    B, H, L, Dv, hidden = 2, 3, 5, 4, 7
    exact, approx = torch.randn(B, H, L, Dv, generator=g).double(), torch.randn(B, H, L, Dv, generator=g)
    rows = torch.ones(B, 1, L, 1, dtype=torch.bool)
    rows[1, 0, 3:] = False
    W = torch.randn(hidden, H * Dv, generator=g).double()
    real = rows[:, 0, :, 0]
    d = (approx.double() - exact).transpose(1, 2)[real]                  # (rows, H, Dv)
    ref = exact.transpose(1, 2)[real]
    want_head = [float(d[:, h].norm() / ref[:, h].norm()) for h in range(H)]
    total = (ref.reshape(-1, H * Dv) @ W.T).norm()
    want_out = [float((d[:, h] @ W[:, h * Dv:(h + 1) * Dv].T).norm() / total) for h in range(H)]
    torch.testing.assert_close(torch.tensor(head_errors(approx, exact, rows)), torch.tensor(want_head))
    torch.testing.assert_close(torch.tensor(head_errors(approx, exact, rows, W)), torch.tensor(want_out))
    # only the second sample
    d1, r1 = (approx.double() - exact)[1:, :, :3], exact[1:, :, :3]
    torch.testing.assert_close(torch.tensor(head_errors(approx, exact, rows, samples=slice(1, 2)), dtype=torch.double),
                               d1.pow(2).sum((0, 2, 3)).sqrt() / r1.pow(2).sum((0, 2, 3)).sqrt())


def test_pruned_error_is_head_prune_importance(bert3):
    """In the output space a pruned head's error is what head-prune ranks heads by (an independent implementation:
    the recorded output-projection input, sliced)."""
    _, program = bert3
    calib = model_inputs("bert", 2, 16)
    a = analyze(program, calib, [], output_errors=True, structural=("pruned", "shared"))
    run = Pipeline([make_pass("head-prune", {"count": 1})]).run(program, calib)
    site = run.report["passes"][0]["sites"][0]
    mine = a.structural[site["module_path"]]["pruned"][site["pruned_heads"][0]]
    assert mine == pytest.approx(site["head_errors"][0], rel=1e-6)
    assert mine == pytest.approx(min(min(e["pruned"]) for e in a.structural.values()), rel=1e-9)
    # head space: a removed head's output is all error; shared is measured from layer 1 on
    h = analyze(program, calib, [], structural=("pruned", "shared"))
    assert all(e == pytest.approx(1.0) for s in h.structural.values() for e in s["pruned"])
    assert "shared" not in h.structural[SITE.format(0)] and h.donors[SITE.format(2)] == SITE.format(1)
    assert all(0 < e < 2 for e in h.structural[SITE.format(1)]["shared"])


# --- rewritten heads against oracles --------------------------------------------------------------------------------

def test_pruned_and_shared_heads_match_the_eager_oracle(bert3):
    model, program = bert3
    plan = _plan(**{"0": ["pruned", "exact", "pruned", "exact"], "1": ["exact"] * 4, "2": ["shared"] * 4})
    run = _replay(program, plan, model_inputs("bert", 2, 16))
    assert run.program.meta["head_prune"] == {SITE.format(0): [0, 2]}
    assert run.program.meta["share_attention"] == {SITE.format(2): SITE.format(1)}
    # two heads of 16 leave: q/k/v rows with biases (3 x (16 x 64 + 16)) and output columns (64 x 16) each; layer 2
    # loses its q/k projections (2 x (64 x 64 + 64))
    assert program.num_parameters() - run.program.num_parameters() == 2 * (3 * (16 * 64 + 16) + 64 * 16) \
        + 2 * (64 * 64 + 64)
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for h in (0, 2):
            oracle.get_submodule(O_PROJ.format(0)).weight[:, h * 16:(h + 1) * 16] = 0
    inputs = model_inputs("bert", 3, 20, seed=7)
    want = _sharing_oracle(oracle, "bert", {2}, inputs)
    got = run.program.run(**inputs)[0]
    assert (_real(got, inputs) - _real(want, inputs)).abs().max() < 1e-5


def test_learned_heads_are_the_hedgehog_pass_fitted_on_the_same_samples(bert3):
    """A site all of whose heads are learned equals the hedgehog pass on that layer, fitted on the samples the plan
    fits on (the first half of the calibration samples)."""
    _, program = bert3
    calib = model_inputs("bert", 4, 16)
    fit = {k: v[:2] for k, v in calib.items()}
    auto = _replay(program, _plan(**{"0": [HH] * 4}), calib)
    ref = Pipeline([make_pass("hedgehog", {"features": 4, "window": 4, "steps": 20, "lr": 0.05, "layers": "0"})]
                   ).run(program, fit)
    inputs = model_inputs("bert", 3, 23, seed=9)
    want = ref.program.run(**inputs)[0]
    assert not torch.allclose(want, program.run(**inputs)[0], atol=1e-3)
    torch.testing.assert_close(auto.program.run(**inputs)[0], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [0, 3])
def test_sliced_maps_are_the_op_on_those_heads(window):
    """GQA (4 query heads on 2 kv heads): the op on a head group with ``slice_learned`` maps equals the op on all
    heads at those heads."""
    from rewriter.attention.hedgehog import identity_maps
    op = torch.ops.rewriter.hedgehog.default
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    maps = {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in identity_maps(4, 2, 8, 5).items()}
    full = op(q, k, v, None, False, 8 ** -0.5, *[maps[n] for n in ("q_weight", "q_bias", "k_weight", "k_bias",
                                                                   "window_gain")], window, 0)
    heads = [3, 0, 2]
    kv = [h // 2 for h in heads]
    part = slice_learned(maps, heads, 2)
    got = op(q[:, heads], k[:, kv], v[:, kv], None, False, 8 ** -0.5,
             *[part[n] for n in ("q_weight", "q_bias", "k_weight", "k_bias", "window_gain")], window, 0)
    torch.testing.assert_close(got, full[:, heads])


# --- planning and replay --------------------------------------------------------------------------------------------

def test_planned_learned_and_pruned_heads_replay_exactly(bert3, tmp_path):
    """The plan made with the new candidates replays from its recipe entry into the same program (learned heads are
    fitted again, on the same samples, into the same maps)."""
    _, program = bert3
    calib = model_inputs("bert", 4, 32)
    cfg = {"density": 0.45, "candidates": [HH, "pruned"]}
    p = make_pass("auto-attention", cfg)
    run = Pipeline([p]).run(program, calib)
    s = run.report["passes"][0]["summary"]
    assert s["attention_flops_ratio"] <= 0.45 + 1e-9
    assert s["heads_by_method"].get("hedgehog", 0) > 0 and s["heads_by_method"].get("pruned", 0) > 0, s
    assert all(f["held_out_samples"] == 1 for f in s["fit"]) and len(s["fit"]) == 3
    assert s["measured_holdout"]["relative_error"] < 1.0
    replay = _replay(program, p.config.plan, calib)
    inputs = model_inputs("bert", 3, 23, seed=9)
    torch.testing.assert_close(replay.program.run(**inputs)[0], run.program.run(**inputs)[0], atol=1e-6, rtol=1e-6)
    assert replay.program.num_parameters() == run.program.num_parameters() < program.num_parameters()


def test_planner_keeps_a_head_per_site_and_pairs_donor_with_receiver():
    model, program = _bert(layers=2)
    calib = model_inputs("bert", 4, 16)
    run = Pipeline([make_pass("auto-attention", {"density": 0.05, "candidates": ["pruned"]})]).run(program, calib)
    plan = run.report["passes"][0]["config"]["plan"]
    assert all(e["heads"].count("pruned") == 3 for e in plan), plan
    # shared only: exact 1, shared 0.5 per head, so 0.75 is met by layer 0 exact and layer 1 reading its map alone
    p = make_pass("auto-attention", {"density": 0.76, "candidates": ["shared"]})
    run = Pipeline([p]).run(program, calib)
    assert [e["heads"] for e in p.config.plan] == [["exact"] * 4, ["shared"] * 4]
    assert run.report["passes"][0]["summary"]["attention_flops_ratio"] == pytest.approx(0.75)
    inputs = model_inputs("bert", 2, 20, seed=4)
    want = _sharing_oracle(model, "bert", {1}, inputs)
    assert (_real(run.program.run(**inputs)[0], inputs) - _real(want, inputs)).abs().max() < 1e-5


def test_candidate_options():
    assert AutoAttention(make_pass("auto-attention", {"density": 0.5}).config)._candidates()[1] == ()
    methods, structural = make_pass("auto-attention", {"density": 0.5, "learned": True, "prune": True,
                                                       "share": True})._candidates()
    assert all(c in methods for c in LEARNED_CANDIDATES) and structural == ("pruned", "shared")
    default = make_pass("auto-attention", {"density": 0.5})._candidates()[0]
    assert not any(m == "hedgehog" for m, _ in default)       # nothing is fitted unless asked
    methods, structural = make_pass("auto-attention", {"density": 0.5, "candidates": ["window(window=8)", "shared"]}
                                    )._candidates()
    assert methods == [("window", {"window": 8})] and structural == ("shared",)
    with pytest.raises((ValueError, RewriterError), match="errors"):
        make_pass("auto-attention", {"density": 0.5, "errors": "model"})


@pytest.mark.parametrize("plan, match", [
    ({"0": ["pruned(x=1)"] + ["exact"] * 3}, "takes no options"),
    ({"0": ["nosuch(window=3)"] + ["exact"] * 3}, "no attention method"),
    ({"0": ["shared"] * 4}, "previous layer"),
    ({"1": ["shared", "exact", "exact", "exact"]}, "some heads only"),
    ({"0": ["window(window=4)"] + ["exact"] * 3, "1": ["shared"] * 4}, "not all exact"),
    ({"0": ["pruned"] * 4}, "every head"),
    ({"0": ["hedgehog(features=4,lora_rank=2)"] + ["exact"] * 3}, "whole site"),
])
def test_bad_plans_are_refused(bert3, plan, match):
    _, program = bert3
    with pytest.raises(RewriterError, match=match):
        _replay(program, _plan(**plan), model_inputs("bert", 2, 12))


def test_gqa_sites_offer_no_single_head_pruning():
    model = tiny_model("llama")
    program = capture(LoadedModel(model, model.config))
    calib = model_inputs("llama", 2, 12)
    a = analyze(program, calib, [], structural=("pruned", "shared"))
    assert all("pruned" not in e for e in a.structural.values()) and len(a.donors) == 1
    with pytest.raises(RewriterError, match="GQA"):
        Pipeline([make_pass("auto-attention", {"plan": [{"site": "model.layers.0.self_attn",
                                                         "heads": ["pruned", "exact", "exact", "exact"]}]})]
                 ).run(program, calib)


# --- exports --------------------------------------------------------------------------------------------------------

def test_exports_of_a_plan_with_every_new_kind(bert3, tmp_path):
    """Learned + exact + pruned heads in layer 0, layer 2 reading layer 1's map: model.pt2 and ONNX (onnxruntime,
    at other shapes) hold it; the HF folder is refused by name. A plan of learned heads alone gets an HF folder,
    which the writer checks against the program."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, program = bert3
    plan = _plan(**{"0": [HH, "pruned", "exact", HH], "1": ["exact"] * 4, "2": ["shared"] * 4})
    res = optimize(program, [make_pass("auto-attention", {"plan": plan})], out=tmp_path / "all", samples=4,
                   seq_len=16, export_onnx=True)
    assert res.report["onnx"]["passed"], res.report["onnx"]
    assert "rewriter::hedgehog" in res.report["onnx"]["custom_ops"]
    assert any("no hf/ folder" in n and "head-prune" in n for n in res.report["notes"])
    back = load_program(tmp_path / "all")
    inputs = model_inputs("bert", 3, 29, seed=11)
    torch.testing.assert_close(back.run(**inputs)[0], res.program.run(**inputs)[0], atol=1e-6, rtol=1e-6)
    res = optimize(program, [make_pass("auto-attention", {"plan": _plan(**{"1": ["exact", HH, HH, "exact"]})})],
                   out=tmp_path / "hh", samples=4, seq_len=16)
    cfg = (tmp_path / "hh" / "hf" / "config.json").read_text()
    assert '"hedgehog"' in cfg and (tmp_path / "hh" / "hf" / "rewriter_attention.safetensors").exists()
