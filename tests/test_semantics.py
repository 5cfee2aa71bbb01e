"""The model's own attention semantics: sliding windows and ALiBi read from the captured masks, attention-like
subgraphs the matcher cannot map reported (not skipped), and linears that are not aten.linear found."""
from __future__ import annotations

import math

import pytest
import torch

from rewriter.semantics import read_pattern

L_PROBE = 40


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
    elif name == "gemma2":
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=24))
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


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma3", "falcon-alibi", "bloom"])
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


@pytest.mark.parametrize("name,reason", [("gemma2", "softcapping"), ("deberta-v2", "relative-position attention")])
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
