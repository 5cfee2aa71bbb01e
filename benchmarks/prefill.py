"""End-to-end prefill of a Llama-shaped 1.1B model (random bf16 weights; hidden 2048, 16 layers, 32 query / 8 KV
heads, intermediate 8192, vocab 32000: 1.104e9 parameters, the issue's anchor shape), original vs rewritten, at 16K and 32K tokens on the GPU.

Variants, all in one run:
- transformers: the HF model itself (SDPA, no mask: causal flash/cuDNN attention): the original as users run it;
- captured: the rewriter program with no pass (what capture alone costs);
- exact: `exact-attention` (attention unchanged; the key-padding mask replaces HF's materialised L x L mask, so
  SDPA runs its causal flash path again);
- window: `window:window=1024,sinks=64` (Triton block-sparse kernel); linear: `linear:feature_map=elu` (Triton
  chunked kernel); scatterbrain: `scatterbrain:window=1024,features=64`.
Capture and passes run on the CPU through rewriter.api.optimize (verified on seeded random ids, 2 x 256 tokens),
then the programs move to the GPU (Program.to). Each timing is the median of `--reps` synchronised forward passes
after one warm-up; the record gives speedup = transformers_ms / ours_ms.

    python benchmarks/prefill.py --out benchmarks/results/prefill_h200.json
    python benchmarks/prefill.py --tiny --out /tmp/prefill_tiny.json          # CPU smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from kv import build_model  # the same 1.1B Llama-shaped model as the decode benchmark
from rewriter.api import load_program, optimize
from rewriter.pipeline import make_pass

PASSES = {
    "exact": ("exact-attention", {}),
    "window": ("window", {"window": 1024, "sinks": 64}),
    "linear": ("linear", {"feature_map": "elu"}),
    "scatterbrain": ("scatterbrain", {"window": 1024, "features": 64}),
}


def timed(fn, reps: int, device: str) -> float:
    def once():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3
    once()
    return statistics.median(once() for _ in range(reps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--variants", nargs="+", default=list(PASSES), choices=list(PASSES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:   # the tiny model has 4096 positions
        args.lengths = [n for n in args.lengths if n <= 4096] or [256, 512]
    # capture and rewrite on the CPU, run on the GPU (Program.to): torch.export's CUDA fake kernels add guards that a
    # dynamic sequence dim cannot satisfy
    model = build_model(args.tiny, "cpu")
    gpu_model = copy.deepcopy(model).to(device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "params": sum(p.numel() for p in model.parameters()), "records": [], "builds": {}}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    t0 = time.perf_counter()
    programs = {"captured": load_program(model).to(device)}
    result["builds"]["captured"] = {"seconds": time.perf_counter() - t0}
    for name in args.variants:
        t0 = time.perf_counter()
        pname, opts = PASSES[name]
        res = optimize(model, [make_pass(pname, opts)], samples=2, seq_len=256)
        programs[name] = res.program.to(device)
        final = res.report.get("final", {})
        result["builds"][name] = {"seconds": time.perf_counter() - t0, "pass": f"{pname}:{opts}",
                                  "calibration_metrics": final}
        print(name, json.dumps(result["builds"][name], default=str)[:400], flush=True)
        save()
    g = torch.Generator().manual_seed(0)
    for L in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=g).to(device)
        base = timed(lambda: gpu_model(input_ids=ids, use_cache=False), args.reps, device)
        result["records"].append({"variant": "transformers", "L": L, "ms": base, "speedup": 1.0})
        print(f"L={L} transformers {base:.1f} ms", flush=True)
        for name, program in programs.items():
            feed = {"input_ids": ids}
            if "attention_mask" in program.input_names:
                feed["attention_mask"] = torch.ones_like(ids)
            try:
                ms = timed(lambda: program.run(**feed), args.reps, device)
                rec = {"variant": name, "L": L, "ms": ms, "speedup": base / ms}
            except torch.OutOfMemoryError as err:
                rec = {"variant": name, "L": L, "error": f"out of memory: {str(err).splitlines()[0]}"}
            result["records"].append(rec)
            print(json.dumps(rec), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
