"""head-prune and share-attention against independent oracles: the original eager model with the dropped heads'
output-projection columns zeroed, and a hand-written float64 attention that hands layer l's map to layer l+1."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, model_inputs, tiny_model
from rewriter.canonical import canonicalize
from rewriter.capture import capture
from rewriter.errors import RewriterError
from rewriter.load import LoadedModel
from rewriter.passes.heads import _projection_sites, prune_heads
from rewriter.pipeline import PassContext, PassResult, Pipeline, make_pass

O_PROJ = {"bert": "encoder.layer.{}.attention.output.dense", "vit": "layers.{}.attention.o_proj",
          "gpt2": "transformer.h.{}.attn.c_proj", "llama": "model.layers.{}.self_attn.o_proj"}


def _program(arch):
    model = tiny_model(arch)
    return model, capture(LoadedModel(model, model.config))


def _real(t, inputs):
    mask = inputs.get("attention_mask")
    return t[mask.bool()] if mask is not None and t.shape[:2] == mask.shape else t


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_head_is_the_original(arch):
    """The surgery itself (weights sliced to every row, shape constants mapped to themselves) changes nothing."""
    _, program = _program(arch)
    gm = program.module()
    canonicalize(gm)
    ctx = PassContext(program=program, calib_inputs={})
    targets = _projection_sites(gm, ctx, ctx.attention_sites(gm), PassResult())
    assert len(targets) == 2
    for site, node, proj, linears in targets:
        prune_heads(gm, site, node, proj, linears, list(range(site.kv_heads)))
    inputs = model_inputs(arch, 2, 12, seed=3)
    after = program.recapture(gm)
    assert torch.equal(after.run(**inputs)[0], program.run(**inputs)[0])
    assert after.num_parameters() == program.num_parameters()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("count", [1, 2])
def test_head_prune_matches_zeroed_heads(arch, count):
    model, program = _program(arch)
    run = Pipeline([make_pass("head-prune", {"count": count})]).run(program, model_inputs(arch, 2, 16))
    entry = run.report["passes"][0]
    pruned = sum(s["kv_heads_before"] - s["kv_heads_after"] for s in entry["sites"])
    assert pruned == count
    assert run.program.num_parameters() < program.num_parameters()
    # oracle: the eager model with the dropped heads' columns of the output projection set to zero
    oracle = copy.deepcopy(model)
    D = model.config.hidden_size // model.config.num_attention_heads
    for s in entry["sites"]:
        o = oracle.get_submodule(O_PROJ[arch].format(s["layer"]))
        with torch.no_grad():
            for h in s["pruned_heads"]:
                if arch == "gpt2":
                    o.weight[h * D:(h + 1) * D] = 0      # Conv1D: (in, out)
                else:
                    o.weight[:, h * D:(h + 1) * D] = 0
        assert s["heads_after"] == s["heads_before"] - len(s["pruned_heads"])
    inputs = model_inputs(arch, 3, 20, seed=5)
    with torch.no_grad():
        want = oracle(**inputs)[0]
    got = run.program.run(**inputs)[0]
    assert (_real(got, inputs) - _real(want, inputs)).abs().max() < 1e-5


def test_head_prune_gqa_drops_whole_groups():
    _, program = _program("llama")
    run = Pipeline([make_pass("head-prune", {"ratio": 0.5})]).run(program, model_inputs("llama", 2, 16))
    for s in run.report["passes"][0]["sites"]:
        k = s["pruned_kv_heads"][0]
        assert s["pruned_heads"] == [2 * k, 2 * k + 1] and s["kv_heads_after"] == 1
    sd = run.program.ep.state_dict
    assert [tuple(t.shape) for n, t in sd.items() if n.endswith("layers.0.self_attn.k_proj.weight")] == [(16, 64)]


def test_head_prune_budget_and_bounds():
    _, program = _program("bert")
    calib = model_inputs("bert", 2, 16)
    none = Pipeline([make_pass("head-prune", {"error": 1e-9})]).run(program, calib)
    assert none.report["passes"][0]["sites_changed"] == 0
    some = Pipeline([make_pass("head-prune", {"error": 0.9})]).run(program, calib)
    assert 0.0 < some.report["passes"][0]["summary"]["error_sum"] <= 0.9
    with pytest.raises(RewriterError, match="keeps one"):
        Pipeline([make_pass("head-prune", {"count": 7})]).run(program, calib)
    with pytest.raises((ValueError, RewriterError), match="at most one"):
        make_pass("head-prune", {"count": 1, "ratio": 0.5})


# --- share-attention --------------------------------------------------------------------------------------------------

def _sharing_oracle(model, arch, receivers: set[int], inputs):
    """The eager model with a float64 attention written out here: layer l stores its map; a receiver layer uses the
    stored map of the layer before instead of its own q.k."""
    from transformers import AttentionInterface, AttentionMaskInterface
    state = {"layer": 0, "maps": {}}

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        layer = state["layer"]
        state["layer"] += 1
        q, k, v = query.double(), key.double(), value.double()
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        if attention_mask is not None:
            m = attention_mask[..., : k.shape[2]]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
        p = torch.softmax(s, -1)
        state["maps"][layer] = p
        if layer in receivers:
            p = state["maps"][layer - 1]
        return (p @ v).transpose(1, 2).to(query.dtype).contiguous(), None

    AttentionInterface.register("share_oracle", attention)
    AttentionMaskInterface.register("share_oracle", AttentionMaskInterface._global_mapping["eager"])
    oracle = copy.deepcopy(model)
    oracle.set_attn_implementation("share_oracle")
    with torch.no_grad():
        return torch.nan_to_num(oracle(**inputs)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_share_attention_matches_oracle(arch):
    model, program = _program(arch)
    none = Pipeline([make_pass("share-attention", {"count": 0})]).run(program, model_inputs(arch, 2, 16))
    inputs = model_inputs(arch, 3, 20, seed=7)
    assert torch.equal(none.program.run(**inputs)[0], program.run(**inputs)[0])
    run = Pipeline([make_pass("share-attention", {"count": 1})]).run(program, model_inputs(arch, 2, 16))
    site = run.report["passes"][0]["sites"][0]
    assert (site["donor_layer"], site["layer"]) == (0, 1)
    if arch == "gpt2":   # the fused c_attn makes v too and stays; the tied wte / lm_head weight counts once
        assert run.program.num_parameters() == program.num_parameters() == sum(p.numel() for p in model.parameters())
        assert run.report["after"]["parameters"] == run.report["before"]["parameters"]
    else:
        assert run.program.num_parameters() < program.num_parameters()
    want = _sharing_oracle(model, arch, {1}, inputs)
    got = run.program.run(**inputs)[0]
    assert (_real(got, inputs) - _real(want, inputs)).abs().max() < 1e-5
    one = {k: v[:1] for k, v in inputs.items()}   # batch 1: GPT-2's re-capture once guarded it away
    assert (_real(run.program.run(**one)[0], one) - _real(want[:1], one)).abs().max() < 1e-5
    # the receiver computes no q.k: one score matmul fewer
    gm = run.program.module()
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and "softmax" in str(n.target)) == 1


def test_share_attention_budget():
    _, program = _program("bert")
    calib = model_inputs("bert", 2, 16)
    none = Pipeline([make_pass("share-attention", {"error": 1e-9})]).run(program, calib)
    assert none.report["passes"][0]["sites_changed"] == 0
    with pytest.raises(RewriterError, match="disjoint"):
        Pipeline([make_pass("share-attention", {"count": 2})]).run(program, calib)
