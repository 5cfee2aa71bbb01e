"""H200 check + benchmark of the attention kernels (run on a CUDA machine).

1. Correctness at realistic shapes, fresh random inputs, outputs written over memory poisoned with NaN:
   block-sparse window kernel and the band kernel (every swept config) vs block_sparse_attention_reference (fp32), chunked linear kernel vs
   linear_attention_core (fp32), and the registered CUDA ops vs the reference ops.
2. Timings (medians of triton.testing.do_bench), bf16, B=1, H=32:
   window 1024 + 64 sinks: the band kernel (default config, and the best of a config sweep), the block-sparse kernel
   on the band layout (block 64), FlexAttention (compiled, same mask, block 128) and dense
   SDPA (flash, cuDNN); linear (elu+1 features, F = D): ours (kernel + division) vs fla chunk_linear_attn
   (normalize=True) and chunk_simple_gla (causal only), and dense SDPA flash; Scatterbrain (window 1024 + 64
   features): the registered op vs the window op alone and the Performer op.
Each record: op, shape, dtype, causal, ours_ms, peer, peer_ms, ratio (= peer_ms / ours_ms; > 1 means ours is faster).

    python benchmarks/attention.py --out benchmarks/results/attention_h200.json [--lengths 4096 16384 32768]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from rewriter.attention.block_sparse import band_layout
from rewriter.attention.triton.block_sparse_attention import block_sparse_attention
from rewriter.attention.triton.linear_attention import chunked_linear_attention
from rewriter.attention._contract import window_extents
from rewriter.attention.block_sparse import block_sparse_attention_reference
from rewriter.attention.feature_map import linear_attention_core

WINDOW, SINKS = 1024, 64


def poison_cache() -> None:
    """Fill freed allocator memory with NaN so an output element the kernel never writes shows up."""
    junk = torch.empty(512 * 1024 * 1024, dtype=torch.float32, device="cuda").fill_(float("nan"))
    del junk


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_correctness(log: list) -> bool:
    ok = True
    torch.manual_seed(1)
    for causal, D, Hkv, L, block in [(True, 128, 32, 4096, 64), (False, 128, 8, 4096, 128), (True, 64, 8, 3001, 64)]:
        q = torch.randn(1, 32, L, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        key_mask = torch.rand(1, L, device="cuda") > 0.1
        left, right = window_extents(WINDOW, causal)
        idx, cnt = band_layout(L, L, block, left, right, SINKS, causal, "cuda")
        args = dict(key_mask=key_mask, causal=causal, window_left=left, window_right=right, sinks=SINKS)
        poison_cache()
        out, lse = block_sparse_attention(q, k, v, idx, cnt, block, **args)
        ref, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, block, **args)
        e, e_lse = rel_err(out, ref), (lse - ref_lse).abs().max().item()
        good = bool(torch.isfinite(out).all()) and e < 1e-2 and e_lse < 1e-2
        ok &= good
        log.append(dict(check="block_sparse_window", causal=causal, D=D, Hkv=Hkv, L=L, block=block, rel_err=e,
                        lse_max_abs_err=e_lse, ok=good))
    from rewriter.attention.triton.window_attention import band_attention
    for causal, D, Hkv, L in [(True, 128, 8, 3001), (False, 128, 32, 2048), (True, 64, 32, 3001), (False, 64, 8, 2049)]:
        q = torch.randn(1, 32, L, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        left, right = window_extents(WINDOW, causal)
        idx, cnt = band_layout(L, L, 64, left, right, SINKS, causal, "cuda")
        for key_mask in (None, torch.rand(1, L, device="cuda") > 0.1):
            ref, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, 64,
                                                            key_mask=key_mask, causal=causal, window_left=left,
                                                            window_right=right, sinks=SINKS)
            for config in (BAND_CONFIGS[D] if key_mask is None else (None,)):    # padding: the default config
                for heads in ((None, 1) if Hkv != 32 else (None,)):
                    poison_cache()
                    try:
                        out, lse = band_attention(q, k, v, key_mask, causal, D ** -0.5, left, right, SINKS,
                                                  config=config, heads=heads)
                    except Exception as err:  # noqa: BLE001  (recorded; the sweep skips that config)
                        log.append(dict(check="band_window", config=config, error=f"{type(err).__name__}: {err}"[:300]))
                        continue
                    e, e_lse = rel_err(out, ref), (lse - ref_lse).abs().max().item()
                    good = bool(torch.isfinite(out).all()) and e < 1e-2 and e_lse < 1e-2
                    ok &= good
                    log.append(dict(check="band_window", causal=causal, D=D, Hkv=Hkv, L=L, config=config,
                                    heads=heads, masked=key_mask is not None, rel_err=e, lse_max_abs_err=e_lse,
                                    ok=good))
    for causal, F_, L in [(True, 128, 4096), (False, 128, 4096), (True, 256, 2049)]:
        pq = torch.rand(1, 32, L, F_, device="cuda", dtype=torch.bfloat16)
        pk = torch.rand(1, 8, L, F_, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16)
        key_mask = torch.rand(1, L, device="cuda") > 0.1
        poison_cache()
        num, den = chunked_linear_attention(pq, pk, v, causal, key_mask)
        rnum, rden = linear_attention_core(pq.float(), pk.float(), v.float(), causal, key_mask)
        e_out = rel_err(num / den.clamp_min(1e-6)[..., None], rnum / rden.clamp_min(1e-6)[..., None])
        e_den = rel_err(den, rden)
        good = bool(torch.isfinite(num).all()) and e_out < 2e-2 and e_den < 1e-2
        ok &= good
        log.append(dict(check="chunked_linear", causal=causal, F=F_, L=L, rel_err_out=e_out, rel_err_den=e_den,
                        ok=good))
    # normalised output, and the sums off a window support (Scatterbrain's low-rank part), against dense oracles
    for causal, outside in [(True, None), (True, (1023, 0, 64)), (False, (511, 512, 64))]:
        L = 3001
        pq = torch.rand(1, 32, L, 64, device="cuda", dtype=torch.bfloat16)
        pk = torch.rand(1, 8, L, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16)
        key_mask = torch.rand(1, L, device="cuda") > 0.1
        i, j = torch.arange(L, device="cuda")[:, None], torch.arange(L, device="cuda")[None, :]
        allowed = (j <= i) if causal else torch.ones(L, L, dtype=torch.bool, device="cuda")
        if outside is not None:
            allowed = allowed & ((j < i - outside[0]) | (j > i + outside[1])) & (j >= outside[2])
        w = (pq.float() @ pk.float().repeat_interleave(4, 1).transpose(-1, -2)) * (allowed & key_mask[:, None, None, :])
        rnum, rden = w @ v.float().repeat_interleave(4, 1), w.sum(-1)
        poison_cache()
        if outside is None:
            out = chunked_linear_attention(pq, pk, v, causal, key_mask, normalise=True)
            e = rel_err(out.float(), rnum / rden.clamp_min(1e-6)[..., None])
        else:
            num, den = chunked_linear_attention(pq, pk, v, causal, key_mask, outside=outside)
            e = max(rel_err(num, rnum), rel_err(den, rden))
        good = e < 2e-2
        ok &= good
        log.append(dict(check="chunked_linear_gqa", causal=causal, outside=outside, L=L, rel_err=e, ok=good))
        del w, allowed
    # FAVOR+ feature kernel against the PyTorch feature map (fp32)
    from rewriter.attention.feature_map import _performer_features
    from rewriter.attention.triton.registry import _performer_features_cuda
    q = torch.randn(1, 32, 3001, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 3001, 128, device="cuda", dtype=torch.bfloat16)
    key_mask = torch.rand(1, 3001, device="cuda") > 0.1
    got = _performer_features_cuda(q, k, key_mask, 128 ** -0.5, 64, 0, torch.float32)
    ref = _performer_features(q, k, key_mask, 128 ** -0.5, 64, 0)
    e = max(rel_err(a, b) for a, b in zip(got, ref))
    good = e < 1e-4
    ok &= good
    log.append(dict(check="favor_features", rel_err=e, ok=good))
    # The registered CUDA implementations against the reference ops, which run on CPU copies of the inputs
    # (`import rewriter` has already registered the kernels for CUDA tensors).
    from rewriter.attention.triton.registry import register_cuda_kernels
    registered = register_cuda_kernels()
    q = torch.randn(1, 8, 1000, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16)
    key_mask = torch.rand(1, 1000, device="cuda") > 0.1
    ops = torch.ops.rewriter
    calls = {"performer": lambda q, k, v, m: ops.performer(q, k, v, m, True, 0.125, 128, 3),
             "linear_elu": lambda q, k, v, m: ops.linear(q, k, v, m, True, 0.125, "elu"),
             "linear_elu_window": lambda q, k, v, m: ops.linear(q, k, v, m, True, 0.125, "elu", 256, 16),
             "scatterbrain": lambda q, k, v, m: ops.scatterbrain(q, k, v, m, True, 0.125, 64, 256, 16, 1),
             "scatterbrain_bidirectional": lambda q, k, v, m: ops.scatterbrain(q, k, v, m, False, 0.125,
                                                                                          64, 256, 16, 1),
             "window": lambda q, k, v, m: ops.window(q, k, v, m, True, 0.125, 256, 16, 64)}
    for name, fn in calls.items():
        for masked in (False, True):
            m = key_mask if masked else None
            ref = fn(q.float().cpu(), k.float().cpu(), v.float().cpu(), None if m is None else m.cpu())
            poison_cache()
            got = fn(q, k, v, m)
            e = rel_err(got.float().cpu(), ref)
            good = bool(torch.isfinite(got).all()) and e < 3e-2
            ok &= good
            log.append(dict(check=f"registered_{name}", masked=masked, registered=registered, rel_err=e, ok=good))
    return ok


def bench(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def sdpa_ms(q, k, v, causal, backend) -> float | None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([backend]):
            return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    except RuntimeError as err:
        print(f"sdpa {backend} failed: {err}", file=sys.stderr)
        return None


def band_pairs(L: int, causal: bool) -> int:
    """Allowed (query, key) pairs of the window band + sinks (the useful work: 4 D FLOPs per pair and head)."""
    left, right = window_extents(WINDOW, causal)
    i = torch.arange(L, dtype=torch.float64)
    lo = (i - left).clamp_min(0)
    hi = (i + right).clamp_max(L - 1) if not causal else i
    band = hi - lo + 1
    sinks = torch.minimum(lo, torch.full_like(lo, SINKS))           # sink keys left of the band
    return int((band + sinks).sum().item())


def matmul_peak_tflops() -> float:
    """bf16 matmul throughput measured in this run (cuBLAS, 8192^3): the denominator of fraction_of_matmul_peak."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


