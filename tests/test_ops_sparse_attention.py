"""Sparse attention ops against float64 dense oracles written here from each method's definition.

Each oracle builds the dense (B, H, Lq, Lk) set of pairs the method keeps - by loops over blocks and tokens for
window / block-topk / strided, by re-hashing and re-sorting for LSH - and runs exact softmax attention on it.
The ops under test gather blocks and never build that matrix.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from rewriter.attention.sparse import (
    block_topk_cost, lsh_cost, measured_density, strided_cost, strided_layout, window_cost, window_layout,
)

ops = torch.ops.rewriter


# ---------------------------------------------------------------------------------------------------- oracles

def dense_allowed(B, Lq, Lk, causal, key_mask):
    """(B, 1, Lq, Lk) bool: causal aligned bottom-right (query i sits at key position i + Lk - Lq) + padding."""
    q_pos = torch.arange(Lq)[:, None] + (Lk - Lq)
    k_pos = torch.arange(Lk)[None, :]
    allowed = (k_pos <= q_pos) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    allowed = allowed[None, None].expand(B, 1, Lq, Lk)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    return allowed


def attention_on(q, k, v, pairs, scale):
    """Exact float64 softmax attention over `pairs` (broadcast to (B, H, Lq, Lk)); rows with no pair give 0."""
    H = q.shape[1]
    k = k.double().repeat_interleave(H // k.shape[1], dim=1)
    v = v.double().repeat_interleave(H // v.shape[1], dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~pairs, float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0))
    w = torch.where(pairs, w, torch.zeros_like(w))
    den = w.sum(-1, keepdim=True)
    return torch.where(den > 0, w @ v / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(w @ v))


def window_pairs(Lq, Lk, causal, window, sinks):
    """The `window` keys around each query (causal: most recent, self included; else window // 2 to the left,
    the rest to the right) plus the first `sinks` keys."""
    keep = torch.zeros(Lq, Lk, dtype=torch.bool)
    left, right = (window - 1, 0) if causal else (window // 2, window - 1 - window // 2)
    for i in range(Lq):
        p = i + Lk - Lq
        for j in range(Lk):
            keep[i, j] = (p - left <= j <= p + right) or j < sinks
    return keep


def block_rules(Lq, Lk, block, causal, local_blocks, sink_blocks):
    """Per (query block, key block): (eligible under causal, forced = local or sink), as python sets of pairs."""
    nqb, nkb = math.ceil(Lq / block), math.ceil(Lk / block)
    eligible, forced = set(), set()
    for qb in range(nqb):
        first = qb * block + Lk - Lq
        last = min(qb * block + block, Lq) - 1 + Lk - Lq
        for kb in range(nkb):
            if causal and kb * block > last:
                continue
            eligible.add((qb, kb))
            local = first // block - (local_blocks - 1) <= kb <= min(last, Lk - 1) // block and local_blocks > 0
            if local or kb < sink_blocks:
                forced.add((qb, kb))
    return eligible, forced


def blocks_to_pairs(chosen, Lq, Lk, block):
    keep = torch.zeros(Lq, Lk, dtype=torch.bool)
    for qb, kb in chosen:
        keep[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
    return keep


def block_topk_pairs(q, k, key_mask, causal, scale, density, block, pool, sink_blocks, local_blocks):
    """Pooled query (mean of the block's rows) . pooled key block (mean over real keys, or [mean, max, min] against
    the query repeated); keep the forced blocks plus the best others, max(ceil(density x n), n_forced) in all."""
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    valid = torch.ones(B, Lk, dtype=torch.bool) if key_mask is None else key_mask
    eligible, forced = block_rules(Lq, Lk, block, causal, local_blocks, sink_blocks)
    keep = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            pooled = {}
            for kb in range(math.ceil(Lk / block)):
                rows = [j for j in range(kb * block, min(Lk, kb * block + block)) if valid[b, j]]
                if rows:
                    keys = k[b, kh, rows].double()
                    parts = [keys.mean(0)] + ([keys.amax(0), keys.amin(0)] if pool == "maxmin" else [])
                    pooled[kb] = torch.cat(parts)
            for qb in range(math.ceil(Lq / block)):
                qbar = q[b, h, qb * block:(qb + 1) * block].double().mean(0)
                qrep = qbar.repeat(3 if pool == "maxmin" else 1)
                cands = [kb for (qq, kb) in eligible if qq == qb and kb in pooled]
                must = [kb for kb in cands if (qb, kb) in forced]
                count = max(math.ceil(density * len(cands) - 1e-9), len(must))
                others = sorted((kb for kb in cands if kb not in must), key=lambda kb: -float(scale * qrep @ pooled[kb]))
                chosen = must + others[:count - len(must)]
                keep[b, h] |= blocks_to_pairs([(qb, kb) for kb in chosen], Lq, Lk, block)
    return keep


def strided_pairs(Lq, Lk, H, block, stride, local_blocks, sink_blocks, causal):
    eligible, forced = block_rules(Lq, Lk, block, causal, local_blocks, sink_blocks)
    keep = torch.zeros(1, H, Lq, Lk, dtype=torch.bool)
    for h in range(H):
        chosen = [(qb, kb) for (qb, kb) in eligible if (kb + h) % stride == 0 or (qb, kb) in forced]
        keep[0, h] = blocks_to_pairs(chosen, Lq, Lk, block)
    return keep


def lsh_pairs(q, k, key_mask, causal, n_hashes, bucket_size, seed):
    """Union over rounds of the pairs (i, j) whose sorted chunks are aligned (key chunk = query chunk or the one
    before): per round, hyperplanes from a CPU generator seeded `seed` (randn(n_hashes, D, bits)), bucket =
    sum_b [x . w_b > 0] 2^b, stable sort by bucket (padding keys last), query chunks of bucket_size and key chunks
    of ceil(Lk / n_chunks). Rows left without an allowed pair fall back to their own position's key block(s)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n_chunks = math.ceil(Lq / bucket_size)
    key_chunk = math.ceil(Lk / n_chunks)
    bits = math.ceil(math.log2(n_chunks))
    planes = torch.randn(n_hashes, D, bits, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    valid = torch.ones(B, Lk, dtype=torch.bool) if key_mask is None else key_mask
    allowed = dense_allowed(B, Lq, Lk, causal, key_mask).expand(B, H, Lq, Lk)

    def chunk_ids(x, chunk, real):
        buckets = [int(sum((x[t] @ plane[:, c] > 0) * 2 ** c for c in range(bits))) if real[t] else 2 ** bits
                   for t in range(x.shape[0])]
        order = sorted(range(x.shape[0]), key=lambda t: (buckets[t], t))
        ids = torch.empty(x.shape[0], dtype=torch.long)
        for rank, t in enumerate(order):
            ids[t] = rank // chunk
        return ids

    seen = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for plane in planes:
                qc = chunk_ids(q[b, h].double(), bucket_size, [True] * Lq)
                kc = chunk_ids(k[b, h // (H // Hkv)].double(), key_chunk, valid[b].tolist())
                seen[b, h] |= (kc[None, :] == qc[:, None]) | (kc[None, :] == qc[:, None] - 1)
    seen &= allowed
    eligible, forced = block_rules(Lq, Lk, bucket_size, causal, 1, 0)
    fallback = blocks_to_pairs([p for p in forced], Lq, Lk, bucket_size)[None, None] & allowed
    return torch.where(seen.any(-1, keepdim=True), seen, fallback)


def random_qkv(B, H, Hkv, Lq, Lk, D, pad, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    key_mask = None
    if pad:
        key_mask = torch.ones(B, Lk, dtype=torch.bool)
        key_mask[-1, Lk - Lk // 3:] = False
    return q, k, v, key_mask


# (B, H, Hkv, Lq, Lk, D, pad, causal, block)
SHAPES = [
    (2, 4, 2, 37, 37, 32, True, False, 16),
    (1, 2, 2, 100, 100, 64, False, True, 32),
    (2, 4, 1, 37, 100, 32, True, True, 16),
    (1, 2, 1, 100, 100, 128, True, False, 32),
]


# ---------------------------------------------------------------------------------------------------- window

@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,pad,causal,block", SHAPES)
@pytest.mark.parametrize("window,sinks", [(9, 0), (20, 4)])
def test_window_matches_dense_oracle(B, H, Hkv, Lq, Lk, D, pad, causal, block, window, sinks):
    q, k, v, key_mask = random_qkv(B, H, Hkv, Lq, Lk, D, pad)
    scale = D ** -0.5
    pairs = window_pairs(Lq, Lk, causal, window, sinks)[None, None] & dense_allowed(B, Lq, Lk, causal, key_mask)
    out = ops.window(q, k, v, key_mask, causal, scale, window, sinks, block)
    assert out.shape == (B, H, Lq, D) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), attention_on(q, k, v, pairs, scale), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_everything_is_exact_sdpa(causal):
    q, k, v, _ = random_qkv(2, 4, 2, 53, 53, 32, False)
    out = ops.window(q, k, v, None, causal, 0.2, 2 * 53 + 1, 0, 16)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              is_causal=causal, scale=0.2)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,causal,window,sinks", [
    (2, 4, 2, 130, 130, False, 32, 4), (2, 4, 2, 130, 130, True, 32, 4), (1, 4, 1, 7, 150, True, 16, 2),
    (2, 2, 2, 200, 200, False, 300, 0), (1, 2, 2, 65, 65, True, 1, 1), (2, 2, 2, 96, 96, False, 5, 70),
    (2, 2, 1, 150, 150, False, 64, 0)])
def test_window_cpu_band_path_equals_the_reference(B, H, Hkv, Lq, Lk, causal, window, sinks, monkeypatch):
    """The CPU kernel (SDPA per block of query rows over the keys its band reaches, sinks joined) against the
    reference's gathered blocks: queries at the end of longer keys, GQA, sinks left of, inside and past the band, a
    window wider than the sequence, padded rows that see no key (zeros)."""
    from rewriter.attention.sparse import window_attention_cpu, window_attention_impl
    q, k, v, key_mask = random_qkv(B, H, Hkv, Lq, Lk, 16, True, seed=3)
    key_mask[-1, :Lk - 20] = False                           # the last row: keys only at its end
    for mask in (None, key_mask):
        ref = window_attention_impl(q, k, v, mask, causal, 0.3, window, sinks)
        out = window_attention_cpu(q, k, v, mask, causal, 0.3, window, sinks)
        assert out.shape == ref.shape and torch.isfinite(out).all() and out.is_contiguous()
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert window_attention_cpu(q[:, :, :0], k, v, key_mask, causal, 0.3, window, sinks).shape == (B, H, 0, 16)
    # ALiBi and softcaps take the reference; so does REWRITER_ATTENTION_REFERENCE=1
    # a window holding every pair: one dense call, contiguous as every attention op's result
    full = window_attention_cpu(q, k, v, key_mask, False, 0.3, 2 * Lk + 1, 0)
    assert full.is_contiguous()
    torch.testing.assert_close(full, window_attention_impl(q, k, v, key_mask, False, 0.3, 2 * Lk + 1, 0), atol=2e-6,
                               rtol=1e-5)
    ref = window_attention_impl(q, k, v, key_mask, causal, 0.3, window, sinks, 64, [0.5] * H, 5.0)
    assert torch.equal(window_attention_cpu(q, k, v, key_mask, causal, 0.3, window, sinks, 64, [0.5] * H, 5.0), ref)
    monkeypatch.setenv("REWRITER_ATTENTION_REFERENCE", "1")
    assert torch.equal(window_attention_cpu(q, k, v, key_mask, causal, 0.3, window, sinks),
                       window_attention_impl(q, k, v, key_mask, causal, 0.3, window, sinks))


def test_window_layout_visits_only_band_blocks():
    kv_index, kv_count = window_layout(100, 100, 16, 20, 4, True, "cpu")
    assert kv_index.dtype == torch.int32 and kv_index.shape[:3] == (1, 1, 7)
    # query block 4 (positions 64..79) reaches back to 64 - 19 = 45 -> key blocks 2, 3, 4; sink block 0.
    assert kv_index[0, 0, 4, :int(kv_count[0, 0, 4])].tolist() == [0, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------- block-topk

@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,pad,causal,block", SHAPES)
@pytest.mark.parametrize("density,pool,sink_blocks,local_blocks", [(0.3, "mean", 1, 1), (0.5, "maxmin", 0, 2)])
def test_block_topk_matches_dense_oracle(B, H, Hkv, Lq, Lk, D, pad, causal, block, density, pool, sink_blocks,
                                         local_blocks):
    q, k, v, key_mask = random_qkv(B, H, Hkv, Lq, Lk, D, pad, seed=1)
    scale = D ** -0.5
    pairs = block_topk_pairs(q, k, key_mask, causal, scale, density, block, pool, sink_blocks, local_blocks)
    pairs = pairs & dense_allowed(B, Lq, Lk, causal, key_mask)
    out = ops.block_topk(q, k, v, key_mask, causal, scale, density, block, pool, sink_blocks, local_blocks)
    torch.testing.assert_close(out.double(), attention_on(q, k, v, pairs, scale), atol=2e-5, rtol=1e-4)
    assert measured_density("block-topk", q, k, key_mask, causal, scale, density=density, block=block, pool=pool,
                            sink_blocks=sink_blocks, local_blocks=local_blocks) == pytest.approx(
        float(pairs.sum()) / float(dense_allowed(B, Lq, Lk, causal, key_mask).expand(B, H, Lq, Lk).sum()))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pool", ["mean", "maxmin"])
def test_block_topk_density_one_is_exact(causal, pool):
    q, k, v, key_mask = random_qkv(2, 4, 2, 70, 70, 32, True)
    out = ops.block_topk(q, k, v, key_mask, causal, 0.2, 1.0, 16, pool, 0, 0)
    torch.testing.assert_close(out.double(), attention_on(q, k, v, dense_allowed(2, 70, 70, causal, key_mask), 0.2),
                               atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- strided

@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,pad,causal,block", SHAPES)
@pytest.mark.parametrize("stride,local_blocks,sink_blocks", [(3, 1, 1), (2, 0, 0)])
def test_strided_matches_dense_oracle(B, H, Hkv, Lq, Lk, D, pad, causal, block, stride, local_blocks, sink_blocks):
    q, k, v, key_mask = random_qkv(B, H, Hkv, Lq, Lk, D, pad, seed=2)
    scale = D ** -0.5
    pairs = strided_pairs(Lq, Lk, H, block, stride, local_blocks, sink_blocks, causal)
    pairs = pairs & dense_allowed(B, Lq, Lk, causal, key_mask)
    out = ops.strided(q, k, v, key_mask, causal, scale, stride, local_blocks, sink_blocks, block)
    torch.testing.assert_close(out.double(), attention_on(q, k, v, pairs, scale), atol=2e-5, rtol=1e-4)


def test_strided_stride_one_is_exact_and_heads_cover_all_blocks():
    q, k, v, key_mask = random_qkv(2, 4, 2, 45, 45, 32, True)
    out = ops.strided(q, k, v, key_mask, True, 0.2, 1, 0, 0, 16)
    torch.testing.assert_close(out.double(), attention_on(q, k, v, dense_allowed(2, 45, 45, True, key_mask), 0.2),
                               atol=2e-5, rtol=1e-4)
    kv_index, kv_count = strided_layout(200, 200, 8, 16, 4, 0, 0, False)
    for h0 in range(5):
        for qb in range(kv_index.shape[2]):
            covered = set()
            for h in range(h0, h0 + 4):
                covered |= set(kv_index[0, h, qb, :int(kv_count[0, h, qb])].tolist())
            assert covered == set(range(13))


@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,causal,block", [
    (2, 4, 2, 130, 130, False, 16), (2, 4, 2, 130, 130, True, 16), (1, 4, 1, 7, 150, True, 16),
    (2, 2, 2, 64, 64, False, 64), (1, 2, 2, 1, 1, False, 16)])
def test_block_sparse_cpu_kernels_equal_the_reference(B, H, Hkv, Lq, Lk, causal, block, monkeypatch):
    """block-topk's and strided's CPU kernels (the reference's layout, then one SDPA over the gathered blocks,
    sparse._layout_sdpa) against their references: queries at the end of longer keys, GQA, one token, whole blocks,
    a padded row whose keys are all at its end (strided rows there see no key: zeros), bfloat16 within its
    rounding (against the reference on the same bfloat16 inputs); ALiBi, softcaps and
    REWRITER_ATTENTION_REFERENCE=1 take the reference itself."""
    from rewriter.attention.sparse import (block_topk_attention_cpu, block_topk_attention_impl, strided_attention_cpu,
                                           strided_attention_impl)
    q, k, v, key_mask = random_qkv(B, H, Hkv, Lq, Lk, 16, True, seed=4)
    key_mask[-1, :max(Lk - 20, 0)] = False
    key_mask[-1, -1] = True
    kernels = [(block_topk_attention_cpu, block_topk_attention_impl, (0.3, block, "mean", 1, 1)),
               (block_topk_attention_cpu, block_topk_attention_impl, (0.5, block, "maxmin", 0, 2)),
               (strided_attention_cpu, strided_attention_impl, (3, 1, 1, block)),
               (strided_attention_cpu, strided_attention_impl, (2, 0, 0, block))]
    for kernel, reference, args in kernels:
        for mask in (None, key_mask):
            ref = reference(q, k, v, mask, causal, 0.3, *args)
            out = kernel(q, k, v, mask, causal, 0.3, *args)
            assert out.shape == ref.shape and out.is_contiguous() and ref.abs().max() > 0.01
            torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
            low = [t.bfloat16() for t in (q, k, v)]      # the same routing: both route on the bfloat16 inputs
            out, ref = kernel(*low, mask, causal, 0.3, *args), reference(*low, mask, causal, 0.3, *args)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        ref = reference(q, k, v, key_mask, causal, 0.3, *args, [0.5] * H, 5.0)
        assert torch.equal(kernel(q, k, v, key_mask, causal, 0.3, *args, [0.5] * H, 5.0), ref)
    monkeypatch.setenv("REWRITER_ATTENTION_REFERENCE", "1")
    for kernel, reference, args in kernels:
        assert torch.equal(kernel(q, k, v, key_mask, causal, 0.3, *args), reference(q, k, v, key_mask, causal, 0.3,
                                                                                     *args))


# ---------------------------------------------------------------------------------------------------- lsh

@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,pad,causal,block", SHAPES[:3])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_lsh_matches_dense_oracle(B, H, Hkv, Lq, Lk, D, pad, causal, block, n_hashes):
    q, k, v, key_mask = random_qkv(B, H, Hkv, Lq, Lk, D, pad, seed=3)
    scale = D ** -0.5
    pairs = lsh_pairs(q, k, key_mask, causal, n_hashes, block, seed=5)
    out = ops.lsh(q, k, v, key_mask, causal, scale, n_hashes, block, 5)
    # Pairs seen in several rounds count once: the oracle is plain softmax over the union.
    torch.testing.assert_close(out.double(), attention_on(q, k, v, pairs, scale), atol=2e-5, rtol=1e-4)
    density = measured_density("lsh", q, k, key_mask, causal, scale, n_hashes=n_hashes, bucket_size=block, seed=5)
    assert density == pytest.approx(float(pairs.sum()) / float(
        dense_allowed(B, Lq, Lk, causal, key_mask).expand(B, H, Lq, Lk).sum()))
    assert density < 1.0


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_one_bucket_is_exact(causal):
    q, k, v, key_mask = random_qkv(2, 4, 2, 37, 37, 32, True)
    out = ops.lsh(q, k, v, key_mask, causal, 0.2, 2, 64, 0)
    torch.testing.assert_close(out.double(), attention_on(q, k, v, dense_allowed(2, 37, 37, causal, key_mask), 0.2),
                               atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- dtypes, edges

CALLS = {
    "window": lambda q, k, v, m, c: ops.window(q, k, v, m, c, 0.15, 12, 2, 16),
    "block_topk": lambda q, k, v, m, c: ops.block_topk(q, k, v, m, c, 0.15, 1.0, 16, "mean", 1, 1),
    "strided": lambda q, k, v, m, c: ops.strided(q, k, v, m, c, 0.15, 1, 1, 1, 16),
    "lsh": lambda q, k, v, m, c: ops.lsh(q, k, v, m, c, 0.15, 2, 64, 0),
}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp64(method, dtype):
    """Half inputs, fp32 accumulation: within 2e-2 of the same op on the inputs upcast to fp64 (bf16 keeps 8 bits
    of mantissa; outputs are O(1))."""
    q, k, v, key_mask = random_qkv(2, 4, 2, 50, 50, 32, True, dtype=dtype)
    out = CALLS[method](q, k, v, key_mask, True)
    assert out.dtype == dtype
    reference = CALLS[method](q.double(), k.double(), v.double(), key_mask, True)
    torch.testing.assert_close(out.double(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_rows_without_keys_give_zero(method):
    q, k, v, key_mask = random_qkv(2, 2, 2, 20, 20, 32, True)
    key_mask[1] = False
    out = CALLS[method](q, k, v, key_mask, False)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0


class _AllSparse(torch.nn.Module):
    def forward(self, q, k, v, key_mask):
        return (ops.window(q, k, v, key_mask, True, 0.2, 8, 2, 16)
                + ops.block_topk(q, k, v, key_mask, True, 0.2, 0.5, 16, "maxmin", 1, 1)
                + ops.strided(q, k, v, key_mask, True, 0.2, 2, 1, 1, 16)
                + ops.lsh(q, k, v, key_mask, True, 0.2, 2, 16, 0))


def test_ops_survive_export_with_dynamic_sequence(tmp_path):
    module = _AllSparse()
    q, k, v, key_mask = random_qkv(1, 4, 2, 40, 40, 32, True)
    seq = torch.export.Dim("seq", min=2, max=256)
    program = torch.export.export(module, (q, k, v, key_mask), strict=False,
                                  dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, {1: seq}))
    torch.export.save(program, tmp_path / "sparse.pt2")
    loaded = torch.export.load(tmp_path / "sparse.pt2")
    q2, k2, v2, m2 = random_qkv(1, 4, 2, 77, 77, 32, True, seed=9)
    torch.testing.assert_close(loaded.module()(q2, k2, v2, m2), module(q2, k2, v2, m2))


@pytest.mark.parametrize("call,message", [
    (lambda a: ops.window(*a, 0, 0, 16), "window"),
    (lambda a: ops.window(*a, 4, -1, 16), "sinks"),
    (lambda a: ops.block_topk(*a, 0.0, 16, "mean", 1, 1), "density"),
    (lambda a: ops.block_topk(*a, 1.5, 16, "mean", 1, 1), "density"),
    (lambda a: ops.block_topk(*a, 0.5, 16, "max", 1, 1), "pool"),
    (lambda a: ops.strided(*a, 0, 1, 1, 16), "stride"),
    (lambda a: ops.lsh(*a, 0, 16, 0), "n_hashes"),
    (lambda a: ops.lsh(*a, 1, 0, 0), "bucket_size"),
])
def test_bad_budgets_raise(call, message):
    q, k, v, key_mask = random_qkv(1, 2, 2, 8, 8, 32, False)
    with pytest.raises(ValueError, match=message):
        call((q, k, v, key_mask, False, 0.2))


# ---------------------------------------------------------------------------------------------------- costs

def test_window_cost_counts_visited_blocks_and_density_matches_pairs():
    Lq = Lk = 100
    cost = window_cost(2, 4, 2, Lq, Lk, 32, 32, True, window=20, sinks=4, block=16)
    # Counted by hand from the band: query block qb visits key blocks from (16 qb - 19) // 16 to qb, plus block 0.
    expected = 0
    for qb in range(7):
        rows = min(16, Lq - 16 * qb)
        blocks = set(range(max(0, (16 * qb - 19) // 16), qb + 1)) | {0}
        expected += rows * sum(min(16, Lk - 16 * kb) for kb in blocks)
    assert cost.score_entries == 2 * 4 * expected
    assert cost.dense_score_entries == 2 * 4 * sum(i + 1 for i in range(100))
    assert cost.flops == 2.0 * cost.score_entries * 64
    # Whole blocks are computed, so at 100 tokens the band saves little; at 2048 it is a small fraction.
    assert 0.9 < cost.density < 1.0
    assert window_cost(1, 1, 1, 2048, 2048, 32, 32, True, window=64, sinks=4, block=16).density < 0.1
    q, k, _, _ = random_qkv(1, 1, 1, Lq, Lk, 32, False)
    pairs = window_pairs(Lq, Lk, True, 20, 4) & dense_allowed(1, Lq, Lk, True, None)[0, 0]
    assert measured_density("window", q, k, None, True, 0.2, window=20, sinks=4, block=16) == pytest.approx(
        float(pairs.sum()) / 5050)


def test_block_strided_lsh_costs():
    topk = block_topk_cost(1, 2, 2, 256, 256, 64, 64, False, density=0.25, block=32, sink_blocks=1, local_blocks=1)
    assert topk.score_entries == 2 * 8 * 32 * 2 * 32              # 8 query blocks x ceil(0.25 x 8) = 2 blocks
    assert topk.density == pytest.approx(0.25)
    strided = strided_cost(1, 4, 4, 256, 256, 64, 64, False, stride=4, local_blocks=0, sink_blocks=0, block=32)
    assert strided.density == pytest.approx(0.25)                 # 2 of 8 key blocks per head
    lsh = lsh_cost(1, 2, 2, 256, 256, 64, 64, False, n_hashes=2, bucket_size=32)
    assert lsh.score_entries == 2 * 2 * (32 * 32 + 7 * 32 * 64)    # chunk 0 sees one key chunk, the rest two
    assert lsh.flops > 2 * lsh.score_entries * 128
