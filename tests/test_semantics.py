"""The model's own attention semantics: sliding windows and ALiBi read from the captured masks, Gemma2's logit
softcap read from its eager chain, attention-like subgraphs the matcher cannot map reported (not skipped), and
linears that are not aten.linear found."""
from __future__ import annotations

import math

import pytest
import torch

from rewriter.semantics import read_pattern

L_PROBE = 40
GEMMA2_CAP = 2.0


def _tiny(name: str):
    import transformers as tf
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=120,
                  max_position_embeddings=256)
    if name == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=24))
    elif name == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=True,
                                               sliding_window=24, max_window_layers=1))
    elif name == "gemma3":
        m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=24,
                                                     layer_types=["sliding_attention", "full_attention"]))
    elif name == "falcon-alibi":
        m = tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 vocab_size=120, alibi=True))
    elif name == "falcon":
        m = tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 vocab_size=120, alibi=False, bias=True))
    elif name == "gemma2":   # eager, the softcapped form (transformers 5.24 refuses sdpa for Gemma2). Layers: sliding
        # window 24, full. Weights 10x the default scale give scores up to ~3.5, so a cap of 2 changes the model.
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=24,
                                                 attn_logit_softcapping=GEMMA2_CAP, initializer_range=0.2))
        m.set_attn_implementation("eager")
    elif name == "bloom":
        m = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=120))
    elif name == "deberta-v2":
        m = tf.DebertaV2Model(tf.DebertaV2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, vocab_size=120, relative_attention=True,
                                                 pos_att_type=["p2c", "c2p"], position_buckets=32))
    else:
        raise ValueError(name)
    return m.eval()


