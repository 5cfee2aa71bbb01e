"""Launch one kernel case a few times so that Nsight Compute can profile its last launch (hardware counters: achieved
DRAM bandwidth, occupancy, warp stall reasons), on the GPU.

Cases (bf16, batch 1, the shapes of the README's tables):
    mla32k / mla4k   the absorbed mla 0.5 step's decode attention: 32 query heads over one shared latent of 448
                     values (keys and values) + 64 RoPE'd key components, context 32768 / 4096 (split + reduce)
    gqa32k           the unthinned step's decode attention: 8 KV heads x 4 query heads of 64, context 32768
    bgemv            the binary split-K GEMV, M = 1, W 4096 x 14336 (out x in)
    band32k          the window kernel (1024 + 64 sinks), causal, 32 heads, D = 128, L = 32768

Every case runs WARMUP + 1 launches of its kernels (compile, autotune-free defaults) and synchronises; profile the
last with ncu's --launch-skip WARMUP. benchmarks/h200.sh ncu runs all cases and writes the reports' details pages:

    ncu --clock-control none --set full -k regex:_decode_split --launch-skip 3 --launch-count 1 \
        python benchmarks/ncu_profile.py --case mla32k
"""
from __future__ import annotations

import argparse
import sys

import torch

WARMUP = 3


def decode_case(L: int, hkv: int, g: int, d: int, dv: int, dx: int):
    from rewriter.decode.triton_decode import decode_attention_triton
    dev = torch.device("cuda")
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)  # noqa: E731
    q = rnd(1, hkv, g, d)
    k = rnd(1, hkv, L, d)
    v = k if dv == 0 else rnd(1, hkv, L, dv)
    qx = rnd(1, hkv, g, dx) if dx else None
    kx = rnd(1, hkv, L, dx) if dx else None
    start = torch.zeros(1, dtype=torch.long, device=dev) if dx else None
    valid = torch.ones(1, L, dtype=torch.bool, device=dev)
    return lambda: decode_attention_triton(q, k, v, valid, (d + dx) ** -0.5, qx, kx, start)


def bgemv_case():
    from rewriter.linear.binary import binarize_weight
    from rewriter.linear.triton.binary_linear import binary_linear_triton
    out_f, in_f = 4096, 14336
    d = binarize_weight(torch.randn(out_f, in_f, device="cuda") * in_f ** -0.5)
    packed, alpha, mu = d["packed"], d["alpha"].bfloat16(), d["mu"].bfloat16()
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, out_f, device="cuda", dtype=torch.bfloat16)
    return lambda: binary_linear_triton(x, packed, alpha, mu, None, in_f, out=y)


def band_case():
    from rewriter.attention.triton.window_attention import band_attention
    L, D = 32768, 128
    q, k, v = (torch.randn(1, 32, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return lambda: band_attention(q, k, v, None, True, D ** -0.5, 1023, 0, 64)


CASES = {
    "mla32k": lambda: decode_case(32768, 1, 32, 448, 0, 64),
    "mla4k": lambda: decode_case(4096, 1, 32, 448, 0, 64),
    "gqa32k": lambda: decode_case(32768, 8, 4, 64, 64, 0),
    "bgemv": bgemv_case,
    "band32k": band_case,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=list(CASES))
    args = parser.parse_args()
    fn = CASES[args.case]()
    for _ in range(WARMUP + 1):
        fn()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
