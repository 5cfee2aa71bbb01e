"""KV-cache decoding: the captured prefill/decode programs against transformers' own generate and forward."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from rewriter.canonical import canonicalize
from rewriter.decode import build_decoder, generate
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