def _left_padded(batch: int, L: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (batch, L), generator=g)
    mask = torch.ones(batch, L, dtype=torch.long)
    mask[-1, : L // 4] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def captured():
    from rewriter.capture import capture
    cache = {}

    def get(name):
        if name not in cache:
            model = _tiny(name)
            cache[name] = (model, capture(model, seq=16))
        return cache[name]
    return get


# --- reading a mask ----------------------------------------------------------------------------------------------

def _hf_window_mask(L, window, causal=True):
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = torch.ones(L, L, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window          # transformers' sliding_window_overlay
    return allowed


@pytest.mark.parametrize("causal,window", [(True, None), (True, 7), (False, None), (True, 1)])
def test_read_pattern_bool(causal, window):
    sem = read_pattern(_hf_window_mask(L_PROBE, window, causal)[None, None])
    assert sem.representable and sem.causal == causal and sem.window == window and sem.alibi_slopes is None


def test_read_pattern_bidirectional_local_and_alibi():
    i, j = torch.arange(L_PROBE)[:, None], torch.arange(L_PROBE)[None, :]
    local = ((i - j).abs() <= 5)[None, None]
    sem = read_pattern(local)
    assert sem.representable and not sem.causal and sem.window == 6 and sem.window_right == 5
    slopes = torch.tensor([0.5, 0.125, 0.03125])
    allowed = _hf_window_mask(L_PROBE, None)
    bias = torch.where(allowed, slopes[:, None, None] * j.float() - 3.0 * i.float(), torch.finfo(torch.float32).min)
    sem = read_pattern(bias[None])
    assert sem.representable and sem.causal and sem.window is None
    assert sem.alibi_slopes == pytest.approx(slopes.tolist(), rel=1e-5)


def test_read_pattern_refuses_what_it_cannot_name():
    allowed = _hf_window_mask(L_PROBE, None).clone()
    allowed[10, 3] = False                               # one hole: not a function of the distance
    assert not read_pattern(allowed[None, None]).representable
    j = torch.arange(L_PROBE)[None, :].float()
    quadratic = torch.where(_hf_window_mask(L_PROBE, None), 0.01 * j ** 2, torch.finfo(torch.float32).min)
    sem = read_pattern(quadratic[None, None])
    assert not sem.representable and "not linear" in sem.note


# --- real architectures ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,windows", [("mistral", [24, 24]), ("qwen2", [None, 24]), ("gemma3", [24, None])])
def test_sliding_windows_read_from_the_program(captured, name, windows):
    """Oracle: the model's config (per layer), read here independently of the probe."""
    from rewriter.api import inspect
    model, program = captured(name)
    sites = inspect(program)["attention"]
    assert [s["window"] for s in sites] == windows
    assert all(s["causal"] and s["alibi_slopes"] is None and not s["semantics_note"] for s in sites)


@pytest.mark.parametrize("name,per_dim", [("falcon-alibi", True), ("bloom", False)])
def test_alibi_read_from_the_program(captured, name, per_dim):
    """Falcon with alibi=True (SDPA mask) and Bloom (eager baddbmm on merged heads, canonicalised to SDPA): the
    ALiBi slopes 2^(-8(h+1)/H) in score units (Falcon adds them after the 1/sqrt(head_dim) scale, Bloom before)."""
    from rewriter.api import inspect
    model, program = captured(name)
    H, D = 4, 16
    want = [2 ** (-8 * (h + 1) / H) / (math.sqrt(D) if per_dim else 1.0) for h in range(H)]
    sites = inspect(program)["attention"]
    assert len(sites) == 2
    for s in sites:
        assert s["causal"] and s["window"] is None and s["alibi_slopes"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma3", "falcon-alibi", "bloom", "gemma2"])
def test_captured_program_equals_hf_beyond_the_window(captured, name):
    """Left padding, a length past the model's window: the captured program is the HF model (1e-5, fp32)."""
    model, program = captured(name)
    inputs = _left_padded(2, 80)
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
    out = program.run(**inputs)[0]
    real = inputs["attention_mask"].bool()
    assert (out - ref)[real].abs().max() < 1e-5


def test_semantics_survive_save_and_load(captured, tmp_path):
    from rewriter.backends.torch_backend import load_program, write_program
    from rewriter.sites import attention_sites
    model, program = captured("qwen2")
    write_program(program, tmp_path)
    back = load_program(tmp_path)
    gm = back.module()
    from rewriter.canonical import canonicalize
    canonicalize(gm)
    assert [s.window for s in attention_sites(gm, back.causal_modules)] == [None, 24]


@pytest.mark.parametrize("name,reason", [("deberta-v2", "relative-position attention")])
def test_unmatched_attention_is_reported(captured, name, reason):
    from rewriter.api import inspect
    model, program = captured(name)
    info = inspect(program)
    unmatched = info["canonicalized"]["unmatched_attention"]
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    assert len(unmatched) == layers and info["attention"] == []
    assert all(reason in u["reason"] and u["module_path"] for u in unmatched)


def test_falcon_linears_are_sites(captured):
    """Falcon's linear subclass computes x @ W.T (+ b): every projection is a LinearSite, and a full-rank lowrank
    binarize with a full-rank residual of all of them keeps the model (the bias stays as the add that follows)."""
    import rewriter
    from rewriter import make_pass
    model, program = captured("falcon")
    lin = rewriter.inspect(program)["linear"]
    names = {s["module_path"].rsplit(".", 1)[-1] for s in lin}
    assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} <= names
    assert len(lin) == 4 * 2 + 1          # 4 per layer + lm_head
    result = rewriter.optimize(program, [make_pass("binarize", {"residual_rank": 64, "exclude": ["lm_head"]})],
                               samples=2, seq_len=24)
    assert result.report["passes"][0]["sites_changed"] == 8
    assert result.report["final"]["relative_error"] < 1e-5


# --- passes keep (or refuse) the model's own attention -----------------------------------------------------------

def _optimize(program, passes, **kw):
    import rewriter
    from rewriter import make_pass
    return rewriter.optimize(program, [make_pass(n, c) for n, c in passes], samples=2, seq_len=40, **kw)


def _max_real_diff(model, program, L=80):
    inputs = _left_padded(2, L)
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
    out = program.run(**inputs)[0]
    return float((out - ref)[inputs["attention_mask"].bool()].abs().max())


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma3", "falcon-alibi", "bloom", "gemma2"])
def test_exact_attention_keeps_windows_and_alibi(captured, name):
    """The issue's case: exact attention on a sliding-window / ALiBi model equals the HF model beyond the window with
    left padding (it used to drop the window: 0.20 max abs logit on Mistral). Capture makes every site exact_attention
    with the model's window / slopes as arguments; the exact-attention pass is a no-op that says so."""
    model, program = captured(name)
    nodes = [n for n in program.ep.graph.nodes if n.target is torch.ops.rewriter.exact_attention.default]
    assert len(nodes) == 2 and not any("scaled_dot_product" in str(n.target) for n in program.ep.graph.nodes)
    windows = [n.args[6] if len(n.args) > 6 else 0 for n in nodes]
    slopes = [n.args[7] if len(n.args) > 7 else None for n in nodes]
    caps = [n.args[8] if len(n.args) > 8 else 0.0 for n in nodes]
    if name in ("falcon-alibi", "bloom"):
        assert all(s is not None and len(s) == 4 for s in slopes) and windows == [0, 0]
    else:
        assert {"mistral": [24, 24], "qwen2": [0, 24], "gemma3": [24, 0], "gemma2": [24, 0]}[name] == windows
    assert caps == ([GEMMA2_CAP] * 2 if name == "gemma2" else [0.0, 0.0])
    assert _max_real_diff(model, program) < 1e-5
    result = _optimize(program, [("exact-attention", {})])
    assert result.report["max_error"] == pytest.approx(1e-4) and "max_error_default" in result.report
    assert result.report["passes"][0]["sites_changed"] == 0
    assert "already exact since capture" in result.report["passes"][0]["notes"][0]
    assert _max_real_diff(model, result.program) < 1e-5


def test_canonical_capture_that_drops_the_window_differs(monkeypatch):
    """The window argument is what keeps the canonical form exact: a capture that forgot it (the old
    exact-attention behaviour) is a different model beyond the window."""
    from rewriter.capture import capture
    from rewriter.sites import AttentionSite
    model = _tiny("mistral")
    monkeypatch.setattr(AttentionSite, "exact_arguments", lambda self: ((0, None), ""))
    assert _max_real_diff(model, capture(model, seq=16)) > 1e-3


def test_an_exact_pass_that_changes_the_output_is_stopped(captured, monkeypatch):
    """A pipeline of exact passes gets a default error budget: a pass documented as exact that is not (here window
    8 inside the model's 24, declared exact) stops the run instead of writing a different model."""
    from rewriter.attention import METHODS
    from rewriter.pipeline import ErrorBudgetExceeded
    model, program = captured("mistral")
    monkeypatch.setattr(METHODS["window"], "exact", True)
    with pytest.raises(ErrorBudgetExceeded, match="default for exact passes"):
        _optimize(program, [("window", {"window": 8, "sinks": 0})])


def test_window_wider_than_the_model_window_is_the_model(captured):
    model, program = captured("mistral")
    result = _optimize(program, [("window", {"window": 200, "sinks": 4})])
    sites = result.report["passes"][0]["sites"]
    assert all(s["window"] == 24 and s["sinks"] == 0 and "narrower" in s["model_semantics"] for s in sites)
    assert _max_real_diff(model, result.program) < 1e-5


def test_window_inside_the_model_window_is_the_intersection():
    """Oracle: transformers itself, the same weights with sliding_window=8 (the intersection of 8 and 24)."""
    from rewriter.capture import capture
    model = _tiny("mistral")
    program = capture(model, seq=16)
    result = _optimize(program, [("window", {"window": 8, "sinks": 0})])
    assert [s["window"] for s in result.report["passes"][0]["sites"]] == [8, 8]
    model.config.sliding_window = 8
    assert _max_real_diff(model, result.program) < 1e-5


def test_methods_refuse_what_they_cannot_keep(captured):
    from rewriter.errors import RewriterError
    model, program = captured("qwen2")          # layer 0 full attention, layer 1 sliding window 24
    result = _optimize(program, [("window", {"window": 8, "sinks": 4})])
    entry = result.report["passes"][0]
    assert [s["module_path"] for s in entry["sites"]] == ["model.layers.0.self_attn"]
    assert entry["summary"]["refused_sites"][0]["site"] == "model.layers.1.self_attn"
    assert any("refused model.layers.1.self_attn" in n and "sinks" in n for n in entry["notes"])
    model, program = captured("falcon-alibi")   # every site has ALiBi, which lsh cannot keep: an error
    with pytest.raises(RewriterError, match="refused.*ALiBi"):
        _optimize(program, [("lsh", {"n_hashes": 2, "bucket_size": 16})])


def test_a_pass_that_selects_nothing_is_an_error(captured):
    from rewriter.errors import RewriterError
    model, program = captured("deberta-v2")      # relative-position attention: no canonical site
    with pytest.raises(RewriterError, match="window: no attention site matched"):
        _optimize(program, [("window", {"window": 8})])
    result = _optimize(program, [("window", {"window": 8, "allow_empty": True})])
    assert result.report["passes"][0]["sites_changed"] == 0
    model, program = captured("mistral")
    with pytest.raises(RewriterError, match="lowrank: no linear site matched .*include=.*nothing"):
        _optimize(program, [("lowrank", {"include": ["*nothing*"]})])


@pytest.mark.parametrize("name", ["mistral", "bloom"])
def test_exact_attention_with_window_or_alibi_exports(captured, name, tmp_path):
    """ONNX translation of the kept window / ALiBi, validated in onnxruntime against the program."""
    pytest.importorskip("onnxruntime")
    from rewriter.backends.onnx import export_program
    model, program = captured(name)
    record = export_program(program, tmp_path / "m.onnx")       # the captured program: already exact_attention
    assert record["passed"] if "passed" in record else all(c["max_abs_diff"] < 1e-4 for c in record["checks"])


def test_exact_op_window_and_alibi_against_float64():
    from rewriter.attention._contract import alibi_bias, allowed_mask, masked_softmax_attention
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 37, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    km = torch.ones(B, L, dtype=torch.bool)
    km[1, :5] = False
    slopes = [0.5, 0.25, 0.125, 0.0625]
    got = torch.ops.rewriter.exact_attention(q, k, v, km, True, D ** -0.5, 9, slopes)
    allowed = allowed_mask(L, L, True, km, "cpu", window=9)
    want = masked_softmax_attention(q.double(), k.double(), v.double(), allowed, D ** -0.5,
                                    alibi_bias(slopes, L, L, "cpu", torch.float64))
    real = km[:, None, :, None].expand_as(want)
    assert (got.double() - want)[real].abs().max() < 1e-5


# --- ALiBi kept by the window method -------------------------------------------------------------------------------

def test_window_op_with_alibi_against_float64():
    """The window op with ALiBi slopes: float64 oracle (band + sinks, bias slope_h * (j - i)), GQA, padding."""
    from rewriter.attention._contract import alibi_bias, allowed_mask, masked_softmax_attention, window_extents
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, L, D = 2, 4, 2, 53, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    km = torch.ones(B, L, dtype=torch.bool)
    km[1, :6] = False
    slopes = [0.5, 0.25, 0.125, 0.0625]
    for causal in (True, False):
        got = torch.ops.rewriter.window(q, k, v, km, causal, D ** -0.5, 11, 2, 16, slopes)
        left, right = window_extents(11, causal)
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        band = ((j >= i - left) & (j <= i + right)) | (j < 2)
        allowed = allowed_mask(L, L, causal, km, "cpu") & band
        want = masked_softmax_attention(q.double(), k.double(), v.double(), allowed, D ** -0.5,
                                        alibi_bias(slopes, L, L, "cpu", torch.float64))
        real = km[:, None, :, None].expand_as(want)
        assert (got.double() - want)[real].abs().max() < 1e-5
    with pytest.raises(ValueError, match="alibi must be"):
        torch.ops.rewriter.window(q, k, v, km, True, D ** -0.5, 11, 2, 16, slopes[:3])


@pytest.mark.parametrize("name", ["falcon-alibi", "bloom"])
def test_window_keeps_alibi(captured, name):
    """window on an ALiBi model keeps the bias: a window covering the sequence equals the HF model (left padding),
    a narrower one differs from it but equals exact attention restricted to the band (transformers cannot say)."""
    model, program = captured(name)
    result = _optimize(program, [("window", {"window": 200, "sinks": 0})])
    sites = result.report["passes"][0]["sites"]
    assert sites and all("ALiBi" in s["model_semantics"] for s in sites)
    assert _max_real_diff(model, result.program) < 1e-5
    narrow = _optimize(program, [("window", {"window": 8, "sinks": 2})], max_error=10.0)
    assert _max_real_diff(model, narrow.program) > 1e-3


def test_window_with_alibi_exports(captured, tmp_path):
    pytest.importorskip("onnxruntime")
    from rewriter.backends.onnx import export_program
    model, program = captured("bloom")
    result = _optimize(program, [("window", {"window": 8, "sinks": 2})], max_error=10.0)
    record = export_program(result.program, tmp_path / "m.onnx")
    assert record["passed"] if "passed" in record else all(c["max_abs_diff"] < 1e-4 for c in record["checks"])


def test_analyze_measures_against_the_models_own_attention(captured):
    """analyze on a windowed site (Mistral, window 24, at 60 tokens): exact-attention (which keeps the window) has
    error 0 against the reference, so the reference is the model's windowed attention, not full attention; window
    wider than the model's is the model (0 too); block-topk, which cannot keep the window, is left out there."""
    from rewriter.analysis import analyze
    model, program = captured("mistral")
    inputs = _left_padded(2, 60)
    result = analyze(program, inputs, [("exact-attention", {}), ("window", {"window": 100, "sinks": 0}),
                                       ("window", {"window": 8, "sinks": 0}), ("block-topk", {"density": 0.5})])
    for path, cands in result.candidates.items():
        by = {(c.method, c.options.get("window")): c for c in cands}
        assert ("block-topk", None) not in by
        assert max(by[("exact-attention", None)].errors) < 1e-6
        assert max(by[("window", 100)].errors) < 1e-6
        assert min(by[("window", 8)].errors) > 1e-3


@pytest.mark.parametrize("method,options", [("block-topk", {"density": 0.5, "block": 16}),
                                            ("strided", {"stride": 2, "block": 16})])
def test_block_methods_with_alibi_against_float64(method, options):
    """block-topk and strided with ALiBi slopes: exact softmax + slope_h * (j - i) over the pairs the method computes
    (its own pair mask), float64 oracle, GQA, padding."""
    from rewriter.attention import METHODS
    from rewriter.attention._contract import alibi_bias, allowed_mask, masked_softmax_attention
    m = METHODS[method]
    g = torch.Generator().manual_seed(2)
    B, H, Hkv, L, D = 2, 4, 2, 61, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    km = torch.ones(B, L, dtype=torch.bool)
    km[1, :9] = False
    slopes = [0.5, 0.25, 0.125, 0.0625]
    kwargs, _ = m.budget(m.config(**options), L)
    for causal in (True, False):
        got = m.op(q, k, v, km, causal, D ** -0.5, *m.positional({**kwargs, "alibi": slopes}))
        pairs = m.pairs(q, k, km, causal, D ** -0.5, **kwargs)
        allowed = allowed_mask(L, L, causal, km, "cpu") & pairs
        want = masked_softmax_attention(q.double(), k.double(), v.double(), allowed, D ** -0.5,
                                        alibi_bias(slopes, L, L, "cpu", torch.float64))
        real = km[:, None, :, None].expand_as(want) & allowed.any(-1, keepdim=True)
        assert (got.double() - want)[real].abs().max() < 1e-5
        plain = m.op(q, k, v, km, causal, D ** -0.5, *m.positional(kwargs))
        assert (plain - got)[real].abs().max() > 1e-2             # the bias is applied


def test_block_methods_keep_alibi_on_the_model(captured, tmp_path):
    """block-topk keeping every block is the Falcon-ALiBi model (1e-5); strided with ALiBi exports to ONNX and
    matches in onnxruntime; neither keeps a model window (Mistral: refused)."""
    pytest.importorskip("onnxruntime")
    from rewriter.backends.onnx import export_program
    from rewriter.errors import RewriterError
    model, program = captured("falcon-alibi")
    result = _optimize(program, [("block-topk", {"density": 1.0, "block": 16})])
    assert all("ALiBi" in s["model_semantics"] for s in result.report["passes"][0]["sites"])
    assert _max_real_diff(model, result.program) < 1e-5
    model, program = captured("bloom")
    result = _optimize(program, [("strided", {"stride": 2, "block": 16})], max_error=10.0)
    record = export_program(result.program, tmp_path / "m.onnx")
    assert record["passed"] if "passed" in record else all(c["max_abs_diff"] < 1e-4 for c in record["checks"])
    model, program = captured("mistral")
    with pytest.raises(RewriterError, match="refused.*sliding window"):
        _optimize(program, [("strided", {"stride": 2, "block": 16})])


# --- logit softcapping (Gemma2): carried by the canonical form, kept by window / block-topk / strided -----------------

def test_softcap_read_from_the_program(captured):
    """Gemma2's eager chain (scores * scale / cap -> tanh -> * cap, before the mask) becomes exact_attention with the
    cap as its argument: inspect reports both sites as exact attention with the cap (oracle: the config), nothing
    kept or unmatched."""
    from rewriter.api import inspect
    model, program = captured("gemma2")
    info = inspect(program)
    assert info["canonicalized"]["exact_attention"] == 2 and info["canonicalized"]["kept"] == []
    assert info["canonicalized"]["unmatched_attention"] == []
    sites = info["attention"]
    assert [s["window"] for s in sites] == [24, None]
    assert all(s["causal"] and s["softcap"] == model.config.attn_logit_softcapping for s in sites)
    assert [r["method"] for r in info["rewritten"]] == ["exact-attention"] * 2


def test_capture_that_drops_the_softcap_differs(monkeypatch):
    """The softcap argument is what keeps the canonical form exact: without it the program is another model."""
    from rewriter.capture import capture
    from rewriter.sites import AttentionSite
    model = _tiny("gemma2")
    real = AttentionSite.exact_arguments
    monkeypatch.setattr(AttentionSite, "exact_arguments", lambda self: ((*real(self)[0][:2], 0.0), ""))
    assert _max_real_diff(model, capture(model, seq=16)) > 1e-3


def test_softcapped_site_the_op_cannot_state_keeps_the_eager_form(monkeypatch):
    """A softcapped site exact_attention cannot state (forced here) goes back to the model's eager chain, not to an
    SDPA node that would drop the cap: the program is still the HF model, and the site is reported as kept."""
    from rewriter.api import inspect
    from rewriter.capture import capture
    from rewriter.sites import AttentionSite
    model = _tiny("gemma2")
    monkeypatch.setattr(AttentionSite, "exact_arguments", lambda self: (None, "forced by the test"))
    program = capture(model, seq=16)
    assert [k["reason"] for k in program.meta["canonical"]["kept"]] == ["forced by the test"] * 2
    assert not any(n.target in (torch.ops.aten.scaled_dot_product_attention.default,
                                torch.ops.rewriter.exact_attention.default) for n in program.ep.graph.nodes)
    assert _max_real_diff(model, program) < 1e-5
    assert all("softcapping" in u["reason"] for u in inspect(program)["canonicalized"]["unmatched_attention"])


def test_exact_op_with_softcap_against_float64():
    """The exact op with a softcap (and a window, ALiBi, GQA, padding): float64 oracle
    softmax(cap * tanh(scale q.k / cap) + bias) over the allowed pairs."""
    from rewriter.attention._contract import alibi_bias, allowed_mask, masked_softmax_attention
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, L, D = 2, 4, 2, 37, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g) * 2 for h in (H, Hkv, Hkv))
    km = torch.ones(B, L, dtype=torch.bool)
    km[1, :5] = False
    for window, slopes, causal in [(9, None, True), (0, [0.5, 0.25, 0.125, 0.0625], True), (0, None, False)]:
        got = torch.ops.rewriter.exact_attention(q, k, v, km, causal, D ** -0.5, window, slopes, 1.5)
        allowed = allowed_mask(L, L, causal, km, "cpu", window=window)
        bias = alibi_bias(slopes, L, L, "cpu", torch.float64) if slopes else None
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(2, 1)) * D ** -0.5
        s = 1.5 * torch.tanh(s / 1.5) + (bias if bias is not None else 0)
        s = s.masked_fill(~allowed, float("-inf"))
        want = torch.nan_to_num(torch.softmax(s, -1)) @ v.double().repeat_interleave(2, 1)
        real = km[:, None, :, None].expand_as(want)
        assert (got.double() - want)[real].abs().max() < 1e-5
        assert (masked_softmax_attention(q.double(), k.double(), v.double(), allowed, D ** -0.5, bias, 1.5)
                - want)[real].abs().max() < 1e-12
        plain = torch.ops.rewriter.exact_attention(q, k, v, km, causal, D ** -0.5, window, slopes)
        assert (plain - got)[real].abs().max() > 1e-2                  # the cap matters at these scores
    with pytest.raises(ValueError, match="softcap must be"):
        torch.ops.rewriter.exact_attention(q, k, v, km, True, D ** -0.5, 0, None, -1.0)


