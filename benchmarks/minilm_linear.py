"""Linear-layer passes on the real all-MiniLM-L6-v2: sentence-embedding cosine against parameter reduction, for
plain and activation-aware low-rank factorisation and for binarisation with and without a low-rank residual.

    python benchmarks/minilm_linear.py [--out benchmarks/results/minilm_linear.json]

Calibration (activations for the activation-aware methods): 16 pydoc topic pages, 128 tokens. Evaluation:
16 *other* pages (held out), 128 tokens - so activation-aware methods are not graded on the data they saw.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import rewriter
from rewriter.load import default_checkpoint
from rewriter import make_pass, optimize
from rewriter.calibration import calibration_inputs, compare_outputs, default_texts

ROWS = [
    ("lowrank", {"ratio": 0.75, "method": "svd"}), ("lowrank", {"ratio": 0.75, "method": "asvd"}),
    ("lowrank", {"ratio": 0.75, "method": "whitened"}),
    ("lowrank", {"ratio": 0.5, "method": "svd"}), ("lowrank", {"ratio": 0.5, "method": "asvd"}),
    ("lowrank", {"ratio": 0.5, "method": "whitened"}),
    ("sparse-lowrank", {"ratio": 0.4, "sparsity": 0.95}),
    ("binarize", {}), ("binarize", {"residual_ratio": 0.25}),
    ("binarize", {"include": ["*intermediate*", "*output.dense"], "exclude": ["*attention*"]}),
    ("binarize", {"include": ["*intermediate*", "*output.dense"], "exclude": ["*attention*"], "residual_ratio": 0.25}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/minilm_linear.json")
    args = ap.parse_args()
    program = rewriter.load_program(default_checkpoint())
    texts = default_texts()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    calib = [texts[i] for i in order[:40]]
    held = [texts[i] for i in order[40:]]
    eval_inputs, desc = calibration_inputs(program, texts=held, samples=16, seq_len=128, seed=1)
    reference = program.run(**eval_inputs)
    linear_params = sum(s["in_features"] * s["out_features"] + s["out_features"]
                        for s in rewriter.inspect(program)["linear"])
    rows = []
    for name, opts in ROWS:
        t0 = time.perf_counter()
        res = optimize(program, [make_pass(name, dict(opts))], calib_texts=calib, samples=16, seq_len=128)
        s = res.report["passes"][0]["summary"]
        held_m = compare_outputs(reference, res.program.run(**eval_inputs), program.output_names, eval_inputs)
        row = {"pass": name, "options": opts, "sites": s["sites"],
               "linear_param_reduction": 1 - (linear_params - s["params_before"] + s["params_after"]) / linear_params,
               "linear_bytes_reduction": 1 - s["bytes_after"] / s["bytes_before"],
               "embedding_cosine_calibration": res.report["final"]["embedding_cosine"],
               "embedding_cosine_heldout": held_m["embedding_cosine"],
               "relative_error_heldout": held_m["relative_error"], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"model": "sentence-transformers/all-MiniLM-L6-v2", "linear_parameters": linear_params,
           "evaluation": desc + " (held-out pages)", "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
