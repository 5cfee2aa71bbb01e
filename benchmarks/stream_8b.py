"""Issue 17's H200 target: an 8B-shaped checkpoint (Llama-3-8B dimensions, random bf16 weights written to local disk
first) through `optimize --stream` with whitened low rank (ratio 0.8) + think 0.5 + auto-attention (density), one
process on the GPU; records the wall time, peak host RAM and GPU memory per block and overall, and the 70B-shaped
estimate from the per-block numbers.

    python benchmarks/stream_8b.py --out stream_h200.json [--workdir /tmp/stream8b] [--budget-s 420]

A device call lasts at most 10 minutes: when `--budget-s` runs out between blocks the run stops (its staging
folder keeps the finished blocks, as an interrupted run would) and the record says how many blocks it did
(`complete: false`); the whole-model figures are then per-block mean x blocks.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

LLAMA_3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=128256)


class Budget(Exception):
    pass


def block_params(c: dict) -> int:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    d = h // c["num_attention_heads"]
    return 2 * h * h + 2 * h * kv * d + 3 * h * i + 2 * h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/stream8b")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder blocks (smoke runs)")
    ap.add_argument("--shrink", type=int, default=1, help="divide every width by this (smoke runs on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: widths / 16, 3 blocks, 4 x 64 tokens")
    args = ap.parse_args()
    if args.tiny:
        args.shrink, args.layers, args.samples, args.seq_len, args.device = 16, 3, 4, 64, "cpu"
    import rewriter
    from rewriter.api import make_pass
    from rewriter.stream import optimize_streamed
    from rewriter.stream.run import staging_dir
    from rewriter.stream.synthetic import LLAMA_3_8B, write_llama

    shape = dict(LLAMA_3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.shrink > 1:
        for k in ("hidden_size", "intermediate_size", "vocab_size"):
            shape[k] //= args.shrink
        shape["num_attention_heads"] //= args.shrink
        shape["num_key_value_heads"] = max(1, shape["num_key_value_heads"] // args.shrink)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    written = write_llama(work / "ckpt", dtype=torch.bfloat16, device=args.device, **shape)
    write_s = time.perf_counter() - t0
    print(json.dumps({"written": written, "seconds": round(write_s, 1)}), flush=True)
    passes = [make_pass("lowrank", {"method": "whitened", "ratio": 0.8}), make_pass("think", {"ratio": 0.5}),
              make_pass("auto-attention", {"density": 0.5})]
    blocks: list[dict] = []
    start = time.perf_counter()

    def on_block(info: dict) -> None:
        blocks.append(info)
        print(json.dumps(info), flush=True)
        if time.perf_counter() - start > args.budget_s and len(blocks) < shape["num_hidden_layers"]:
            raise Budget

    report, complete = None, True
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        run = optimize_streamed(work / "ckpt", passes, out=work / "out", samples=args.samples, seq_len=args.seq_len,
                                device=args.device, block_progress=on_block,
                                progress=lambda m: print(m, flush=True) if not m.startswith("block") else None)
        report = run.report
    except Budget:
        complete = False
    seconds = time.perf_counter() - start
    n = len(blocks)
    mean = sum(b["seconds"] for b in blocks) / max(n, 1)
    L8 = shape["num_hidden_layers"]
    p8, p70 = block_params(shape), block_params(LLAMA_3_70B)
    peak_dev = max((b.get("peak_device_bytes", 0) for b in blocks), default=0)
    record = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "rewriter_commit": _commit(),
        "shape": shape, "checkpoint_bytes": written["bytes"], "checkpoint_dtype": "bfloat16",
        "write_seconds": round(write_s, 1),
        "passes": [p.recipe_entry() for p in passes], "samples": args.samples, "seq_len": args.seq_len,
        "complete": complete, "blocks_done": n, "blocks_total": L8, "seconds": round(seconds, 1),
        "per_block_seconds_mean": round(mean, 2),
        "estimated_seconds_all_blocks": round(mean * L8, 1),
        "peak_host_bytes": max((b["peak_host_bytes"] for b in blocks), default=0),
        "peak_device_bytes": peak_dev,
        "blocks": blocks,
        # on paper: a 70B block holds p70 / p8 times the weights; the block's SVDs grow with (rows x cols^2), the
        # whitening grams with in_features^2: time per block x 4-8, device memory per block x ~4
        "estimate_70b": {"blocks": LLAMA_3_70B["num_hidden_layers"], "block_param_ratio": round(p70 / p8, 2),
                         "seconds_low": round(mean * 4 * LLAMA_3_70B["num_hidden_layers"], 0),
                         "seconds_high": round(mean * 8 * LLAMA_3_70B["num_hidden_layers"], 0),
                         "device_bytes": int(peak_dev * p70 / p8),
                         "host_bytes_note": "host RAM does not grow with the model: one block is resident, the rest "
                                            "stays on disk; the activation streams grow with hidden size (x2)"},
    }
    if report is not None:
        record["final"] = report["final"]
        record["pass_metrics"] = {p["pass"]: p["metrics"] for p in report["passes"]}
        record["sites_changed"] = {p["pass"]: p["sites_changed"] for p in report["passes"]}
        record["params_before_after"] = [report["before"]["parameters"], report["after"]["parameters"]]
    else:
        record["stopped_at_budget"] = f"{args.budget_s:g} s; finished blocks are in {staging_dir(work / 'out')}"
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "blocks"}, indent=1))
    del rewriter


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
