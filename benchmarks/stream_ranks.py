"""Streamed calibration over N processes against one (issues 17-18): the same `rewriter optimize --stream` run
without a launcher and under `torchrun --nproc-per-node N` (NCCL on GPUs, gloo on CPUs), timed; the record gives the
largest weight difference, the final-output metrics of both, and for N > 1 the scaling efficiency
one-process time / (N x N-process time).

    python benchmarks/stream_ranks.py --nproc 1 2 --out stream_ranks.json [--shape small|8b] [--device cuda]

`--shape small` is a 4-block 1024-wide Llama (seconds); `8b` the Llama-3-8B shape (the 2-GPU target).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

PASSES = ["lowrank:method=whitened,ratio=0.8", "think:ratio=0.5"]
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd[:8])} ...")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, nargs="+", default=[1])
    ap.add_argument("--shape", choices=["small", "8b"], default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workdir", default="/tmp/stream_ranks")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from rewriter.stream.synthetic import LLAMA_3_8B, write_llama
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    shape = SMALL if args.shape == "small" else LLAMA_3_8B
    info = write_llama(work / "ckpt", dtype=torch.bfloat16, **shape)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    base = ["optimize", str(work / "ckpt"), "--stream", "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    for p in PASSES:
        base += ["--pass", p]
    device = ["--device", args.device] if args.device == "cpu" else []
    single = run([sys.executable, "-m", "rewriter", *base, "-o", str(work / "one"), *device], env)
    ref = tensors(work / "one")
    ref_report = json.loads((work / "one" / "report.json").read_text())
    records = [{"processes": 0, "launcher": "none", "seconds": round(single, 2), "final": ref_report["final"]}]
    for n in args.nproc:
        out = work / f"ranks{n}"
        sec = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   "-m", "rewriter", *base, "-o", str(out), *device], env)
        got = tensors(out)
        report = json.loads((out / "report.json").read_text())
        worst = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref)
        rec = {"processes": n, "launcher": "torchrun", "backend": report["calibration"].get("backend"),
               "world_size": report["calibration"]["world_size"],
               "rank_samples": report["calibration"]["rank_samples"], "seconds": round(sec, 2),
               "max_abs_weight_difference": worst, "same_tensor_names": set(got) == set(ref),
               "final": report["final"]}
        if n > 1:
            rec["scaling_efficiency"] = round(single / (n * sec), 3)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "shape": shape, "checkpoint_bytes": info["bytes"],
                                          "passes": PASSES, "samples": args.samples, "seq_len": args.seq_len,
                                          "torch": torch.__version__, "records": records}, indent=1))


if __name__ == "__main__":
    main()