@pytest.mark.parametrize("method,options", [("window", {"window": 11, "sinks": 2, "block": 16}),
                                            ("block-topk", {"density": 0.5, "block": 16}),
                                            ("strided", {"stride": 2, "block": 16})])
def test_block_methods_with_softcap_against_float64(method, options):
    """window, block-topk and strided with a softcap (+ ALiBi): exact softmax of the capped (+ biased) scores over the
    pairs the method computes, float64 oracle (the model's attention restricted to them), GQA, padding."""
    from rewriter.attention import METHODS
    from rewriter.attention._contract import alibi_bias, allowed_mask, model_attention_float64
    m = METHODS[method]
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, L, D = 2, 4, 2, 61, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g) * 2 for h in (H, Hkv, Hkv))
    km = torch.ones(B, L, dtype=torch.bool)
    km[1, :9] = False
    slopes = [0.5, 0.25, 0.125, 0.0625]
    kwargs, _ = m.budget(m.config(**options), L)
    for causal, alibi in [(True, None), (False, slopes)]:
        got = m.op(q, k, v, km, causal, D ** -0.5, *m.positional({**kwargs, "alibi": alibi, "softcap": 1.5}))
        pairs = m.pairs(q, k, km, causal, D ** -0.5, **kwargs)
        allowed = allowed_mask(L, L, causal, km, "cpu") & pairs
        from rewriter.attention._contract import masked_softmax_attention
        want = masked_softmax_attention(q.double(), k.double(), v.double(), allowed, D ** -0.5,
                                        alibi_bias(alibi, L, L, "cpu", torch.float64) if alibi else None, 1.5)
        real = km[:, None, :, None].expand_as(want) & allowed.any(-1, keepdim=True)
        assert (got.double() - want)[real].abs().max() < 1e-5
        plain = m.op(q, k, v, km, causal, D ** -0.5, *m.positional({**kwargs, "alibi": alibi}))
        assert (plain - got)[real].abs().max() > 1e-2
    full = model_attention_float64(q, k, v, km, True, D ** -0.5, softcap=1.5)     # the oracle's softcap is the op's
    assert (torch.ops.rewriter.exact_attention(q, k, v, km, True, D ** -0.5, 0, None, 1.5).double()
            - full)[km[:, None, :, None].expand_as(full)].abs().max() < 1e-5


