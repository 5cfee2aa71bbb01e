"""The fuse pass's kernels on the GPU at the 1.1B prefill's shapes (32K tokens, hidden 2048, intermediate 8192, bf16):
rewriter::rms_norm and rewriter::silu_mul (Triton) against their references (the model's own aten chain, what the
eager program ran before the pass), eager and compiled by Inductor; agreement (max abs difference, fraction of
bit-equal elements) and median times, with the bytes each moves at least.

    python benchmarks/fused_kernels.py --out benchmarks/results/fused_kernels_h100.json
"""
from __future__ import annotations

import argparse
import json

import torch

import rewriter  # noqa: F401  (registers the ops and their CUDA kernels)
from rewriter.linear.fused import rms_norm_reference, silu_mul_reference


def median_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    return {"max_abs_diff": float((got.float() - want.float()).abs().max()),
            "bit_equal_fraction": float((got == want).float().mean())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--out", default="fused_kernels.json")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, args.tokens, args.hidden, device=dev, dtype=dt)
    w = (1 + 0.1 * torch.randn(args.hidden, device=dev)).to(dt)
    gate = torch.randn(1, args.tokens, args.intermediate, device=dev, dtype=dt)
    up = torch.randn(1, args.tokens, args.intermediate, device=dev, dtype=dt)
    eps = 1e-5
    cases = {
        "rms_norm": (lambda: torch.ops.rewriter.rms_norm(x, w, eps), lambda: rms_norm_reference(x, w, eps),
                     2 * x.numel() * x.element_size()),
        "silu_mul": (lambda: torch.ops.rewriter.silu_mul(gate, up), lambda: silu_mul_reference(gate, up),
                     3 * gate.numel() * gate.element_size()),
    }
    records = []
    for name, (op, ref, min_bytes) in cases.items():
        compiled = torch.compile(ref)
        rec = {"op": name, "tokens": args.tokens, "dtype": "bfloat16", **compare(op(), ref()),
               "compiled_vs_reference": compare(compiled(), ref())}
        rec["ms"] = {"triton": median_ms(op), "reference_eager": median_ms(ref), "reference_compiled": median_ms(compiled)}
        rec["min_bytes"] = min_bytes
        rec["triton_GBps"] = min_bytes / rec["ms"]["triton"] / 1e6
        rec["speedup_vs_eager"] = rec["ms"]["reference_eager"] / rec["ms"]["triton"]
        rec["speedup_vs_compiled"] = rec["ms"]["reference_compiled"] / rec["ms"]["triton"]
        print(json.dumps(rec), flush=True)
        records.append(rec)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
