"""A captured program with no pass against the HF model it came from: CPU latency of one forward, MiniLM at 512 tokens
and the shipped 7.6M-parameter decoder (Llama, GQA) at 1024, unpadded batch of 1. The two run interleaved (HF,
program, HF, ...) so that load from other processes hits both alike; median of the repeats.

    python benchmarks/captured_cpu.py [--reps 7] [--out benchmarks/results/captured_cpu.json]
"""
import argparse
import json
import statistics
import sys
import time
import torch
from pathlib import Path
torch.manual_seed(0)
from rewriter.load import load, default_checkpoint
from rewriter.capture import capture

ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("--out", type=Path, default=None)
args = ap.parse_args()
REPS = args.reps
out = {}
for name, src, L in [("minilm", default_checkpoint(), 512), ("decoder", Path("rewriter/data/decoder"), 1024)]:
    loaded = load(src)
    model = loaded.module.eval()
    t0 = time.perf_counter(); program = capture(loaded); cap_s = time.perf_counter() - t0
    ids = torch.randint(5, model.config.vocab_size, (1, L))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = {"use_cache": False} if name == "decoder" else {}
    pin = {k: inputs[k] for k in program.input_names}
    hf, cap = [], []
    with torch.no_grad():
        ref = model(**inputs, **kw)[0]; got = program.run(**pin)[0]
        program.run(**pin); model(**inputs, **kw)
        for _ in range(REPS):
            t = time.perf_counter(); model(**inputs, **kw); hf.append(time.perf_counter() - t)
            t = time.perf_counter(); program.run(**pin); cap.append(time.perf_counter() - t)
    ops = sorted({str(n.target) for n in program.ep.graph.nodes if n.op == "call_function" and "attention" in str(n.target)})
    h, c = statistics.median(hf) * 1e3, statistics.median(cap) * 1e3
    out[name] = {"L": L, "reps": REPS, "hf_ms": round(h, 1), "captured_ms": round(c, 1), "hf_over_captured": round(h / c, 3),
                 "max_abs_diff": float((ref - got).abs().max()), "attention_ops": ops, "capture_s": round(cap_s, 1)}
    print(name, out[name], flush=True)
print(json.dumps(out))
if args.out is not None:
    args.out.write_text(json.dumps(out, indent=1))