def test_window_wider_than_the_sequence_keeps_the_softcapped_model(captured):
    """window 200 on Gemma2 at 80 tokens: layer 0 keeps the model's window 24, layer 1 a window past the sequence,
    both with the model's softcap: the HF model (1e-5, left padding)."""
    model, program = captured("gemma2")
    result = _optimize(program, [("window", {"window": 200, "sinks": 0})])
    sites = result.report["passes"][0]["sites"]
    assert len(sites) == 2 and all("softcap" in s["model_semantics"] for s in sites)
    assert [s["window"] for s in sites] == [24, 200]
    assert _max_real_diff(model, result.program) < 1e-5


def test_window_inside_the_model_window_is_the_intersection_with_softcap(captured):
    """window 8 on Gemma2 (layer 0: inside the model's 24; layer 1: full attention) is window 8 on both layers with
    the softcap. Oracle: transformers itself, the same weights with sliding_window=8 on every layer: in float64 on
    unpadded rows (transformers' float64 eager attention gives padded rows NaN values, which its zero probabilities
    carry into real rows), in fp32 with left padding."""
    import transformers as tf
    model, program = captured("gemma2")
    result = _optimize(program, [("window", {"window": 8, "sinks": 0})], max_error=10.0)
    assert [s["window"] for s in result.report["passes"][0]["sites"]] == [8, 8]
    cfg = tf.Gemma2Config(**{**model.config.to_dict(), "sliding_window": 8,
                             "layer_types": ["sliding_attention", "sliding_attention"]})
    oracle = tf.Gemma2ForCausalLM(cfg).eval()
    oracle.load_state_dict(model.state_dict())
    oracle.set_attn_implementation("eager")
    assert _max_real_diff(oracle, result.program) < 1e-5
    inputs = _left_padded(2, 80)
    inputs["attention_mask"][:] = 1
    with torch.no_grad():
        want = oracle.double()(**inputs, use_cache=False).logits
    assert (result.program.run(**inputs)[0].double() - want).abs().max() < 1e-5
    assert _max_real_diff(model, result.program) > 1e-3             # and it is not the original model


