"""The decode step's attention kernel alone (rewriter.decode.triton_decode, split-K over the cache then a reduce) at
the 1.1B benchmark model's two cache forms, across stage-1 tiles and split plans, on the GPU.

Shapes (batch 1, bf16, one token per row; the cache holds `context` slots, all valid):
    gqa: 8 KV heads x 4 query heads of 64 (the unthinned step)
    mla: one shared latent of 448 values read as keys and values, 32 query heads, plus 64 RoPE'd key components as
         the second key region over every slot (the absorbed mla 0.5 step, decode/absorbed.py)

A timed call attends once per layer of the model (16 layers, each its own cache tensor, so that nothing stays in L2
between uses, as in a decode step) inside one CUDA graph: ms are per step, comparable with kv.py's step profile
(`_decode_split` + `_decode_reduce`). Each configuration is first checked against float32 SDPA on the same bf16 data
(max |diff| under 2e-2 of the output's scale) and skipped (recorded with its error) if it fails or does not compile.
Records: shape, context, config (tiles, split, partials: float32 or half), ms, bytes (cache bytes read per step), read_frac_of_copy (bytes /
ms over the copy bandwidth measured in the run: read + written bytes per second of a 2 GiB copy), tflops (the
scores' and outputs' multiply-adds), splits.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_h100.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from kv import copy_bandwidth            # benchmarks/kv.py: the same copy bandwidth as the decode roofline
from linear import graph_time_ms         # benchmarks/linear.py: calls captured in one CUDA graph, median per call

LAYERS = 16
SHAPES = {     # name: (kv heads, query heads per kv head, key width, value width (0: the keys), extra key width)
    "mla": (1, 32, 448, 0, 64),      # first: the budget cuts the later shape's configurations
    "gqa": (8, 4, 64, 64, 0),
}
# stage-1 tiles tried per shape: (block_h, block_n, warps, stages, transposed); None = tiles()'s default
TILES = {
    "gqa": [None, (16, 64, 4, 3, False), (16, 128, 4, 2, False), (16, 128, 8, 3, False), (16, 64, 4, 2, True),
            (16, 128, 4, 3, True), (16, 128, 8, 2, True)],
    # mla: the 64-slot transposed tiles are refused (wrong numbers on the H100, triton_decode.tiles); 64 heads
    # (32 real, padded) is the one untransposed tile whose products both compile to wgmma (kernel_resources.py)
    "mla": [None, (32, 32, 8, 2, False), (32, 64, 8, 2, False), (32, 64, 4, 2, False), (32, 64, 8, 3, False),
            (64, 32, 8, 2, False), (64, 32, 4, 2, False), (16, 32, 8, 2, False)],
}
# split plans tried: (programs per SM, partial share[, fewest slots per chunk]), None = split_plan's default; 64-slot
# chunks (partials up to twice their cache bytes) let the latent's 4K cache reach 64 SMs (32 with the defaults)
SPLITS = [None, (4, 1.0), (2, 1.0), (8, 0.25), (2, 0.25), (1, 0.5), (1, 2.0, 64), (4, 2.0, 64)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--budget-s", type=float, default=240)
    parser.add_argument("--partials", nargs="+", default=["float32"], choices=["float32", "half"],
                        help="stage 1's partial outputs: float32, the cache's half type (triton_decode.set_partials),"
                             " or both (each configuration timed with each)")
    parser.add_argument("--default-only", action="store_true", help="only the default tile and split")
    args = parser.parse_args()
    from rewriter.decode.attention import decode_attention_reference
    from rewriter.decode.triton_decode import (decode_attention_triton, launch_plan, set_partials, set_split,
                                               set_tiles)
    began = time.perf_counter()
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    records, skipped = [], []
    for name in args.shapes:
        Hkv, G, D, Dv, Dx = SHAPES[name]
        for L in args.contexts:
            g = torch.Generator(device=dev).manual_seed(L)
            rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=torch.bfloat16)  # noqa: E731
            q = rnd(1, Hkv, G, D)
            keys = [rnd(1, Hkv, L, D) for _ in range(LAYERS)]
            values = keys if Dv == 0 else [rnd(1, Hkv, L, Dv) for _ in range(LAYERS)]
            qx = rnd(1, Hkv, G, Dx) if Dx else None
            kxs = [rnd(1, Hkv, L, Dx) for _ in range(LAYERS)] if Dx else [None] * LAYERS
            start = torch.zeros(1, dtype=torch.long, device=dev)
            valid = torch.ones(1, L, dtype=torch.bool, device=dev)
            scale = (D + Dx) ** -0.5
            ref = decode_attention_reference(q.float(), keys[0].float(), values[0].float(), valid[:, None, None],
                                             scale, None if qx is None else qx.float(),
                                             None if qx is None else kxs[0].float(), start if Dx else None)
            nbytes = LAYERS * 2 * Hkv * L * (D + (Dv or 0) + Dx)
            flops = LAYERS * 2 * Hkv * G * L * (D + Dx + (Dv or D))
            for tile, split, partials in ((t, s, p) for t in TILES[name] for s in SPLITS for p in args.partials):
                if args.default_only and (tile is not None or split is not None):
                    continue
                if time.perf_counter() - began > args.budget_s:
                    skipped.append({"shape": name, "context": L, "tile": tile, "split": split, "why": "budget"})
                    continue
                t_ctx = set_tiles() if tile is None else set_tiles(*tile)
                plan_kw = None if split is None else dict(zip(("programs_per_sm", "partial_share",
                                                               "min_chunk"), split))
                s_ctx = set_split() if split is None else set_split(**plan_kw)
                config = {"tile": "default" if tile is None else dict(zip(
                    ("block_h", "block_n", "num_warps", "num_stages", "transposed"), tile)),
                    "split": "default" if split is None else plan_kw, "partials": partials}
                try:
                    with t_ctx, s_ctx, set_partials(partials == "half"):
                        cfg, _, plan = launch_plan(1, Hkv, G, L, D, Dv or D, Dx, Dv == 0, dev)
                        out = decode_attention_triton(q, keys[0], values[0], valid, scale, qx, kxs[0],
                                                      start if Dx else None)
                        err = (out.float() - ref).abs().max().item()
                        if not err < 2e-2 * max(1.0, ref.abs().max().item()):
                            raise AssertionError(f"max |diff| {err:.3g} against float32 SDPA")
                        calls = [lambda i=i: decode_attention_triton(q, keys[i], values[i], valid, scale, qx,
                                                                     kxs[i], start if Dx else None)
                                 for i in range(LAYERS)]
                        ms = graph_time_ms(calls) * LAYERS
                except Exception as e:     # out of shared memory / registers, or wrong numbers: recorded
                    skipped.append({"shape": name, "context": L, **config,
                                    "why": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                    continue
                rec = {"shape": name, "context": L, **config, "resolved_tile": cfg, "splits": plan[0],
                       "chunk": plan[1], "ms": ms, "bytes": nbytes, "read_frac_of_copy": nbytes / (ms / 1e3) / bw,
                       "tflops": flops / (ms / 1e3) / 1e12, "max_abs_diff": err}
                records.append(rec)
                print(json.dumps(rec), flush=True)
            del keys, values, kxs
            torch.cuda.empty_cache()
    best = {}
    for r in records:
        k = f"{r['shape']}@{r['context']}" + ("" if r["partials"] == "float32" else "/half")
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_bytes_per_s": bw, "layers": LAYERS, "records": records, "skipped": skipped,
              "best": {k: {"tile": v["tile"], "split": v["split"], "ms": v["ms"],
                           "read_frac_of_copy": v["read_frac_of_copy"]} for k, v in best.items()},
              "elapsed_s": time.perf_counter() - began}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, v in best.items():
        print("best", k, json.dumps(v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