BAND_CONFIGS = {   # (block_m, block_n, num_warps, num_stages) swept for the band kernel, per head dim
    128: ((64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (64, 64, 8, 3)),
    64: ((64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3)),
}


def bench_window(L: int, D: int, causal: bool, records: list, flex, peak: float, hkv: int = 32) -> None:
    """The band kernel (the window op's CUDA kernel, window_attention.py) over a config sweep, the previous
    block-sparse kernel on the band layout (block 64), FlexAttention on the same mask and dense SDPA."""
    from torch.nn.attention import SDPBackend
    from rewriter.attention.triton.window_attention import band_attention, default_config
    H = 32
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    left, right = window_extents(WINDOW, causal)
    shape = [1, H, L, D]
    flops = 4 * D * H * band_pairs(L, causal)
    sweep = {}
    for config in BAND_CONFIGS[D]:
        for heads in ((None, 1) if hkv != H else (None,)):
            key = f"{config}" + ("" if heads is None else f"/heads{heads}")
            try:
                sweep[key] = bench(lambda: band_attention(q, k, v, None, causal, D ** -0.5, left, right, SINKS,
                                                          config=config, heads=heads))
            except Exception as err:  # noqa: BLE001  (a config the compiler refuses, e.g. out of shared memory)
                print(f"band config {key} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                sweep[key] = float("inf")
    default = f"{default_config(D, q.dtype)}"
    best = min(sweep, key=sweep.get)
    idx, cnt = band_layout(L, L, 64, left, right, SINKS, causal, "cuda")
    block_sparse_ms = bench(lambda: block_sparse_attention(q, k, v, idx, cnt, 64, causal=causal, window_left=left,
                                                           window_right=right, sinks=SINKS, num_warps=4,
                                                           num_stages=3))
    peers = {}
    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, kj):
            band = (kj >= qi - left) & (kj <= qi + right)
            allowed = band | (kj < SINKS)
            return (allowed & (kj <= qi)) if causal else allowed

        bm = create_block_mask(mask_mod, None, None, L, L, device="cuda", BLOCK_SIZE=128)
        gqa = dict(enable_gqa=True) if hkv != H else {}
        flex(q, k, v, block_mask=bm, **gqa)
        peers["flex_attention"] = bench(lambda: flex(q, k, v, block_mask=bm, **gqa))
    peers["block_sparse_kernel_block64"] = block_sparse_ms
    if hkv == H:
        peers["sdpa_flash_dense"] = sdpa_ms(q, k, v, causal, SDPBackend.FLASH_ATTENTION)
        peers["sdpa_cudnn_dense"] = sdpa_ms(q, k, v, causal, SDPBackend.CUDNN_ATTENTION)
    name = f"window{WINDOW}+sinks{SINKS}" + ("" if hkv == H else f"_gqa{H}/{hkv}")
    for label, ms in (("band", sweep[default]), ("band_best_swept", sweep[best])):
        for peer, peer_ms in peers.items():
            records.append(dict(op=f"{name}_{label}", shape=shape, dtype="bfloat16", causal=causal, ours_ms=ms,
                                peer=peer, peer_ms=peer_ms, ratio=None if peer_ms is None else peer_ms / ms,
                                kv_heads=hkv, config=default if label == "band" else best, sweep_ms=sweep,
                                tflops=flops / (ms * 1e-3) / 1e12,
                                fraction_of_matmul_peak=flops / (ms * 1e-3) / 1e12 / peak))
    print(f"window L={L} D={D} hkv={hkv} causal={causal} default={default} {sweep[default]:.3f} best={best} "
          f"frac={flops / (sweep[best] * 1e-3) / 1e12 / peak:.3f} sweep={sweep} peers={peers}", flush=True)


def bench_linear(L: int, D: int, causal: bool, records: list, fla_ops, hkv: int = 32) -> None:
    from torch.nn.attention import SDPBackend
    H = 32
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pq, pk = F.elu(q * D ** -0.25) + 1, F.elu(k * D ** -0.25) + 1
    # chunk / warps / state segments (auto: about four programs per SM; 1: one serial walk per state tile) / the
    # output kernel's pipeline stages (3: Triton's default, one program per SM at D = 128; 1: two)
    by_chunk = {f"{chunk}/{warps}/{seg or 'auto'}/s{stages}": bench(lambda: chunked_linear_attention(
        pq, pk, v, causal, chunk=chunk, normalise=True, num_warps=warps, segments=seg, output_stages=stages))
        for chunk, warps, seg, stages in ((64, 4, None, 3), (64, 4, 1, 3), (32, 4, None, 3), (64, 4, None, 1),
                                          (64, 4, None, 2))}
    chunk = min(by_chunk, key=by_chunk.get)
    ours = by_chunk[chunk]
    peers = {}
    if causal and fla_ops:
        tq, tk, tv = (x.repeat_interleave(H // x.shape[1], 1).transpose(1, 2).contiguous() for x in (pq, pk, v))
        chunk_linear_attn, chunk_simple_gla = fla_ops
        peers["fla_chunk_linear_attn_normalized"] = bench(
            lambda: chunk_linear_attn(tq, tk, tv, scale=1.0, normalize=True))
        peers["fla_chunk_simple_gla"] = bench(lambda: chunk_simple_gla(tq, tk, tv, scale=1.0))
    if hkv == H:
        peers["sdpa_flash_dense"] = sdpa_ms(q, k, v, causal, SDPBackend.FLASH_ATTENTION)
    name = "linear_elu_F=D" + ("" if hkv == H else f"_gqa{H}/{hkv}")
    for peer, peer_ms in peers.items():
        records.append(dict(op=name, shape=[1, H, L, D], dtype="bfloat16", causal=causal, ours_ms=ours,
                            peer=peer, peer_ms=peer_ms, ratio=None if peer_ms is None else peer_ms / ours,
                            chunk=chunk, ms_by_chunk=by_chunk, kv_heads=hkv))
    print(f"linear L={L} D={D} hkv={hkv} causal={causal} ours={by_chunk} peers={peers}", flush=True)


def bench_scatterbrain(L: int, D: int, causal: bool, records: list) -> None:
    """The registered ops end to end (features, layout and kernels): Scatterbrain (window 1024 + 64 features,
    64 sinks) against the window op alone (same window and sinks) and the Performer op (64 features)."""
    H = 32
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    ops = torch.ops.rewriter
    sb = bench(lambda: ops.scatterbrain(q, k, v, None, causal, scale, 64, WINDOW, SINKS, 0))
    peers = {"window_op": bench(lambda: ops.window(q, k, v, None, causal, scale, WINDOW, SINKS, 64)),
             "performer_op_64": bench(lambda: ops.performer(q, k, v, None, causal, scale, 64, 0))}
    # where the time goes: the FAVOR+ feature kernel (q and k) and the fused Scatterbrain kernel, timed alone
    from rewriter.attention.feature_map import _performer_features
    from rewriter.attention.triton.registry import _performer_features_cuda
    from rewriter.attention.triton.scatterbrain import scatterbrain_attention_triton
    feats = _performer_features_cuda(q, k, None, scale, 64, 0, torch.bfloat16)
    left, right = window_extents(WINDOW, causal)
    parts = {"features_ms": bench(lambda: _performer_features_cuda(q, k, None, scale, 64, 0, torch.bfloat16)),
             "features_torch_ms": bench(lambda: _performer_features(q, k, None, scale, 64, 0)),
             "lowrank_outside_ms": bench(lambda: chunked_linear_attention(feats[0], feats[1], v, causal,
                                                                          outside=(left, right, SINKS))),
             "fused_kernel_ms": bench(lambda: scatterbrain_attention_triton(
                 q, k, v, None, causal, scale, feats[0], feats[1], WINDOW, SINKS, log_phi_q=feats[2],
                 log_phi_k=feats[3]))}
    for peer, peer_ms in peers.items():
        records.append(dict(op=f"scatterbrain_window{WINDOW}+sinks{SINKS}+features64", shape=[1, H, L, D], **parts,
                            dtype="bfloat16", causal=causal, ours_ms=sb, peer=peer, peer_ms=peer_ms,
                            ratio=peer_ms / sb))
    print(f"scatterbrain L={L} D={D} causal={causal} ours={sb:.3f} parts={parts} peers={peers}", flush=True)


EXACT_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3))


def bench_exact(L: int, D: int, causal: bool, records: list, peak: float, hkv: int = 8) -> None:
    """Exact attention on the band kernel with no band (rewriter::exact_triton, what compiled programs run for exact
    attention with a key mask), swept over tile configs and query heads per program, against SDPA's cuDNN and flash
    kernels; with a mask of all ones (the compiled program's case) and with 10% left padding, where the eager op
    (`rewriter::exact_attention`, `op_padded`) runs the same kernel since attention_exact_h100.json, and ran SDPA on
    the dense mask before (the peer `sdpa_masked_padded`, exact.exact_attention_impl). "default" is the config the
    op launches (window_attention.exact_config)."""
    from torch.nn.attention import SDPBackend
    from rewriter.attention.exact import exact_attention_impl
    from rewriter.attention.triton.window_attention import band_attention, exact_config
    H = 32
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ones = torch.ones(1, L, dtype=torch.bool, device="cuda")
    padded = ones.clone()
    padded[:, : L // 10] = False
    flops = 4 * D * H * (L * (L + 1) // 2 if causal else L * L)
    sweep = {}
    for config in dict.fromkeys((exact_config(D, q.dtype), *EXACT_CONFIGS)):
        for heads in (None, 1, 2):
            key = f"{config}/heads{heads or 'default'}"
            try:
                sweep[key] = bench(lambda: band_attention(q, k, v, ones, causal, D ** -0.5, -1, -1, 0,
                                                          config=config, heads=heads))
            except Exception as err:  # noqa: BLE001  (a config the compiler refuses)
                print(f"exact config {key} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                sweep[key] = float("inf")
    default = f"{exact_config(D, q.dtype)}/headsdefault"
    best = min(sweep, key=sweep.get)
    ours = {"ones_default": sweep[default], "ones_best": sweep[best],
            "padded_default": bench(lambda: band_attention(q, k, v, padded, causal, D ** -0.5, -1, -1, 0,
                                                           config=exact_config(D, q.dtype))),
            "op_padded": bench(lambda: torch.ops.rewriter.exact_attention(q, k, v, padded, causal, D ** -0.5))}
    kr, vr = (x.repeat_interleave(H // hkv, 1) for x in (k, v))
    peers = {"sdpa_cudnn": sdpa_ms(q, kr, vr, causal, SDPBackend.CUDNN_ATTENTION),
             "sdpa_flash": sdpa_ms(q, kr, vr, causal, SDPBackend.FLASH_ATTENTION),
             "sdpa_masked_padded": bench(lambda: exact_attention_impl(q, k, v, padded, causal, D ** -0.5))}
    name = f"exact_gqa{H}/{hkv}"
    for label, ms in ours.items():
        for peer, peer_ms in peers.items():
            records.append(dict(op=f"{name}_{label}", shape=[1, H, L, D], dtype="bfloat16", causal=causal,
                                ours_ms=ms, peer=peer, peer_ms=peer_ms,
                                ratio=None if peer_ms is None else peer_ms / ms, kv_heads=hkv,
                                config=best if label == "ones_best" else default, sweep_ms=sweep,
                                tflops=flops / (ms * 1e-3) / 1e12,
                                fraction_of_matmul_peak=flops / (ms * 1e-3) / 1e12 / peak))
    print(f"exact L={L} D={D} causal={causal} ours={ours} best={best} peers={peers}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--ops", nargs="+", choices=["window", "linear", "scatterbrain", "exact"],
                        default=["window", "linear", "scatterbrain"])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop starting new shapes after this long")
    args = parser.parse_args()
    start = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks=[], records=[])
    import triton
    result["triton"] = triton.__version__

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    result["correct"] = check_correctness(result["checks"])
    result["matmul_peak_tflops"] = matmul_peak_tflops()
    print(json.dumps(result["checks"], indent=1), flush=True)
    save()
    try:
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as err:  # noqa: BLE001  (record why the peer is missing, keep benchmarking)
        result["flex_error"] = repr(err)
        flex = None
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
        fla_ops = (chunk_linear_attn, chunk_simple_gla)
    except Exception as err:  # noqa: BLE001
        result["fla_error"] = repr(err)
        fla_ops = None
    for L in args.lengths:
        for D in args.dims:
            for causal in (True, False):
                if time.time() - start > args.budget_s:
                    result.setdefault("skipped", []).append(dict(L=L, D=D, causal=causal))
                    continue
                if "window" in args.ops:
                    bench_window(L, D, causal, result["records"], flex, result["matmul_peak_tflops"])
                    if D == 128:
                        bench_window(L, D, causal, result["records"], flex, result["matmul_peak_tflops"], hkv=8)
                if "linear" in args.ops:
                    bench_linear(L, D, causal, result["records"], fla_ops)
                    if causal:
                        bench_linear(L, D, causal, result["records"], fla_ops, hkv=8)
                if "scatterbrain" in args.ops:
                    bench_scatterbrain(L, D, causal, result["records"])
                if "exact" in args.ops:
                    bench_exact(L, D, causal, result["records"], result["matmul_peak_tflops"])
                save()
                torch.cuda.empty_cache()
    result["elapsed_s"] = time.time() - start
    save()
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
