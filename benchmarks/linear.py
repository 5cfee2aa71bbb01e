"""GPU benchmark of the linear-layer kernels: bit-packed binary linear and fused low-rank linear (bf16).

Per shape (out, in) of W and per M (tokens): correctness on fresh random inputs against a float64 oracle
(binary: the output buffer is poisoned with NaN first, so an unwritten element fails), then timings.
Timing: each variant is captured in a CUDA graph that calls it once per weight copy, with enough copies
that the weights read per replay exceed 3x the L2 (no timing from cache); time per call = replay time /
copies, median of repeated replays. Peers: cuBLAS bf16 through torch.nn.functional.linear, and for the
binary GEMV (M <= GEMV_MAX_M) a device-to-device copy of the packed bytes (its time is the floor for reading
them; read_frac_of_copy = copy_us / ours_us). Each split-K GEMV configuration of GEMV_SWEEP is timed and then
checked again over NaN-poisoned output (after many replays, so a counter left non-zero would show).

    python benchmarks/linear.py --out benchmarks/results/linear_h200_v4_splitk.json [--binary-only]

Results: linear_h200.json is the dot-based binary kernels (bit-plane GEMV at M = 1, reshaped tiles above);
linear_h200_v1.json (binary: reshaped-tile kernel only), linear_h200_v2_replicated_bytes.json (each byte
loaded once per bit, no reshape: 2.5x slower) and linear_h200_v3_bitplane_dots.json (one dot per bit
position) record the variants that led to it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewriter.linear.triton.binary_linear import (GEMV_DISPATCH_MAX_M, GEMV_MAX_M, _sm_count,  # noqa: E402
                                           binary_linear_triton, gemv_defaults, gemv_split, launch_binary_gemv,
                                           launch_binary_linear, launch_binary_lut_gemv)
from rewriter.linear.triton.lowrank_linear import FUSED_MAX_M, lowrank_linear_fused  # noqa: E402
from rewriter.linear.binary import binarize_weight, binary_linear  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # W (out, in)
MS = [1, 4, 16, 256]
DTYPE = torch.bfloat16
# split-K GEMV configurations (launch_binary_gemv keywords), at most 10 per (shape, M); the first of each
# list is gemv_defaults(M). Compiles are per (block_n, block_w, num_warps, num_stages, rows of x, split or not).
GEMV_SWEEP = {
    1: [
        gemv_defaults(1),
        dict(block_n=128, block_w=8, programs_per_sm=4, num_warps=4, num_stages=3),
        dict(block_n=256, block_w=8, programs_per_sm=4, num_warps=4, num_stages=3),
        dict(block_n=256, block_w=4, programs_per_sm=4, num_warps=4, num_stages=3),
        dict(block_n=1024, block_w=4, programs_per_sm=4, num_warps=8, num_stages=3),
        dict(block_n=512, block_w=8, programs_per_sm=4, num_warps=8, num_stages=3),
        dict(block_n=128, block_w=16, programs_per_sm=4, num_warps=4, num_stages=3),
        dict(block_n=512, block_w=4, programs_per_sm=8, num_warps=4, num_stages=3),
        dict(block_n=512, block_w=4, programs_per_sm=2, num_warps=4, num_stages=3),
        dict(block_n=512, block_w=4, split_k=1, num_warps=4, num_stages=3),
    ],
    4: [
        gemv_defaults(4),
        dict(block_n=128, block_w=8, programs_per_sm=4, num_warps=4, num_stages=3),
        dict(block_n=512, block_w=4, programs_per_sm=4, num_warps=8, num_stages=3),
        dict(block_n=256, block_w=4, programs_per_sm=8, num_warps=4, num_stages=3),
    ],
    16: [
        gemv_defaults(16),
        dict(block_n=64, block_w=8, programs_per_sm=4, num_warps=4, num_stages=3),
        dict(block_n=64, block_w=4, programs_per_sm=4, num_warps=4, num_stages=3),
        dict(block_n=32, block_w=8, programs_per_sm=8, num_warps=4, num_stages=3),
    ],
}
# the nibble-table GEMV at M = 1 (launch_binary_lut_gemv keywords; lanes over output rows, block_w words per thread)
LUT_SWEEP = [dict(block_n=128, block_w=4, programs_per_sm=4), dict(block_n=128, block_w=8, programs_per_sm=4),
             dict(block_n=256, block_w=4, programs_per_sm=4, num_warps=8), dict(block_n=128, block_w=4, programs_per_sm=8)]
# the dot-based kernels at M <= 16, for comparison: (kernel, BLOCK_M, BLOCK_N, BLOCK_KB, warps, stages)
DOT_DECODE = [("bitplane", 16, 32, 128, 4, 3), ("tile", 16, 32, 64, 4, 3)]
PREFILL_SWEEP = [("tile", 128, 128, 8, 8, 3), ("tile", 128, 64, 16, 8, 3)]
LOWRANK_SWEEP = [dict(block_r=16, block_k=256, block_n=64, num_warps=4, shares=1), dict(block_r=16, block_k=256, block_n=64, num_warps=4, shares=2),
                 dict(block_r=16, block_k=512, block_n=128, num_warps=8)]


def lowrank_linear(x, A, B, bias):
    """The fused kernel where it applies (M <= FUSED_MAX_M), two linears above."""
    if x.shape[0] <= FUSED_MAX_M:
        return lowrank_linear_fused(x, A, B, bias)
    return F.linear(F.linear(x, A), B, bias)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def graph_time_ms(calls: list, reps: int = 15) -> float:
    """Median time of one call: all calls captured once in a CUDA graph, replayed `reps` times."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, min(64, math.ceil(3 * l2 / nbytes)))


