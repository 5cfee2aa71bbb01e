"""H200: the chunked linear-attention kernel with its output kernel at 1, 2 and 3 pipeline stages (the static profile,
kernel_resources_sm90.json, shows 3 stages holding 144 KiB of shared memory at F = Dv = 128: one program per SM).
Correctness first (each stage count against linear_attention_core in fp32, outputs over NaN-poisoned memory), then
medians of triton.testing.do_bench, causal, elu+1 features, normalised, bf16, B = 1, H = 32, D = 128, beside fla's
chunk_simple_gla when fla-core is importable.

    python benchmarks/linear_output_stages.py --out benchmarks/results/linear_stages_h200.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton

from rewriter.attention.feature_map import linear_attention_core
from rewriter.attention.triton.linear_attention import chunked_linear_attention

STAGES = (3, 2, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 16384])
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "checks": [], "records": []}
    torch.manual_seed(0)
    ok = True
    for hkv in (32, 8):
        pq = torch.rand(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16)
        pk = torch.rand(1, hkv, 4096, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, 4096, 128, device="cuda", dtype=torch.bfloat16)
        num, den = linear_attention_core(pq.float(), pk.float(), v.float(), True, None)
        ref = num / den[..., None]
        for stages in STAGES:
            torch.empty(256 * 1024 * 1024, device="cuda").fill_(float("nan"))
            out = chunked_linear_attention(pq, pk, v, True, normalise=True, output_stages=stages)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            good = bool(torch.isfinite(out).all()) and err < 2e-2
            ok &= good
            result["checks"].append({"kv_heads": hkv, "output_stages": stages, "rel_err": err, "ok": good})
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # noqa: BLE001
        chunk_simple_gla, result["fla_error"] = None, repr(err)
    for L in args.lengths:
        for hkv in (32, 8):
            q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, hkv, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            pq, pk = F.elu(q * 128 ** -0.25) + 1, F.elu(k * 128 ** -0.25) + 1
            ms = {s: triton.testing.do_bench(lambda s=s: chunked_linear_attention(
                pq, pk, v, True, normalise=True, output_stages=s)) for s in STAGES}
            peer = None
            if chunk_simple_gla is not None:
                tq, tk, tv = (x.repeat_interleave(32 // x.shape[1], 1).transpose(1, 2).contiguous()
                              for x in (pq, pk, v))
                peer = triton.testing.do_bench(lambda: chunk_simple_gla(tq, tk, tv, scale=1.0))
            for s, t in ms.items():
                result["records"].append({"op": "linear_elu_F=D" + ("" if hkv == 32 else f"_gqa32/{hkv}"),
                                          "shape": [1, 32, L, 128], "causal": True, "output_stages": s,
                                          "ours_ms": t, "peer": "fla_chunk_simple_gla", "peer_ms": peer,
                                          "ratio": None if peer is None else peer / t})
            print(f"L={L} hkv={hkv} ms_by_stages={ms} fla_simple_gla={peer}", flush=True)
    result["correct"] = ok
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