def test_methods_that_cannot_keep_a_softcap_refuse_it(captured):
    """Every registered method either keeps the full-attention softcapped site (exact, window, block-topk, strided)
    or refuses it with a reason naming the softcap; a pass whose every site is refused is an error."""
    from rewriter.attention import METHODS
    from rewriter.errors import RewriterError
    from rewriter.sites import attention_sites
    model, program = captured("gemma2")
    gm = program.module()
    site = attention_sites(gm, program.causal_modules)[1]          # layer 1: full attention + softcap
    keeps = {"exact-attention", "window", "block-topk", "strided"}
    for name, m in METHODS.items():
        kwargs, _ = m.budget(m.config(), 64)
        args, why = m.keep_semantics(site, kwargs)
        if name in keeps:
            assert args is not None and args["softcap"] == GEMMA2_CAP, (name, why)
        else:
            assert args is None and "softcap" in why, (name, why)
    with pytest.raises(RewriterError, match="refused.*softcap"):
        _optimize(program, [("lsh", {"n_hashes": 2, "bucket_size": 16})])


@pytest.mark.parametrize("passes", [[], [("window", {"window": 8, "sinks": 2})], [("strided", {"stride": 2,
                                                                                              "block": 16})]])
def test_softcap_exports_to_onnx(captured, tmp_path, passes):
    """The captured Gemma2 (exact attention with the softcap), window with sinks (layer 1, full attention: the band
    form) and strided (layer 1; layer 0's window refused: the gathered-block form) in onnxruntime against the
    program."""
    pytest.importorskip("onnxruntime")
    from rewriter.backends.onnx import export_program
    model, program = captured("gemma2")
    if passes:
        program = _optimize(program, passes, max_error=10.0).program
    record = export_program(program, tmp_path / "m.onnx")
    assert record["passed"] if "passed" in record else all(c["max_abs_diff"] < 1e-4 for c in record["checks"])