def gemv_rows(x, packs, alpha, mu, bias, in_f, ybuf, ref, dense_us, copy_us, nbytes) -> dict:
    """Split-K GEMV sweep (then a poisoned-output check per configuration) and the dot-based kernels."""
    M, N = ybuf.shape
    x2 = x.contiguous()
    sms = _sm_count(x.device)
    sweep, worst = [], 0.0
    for cfg in GEMV_SWEEP.get(M, [gemv_defaults(M)]):
        t = graph_time_ms([lambda p=p, cfg=cfg: launch_binary_gemv(x2, p, alpha, mu, bias, ybuf, **cfg) for p in packs]) * 1e3
        y = torch.full_like(ybuf, float("nan"))
        launch_binary_gemv(x2, packs[0], alpha, mu, bias, y, **cfg)
        err = rel_err(y, ref)
        worst = max(worst, err) if err == err else float("nan")
        split = cfg.get("split_k") or gemv_split(N, in_f, cfg["block_n"], cfg["block_w"], cfg["programs_per_sm"], sms)[0]
        sweep.append({"config": cfg, "split_k": split, "programs": math.ceil(N / cfg["block_n"]) * split, "us": t,
                      "ratio_vs_cublas": dense_us / t, "packed_GBps": nbytes / (t * 1e-6) / 1e9,
                      "read_frac_of_copy": copy_us / t, "rel_err": err})
    dot = []
    for cfg in DOT_DECODE:
        t = graph_time_ms([lambda p=p, cfg=cfg: launch_binary_linear(x2, p, alpha, mu, bias, ybuf, *cfg) for p in packs]) * 1e3
        dot.append({"config(kernel,block_m,block_n,block_kb,warps,stages)": list(cfg), "us": t, "ratio_vs_cublas": dense_us / t})
    lut = []
    if M == 1:      # the nibble-table GEMV (tables of x, then one gather per 4 columns), both launches timed
        for cfg in LUT_SWEEP:
            t = graph_time_ms([lambda p=p, cfg=cfg: launch_binary_lut_gemv(x2, p, alpha, mu, bias, ybuf, **cfg)
                               for p in packs]) * 1e3
            y = torch.full_like(ybuf, float("nan"))
            launch_binary_lut_gemv(x2, packs[0], alpha, mu, bias, y, **cfg)
            lut.append({"config": cfg, "us": t, "ratio_vs_cublas": dense_us / t, "read_frac_of_copy": copy_us / t,
                        "rel_err": rel_err(y, ref)})
    best = min(sweep, key=lambda r: r["us"])
    return {"gemv_sweep": sweep, "gemv_sweep_max_rel_err": worst, "best_gemv": best, "dot_kernels": dot,
            "lut_gemv": lut, "best_ratio_vs_cublas": best["ratio_vs_cublas"],
            "best_read_frac_of_copy": best["read_frac_of_copy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--binary-only", action="store_true", help="skip the low-rank kernels")
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = props.L2_cache_size
    torch.manual_seed(0)
    rows, checks = [], []

    for out_f, in_f in SHAPES:
        W = torch.randn(out_f, in_f, device=dev) * in_f ** -0.5
        bias = torch.randn(out_f, device=dev, dtype=DTYPE) * 0.1
        d = binarize_weight(W)
        packed, alpha, mu = d["packed"], d["alpha"].to(DTYPE), d["mu"].to(DTYPE)
        Wbf = W.to(DTYPE)
        n_bin = copies_for(packed.numel(), l2)
        n_dense = copies_for(Wbf.numel() * 2, l2)
        packs = [packed.clone() for _ in range(n_bin)]
        denses = [Wbf.clone() for _ in range(n_dense)]
        lrs = []
        if not args.binary_only:
            rank = min(out_f, in_f) // 4
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # fp32 on GPU: speed over the fp64 of svd_factors
            A = (S[:rank].sqrt()[:, None] * Vh[:rank]).to(DTYPE).contiguous()
            B = (U[:, :rank] * S[:rank].sqrt()[None]).to(DTYPE).contiguous()
            n_lr = copies_for((A.numel() + B.numel()) * 2, l2)
            lrs = [(A.clone(), B.clone()) for _ in range(n_lr)]
            ideal = out_f * in_f / (rank * (out_f + in_f))
        # the floor for reading the packed bytes: a device-to-device copy of them (rotating buffers, as above)
        dsts = [torch.empty_like(packed) for _ in packs]
        copy_us = graph_time_ms([lambda p=p, q=q: q.copy_(p) for p, q in zip(packs, dsts)]) * 1e3
        del dsts

        for M in MS:
            shape = f"{out_f}x{in_f}"
            # correctness, fresh inputs each check
            x = torch.randn(M, in_f, device=dev, dtype=DTYPE)
            ref = binary_linear(x.double(), packed, alpha.double(), mu.double(), bias.double(), in_f)
            y = torch.full((M, out_f), float("nan"), device=dev, dtype=DTYPE)
            binary_linear_triton(x, packed, alpha, mu, bias, in_f, out=y)
            checks.append({"op": "binary_linear", "shape": shape, "M": M, "rel_err": rel_err(y, ref)})
            if not args.binary_only:
                x = torch.randn(M, in_f, device=dev, dtype=DTYPE)
                ref = (x.double() @ A.double().T) @ B.double().T + bias.double()
                checks.append({"op": "lowrank_linear", "shape": shape, "M": M,
                               "rel_err": rel_err(lowrank_linear(x, A, B, bias), ref)})

            x = torch.randn(M, in_f, device=dev, dtype=DTYPE)
            dense_ms = graph_time_ms([lambda w=w: F.linear(x, w, bias) for w in denses])
            ybuf = torch.empty(M, out_f, device=dev, dtype=DTYPE)
            bin_ms = graph_time_ms([lambda p=p: binary_linear_triton(x, p, alpha, mu, bias, in_f, out=ybuf) for p in packs])
            row = {"op": "binary_linear", "shape": shape, "M": M, "ours_us": bin_ms * 1e3, "peer": "cublas_bf16_linear",
                   "peer_us": dense_ms * 1e3, "ratio": dense_ms / bin_ms,
                   "path": "splitk" if M <= GEMV_DISPATCH_MAX_M else "decode" if M <= GEMV_MAX_M else "prefill",
                   "splitk_defaults": gemv_defaults(M) if M <= GEMV_MAX_M else None}
            if M <= GEMV_MAX_M:
                ref = binary_linear(x.double(), packed, alpha.double(), mu.double(), bias.double(), in_f)
                row["packed_bytes"] = packed.numel()
                row["copy_us"] = copy_us
                row["copy_GBps"] = 2 * packed.numel() / (copy_us * 1e-6) / 1e9  # read + write
                row["packed_GBps"] = packed.numel() / (bin_ms * 1e-3) / 1e9
                row["read_frac_of_copy"] = copy_us / (bin_ms * 1e3)
                row["dense_GBps"] = Wbf.numel() * 2 / (dense_ms * 1e-3) / 1e9
                row.update(gemv_rows(x, packs, alpha, mu, bias, in_f, ybuf, ref, dense_ms * 1e3, copy_us,
                                     packed.numel()))
            else:
                row["TFLOPs"] = 2 * M * out_f * in_f / (bin_ms * 1e-3) / 1e12
                sweep = []
                for cfg in PREFILL_SWEEP:
                    x2 = x.contiguous()
                    t = graph_time_ms([lambda p=p, cfg=cfg: launch_binary_linear(x2, p, alpha, mu, bias, ybuf, *cfg) for p in packs])
                    sweep.append({"config(kernel,block_m,block_n,block_kb,warps,stages)": list(cfg), "us": t * 1e3})
                row["prefill_sweep"] = sweep
                row["best_ratio_vs_cublas"] = dense_ms * 1e3 / min(s["us"] for s in sweep)
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("gemv_sweep", "dot_kernels", "prefill_sweep")}, flush=True)
            if args.binary_only:
                continue

            two_ms = graph_time_ms([lambda a=a, b=b: F.linear(F.linear(x, a), b, bias) for a, b in lrs])
            ours_ms = graph_time_ms([lambda a=a, b=b: lowrank_linear(x, a, b, bias) for a, b in lrs])
            lr = {"op": "lowrank_linear", "shape": shape, "M": M, "rank": rank,
                  "path": "fused_triton" if M <= 16 else "two_cublas_linears",
                  "ours_ms": ours_ms, "peer": "two_cublas_linears", "peer_ms": two_ms, "ratio": two_ms / ours_ms,
                  "dense_ms": dense_ms, "speedup_vs_dense": dense_ms / ours_ms, "ideal_flop_ratio": ideal,
                  "fraction_of_ideal": dense_ms / ours_ms / ideal,
                  "two_cublas_fraction_of_ideal": dense_ms / two_ms / ideal}
            if M <= 16:
                sweep = []
                for cfg in LOWRANK_SWEEP:
                    t = graph_time_ms([lambda a=a, b=b, cfg=cfg: lowrank_linear_fused(x, a, b, bias, **cfg) for a, b in lrs])
                    sweep.append({"config": cfg, "ms": t})
                lr["fused_sweep"] = sweep
                lr["best_sweep_fraction_of_ideal"] = dense_ms / min(s["ms"] for s in sweep) / ideal
            rows.append(lr)
            print({k: v for k, v in lr.items() if k != "fused_sweep"}, flush=True)
        del packs, denses, lrs
        torch.cuda.empty_cache()

    result = {"device": props.name, "torch": torch.__version__, "l2_bytes": l2, "dtype": "bfloat16",
              "timing": "CUDA graph replay over rotating weight copies (> 3x L2), median of 15 replays, per call",
              "checks": checks, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\nop              shape        M   ours_us   peer_us  ratio  extra")
    for r in rows:
        if r["op"] == "lowrank_linear":
            ours, peer = r["ours_ms"] * 1e3, r["peer_ms"] * 1e3
            extra = f"frac_ideal={r['fraction_of_ideal']:.2f} (2xcublas {r['two_cublas_fraction_of_ideal']:.2f})"
        else:
            ours, peer = r["ours_us"], r["peer_us"]
            extra = f"best_ratio={r['best_ratio_vs_cublas']:.2f}"
            if "best_gemv" in r:
                b = r["best_gemv"]
                extra += (f" copy_us={r['copy_us']:.2f} read_frac_of_copy={r['read_frac_of_copy']:.2f}"
                          f" (best {b['read_frac_of_copy']:.2f}: {b['config']} split {b['split_k']})")
        print(f"{r['op']:15s} {r['shape']:11s} {r['M']:4d} {ours:9.2f} {peer:9.2f} {r['ratio']:6.2f}  {extra}")
    errs = checks + [{"op": "binary_gemv_sweep", "shape": r["shape"], "M": r["M"], "rel_err": r["gemv_sweep_max_rel_err"]}
                     for r in rows if "gemv_sweep_max_rel_err" in r]
    print("max rel err:", max(c["rel_err"] for c in errs), [c for c in errs if not c["rel_err"] < 2e-2])


if __name__ == "__main__":
    main()
