"""KV-cache decoding: the captured prefill/decode programs against transformers' own generate and forward."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from rewriter.canonical import canonicalize
from rewriter.api import generate
from rewriter.decode import build_decoder
from rewriter.sites import attention_sites


@pytest.fixture(scope="module", params=["llama", "gpt2"])   # llama: GQA (4 heads, 2 KV heads); gpt2: MHA
def model_and_decoder(request):
    model = tiny_model(request.param)
    return request.param, model, build_decoder(model, max_len=32)


def _ids(batch, T, seed):
    return torch.randint(1, 120, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_greedy_matches_transformers_generate(model_and_decoder):
    _, model, dec = model_and_decoder
    ids = _ids(2, 7, 3)
    ours = dec.generate(ids, 12)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, ref)


def test_single_token_prompt_matches_transformers_generate(model_and_decoder):
    _, model, dec = model_and_decoder
    ids = _ids(1, 1, 4)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(dec.generate(ids, 5), ref)


def test_cached_decode_logits_equal_full_forward(model_and_decoder):
    _, model, dec = model_and_decoder
    ids = _ids(2, 20, 5)
    tf = dec.teacher_forced_logits(ids, prefix=6)            # positions 5..19, 14 of them through the cache
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, 5:]
    torch.testing.assert_close(tf, full, atol=2e-5, rtol=1e-4)


def test_decode_program_has_canonical_attention_sites(model_and_decoder):
    _, model, dec = model_and_decoder
    for program in (dec.prefill, dec.step):
        gm = program.module()
        canonicalize(gm)
        sites = attention_sites(gm)
        assert [s.layer for s in sites] == list(range(model.config.num_hidden_layers))
        assert all(s.kv_heads == dec.dims["kv_heads"] for s in sites)


def test_cache_is_explicit_and_sized(model_and_decoder):
    arch, model, dec = model_and_decoder
    k, v = dec.empty_cache(2)
    assert k.shape == (2, 2, dec.dims["kv_heads"], 32, 16)
    # float32: layers x kv_heads x (Dk + Dv) x 4 bytes
    assert dec.kv_bytes_per_token() == 2 * dec.dims["kv_heads"] * 32 * 4
    assert dec.kv_bytes_per_sequence(10) == 10 * dec.kv_bytes_per_token()


def test_bad_arguments_are_rejected(model_and_decoder):
    _, model, dec = model_and_decoder
    with pytest.raises(ValueError, match="exceeds the cache"):
        dec.generate(_ids(1, 30, 0), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(_ids(1, 3, 0), -1)
    with pytest.raises(ValueError, match="batch, tokens"):
        dec.generate(torch.tensor([1, 2, 3]), 2)


def test_generate_api_from_folder_with_prompt_ids(tiny_folders):
    import transformers as tf
    res = generate(tiny_folders["llama"], prompt_ids=[5, 6, 7], max_new_tokens=6)
    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_folders["llama"])).eval()
    ids = torch.tensor([[5, 6, 7]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(res.ids, ref)
    assert res.text is None
    assert res.kv["before"] == res.kv["after"]
    with pytest.raises(ValueError, match="must be in \\[0, 120\\)"):
        generate(tiny_folders["llama"], prompt_ids=[5, 500], max_new_tokens=2)
    with pytest.raises(ValueError, match="exactly one"):
        generate(tiny_folders["llama"], max_new_tokens=2)


def test_cli_generate_prints_the_greedy_ids(tiny_folders):
    import transformers as tf
    from typer.testing import CliRunner
    from rewriter.cli import app
    r = CliRunner().invoke(app, ["generate", str(tiny_folders["gpt2"]), "--prompt-ids", "9,8,7", "--max-new-tokens",
                                 "5", "--json"])
    assert r.exit_code == 0, r.output
    import json
    got = json.loads(r.stdout.strip().splitlines()[-1])
    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_folders["gpt2"])).eval()
    ids = torch.tensor([[9, 8, 7]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert got["ids"] == ref.tolist()
    bad = CliRunner().invoke(app, ["generate", str(tiny_folders["gpt2"]), "--prompt-ids", "1,x"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output


# --- rewriter outputs carry what decode needs ---------------------------------------------------------------------

# think also with exact-attention after it: that op is the model's own attention, so the decode bundle stays
@pytest.mark.parametrize("spec", ["think:ratio=0.5+exact-attention", "kv-window:sinks=2,window=6"])
def test_optimize_output_generates_like_the_hf_folder_with_the_same_passes(tiny_folders, tmp_path, spec):
    import json
    from typer.testing import CliRunner
    from rewriter.api import optimize
    from rewriter.cli import app
    from rewriter.recipe import parse_pass_flag
    out = tmp_path / "out"
    spec, *others = spec.split("+")
    run = optimize(tiny_folders["llama"], [parse_pass_flag(s) for s in [spec, *others]], out=out, samples=2,
                   seq_len=16)
    decode = json.loads((out / "rewriter.json").read_text())["decode"]
    assert (out / decode["weights"] / "config.json").exists()
    meta = run.program.meta
    if "think_key_channels" in meta:
        assert decode["kv_policy"]["key_channels"] == [meta["think_key_channels"][i] for i in range(2)]
    else:
        assert (decode["kv_policy"]["sinks"], decode["kv_policy"]["window"]) == (2, 6)
    ours = generate(out, prompt_ids=[5, 6, 7], max_new_tokens=16)        # 19 tokens: a 2 + 6 window evicts
    ref = generate(tiny_folders["llama"], prompt_ids=[5, 6, 7], max_new_tokens=16, passes=[parse_pass_flag(spec)],
                   samples=2, seq_len=16)
    assert torch.equal(ours.ids, ref.ids)
    assert ours.kv == ref.kv and ours.kv["after"] != ours.kv["before"]
    r = CliRunner().invoke(app, ["generate", str(out), "--prompt-ids", "5,6,7", "--max-new-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["ids"] == ref.ids.tolist()


def test_generate_refuses_outputs_it_cannot_decode(tiny_folders, tmp_path):
    from rewriter.api import optimize
    from rewriter.decode import KVPolicy, ThinkDynamic
    from rewriter.errors import RewriterError
    from rewriter.pipeline import make_pass
    optimize(tiny_folders["bert"], [make_pass("kv-window", {"sinks": 2, "window": 6})], out=tmp_path / "bert",
             samples=2, seq_len=16)
    with pytest.raises(RewriterError, match="holds a 'bert' program, not a decoder LM"):
        generate(tmp_path / "bert", prompt_ids=[1, 2], max_new_tokens=2)
    optimize(tiny_folders["llama"], [make_pass("kv-window", {"sinks": 2, "window": 6})], out=tmp_path / "llama",
             samples=2, seq_len=16)
    with pytest.raises(ValueError, match="--pass applies to HF folders only"):
        generate(tmp_path / "llama", prompt_ids=[1, 2], max_new_tokens=2, passes=[make_pass("think", {})])
    dyn = KVPolicy(sinks=1, window=3, think_dynamic=ThinkDynamic(0.25, 7))
    assert KVPolicy.from_json(dyn.to_json()) == dyn


def test_decoder_refuses_a_context_past_the_models_sliding_window():
    """The decode cache attends every cached token: a Mistral window of 16 is honoured by refusing longer caches
    (a silent full attention would attend further back than the model was trained to)."""
    import transformers as tf
    from rewriter.decode.decoder import build_decoder
    cfg = tf.MistralConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=100, sliding_window=16, max_position_embeddings=128)
    model = tf.MistralForCausalLM(cfg)
    with pytest.raises(ValueError, match="last 16 tokens"):
        build_decoder(model, max_len=64)
    dec = build_decoder(model, max_len=16)
    # its prefill keeps SDPA on HF's mask, which holds the window (an evicting cache prefills past it)
    assert any("scaled_dot_product" in str(n.target) for n in dec.prefill.ep.graph.nodes)


def test_prefill_program_attends_in_canonical_form(model_and_decoder):
    """The prefill program runs exact attention on the key mask (SDPA's causal flash path on CUDA), not SDPA on the
    (B, 1, T, T) mask the cache hands HF; its keys and values are the model's, and its logits the model's at the
    last position (the only one decoding reads: the LM head runs on that position alone)."""
    _, model, dec = model_and_decoder
    targets = [str(n.target) for n in dec.prefill.ep.graph.nodes if n.op == "call_function"]
    assert targets.count("rewriter.exact_attention.default") == model.config.num_hidden_layers
    assert not any("scaled_dot_product" in t for t in targets)
    ids = _ids(3, 30, 6)
    logits, keys, _ = dec.prefill.run(input_ids=ids)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert logits.shape == (3, 1, model.config.vocab_size)
    torch.testing.assert_close(logits, out.logits[:, -1:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(keys[-1], out.past_key_values.layers[-1].keys, atol=2e-5, rtol=1e-4)
    lm_head = [n for n in dec.prefill.ep.graph.nodes if n.op == "call_function" and "linear" in str(n.target)][-1]
    assert lm_head.meta["val"].shape[1] == 1                  # the LM head runs on one position


def test_prefill_that_does_not_canonicalise_keeps_sdpa(monkeypatch):
    """A prefill whose canonical form does not export still decodes, on SDPA, and says why."""
    import importlib
    from rewriter.errors import RewriterError

    def refuse(program, max_positions):
        raise RewriterError("the canonical form of LlamaForCausalLM no longer exports: test")
    monkeypatch.setattr(importlib.import_module("rewriter.capture"), "canonical_program", refuse)
    model = tiny_model("llama")
    dec = build_decoder(model, max_len=16)
    assert "no longer exports" in dec.prefill.meta["canonical_error"]
    assert any("scaled_dot_product" in str(n.target) for n in dec.prefill.ep.graph.nodes)
    ids = _ids(1, 5, 7)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(dec.generate(ids, 4), ref)
