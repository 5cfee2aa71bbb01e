"""Capture reproduces eager models at shapes other than the example; eager and sdpa give the same sites."""
import pytest
import torch

from rewriter.canonical import canonicalize
from rewriter.capture import capture
from rewriter.graph import record_node_inputs
from rewriter.sites import attention_sites, linear_sites

from conftest import ARCHS, model_inputs, tiny_model


def _eager_first_output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else next(v for v in out.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_eager_at_other_shapes(arch, attn):
    model = tiny_model(arch, attn)
    program = capture(model)
    for batch, seq in [(1, 7), (3, 29)]:
        inputs = model_inputs(arch, batch, seq)
        ref = _eager_first_output(model, inputs)
        got = program.run(**inputs)[0]
        assert got.shape == ref.shape
        if attn == "eager" and arch in ("gpt2", "llama") and batch > 1:
            # left padding: a padding query row sees no key. HF's eager softmax over an all-masked row averages
            # every value (future ones too); SDPA and the canonical exact_attention give 0. The rows carry no
            # information (no real token attends to them); every real token must match.
            real = inputs["attention_mask"].bool()
            torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
            continue
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _assert_canonical(program, arch):
    """Capture's canonical form: every site one exact_attention node on the key-padding mask, read straight from the
    `attention_mask` input (one shared `!= 0` node); HF's materialised (B, 1, L, L) mask is gone from the graph."""
    nodes = list(program.ep.graph.nodes)
    exact = [n for n in nodes if n.target is torch.ops.rewriter.exact_attention.default]
    assert len(exact) == 2 and not any("scaled_dot_product" in str(n.target) for n in nodes)
    assert program.meta["canonical"]["exact_attention"] == 2 and program.meta["canonical"]["kept"] == []
    masks = {n.args[3] for n in exact}
    if arch == "vit":
        # transformers builds ViT an all-keys mask from the pixel batch (no attention_mask input): each site reduces
        # it to a key mask, all real, so exact_attention takes SDPA's unmasked path
        inputs = model_inputs(arch, 2, 0)
        km = record_node_inputs(program.module(), inputs, {n.name for n in exact})
        assert len(km) == 2 and all(args[3].shape == (2, 17) and bool(args[3].all()) for args, _ in km.values())
    else:
        (km,) = masks
        assert km.target is torch.ops.aten.ne.Scalar and km.args[0].name == "attention_mask"
    square = [n.name for n in nodes if isinstance(v := n.meta.get("val"), torch.Tensor) and v.dim() == 4
              and not isinstance(v.shape[-1], int) and str(v.shape[-1]) == str(v.shape[-2])]
    assert square == [], f"(.., L, L) tensors left in the canonical program: {square}"


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_and_sdpa_canonicalise_to_the_same_sites(arch):
    found = {}
    for attn in ("eager", "sdpa"):
        program = capture(tiny_model(arch, attn))
        gm = program.module()
        canonicalize(gm)
        att = attention_sites(gm, program.causal_modules)
        lin = linear_sites(gm)
        found[attn] = ([(s.module_path, s.heads, s.kv_heads, s.head_dim, s.causal, s.scale) for s in att],
                       [(s.module_path, s.in_features, s.out_features, s.transposed) for s in lin])
        _assert_canonical(program, arch)
        # the canonical graph still computes the same function
        inputs = model_inputs(arch, 2, 11)
        torch.testing.assert_close(gm(**inputs)[0], program.run(**inputs)[0], atol=1e-5, rtol=1e-5)
    assert found["eager"] == found["sdpa"]
    att, lin = found["sdpa"]
    assert len(att) == 2
    expect_kv = 2 if arch == "llama" else 4
    assert all(a[1] == 4 and a[2] == expect_kv and a[3] == 16 for a in att)
    assert all(a[4] == (arch in ("gpt2", "llama")) for a in att)
    if arch == "gpt2":
        assert any(t for *_, t in lin), "GPT-2 Conv1D must appear as transposed linear sites"


def test_minilm_sites(minilm_program):
    from rewriter import inspect
    info = inspect(minilm_program)
    att = info["attention"]
    assert len(att) == 6
    assert all(a["heads"] == 12 and a["head_dim"] == 32 and not a["causal"] for a in att)
    assert len(info["linear"]) == 37
    assert [a["layer"] for a in att] == list(range(6))


def test_minilm_capture_matches_transformers(minilm_dir, minilm_program):
    from transformers import AutoModel, AutoTokenizer
    from pydoc_data.topics import topics
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = [topics["assert"], topics["if"], topics["with"]]
    enc = tok(texts, truncation=True, max_length=200, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    got = minilm_program.run(**{k: enc[k] for k in minilm_program.input_names})[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
