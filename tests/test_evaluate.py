"""rewriter.evaluate: sliding-window perplexity against hand-computed values (uniform and bigram callables, a tiny
random Llama with explicit per-token contexts) and passkey retrieval by distance."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rewriter.evaluate import PasskeyTask, perplexity, retrieval_accuracy_by_distance

V = 11


def uniform(ids):
    return torch.zeros(*ids.shape, V)


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, V, (37,), generator=torch.Generator().manual_seed(0))
    # (8, 8): windows [0,8) [8,16) [16,24) [24,32) and the last pulled back to [29,37): 7+7+7+7+5 tokens
    for window, stride, tokens in ((64, None, 36), (8, 3, 36), (2, 1, 36), (8, 8, 33)):
        r = perplexity(uniform, ids, window=window, stride=stride)
        assert r["tokens"] == tokens
        assert r["perplexity"] == pytest.approx(V, rel=1e-6)


def test_bigram_by_hand():
    g = torch.Generator().manual_seed(1)
    P = torch.softmax(torch.randn(V, V, generator=g), -1)         # P[prev, next]
    bigram = lambda ids: P[ids].log()
    streams = [torch.randint(0, V, (n,), generator=g) for n in (25, 9, 1)]
    # non-overlapping windows of 5 leave out the window starts 5, 10, 15, 20 of the 25-token stream; the 9-token
    # stream's second window is pulled back to [4, 9), so its token 5 keeps one token of context
    skipped = {(0, 5), (0, 10), (0, 15), (0, 20)}
    for window, stride, skip in ((64, None, set()), (5, 2, set()), (5, 5, skipped)):
        by_hand = [-math.log(P[s[t - 1], s[t]]) for k, s in enumerate(streams) for t in range(1, s.numel())
                   if (k, t) not in skip]
        r = perplexity(bigram, streams, window=window, stride=stride)
        assert r["tokens"] == len(by_hand)
        assert r["nll"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)


def test_tiny_llama_windows_by_hand():
    from conftest import tiny_model
    model = tiny_model("llama", attn="eager")
    ids = torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(2))

    def logp(begin, t):          # log p(ids[t] | ids[begin:t]) from one forward over exactly that context
        with torch.no_grad():
            logits = model(input_ids=ids[None, begin:t]).logits[0, -1].float()
        return torch.log_softmax(logits, -1)[ids[t]].item()

    full = -sum(logp(0, t) for t in range(1, 20)) / 19
    assert perplexity(model, ids, window=64)["nll"] == pytest.approx(full, abs=1e-5)
    # window 8, stride 4: windows [0,8) scores 1..7, [4,12) scores 8..11, [8,16) 12..15, [12,20) 16..19
    ctx = {t: 0 for t in range(1, 8)} | {t: 4 for t in range(8, 12)} | {t: 8 for t in range(12, 16)} | \
        {t: 12 for t in range(16, 20)}
    windowed = -sum(logp(ctx[t], t) for t in range(1, 20)) / 19
    r = perplexity(model, ids, window=8, stride=4)
    assert r["tokens"] == 19 and r["nll"] == pytest.approx(windowed, abs=1e-5)
    assert r["nll"] != pytest.approx(full, abs=1e-4)             # the windows really cut the context


def test_perplexity_rejects_bad_stride():
    with pytest.raises(ValueError):
        perplexity(uniform, torch.arange(5) % V, window=4, stride=5)


def _task(seq_len=64):
    filler = torch.arange(200) % 7 + 20               # filler tokens 20..26, digits 10..19
    return PasskeyTask(filler, needle_prefix=[1, 2], query_prefix=[3, 4, 2], newline=[5],
                       digits=list(range(10, 20)), seq_len=seq_len)


def test_passkey_layout():
    task = _task()
    key = torch.tensor([3, 1, 4, 1, 5])
    ids, a0 = task.build(30, key, offset=7)
    digits = torch.tensor([13, 11, 14, 11, 15])
    assert ids.numel() == 64 and a0 == 64 - 1 - 5
    assert torch.equal(ids[a0:a0 + 5], digits) and ids[-1] == 5
    assert torch.equal(ids[a0 - 30:a0 - 30 + 5], digits) and ids[a0 - 32:a0 - 30].tolist() == [1, 2]
    assert ids[a0 - 3:a0].tolist() == [3, 4, 2]
    lo, hi = task.distance_range()
    for d in (lo, hi):
        task.build(d, key, 0)
    with pytest.raises(ValueError):
        task.build(hi + 1, key, 0)


def test_retrieval_oracle_and_constant():
    task = _task()

    def oracle(ids):                 # reads the key after the needle prefix [1, 2]; predicts it at the last 5 positions
        logits = torch.zeros(*ids.shape, 32)
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            p = next(i for i in range(len(row) - 1) if row[i:i + 2] == [1, 2]) + 2
            for k, tok in enumerate(row[p:p + 5]):
                logits[b, len(row) - 5 + k, tok] = 1.0
        return logits

    assert retrieval_accuracy_by_distance(oracle, task, [10, 40], trials=3, batch_size=2) == {10: 1.0, 40: 1.0}
    assert retrieval_accuracy_by_distance(lambda x: torch.zeros(*x.shape, 32), task, [20], trials=3) == {20: 0.0}


def test_shipped_decoder_short_passkey():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rewriter.data import DECODER_DIR
    model = AutoModelForCausalLM.from_pretrained(DECODER_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DECODER_DIR)
    filler = json.loads((DECODER_DIR / "eval.json").read_text())["slice"]["input_ids"]
    task = PasskeyTask.from_tokenizer(tok, filler, seq_len=256)
    acc = retrieval_accuracy_by_distance(model, task, [64], trials=4, batch_size=4)
    assert acc[64] >= 0.75
    r = perplexity(model, filler[:512], window=256, stride=128)
    assert r["tokens"] == 511 and r["perplexity"] < 10
