"""The decode step's matrix-vector products on the GPU: rewriter::gemv / rewriter::swiglu_gemv's Triton kernels
(rewriter/decode/triton_gemv.py) against cuBLAS, at the 1.1B Llama shape's projections (hidden 2048, 32 / 8 heads of
64, intermediate 8192, vocab 32000), x of M = 1 (and 2, 4) rows, bf16.

Shapes (name: weights read together):
    qkv: q (2048, 2048), k (512, 2048), v (512, 2048)   peers: three cuBLAS linears (what the captured step runs) and
                                                         one on the three concatenated (cublas_concat)
    o: (2048, 2048); down: (2048, 8192); lm_head: (32000, 2048)        peer: one cuBLAS linear
    swiglu: gate, up (8192, 2048) and silu(gate) * up    peers: two cuBLAS linears + rewriter::silu_mul's kernel, and
                                                         one linear on the concatenated pair + the same silu_mul

In a decode step nothing stays in L2 between one use of a weight and the next (2 GB stream through per token), so each
timing replays a CUDA graph of calls that cycle through enough copies of the weights (>= 150 MB) that every call reads
HBM; time per call = graph time / calls. Every config of the sweep (BLOCK_N, BLOCK_K, warps, stages) is checked
against float64 first (NaN-poisoned output). Records: op, shape, M, config, ours_ms, peer, peer_ms, ratio (peer / ours),
read_frac_of_copy (weight bytes per call / time, over the device's copy bandwidth measured in the run: bytes read +
written per second of a 2 GiB copy). `--configs-out` writes the best config per (kind, N, K) for kv.py's
`--gemv-configs` (triton_gemv.GEMV_CONFIGS).

    python benchmarks/gemv.py --out benchmarks/results/gemv_h100.json --configs-out gemv_configs.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F
from kv import copy_bandwidth            # benchmarks/kv.py: the same copy bandwidth as the decode roofline
from linear import graph_time_ms         # benchmarks/linear.py: calls captured in one CUDA graph, median per call

SHAPES = {           # name: (kind, [(N, K) per weight])
    "qkv": ("gemv", [(2048, 2048), (512, 2048), (512, 2048)]),
    "o": ("gemv", [(2048, 2048)]),
    "down": ("gemv", [(2048, 8192)]),
    "lm_head": ("gemv", [(32000, 2048)]),
    "swiglu": ("swiglu", [(8192, 2048), (8192, 2048)]),
}
# launches tried per shape (BLOCK_N, BLOCK_K, warps, stages): each is a compile per kernel and row count
# (the first run, gemv_h100.json, swept BLOCK_N 2-32, BLOCK_K 256-1024, 4 / 8 warps, 2 / 4 stages, and x of 1 and 4
# rows: two rows per program and K steps of 1024 won every shape at one row; 4 rows ran slower than cuBLAS)
SWEEP = dict(block_n=(1, 2, 4), block_k=(512, 1024, 2048), warps=(2, 4, 8), stages=(2, 3, 4, 5))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs-out", default=None)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1],
                        help="rows of x (the kernels take one; more rows time cuBLAS only)")
    parser.add_argument("--budget-s", type=float, default=240)
    args = parser.parse_args()
    from rewriter.decode import gemv as _ops  # noqa: F401  (registers the ops)
    from rewriter.decode.triton_gemv import gemv_config, gemv_triton, swiglu_gemv_triton
    from rewriter.linear.fused import silu_mul
    began = time.perf_counter()
    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bw,
              "records": [], "best": {}, "skipped": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    for name in args.shapes:
        kind, dims = SHAPES[name]
        K = dims[0][1]
        nbytes = sum(n * k for n, k in dims) * 2
        copies = max(2, -(-150_000_000 // nbytes))
        sets = [[torch.randn(n, k, device="cuda", generator=gen, dtype=dt) / k ** 0.5 for n, k in dims]
                for _ in range(copies)]
        concat = [torch.cat(ws) for ws in sets]
        n_total = dims[0][0] if kind == "swiglu" else sum(n for n, _ in dims)
        for M in args.rows:
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=dt)
            xd = x.double()
            if kind == "swiglu":
                want = F.silu(xd @ sets[0][0].double().T) * (xd @ sets[0][1].double().T)
                peers = {"cublas+silu_mul": lambda i: silu_mul(F.linear(x, sets[i][0]), F.linear(x, sets[i][1])),
                         "cublas_concat+silu_mul": lambda i: silu_mul(*F.linear(x, concat[i]).split(dims[0][0], -1))}
            else:
                want = torch.cat([xd @ w.double().T for w in sets[0]], -1)
                peers = {"cublas": lambda i: [F.linear(x, w) for w in sets[i]]}
                if len(dims) > 1:
                    peers["cublas_concat"] = lambda i: F.linear(x, concat[i])
            peer_ms = {p: graph_time_ms([lambda i=i, fn=fn: fn(i) for i in range(copies)])
                       for p, fn in peers.items()}
            default = gemv_config(kind, n_total, K)
            configs = [] if M > 1 else [default] + [c for c in itertools.product(*SWEEP.values())
                                                    if c != default and c[1] <= max(512, K)]
            best = None
            for config in configs:
                if time.perf_counter() - began > args.budget_s:
                    result["skipped"].append(f"{name} M={M} from config {config}")
                    break

                def ours(i, config=config):
                    if kind == "swiglu":
                        return swiglu_gemv_triton(x, sets[i][0], sets[i][1], config)
                    return gemv_triton(x, sets[i], config)
                try:
                    torch.cuda.synchronize()
                    got = ours(0).double()
                    err = float((got - want).abs().max() / want.abs().max())
                    if not err < 2e-2:
                        raise AssertionError(f"relative error {err:.3g} against float64")
                    ms = graph_time_ms([lambda i=i: ours(i) for i in range(copies)])
                except Exception as e:
                    result["records"].append({"op": kind, "shape": name, "M": M, "config": list(config),
                                              "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    continue
                for p, pms in peer_ms.items():
                    rec = {"op": kind, "shape": name, "dims": dims, "M": M, "config": list(config),
                           "default_config": config == default, "ours_ms": ms, "peer": p, "peer_ms": pms,
                           "ratio": pms / ms, "read_frac_of_copy": nbytes / (ms / 1e3) / bw,
                           "peer_read_frac_of_copy": nbytes / (pms / 1e3) / bw, "max_rel_err": err}
                    result["records"].append(rec)
                if best is None or ms < best[1]:
                    best = (config, ms)
            if best is not None:
                result["best"][f"{kind} {n_total} {K} M{M}"] = {"config": list(best[0]), "ours_ms": best[1],
                                                                "default_ms": next((r["ours_ms"] for r in
                                                                                    result["records"]
                                                                                    if r.get("shape") == name and
                                                                                    r.get("M") == M and
                                                                                    r.get("default_config")), None),
                                                                "peers_ms": peer_ms,
                                                                "read_frac_of_copy": nbytes / (best[1] / 1e3) / bw}
                print(f"{name} M={M}: best {best[0]} {best[1] * 1e3:.2f} us "
                      f"({nbytes / (best[1] / 1e3) / bw:.2f} of copy bw), peers "
                      + ", ".join(f"{p} {v * 1e3:.2f} us" for p, v in peer_ms.items()), flush=True)
            save()
        del sets, concat
        torch.cuda.empty_cache()
    if args.configs_out:
        table = {k: v["config"] for k, v in result["best"].items() if k.endswith(" M1")}
        with open(args.configs_out, "w") as f:
            json.dump(table, f, indent=1)
    result["elapsed_s"] = time.perf_counter() - began
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
