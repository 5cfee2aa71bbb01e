"""CPU evaluation of the shipped decoder (rewriter/data/decoder) on the held-out stdlib files of
benchmarks/decoder_split.json, in fp32 from the bf16 weights.

held_out_perplexity: exp of the mean next-token NLL over the held-out files, tokenized with the shipped tokenizer,
each followed by <|endoftext|>, concatenated and cut into non-overlapping 2048-token windows (the first token of a
window is not scored; the tail shorter than a window is dropped), as in training's final evaluation (--window-stride k
scores every k-th window only, for a quicker look: one 2048-token forward takes seconds on CPU).
retrieval_accuracy_by_distance: passkey sequences of 2048 tokens over held-out filler (benchmarks/decoder_common.py),
`--trials` per distance (20), seed 1234; a trial counts when all 5 digits are right under greedy decoding (checked as
every teacher-forced argmax right, which is the same thing).

Also writes rewriter/data/decoder/eval.json (--write-fixture): a fixed held-out slice (token ids) with its perplexity
and one short passkey prompt with its greedy answer, which tests/test_decoder_fixture.py checks.

    python benchmarks/decoder_eval.py                   # -> benchmarks/results/decoder_eval.json (~10 min, 2 cores)
    python benchmarks/decoder_eval.py --write-fixture   # also rewriter/data/decoder/eval.json

The held-out files are read from the running Python's stdlib: it must be the version recorded in the split (3.11.7),
or the texts differ (the script stops unless --any-python).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

from decoder_common import (DATA_DIR, DECODER_DIR, EVAL_DISTANCES, N_DIGITS, REPO, SEQ_LEN, SPLIT_JSON, Templates,
                            python_version, read_text, retrieval_sequence)

RESULT = REPO / "benchmarks" / "results" / "decoder_eval.json"
FIXTURE = DECODER_DIR / "eval.json"
SLICE = (0, 1024)            # tokens [0, 1024) of the held-out stream
SHORT = dict(seq_len=256, distance=64, filler_offset=4096, seed=7)


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DECODER_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DECODER_DIR)
    return model, tok


def held_out_stream(tok, split):
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for f in split["held_out"]:
        ids.extend(tok(read_text(f), add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def nll_sum(model, x):
    logits = model(input_ids=x).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                             reduction="sum").item(), x[:, 1:].numel()


@torch.no_grad()
def retrieval(model, held, t, distances, trials, seed=1234, bs=4):
    g = torch.Generator()
    g.manual_seed(seed)
    out = {}
    for d in distances:
        seqs, a0 = [], None
        for _ in range(trials):
            off = int(torch.randint(0, held.numel() - SEQ_LEN, (1,), generator=g))
            key = torch.randint(0, 10, (N_DIGITS,), generator=g)
            ids, a0 = retrieval_sequence(held[off:off + SEQ_LEN], d, key, t, SEQ_LEN)
            seqs.append(ids)
        ok = 0
        for s in range(0, trials, bs):
            x = torch.stack(seqs[s:s + bs])
            pred = model(input_ids=x[:, :a0 + N_DIGITS - 1], logits_to_keep=N_DIGITS).logits.argmax(-1)
            ok += (pred == x[:, a0:a0 + N_DIGITS]).all(-1).sum().item()
        out[str(d)] = ok / trials
        print(f"distance {d}: {out[str(d)]:.3f}", flush=True)
    return out


def write_fixture(model, held, t):
    x = held[SLICE[0]:SLICE[1]]
    s, c = nll_sum(model, x[None])
    g = torch.Generator()
    g.manual_seed(SHORT["seed"])
    key = torch.randint(0, 10, (N_DIGITS,), generator=g)
    off = SHORT["filler_offset"]
    ids, a0 = retrieval_sequence(held[off:off + SHORT["seq_len"]], SHORT["distance"], key, t, SHORT["seq_len"])
    prompt = ids[:a0]
    gen = model.generate(prompt[None], max_new_tokens=N_DIGITS, do_sample=False,
                         pad_token_id=t.eos)[0, a0:].tolist()
    fixture = dict(
        note="Checked by tests/test_decoder_fixture.py; written by benchmarks/decoder_eval.py --write-fixture "
             "(CPU, fp32 from the bf16 weights).",
        params=sum(p.numel() for p in model.parameters()),
        slice=dict(source="held-out stream tokens %d:%d" % SLICE, input_ids=x.tolist(), nll=s / c,
                   perplexity=math.exp(s / c)),
        passkey=dict(distance=SHORT["distance"], prompt_ids=prompt.tolist(), answer_ids=ids[a0:a0 + N_DIGITS].tolist(),
                     passkey="".join(str(int(k)) for k in key), greedy_ids=gen),
        )
    FIXTURE.write_text(json.dumps(fixture) + "\n")
    print("slice perplexity", math.exp(s / c), "passkey", fixture["passkey"]["passkey"], "greedy", gen,
          "answer", fixture["passkey"]["answer_ids"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--window-stride", type=int, default=1,
                   help="score every k-th 2048-token window of the held-out stream (CPU time; 1 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-fixture", action="store_true")
    p.add_argument("--any-python", action="store_true")
    p.add_argument("--skip-perplexity", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    split = json.loads(SPLIT_JSON.read_text())
    if python_version() != split["python"] and not a.any_python:
        raise SystemExit(f"split made from Python {split['python']}'s stdlib, this is {python_version()}")
    model, tok = load()
    t = Templates.from_tokenizer(tok)
    assert t.to_json() == split["templates"], "tokenizer templates differ from the split's"
    held = held_out_stream(tok, split)
    packed = DATA_DIR / "heldout.bin"
    if packed.exists():   # same ids as the packed stream the training run evaluated on
        assert torch.equal(held, torch.from_numpy(np.fromfile(packed, dtype=np.uint16).astype(np.int64)))
    if a.write_fixture:
        write_fixture(model, held, t)
    res = dict(model=str(DECODER_DIR.relative_to(REPO)), python=python_version(), torch=torch.__version__,
               dtype="float32 (from bf16 weights)", device="cpu", held_out_files=len(split["held_out"]),
               held_out_tokens=held.numel(), seq_len=SEQ_LEN)
    if not a.skip_perplexity:
        n = (held.numel() - 1) // SEQ_LEN
        windows = list(range(0, n, a.window_stride))
        tot, cnt = 0.0, 0
        for i in windows:
            s, c = nll_sum(model, held[i * SEQ_LEN:(i + 1) * SEQ_LEN][None])
            tot, cnt = tot + s, cnt + c
        res.update(held_out_windows=len(windows), held_out_windows_total=n, window_stride=a.window_stride,
                   held_out_scored_tokens=cnt, held_out_nll=tot / cnt,
                   held_out_perplexity=math.exp(tot / cnt))
        print(f"held-out perplexity {math.exp(tot / cnt):.4f} over {cnt} tokens ({time.time() - t0:.0f} s)", flush=True)
    res["retrieval_trials"] = a.trials
    res["retrieval_accuracy_by_distance"] = retrieval(model, held, t, EVAL_DISTANCES, a.trials)
    res["wall_s"] = round(time.time() - t0, 1)
    if not a.skip_perplexity:
        RESULT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))



if __name__ == "__main__":
    main()
