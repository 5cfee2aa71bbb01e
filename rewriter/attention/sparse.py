"""Sparse attention: sliding window + sinks, block top-k routing, strided heads (S2-Attention) and angular LSH.

Each method computes exact softmax attention on a subset of the (query, key) pairs. Window, block-topk and
strided choose whole key blocks per query block and lower to ``block_sparse.block_sparse_attention_reference``
(layout kv_index/kv_count plus the token-level predicate); LSH permutes tokens by hash bucket, attends within
aligned chunks of the sorted orders and merges its rounds by log-sum-exp.

Block positions: query i sits at key position i + (Lk - Lq) (``_common``). The "local" blocks of a query block
are the key blocks overlapping its positions (the diagonal block when Lq == Lk and the blocks align), plus the
`local_blocks - 1` key blocks before them; `local_blocks = 0` keeps none. "Sink" blocks are the first
`sink_blocks` key blocks. Under causal masking a key block is eligible only if its first key is visible to the
query block's last query.

Op conventions (shapes, GQA, key_mask, causal alignment) are those of ``_contract.py``.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import _onnx as ox
from ._contract import (METHODS, AttentionConfig, AttentionCost, AttentionMethod, allowed_mask, check_qkv, check_softcap,
                        empty_output, exact_attention_cost, expand_kv, register_method, use_reference,
                        window_extents, window_from)
from .block_sparse import (_device_copy, _pad_to, _query_block_span, band_layout, block_sparse_attention_reference,
                           check_alibi, layout_from_block_mask, layout_sdpa, num_blocks)

POOLS = ("mean", "maxmin")


# --------------------------------------------------------------------------------------------------------------
# Budget checks (shared by ops, fakes, layouts and costs)
# --------------------------------------------------------------------------------------------------------------

def _check_block(block: int) -> None:
    if block < 1:
        raise ValueError(f"block must be >= 1 token; got {block}")


def _check_window_budget(window: int, sinks: int, block: int) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1 token; got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0 tokens; got {sinks}")
    _check_block(block)


def _check_local_sink(local_blocks: int, sink_blocks: int) -> None:
    if local_blocks < 0 or sink_blocks < 0:
        raise ValueError(f"local_blocks and sink_blocks must be >= 0; got {local_blocks}, {sink_blocks}")


def _check_topk_budget(density: float, block: int, pool: str, sink_blocks: int, local_blocks: int) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
    _check_block(block)
    _check_local_sink(local_blocks, sink_blocks)


def _check_strided_budget(stride: int, local_blocks: int, sink_blocks: int, block: int) -> None:
    if stride < 1:
        raise ValueError(f"stride must be >= 1 block; got {stride}")
    _check_block(block)
    _check_local_sink(local_blocks, sink_blocks)


def _check_lsh_budget(n_hashes: int, bucket_size: int) -> None:
    if n_hashes < 1:
        raise ValueError(f"n_hashes must be >= 1; got {n_hashes}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1 token; got {bucket_size}")


# --------------------------------------------------------------------------------------------------------------
# Block layouts
# --------------------------------------------------------------------------------------------------------------

def _base_block_mask(Lq: int, Lk: int, block: int, causal: bool, local_blocks: int, sink_blocks: int, device):
    """(causal-eligible blocks, local | sink blocks), both (nqb, nkb) bool."""
    first, last = _query_block_span(Lq, Lk, block, device)
    kb = torch.arange(num_blocks(Lk, block), device=device)[None, :]
    eligible = (kb * block <= last[:, None]) if causal else torch.ones_like(kb, dtype=torch.bool).expand(len(first), -1)
    first_b, last_b = (first // block)[:, None], (torch.clamp(last, max=Lk - 1) // block)[:, None]
    local = (kb >= first_b - (local_blocks - 1)) & (kb <= last_b) if local_blocks > 0 else torch.zeros_like(eligible)
    forced = (local | (kb < sink_blocks)) & eligible
    return eligible, forced


def window_layout(Lq: int, Lk: int, block: int, window: int, sinks: int, causal: bool, device=None):
    """The window method's layout: ``band_layout`` of ``window_extents(window, causal)`` plus `sinks`."""
    _check_window_budget(window, sinks, block)
    left, right = window_extents(window, causal)
    return band_layout(Lq, Lk, block, left, right, sinks, causal, device)


def _pooled_block_scores(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float, block: int,
                         pool: str) -> tuple[Tensor, Tensor]:
    """(scores (B, H, nqb, nkb), key block has a real key (B, 1, 1, nkb)), pooled in fp32 (fp64 for fp64 q)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = num_blocks(Lq, block), num_blocks(Lk, block)
    rows = torch.clamp(Lq - torch.arange(nqb, device=q.device) * block, max=block).to(acc)
    q_mean = _pad_to(q.to(acc), 2, nqb * block).view(B, H, nqb, block, D).sum(3) / rows[:, None]

    valid = torch.ones(B, Lk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.to(torch.bool)
    valid = _pad_to(valid, 1, nkb * block, False).view(B, 1, nkb, block, 1)
    kb = _pad_to(k.to(acc), 2, nkb * block).view(B, Hkv, nkb, block, D)
    n_valid = valid.sum(3)                                                   # (B, 1, nkb, 1)
    k_mean = torch.where(valid, kb, torch.zeros_like(kb)).sum(3) / n_valid.clamp_min(1)
    pooled_k = k_mean
    pooled_q = q_mean
    if pool == "maxmin":
        # SeerAttention's gate input: [mean, max, min] of the block's keys, against the pooled query repeated.
        k_max = torch.where(valid, kb, torch.full_like(kb, float("-inf"))).amax(3)
        k_min = torch.where(valid, kb, torch.full_like(kb, float("inf"))).amin(3)
        empty = n_valid == 0
        k_max, k_min = k_max.masked_fill(empty, 0.0), k_min.masked_fill(empty, 0.0)
        pooled_k = torch.cat([k_mean, k_max, k_min], dim=-1)
        pooled_q = q_mean.repeat(1, 1, 1, 3)
    scores = torch.matmul(pooled_q, expand_kv(pooled_k, H).transpose(-1, -2)) * scale
    return scores, (n_valid[..., 0] > 0)[:, :, None, :]


def block_topk_layout(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, density: float,
                      block: int = 64, pool: str = "mean", sink_blocks: int = 1, local_blocks: int = 1):
    """Per (batch, query head, query block): the local and sink blocks plus the best-scoring key blocks, in all
    max(ceil(density x n_eligible), n_forced) blocks; n_eligible counts the causal-eligible key blocks holding at
    least one real key (others are never chosen). Returns (kv_index (B, H, nQB, K) int32, kv_count (B, H, nQB))."""
    _check_topk_budget(density, block, pool, sink_blocks, local_blocks)
    check_qkv(q, k, q.new_empty(k.shape[:3] + (1,)), key_mask)
    Lq, Lk = q.shape[2], k.shape[2]
    scores, has_key = _pooled_block_scores(q, k, key_mask, scale, block, pool)
    eligible, forced = _base_block_mask(Lq, Lk, block, causal, local_blocks, sink_blocks, q.device)
    eligible, forced = eligible & has_key, forced & has_key                  # (B, 1, nqb, nkb)
    n_eligible, n_forced = eligible.sum(-1), forced.sum(-1)
    # The slack keeps ceil exact where density x n is an integer that floats land just above (0.3 x 10).
    keep = torch.ceil(n_eligible.to(torch.float64) * density - 1e-9).to(torch.long)
    keep = torch.maximum(keep, n_forced)
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(~eligible, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=q.device).expand_as(order))
    chosen = (rank < keep[..., None]) & eligible
    return layout_from_block_mask(chosen)


def strided_layout(Lq: int, Lk: int, H: int, block: int, stride: int, local_blocks: int = 1, sink_blocks: int = 1,
                   causal: bool = False, device=None):
    """Query head h keeps the key blocks kb with (kb + h) % stride == 0, plus local and sink blocks (causal-
    eligible only), so any `stride` consecutive heads together cover every key block.
    Returns (kv_index (1, H, nQB, K) int32, kv_count (1, H, nQB) int32)."""
    _check_strided_budget(stride, local_blocks, sink_blocks, block)
    eligible, forced = _base_block_mask(Lq, Lk, block, causal, local_blocks, sink_blocks, device)
    kb = torch.arange(eligible.shape[-1], device=device)
    heads = torch.arange(H, device=device)
    strided = ((kb[None, :] + heads[:, None]) % stride == 0)[:, None, :]     # (H, 1, nkb)
    kv_index, kv_count = layout_from_block_mask((strided & eligible) | forced)
    return kv_index[None], kv_count[None]


def _layout_entries(kv_index: Tensor, kv_count: Tensor, Lq: int, Lk: int, block: int) -> Tensor:
    """Score entries the block layout evaluates, per (B', H') (short last blocks counted at their length)."""
    nqb, nkb = num_blocks(Lq, block), num_blocks(Lk, block)
    rows = torch.clamp(Lq - torch.arange(nqb) * block, max=block)
    cols = torch.clamp(Lk - torch.arange(nkb) * block, max=block)
    used = torch.arange(kv_index.shape[-1]) < kv_count[..., None].cpu()
    keys = torch.where(used, cols[kv_index.cpu().long()], torch.zeros_like(cols[kv_index.cpu().long()])).sum(-1)
    return (keys * rows).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# LSH
# --------------------------------------------------------------------------------------------------------------

def lsh_chunks(Lq: int, Lk: int, bucket_size: int) -> tuple[int, int, int]:
    """(n_chunks, key_chunk, bits): queries sorted by bucket split into n_chunks = ceil(Lq / bucket_size) chunks
    of bucket_size; keys into as many chunks of key_chunk = ceil(Lk / n_chunks); 2^bits >= n_chunks buckets."""
    n_chunks = num_blocks(Lq, bucket_size)
    return n_chunks, num_blocks(Lk, n_chunks), max(0, math.ceil(math.log2(n_chunks)))


def lsh_hyperplanes(n_hashes: int, dim: int, bits: int, seed: int) -> Tensor:
    """(n_hashes, dim, bits) float64 Gaussian hyperplanes from a CPU generator seeded by `seed` (same on all
    devices)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n_hashes, dim, bits, generator=gen, dtype=torch.float64)


def _angular_buckets(x: Tensor, planes: Tensor) -> Tensor:
    """Bucket id in [0, 2^bits): bit b is the sign of x . plane_b (the sign of x/|x| . plane_b: angular LSH)."""
    bits = planes.shape[-1]
    weights = 2 ** torch.arange(bits, device=x.device)
    return ((torch.matmul(x, planes) > 0).to(torch.long) * weights).sum(-1)


def _sorted_chunk_of(buckets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Sort positions by (bucket, position): returns (order (..., L), chunk id of each position (..., L))."""
    L = buckets.shape[-1]
    order = torch.argsort(buckets * L + torch.arange(L, device=buckets.device))
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=buckets.device).expand_as(order))
    return order, rank // chunk


def _lsh_rounds(q: Tensor, k: Tensor, key_mask: Optional[Tensor], n_hashes: int, bucket_size: int, seed: int):
    """Per round: (q order (B, H, Lq), q chunk ids (B, H, Lq), k order (B, Hkv, Lk), k chunk ids (B, Hkv, Lk)).
    Padding keys get a bucket past every real one, so they sort last and take no real key's slot."""
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    n_chunks, key_chunk, bits = lsh_chunks(Lq, Lk, bucket_size)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    planes = lsh_hyperplanes(n_hashes, D, bits, seed).to(device=q.device, dtype=acc)
    rounds = []
    for r in range(n_hashes):
        bq = _angular_buckets(q.to(acc), planes[r])
        bk = _angular_buckets(k.to(acc), planes[r])
        if key_mask is not None:
            bk = torch.where(key_mask[:, None, :].to(torch.bool), bk, torch.full_like(bk, 2 ** bits))
        rounds.append(_sorted_chunk_of(bq, bucket_size) + _sorted_chunk_of(bk, key_chunk))
    return rounds


def _gather_rows(x: Tensor, order: Tensor) -> Tensor:
    return torch.gather(x, 2, order[..., None].expand(*order.shape, x.shape[-1]))


def _lsh_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                   n_hashes: int, bucket_size: int, seed: int) -> Tensor:
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv, group, dev = v.shape[-1], H // Hkv, q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_chunks, kc, _ = lsh_chunks(Lq, Lk, bucket_size)
    qc = bucket_size
    rounds = _lsh_rounds(q, k, key_mask, n_hashes, bucket_size, seed)
    k_valid = torch.ones(B, Lk, dtype=torch.bool, device=dev) if key_mask is None else key_mask.to(torch.bool)

    def previous_and_own(x: Tensor) -> Tensor:
        """(B, Hkv, n_chunks, kc, *) -> (B, Hkv, n_chunks, 2 kc, *): key chunk i-1 (padding for i = 0), then i."""
        before = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)   # zeros: masked by `slot`
        return torch.cat([before, x], dim=3)

    outs, lses = [], []
    for q_order, _, k_order, _ in rounds:
        qs = _pad_to(_gather_rows(q.to(acc), q_order), 2, n_chunks * qc).view(B, Hkv, group, n_chunks, qc, D)
        q_pos = _pad_to(q_order, 2, n_chunks * qc).view(B, Hkv, group, n_chunks, qc, 1)
        ks = previous_and_own(_pad_to(_gather_rows(k.to(acc), k_order), 2, n_chunks * kc).view(B, Hkv, n_chunks, kc, D))
        vs = previous_and_own(_pad_to(_gather_rows(v.to(acc), k_order), 2, n_chunks * kc).view(B, Hkv, n_chunks, kc, Dv))
        k_pos = previous_and_own(_pad_to(k_order, 2, n_chunks * kc).view(B, Hkv, n_chunks, kc, 1))[..., 0]
        slot = previous_and_own((torch.arange(n_chunks * kc, device=dev) < Lk).view(1, 1, n_chunks, kc))
        ok = slot & torch.gather(k_valid[:, None].expand(B, Hkv, Lk), 2, k_pos.flatten(2)).view_as(k_pos)
        ok = ok[:, :, None, :, None, :]                                      # (B, Hkv, 1, n, 1, 2kc)
        kp = k_pos[:, :, None, :, None, :]
        if causal:
            ok = ok & (kp <= q_pos + (Lk - Lq))
        # A pair seen in c rounds must count once: every round adds it with weight exp(s) / c.
        seen = torch.zeros((), dtype=acc, device=dev)
        for _, q_chunk, _, k_chunk in rounds:
            qch = torch.gather(q_chunk, 2, q_pos.reshape(B, H, -1)).view(B, Hkv, group, n_chunks, qc, 1)
            kch = torch.gather(k_chunk, 2, k_pos.flatten(2)).view_as(k_pos)[:, :, None, :, None, :]
            seen = seen + ((kch == qch) | (kch == qch - 1)).to(acc)
        s = torch.matmul(qs, ks[:, :, None].transpose(-1, -2)) * scale - torch.log(seen.clamp_min(1))
        s = s.masked_fill(~ok, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        out = torch.matmul(p, vs[:, :, None]) / den.clamp_min(torch.finfo(acc).tiny)
        lse = (m + torch.log(den))[..., 0]
        # Back from sorted order to positions.
        out = out.reshape(B, H, n_chunks * qc, Dv)[:, :, :Lq]
        lse = lse.reshape(B, H, n_chunks * qc)[:, :, :Lq]
        outs.append(torch.empty_like(out).scatter_(2, q_order[..., None].expand_as(out), out))
        lses.append(torch.empty_like(lse).scatter_(2, q_order, lse))
    lse_all = torch.stack(lses)                                              # (R, B, H, Lq)
    total = torch.logsumexp(lse_all, dim=0)
    saw_key = torch.isfinite(total)
    weights = torch.where(saw_key, torch.exp(lse_all - torch.where(saw_key, total, torch.zeros_like(total))),
                          torch.zeros_like(lse_all))
    out = (weights[..., None] * torch.stack(outs)).sum(0)
    # Fallback, so that every query sees a key when one is visible: rows that no round gave a key attend their
    # own position's block(s) of bucket_size keys (the local blocks of the block layouts).
    _, forced = _base_block_mask(Lq, Lk, bucket_size, causal, 1, 0, dev)
    kv_index, kv_count = layout_from_block_mask(forced)
    local, _ = block_sparse_attention_reference(q, k, v, kv_index[None, None], kv_count[None, None], bucket_size,
                                                key_mask, causal, scale)
    return torch.where(saw_key[..., None], out, local.to(acc)).to(q.dtype)


def lsh_pair_mask(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, n_hashes: int, bucket_size: int,
                  seed: int = 0) -> Tensor:
    """Dense (B, H, Lq, Lk) bool of the pairs lsh_attention computes exactly (rounds' union + fallback), restricted
    to allowed pairs. For reports (measured_density) only: O(Lq x Lk)."""
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rounds = _lsh_rounds(q, k, key_mask, n_hashes, bucket_size, seed)
    seen = torch.zeros(B, H, Lq, Lk, dtype=torch.bool, device=q.device)
    for _, q_chunk, _, k_chunk in rounds:
        kch = expand_kv(k_chunk[..., None], H)[..., 0][:, :, None, :]
        seen |= (kch == q_chunk[..., None]) | (kch == q_chunk[..., None] - 1)
    allowed = allowed_mask(Lq, Lk, causal, key_mask, q.device)
    seen &= allowed
    _, forced = _base_block_mask(Lq, Lk, bucket_size, causal, 1, 0, q.device)
    q_block = torch.arange(Lq, device=q.device) // bucket_size
    k_block = torch.arange(Lk, device=q.device) // bucket_size
    local = forced[q_block][:, k_block][None, None] & allowed
    return torch.where(seen.any(-1, keepdim=True), seen, local)


# --------------------------------------------------------------------------------------------------------------
# Ops (explicit schemas: budgets are plain ints, not SymInts)
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("rewriter::window", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, int window, int sinks, "
    "int block=64, float[]? alibi=None, float softcap=0.0) -> Tensor"))
def window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                     window: int, sinks: int, block: int = 64, alibi: Optional[list[float]] = None,
                     softcap: float = 0.0) -> Tensor:
    """Sliding window of `window` keys per query (window_extents) plus the first `sinks` keys (StreamingLLM);
    `alibi` (one slope per query head) keeps a model's ALiBi bias slope_h * (j - i) and `softcap` (> 0) its logit
    softcap cap * tanh(s / cap) on the pairs it computes."""
    return window_attention_impl(q, k, v, key_mask, causal, scale, window, sinks, block, alibi, softcap).contiguous()


def window_attention_impl(q, k, v, key_mask, causal, scale, window, sinks, block=64, alibi=None, softcap=0.0,
                          core=block_sparse_attention_reference) -> Tensor:
    """The op's body with its block-sparse core as a parameter (the CUDA registration passes the Triton one)."""
    check_qkv(q, k, v, key_mask)
    Lq, Lk = q.shape[2], k.shape[2]
    kv_index, kv_count = window_layout(Lq, Lk, block, window, sinks, causal, q.device)
    left, right = window_extents(window, causal)
    out, _ = core(q, k, v, kv_index, kv_count, block, key_mask, causal, scale,
                  window_left=left, window_right=right, sinks=sinks, alibi=_slopes(alibi, q), softcap=softcap)
    return out


CPU_QUERY_BLOCK = 128     # query rows per SDPA call of the CPU band path (window_attention_cpu); 256 for windows
# over 512 keys. Two cores, fp32, per call of the op: 512 tokens, window 128, 12 heads, batch 8: 15.9 ms (64 rows:
# 15.6, 256: 18.4) against 22.3 for dense SDPA and 135 for the reference; causal 2048 tokens, window 256, 32 heads:
# 52 ms (64: 54, 256: 59) against 98.6 dense, 338 reference; 4096 tokens, window 1024: 284 ms with 256 rows, 334
# with 128, 359 dense


def _fast_cpu(q: Tensor, alibi, softcap: float) -> bool:
    """Whether a sparse op's CPU kernel takes its SDPA path (window: per block of query rows; block top-k and strided:
    ``block_sparse.layout_sdpa``) rather than the reference: no ALiBi, no softcap, float32 / bfloat16 / float16,
    REWRITER_ATTENTION_REFERENCE unset."""
    return alibi is None and not softcap > 0 and q.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and not use_reference()


@window_attention.register_kernel("cpu")
def window_attention_cpu(q, k, v, key_mask, causal, scale, window, sinks, block=64, alibi=None, softcap=0.0):
    """The window op on the CPU: per block of CPU_QUERY_BLOCK query rows (all rows when a block's band would reach
    every key), SDPA (the CPU flash kernel) over the keys
    its band can reach (a view of k and v; the sinks before the band joined to it) under the same token predicate as
    the reference, so a row computes about window + sinks scores instead of the reference's gathered key blocks
    (its block layout, copies and masks cost 4.5-9x dense SDPA on two cores) or dense SDPA's Lk. Rows that see no
    key give 0, as the reference. ALiBi, softcaps, float64 and REWRITER_ATTENTION_REFERENCE=1 take the reference."""
    check_qkv(q, k, v, key_mask)
    if not _fast_cpu(q, alibi, softcap):
        return window_attention_impl(q, k, v, key_mask, causal, scale, window, sinks, block, alibi,
                                     softcap).contiguous()
    _check_window_budget(window, sinks, block)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    left, right = window_extents(window, causal)
    offset = Lk - Lq                                         # query i sits at key position i + offset
    rows = CPU_QUERY_BLOCK * (2 if window > 512 else 1)
    if rows + window + sinks >= Lk:                          # a block's band would hold every key: one call
        rows = max(Lq, 1)
    valid = None if key_mask is None else key_mask.to(torch.bool)
    if left >= Lq - 1 + offset and (causal or right >= Lk - 1 - offset):     # the window holds every pair
        kv = (k, v) if Hkv == H else (expand_kv(k, H), expand_kv(v, H))
        if not causal or (valid is None and Lq == Lk):
            o = torch.nn.functional.scaled_dot_product_attention(
                q, *kv, attn_mask=None if valid is None else valid[:, None, None, :], scale=scale,
                is_causal=causal)
            if valid is not None:                           # rows of batch entries with no key: 0
                o = torch.where(valid.any(-1)[:, None, None, None], o, torch.zeros((), dtype=o.dtype))
            return o.contiguous()                            # the ops' contract (CPU flash returns B, L, H, D)
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    positions = torch.arange(Lk, device=q.device)
    for q0 in range(0, Lq, rows):
        q1 = min(q0 + rows, Lq)
        lo = min(max(0, q0 + offset - left), Lk)
        hi = max(min(Lk, q1 + offset + right), lo)
        if sinks > lo:                                      # sinks reaching into or past the band: one range
            hi = max(hi, min(sinks, Lk))
        head = min(sinks, lo)                               # sinks left of the band
        if head:
            keys, values = torch.cat([k[:, :, :head], k[:, :, lo:hi]], 2), torch.cat([v[:, :, :head], v[:, :, lo:hi]], 2)
            kpos = torch.cat([positions[:head], positions[lo:hi]])
        else:
            keys, values, kpos = k[:, :, lo:hi], v[:, :, lo:hi], positions[lo:hi]
        qpos = torch.arange(q0, q1, device=q.device) + offset
        d = kpos[None, :] - qpos[:, None]
        allowed = ((d >= -left) & (d <= right)) | (kpos[None, :] < sinks)
        if causal:
            allowed &= d <= 0
        mask = allowed[None, None] if valid is None else allowed[None, None] & valid[:, None, None, kpos]
        if keys.shape[2] == 0:
            out[:, :, q0:q1] = 0
            continue
        if Hkv != H:
            keys, values = expand_kv(keys, H), expand_kv(values, H)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, q0:q1], keys, values, attn_mask=mask,
                                                             scale=scale)
        seen = mask.any(-1, keepdim=True)
        out[:, :, q0:q1] = torch.where(seen, o, torch.zeros((), dtype=o.dtype)) if not bool(seen.all()) else o
    return out


@window_attention.register_fake
def _window_attention_fake(q, k, v, key_mask, causal, scale, window, sinks, block=64, alibi=None, softcap=0.0):
    _check_window_budget(window, sinks, block)
    check_alibi(alibi, q.shape[1])
    check_softcap(softcap)
    return empty_output(q, v)


@torch.library.custom_op("rewriter::block_topk", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, float density, int block=64, "
    "str pool=\"mean\", int sink_blocks=1, int local_blocks=1, float[]? alibi=None, float softcap=0.0) -> Tensor"))
def block_topk_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                         density: float, block: int = 64, pool: str = "mean", sink_blocks: int = 1,
                         local_blocks: int = 1, alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """Training-free block routing (SeerAttention / Quest / BiFormer): pooled query . pooled key block scores pick
    the top key blocks per query block (block_topk_layout); exact attention inside them (with a model's ALiBi bias
    when `alibi` slopes are given and its logit softcap when `softcap` > 0: the routing reads content only, the
    computed pairs get the bias and the cap)."""
    return block_topk_attention_impl(q, k, v, key_mask, causal, scale, density, block, pool, sink_blocks, local_blocks,
                                     alibi, softcap).contiguous()


def block_topk_attention_impl(q, k, v, key_mask, causal, scale, density, block=64, pool="mean", sink_blocks=1,
                              local_blocks=1, alibi=None, softcap=0.0, core=block_sparse_attention_reference) -> Tensor:
    check_qkv(q, k, v, key_mask)
    kv_index, kv_count = block_topk_layout(q, k, key_mask, causal, scale, density, block, pool, sink_blocks,
                                           local_blocks)
    out, _ = core(q, k, v, kv_index, kv_count, block, key_mask, causal, scale, alibi=_slopes(alibi, q),
                  softcap=softcap)
    return out


def _layout_sdpa(q, k, v, key_mask, causal, scale, kv_index: Tensor, kv_count: Tensor, block: int) -> Tensor:
    """The reference's layout (kv_index, kv_count) through ``block_sparse.layout_sdpa``. One MiniLM-shaped layer
    (12 heads, 512 tokens, float32, two cores): block top-k (density 0.25) 2.6 ms against 6.2 for the reference's
    gathered scores (dense SDPA 2.7), strided (stride 4) 3.6-3.9 against 11.5."""
    used = torch.arange(kv_index.shape[-1], device=q.device) < kv_count.to(torch.long)[..., None]
    kv_index = torch.where(used, kv_index.to(torch.long), torch.zeros((), dtype=torch.long, device=q.device))
    return layout_sdpa(q, k, v, key_mask, causal, scale, kv_index, used, block).contiguous()


@block_topk_attention.register_kernel("cpu")
def block_topk_attention_cpu(q, k, v, key_mask, causal, scale, density, block=64, pool="mean", sink_blocks=1,
                             local_blocks=1, alibi=None, softcap=0.0):
    """Block top-k on the CPU: the reference's routing, then one SDPA over the chosen blocks (``_fast_cpu``)."""
    if not _fast_cpu(q, alibi, softcap):
        return block_topk_attention_impl(q, k, v, key_mask, causal, scale, density, block, pool, sink_blocks,
                                         local_blocks, alibi, softcap).contiguous()
    check_qkv(q, k, v, key_mask)
    kv_index, kv_count = block_topk_layout(q, k, key_mask, causal, scale, density, block, pool, sink_blocks,
                                           local_blocks)
    return _layout_sdpa(q, k, v, key_mask, causal, scale, kv_index, kv_count, block)


def _slopes(alibi, q: Tensor) -> Optional[Tensor]:
    return torch.tensor(alibi, dtype=torch.float32, device=q.device) if alibi else None


@block_topk_attention.register_fake
def _block_topk_attention_fake(q, k, v, key_mask, causal, scale, density, block=64, pool="mean", sink_blocks=1,
                               local_blocks=1, alibi=None, softcap=0.0):
    _check_topk_budget(density, block, pool, sink_blocks, local_blocks)
    check_alibi(alibi, q.shape[1])
    check_softcap(softcap)
    return empty_output(q, v)


@torch.library.custom_op("rewriter::strided", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, int stride, int local_blocks=1, "
    "int sink_blocks=1, int block=64, float[]? alibi=None, float softcap=0.0) -> Tensor"))
def strided_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                      stride: int, local_blocks: int = 1, sink_blocks: int = 1, block: int = 64,
                      alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """S2-Attention heterogeneous sharding: each head visits a different 1/stride of the key blocks (+ a model's
    ALiBi bias and logit softcap on the computed pairs when `alibi` slopes / a `softcap` are given)."""
    return strided_attention_impl(q, k, v, key_mask, causal, scale, stride, local_blocks, sink_blocks, block, alibi,
                                  softcap).contiguous()


def strided_attention_impl(q, k, v, key_mask, causal, scale, stride, local_blocks=1, sink_blocks=1, block=64,
                           alibi=None, softcap=0.0, core=block_sparse_attention_reference) -> Tensor:
    _, H, _, Lq, Lk, _ = check_qkv(q, k, v, key_mask)
    kv_index, kv_count = strided_layout(Lq, Lk, H, block, stride, local_blocks, sink_blocks, causal, q.device)
    out, _ = core(q, k, v, kv_index, kv_count, block, key_mask, causal, scale, alibi=_slopes(alibi, q),
                  softcap=softcap)
    return out


@strided_attention.register_kernel("cpu")
def strided_attention_cpu(q, k, v, key_mask, causal, scale, stride, local_blocks=1, sink_blocks=1, block=64,
                          alibi=None, softcap=0.0):
    """Strided on the CPU: its layout, then one SDPA over the visited blocks (``_fast_cpu``)."""
    if not _fast_cpu(q, alibi, softcap):
        return strided_attention_impl(q, k, v, key_mask, causal, scale, stride, local_blocks, sink_blocks, block,
                                      alibi, softcap).contiguous()
    _, H, _, Lq, Lk, _ = check_qkv(q, k, v, key_mask)
    kv_index, kv_count = strided_layout(Lq, Lk, H, block, stride, local_blocks, sink_blocks, causal, q.device)
    return _layout_sdpa(q, k, v, key_mask, causal, scale, kv_index, kv_count, block)


@strided_attention.register_fake
def _strided_attention_fake(q, k, v, key_mask, causal, scale, stride, local_blocks=1, sink_blocks=1, block=64,
                            alibi=None, softcap=0.0):
    _check_strided_budget(stride, local_blocks, sink_blocks, block)
    check_alibi(alibi, q.shape[1])
    check_softcap(softcap)
    return empty_output(q, v)


@torch.library.custom_op("rewriter::lsh", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, int n_hashes, int bucket_size=64, "
    "int seed=0) -> Tensor"))
def lsh_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                  n_hashes: int, bucket_size: int = 64, seed: int = 0) -> Tensor:
    """Angular LSH attention (Reformer / HyperAttention sortLSH) for q != k.

    Per round, random hyperplanes (lsh_hyperplanes) hash q and k into 2^bits buckets (lsh_chunks); q and k are
    sorted separately by (bucket, position); sorted query chunk i (bucket_size queries) attends sorted key chunks
    i-1 and i (Lk / n_chunks keys each). Rounds merge by log-sum-exp, each pair weighted 1/c where c counts the
    rounds that see it (so it counts once). Causal and padding apply by original position. A query that no round
    gives a visible key attends the key block(s) at its own position instead (blocks of bucket_size).
    """
    return lsh_attention_impl(q, k, v, key_mask, causal, scale, n_hashes, bucket_size, seed).contiguous()


def lsh_attention_impl(q, k, v, key_mask, causal, scale, n_hashes, bucket_size=64, seed=0) -> Tensor:
    check_qkv(q, k, v, key_mask)
    _check_lsh_budget(n_hashes, bucket_size)
    return _lsh_attention(q, k, v, key_mask, causal, scale, n_hashes, bucket_size, seed)


@lsh_attention.register_fake
def _lsh_attention_fake(q, k, v, key_mask, causal, scale, n_hashes, bucket_size=64, seed=0):
    _check_lsh_budget(n_hashes, bucket_size)
    return empty_output(q, v)


# --------------------------------------------------------------------------------------------------------------
# Costs (counted, not timed) and measured density
# --------------------------------------------------------------------------------------------------------------

def _block_cost(B: int, H: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int,
                entries: float, gathered: float, extra_flops: float = 0.0) -> AttentionCost:
    """entries: score entries evaluated; gathered: the largest score buffer held (entries incl. block padding)."""
    dense = exact_attention_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes)
    return AttentionCost(float(entries), dense.dense_score_entries, 2.0 * entries * (D + Dv) + extra_flops,
                         dense.dense_flops, float(gathered * elem_bytes), dense.dense_memory_bytes)


def _layout_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes, kv_index, kv_count, block, extra_flops=0.0):
    per_head = _layout_entries(kv_index, kv_count, Lq, Lk, block).to(torch.float64)
    entries = float(per_head.sum()) * (B // kv_index.shape[0]) * (H // kv_index.shape[1])
    gathered = B * H * num_blocks(Lq, block) * block * kv_index.shape[-1] * block
    return _block_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes, entries, gathered, extra_flops)


def window_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4,
                *, window: int, sinks: int = 0, block: int = 64, alibi=None, softcap: float = 0.0) -> AttentionCost:
    """Cost of window_attention: every entry of the visited blocks (the token predicate masks, not skips); an ALiBi
    bias (one multiply-add per entry) and a softcap (a tanh per entry) are not counted."""
    kv_index, kv_count = window_layout(Lq, Lk, block, window, sinks, causal)
    return _layout_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes, kv_index, kv_count, block)


def block_topk_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4,
                    *, density: float, block: int = 64, pool: str = "mean", sink_blocks: int = 1,
                    local_blocks: int = 1, alibi=None, softcap: float = 0.0) -> AttentionCost:
    """Cost of block_topk_attention from its density (no padding): max(ceil(density x eligible), forced) whole
    blocks per query block, plus pooling every token and scoring every (query block, key block) pair."""
    _check_topk_budget(density, block, pool, sink_blocks, local_blocks)
    eligible, forced = _base_block_mask(Lq, Lk, block, causal, local_blocks, sink_blocks, None)
    keep = torch.maximum(torch.ceil(eligible.sum(-1).to(torch.float64) * density - 1e-9).long(), forced.sum(-1))
    rows = torch.clamp(Lq - torch.arange(len(keep)) * block, max=block)
    entries = float((rows * keep * block).sum()) * B * H
    gathered = B * H * len(keep) * block * int(keep.max()) * block
    pooled_dim = D * (3 if pool == "maxmin" else 1)
    extra = float(B * (H * Lq + Hkv * Lk * (3 if pool == "maxmin" else 1)) * D)
    extra += 2.0 * B * H * eligible.numel() * pooled_dim
    return _block_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes, entries, gathered, extra)


def strided_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4,
                 *, stride: int, local_blocks: int = 1, sink_blocks: int = 1, block: int = 64,
                 alibi=None, softcap: float = 0.0) -> AttentionCost:
    """Cost of strided_attention, counted from its layout."""
    kv_index, kv_count = strided_layout(Lq, Lk, H, block, stride, local_blocks, sink_blocks, causal)
    return _layout_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes, kv_index, kv_count, block)


def lsh_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4,
             *, n_hashes: int, bucket_size: int = 64, seed: int = 0) -> AttentionCost:
    """Cost of lsh_attention: per round, each query chunk against two key chunks (one for the first), plus hashing
    (D x bits per token), the duplicate counts (n_hashes per entry) and the fallback's local blocks."""
    _check_lsh_budget(n_hashes, bucket_size)
    n_chunks, kc, bits = lsh_chunks(Lq, Lk, bucket_size)
    rows = torch.clamp(Lq - torch.arange(n_chunks) * bucket_size, max=bucket_size)
    keys = torch.full((n_chunks,), 2 * kc)
    keys[0] = kc
    per_round = float((rows * keys).sum())
    entries = n_hashes * per_round * B * H
    extra = 2.0 * n_hashes * B * (H * Lq + Hkv * Lk) * D * bits + entries * n_hashes
    gathered = B * H * n_chunks * bucket_size * 2 * kc
    return _block_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes, entries, gathered, extra)


def _layout_pairs(kv_index: Tensor, kv_count: Tensor, Lq: int, Lk: int, block: int) -> Tensor:
    """Dense (B', H', Lq, Lk) bool of the pairs a block layout visits (whole blocks)."""
    nkb = num_blocks(Lk, block)
    used = torch.arange(kv_index.shape[-1], device=kv_index.device) < kv_count[..., None]
    block_mask = torch.zeros(kv_index.shape[:-1] + (nkb + 1,), dtype=torch.bool, device=kv_index.device)
    block_mask.scatter_(-1, torch.where(used, kv_index.long(), torch.full_like(kv_index.long(), nkb)), True)
    return block_mask[..., :nkb].repeat_interleave(block, -2)[..., :Lq, :].repeat_interleave(block, -1)[..., :Lk]


def window_pairs(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, window: int,
                 sinks: int = 0, block: int = 64, alibi=None, softcap: float = 0.0) -> Tensor:
    """Dense (1, 1, Lq, Lk) bool of the pairs window_attention computes (its token predicate applied)."""
    Lq, Lk = q.shape[2], k.shape[2]
    kv_index, kv_count = window_layout(Lq, Lk, block, window, sinks, causal, q.device)
    q_pos = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    k_pos = torch.arange(Lk, device=q.device)[None, :]
    left, right = window_extents(window, causal)
    return _layout_pairs(kv_index, kv_count, Lq, Lk, block) & (
        ((k_pos >= q_pos - left) & (k_pos <= q_pos + right)) | (k_pos < sinks))


def block_topk_pairs(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                     alibi=None, softcap: float = 0.0, **budget) -> Tensor:
    kv_index, kv_count = block_topk_layout(q, k, key_mask, causal, scale, **budget)
    return _layout_pairs(kv_index, kv_count, q.shape[2], k.shape[2], budget.get("block", 64))


def strided_pairs(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, alibi=None,
                  softcap: float = 0.0, **budget) -> Tensor:
    kv_index, kv_count = strided_layout(q.shape[2], k.shape[2], q.shape[1], causal=causal, device=q.device, **budget)
    return _layout_pairs(kv_index, kv_count, q.shape[2], k.shape[2], budget.get("block", 64))


def lsh_pairs(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, **budget) -> Tensor:
    return lsh_pair_mask(q, k, key_mask, causal, **budget)


def measured_density(method: str, q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                     **budget) -> float:
    """Fraction of the allowed (causal + padding) score entries, over all batches and query heads, that `method`
    (a registered method with `pairs`; budget as the op's keyword arguments) computes exactly."""
    B, H, Lq, _ = q.shape
    allowed = allowed_mask(Lq, k.shape[2], causal, key_mask, q.device).expand(B, H, -1, -1)
    kept = METHODS[method].pairs(q, k, key_mask, causal, scale, **budget) & allowed
    total = int(allowed.sum())
    return float(kept.sum()) / total if total else 0.0


# --------------------------------------------------------------------------------------------------------------
# ONNX translations (onnxscript, opset 18; helpers in _onnx.py)
# --------------------------------------------------------------------------------------------------------------

def translate_window_attention(q, k, v, key_mask=None, causal=False, scale=1.0, window=1, sinks=0, block=64,
                               alibi=None, softcap=0.0):
    """Exact softmax over the band of ``window_extents(window, causal)`` plus the first `sinks` keys (the scores
    softcapped when `softcap` > 0, + the ALiBi bias slope_h * (j - i) when given), on key runs (``_run_support``:
    blocks of query rows against the keys their bands reach)."""
    op = ox._op()
    qa, ka, va, (_, d, dv) = ox._heads_fp32(q, k, v)
    sup = ox._run_support(qa, ka, key_mask, causal, window, sinks)
    s = ox._masked_scores(sup.blocks(qa, d), sup.gather(ka, d), sup.allowed, scale, sup.alibi(alibi), softcap)
    p = op.Exp(op.Sub(s, ox._finite_row_max(s)))                    # exp(-inf) = 0 off the support
    out = op.MatMul(p, sup.gather(ox._with_ones(va), dv + 1))
    return op.CastLike(ox._normalise(sup.rows(out, dv + 1), dv), q)


def translate_block_topk_attention(q, k, v, key_mask=None, causal=False, scale=1.0, density=1.0, block=64,
                                   pool="mean", sink_blocks=1, local_blocks=1, alibi=None, softcap=0.0):
    """Pooled block scores, TopK per query block of max(ceil(density x n_eligible), n_forced) blocks (forced ones
    ranked +inf, ineligible ones -inf, as ``block_topk_layout``), then the gathered blocks. Blocks whose pooled
    scores tie may be chosen differently from torch.sort (TopK breaks ties its own way)."""
    op = ox._op()
    qa, ka, va, (_, d, dv) = ox._heads_fp32(q, k, v)
    scores, has_key = ox._pooled_block_scores(qa, ka, key_mask, scale, block, pool, d)
    eligible, forced = ox._base_blocks(qa, ka, block, causal, local_blocks, sink_blocks)
    eligible, forced = op.And(eligible, has_key), op.And(forced, has_key)        # (B, 1, nqb, nkb)
    n_eligible = op.ReduceSum(op.Cast(eligible, to=11), ox._ints([-1]), keepdims=0)  # float64, as the reference
    n_forced = op.ReduceSum(op.Cast(forced, to=7), ox._ints([-1]), keepdims=0)
    # the slack keeps ceil exact where density x n is an integer that floats land just above (as the reference)
    keep = op.Cast(op.Ceil(op.Sub(op.Mul(n_eligible, ox._double(density)), ox._double(1e-9))), to=7)
    keep = op.Max(keep, n_forced)                                                 # (B, 1, nqb)
    ranked = op.Where(forced, ox._float(math.inf), op.Where(eligible, scores, ox._float(-math.inf)))
    kv_index, slot_valid = ox._top_blocks(ranked, op.Expand(keep, op.Shape(ranked, start=0, end=3)))
    out = ox._gathered_block_attention(qa, ka, va, key_mask, causal, scale, kv_index, slot_valid, block, d, dv, alibi,
                                       softcap)
    return op.CastLike(out, q)


def translate_strided_attention(q, k, v, key_mask=None, causal=False, scale=1.0, stride=1, local_blocks=1,
                                sink_blocks=1, block=64, alibi=None, softcap=0.0):
    """Head h keeps key blocks kb with (kb + h) % stride == 0 plus local and sink blocks (causal-eligible only):
    the layout of ``strided_layout``, built from the lengths, then the gathered blocks."""
    op = ox._op()
    qa, ka, va, (heads, d, dv) = ox._heads_fp32(q, k, v)
    eligible, forced = ox._base_blocks(qa, ka, block, causal, local_blocks, sink_blocks)   # (nqb, nkb)
    _, nkb, _, _ = ox._block_grid(qa, ka, block)
    kb = op.Range(ox._int(0), op.Squeeze(nkb, ox._ints([0])), ox._int(1))
    head = op.Unsqueeze(ox._ints(range(heads)), ox._ints([1]))                          # (H, 1)
    strided = op.Equal(op.Mod(op.Add(op.Unsqueeze(kb, ox._ints([0])), head), ox._ints([stride])), ox._ints([0]))
    chosen = op.Or(op.And(op.Unsqueeze(strided, ox._ints([1])), eligible), forced)   # (H, nqb, nkb)
    count = op.ReduceSum(op.Cast(chosen, to=7), ox._ints([-1]), keepdims=0)
    kv_index, slot_valid = ox._top_blocks(op.Cast(chosen, to=1), count)
    out = ox._gathered_block_attention(qa, ka, va, key_mask, causal, scale, op.Unsqueeze(kv_index, ox._ints([0])),
                                    op.Unsqueeze(slot_valid, ox._ints([0])), block, d, dv, alibi, softcap)
    return op.CastLike(out, q)


def translate_lsh_attention(q, k, v, key_mask=None, causal=False, scale=1.0, n_hashes=1, bucket_size=64, seed=0):
    """The hyperplanes of every possible bit count (``lsh_hyperplanes``, zero-padded to LSH_MAX_BITS columns)
    are one initializer; the graph picks the set for ceil(log2(n_chunks)) bits. Sorting is TopK on the unique
    key bucket x L + position. Dot products within float rounding of 0 may hash differently from PyTorch."""
    import onnx_ir as ir
    import numpy as np
    op = ox._op()
    qa, ka, va, (_, d, dv) = ox._heads_fp32(q, k, v)
    lq, lk = ox._dim(qa, 2), ox._dim(ka, 2)
    n_chunks = op.Div(op.Add(lq, ox._ints([bucket_size - 1])), ox._ints([bucket_size]))
    key_chunk = op.Div(op.Add(lk, op.Sub(n_chunks, ox._ints([1]))), n_chunks)
    bits = op.ReduceSum(op.Cast(op.Less(ox._ints([2**b for b in range(ox.LSH_MAX_BITS)]), n_chunks), to=7), keepdims=0)
    planes = np.zeros((ox.LSH_MAX_BITS + 1, n_hashes, d, ox.LSH_MAX_BITS), dtype=np.float32)
    for b in range(ox.LSH_MAX_BITS + 1):
        planes[b, :, :, :b] = lsh_hyperplanes(n_hashes, d, b, seed).to(torch.float32).numpy()
    planes = op.Gather(op.Constant(value=ir.tensor(planes, name="lsh_hyperplanes")), bits, axis=0)   # (R, D, bits)
    weights = ox._ints([2**b for b in range(ox.LSH_MAX_BITS)])
    padding_bucket = op.Gather(ox._ints([2**b for b in range(ox.LSH_MAX_BITS + 1)]), bits, axis=0)
    k_valid = ox._key_valid(ka, key_mask)                                            # (B, Lk)
    k_valid_h = op.Expand(op.Unsqueeze(k_valid, ox._ints([1])), op.Shape(ka, start=0, end=3))   # (B, H, Lk)

    def buckets(x, r):
        signs = op.Cast(op.Greater(op.MatMul(x, op.Gather(planes, ox._int(r), axis=0)), ox._float(0.0)), to=7)
        return op.ReduceSum(op.Mul(signs, weights), ox._ints([-1]), keepdims=0)     # (B, H, L)

    rounds = []
    for r in range(n_hashes):
        bk = op.Where(k_valid_h, buckets(ka, r), padding_bucket)                  # padding keys sort last
        rounds.append(ox._sort_by_bucket(buckets(qa, r), ox._ints([bucket_size])) + ox._sort_by_bucket(bk, key_chunk))

    q_len, k_len = op.Mul(n_chunks, ox._ints([bucket_size])), op.Mul(n_chunks, key_chunk)

    def chunked(x, e: int):
        """(B, H, n x c, e) -> (B, H, n, c, e)."""
        return op.Reshape(x, op.Concat(ox._ints([0, 0]), n_chunks, ox._ints([-1, e]), axis=0))

    va1 = ox._with_ones(va)
    offset = op.Sub(lk, lq)
    outs, lses = [], []
    for q_order, _, k_order, _ in rounds:
        qs = chunked(ox._pad_to_length(op.GatherND(qa, op.Unsqueeze(q_order, ox._ints([3])), batch_dims=2), 2, q_len), d)
        q_pos = chunked(ox._pad_to_length(op.Unsqueeze(q_order, ox._ints([3])), 2, q_len), 1)          # (B, H, n, qc, 1)
        k_index = op.Unsqueeze(k_order, ox._ints([3]))
        ks = ox._previous_and_own(chunked(ox._pad_to_length(op.GatherND(ka, k_index, batch_dims=2), 2, k_len), d))
        vs = ox._previous_and_own(chunked(ox._pad_to_length(op.GatherND(va1, k_index, batch_dims=2), 2, k_len), dv + 1))
        k_pos = ox._previous_and_own(chunked(ox._pad_to_length(k_index, 2, k_len), 1))                  # (B, H, n, 2kc, 1)
        k_pos = op.Squeeze(k_pos, ox._ints([4]))
        slot = op.Less(op.Range(ox._int(0), op.Squeeze(k_len, ox._ints([0])), ox._int(1)), lk)
        slot = op.Cast(ox._previous_and_own(chunked(op.Cast(op.Unsqueeze(slot, ox._ints([0, 1])), to=7), 1)), to=9)
        flat_k_pos = op.Reshape(k_pos, ox._ints([0, 0, -1]))
        ok = op.And(op.Squeeze(slot, ox._ints([4])), op.Reshape(op.GatherElements(k_valid_h, flat_k_pos, axis=2),
                                                             op.Shape(k_pos)))
        ok = op.Unsqueeze(ok, ox._ints([3]))                                         # (B, H, n, 1, 2kc)
        kp = op.Unsqueeze(k_pos, ox._ints([3]))
        if causal:
            ok = op.And(ok, op.LessOrEqual(kp, op.Add(q_pos, offset)))
        flat_q_pos = op.Reshape(q_pos, ox._ints([0, 0, -1]))
        seen = None
        for _, q_chunk, _, k_chunk in rounds:
            qch = op.Reshape(op.GatherElements(q_chunk, flat_q_pos, axis=2), op.Shape(q_pos))
            kch = op.Reshape(op.GatherElements(k_chunk, flat_k_pos, axis=2), op.Shape(kp))
            hit = op.Cast(op.Or(op.Equal(kch, qch), op.Equal(kch, op.Sub(qch, ox._ints([1])))), to=1)
            seen = hit if seen is None else op.Add(seen, hit)
        s = op.Mul(op.MatMul(qs, op.Transpose(ks, perm=[0, 1, 2, 4, 3])), ox._float(scale))
        s = op.Where(ok, op.Sub(s, op.Log(op.Max(seen, ox._float(1.0)))), ox._float(-math.inf))
        m = ox._finite_row_max(s)
        acc = op.MatMul(op.Exp(op.Sub(s, m)), vs)                                 # (B, H, n, qc, Dv + 1)
        acc = op.Slice(op.Reshape(acc, ox._ints([0, 0, -1, dv + 1])), ox._ints([0]), lq, ox._ints([2]))
        m = op.Slice(op.Reshape(m, ox._ints([0, 0, -1, 1])), ox._ints([0]), lq, ox._ints([2]))
        rank = op.Unsqueeze(op.ScatterElements(op.Mul(q_order, ox._ints([0])), q_order,
                                               op.Expand(op.Range(ox._int(0), op.Squeeze(lq, ox._ints([0])), ox._int(1)),
                                                         op.Shape(q_order)), axis=2), ox._ints([3]))
        acc = op.GatherND(acc, rank, batch_dims=2)                               # back to positions
        m = op.GatherND(m, rank, batch_dims=2)
        den = op.Slice(acc, ox._ints([dv]), ox._ints([dv + 1]), ox._ints([-1]))
        outs.append(op.Div(op.Slice(acc, ox._ints([0]), ox._ints([dv]), ox._ints([-1])), op.Max(den, ox._float(1.1754944e-38))))
        lses.append(op.Unsqueeze(op.Add(m, op.Log(den)), ox._ints([0])))            # (1, B, H, Lq, 1); -inf: no key
    lse_all = op.Concat(*lses, axis=0)
    top = op.ReduceMax(lse_all, ox._ints([0]), keepdims=1)
    top = op.Where(op.IsInf(top), ox._float(0.0), top)
    total = op.Add(top, op.Log(op.ReduceSum(op.Exp(op.Sub(lse_all, top)), ox._ints([0]), keepdims=1)))
    saw_key = op.Not(op.IsInf(total))
    weights_r = op.Where(saw_key, op.Exp(op.Sub(lse_all, op.Where(saw_key, total, ox._float(0.0)))), ox._float(0.0))
    out = op.ReduceSum(op.Mul(weights_r, op.Concat(*[op.Unsqueeze(o, ox._ints([0])) for o in outs], axis=0)),
                       ox._ints([0]), keepdims=0)
    _, forced = ox._base_blocks(qa, ka, bucket_size, causal, 1, 0)
    count = op.ReduceSum(op.Cast(forced, to=7), ox._ints([-1]), keepdims=0)
    kv_index, slot_valid = ox._top_blocks(op.Cast(forced, to=1), count)
    local = ox._gathered_block_attention(qa, ka, va, key_mask, causal, scale, op.Unsqueeze(kv_index, ox._ints([0, 1])),
                                      op.Unsqueeze(slot_valid, ox._ints([0, 1])), bucket_size, d, dv)
    return op.CastLike(op.Where(op.Squeeze(saw_key, ox._ints([0])), out, local), q)


# --------------------------------------------------------------------------------------------------------------
# Configs and registry entries
# --------------------------------------------------------------------------------------------------------------

@dataclass
class WindowConfig(AttentionConfig):
    window: int = field(default=0, metadata={"help": "keys per query (tokens); 0: from density"})
    density: float = field(default=0.25, metadata={"help": "window = density x L (the model's maximum length)"})
    sinks: int = field(default=4, metadata={"help": "first tokens always visible"})
    block: int = 64

    def validate(self):
        if self.window < 0 or self.sinks < 0 or self.block < 1:
            raise ValueError("window, sinks must be >= 0 and block >= 1")
        self._density_ok("density", self.density, allow_zero=self.window > 0)


def _window_budget(c: WindowConfig, L: int) -> tuple[dict, dict]:
    w = window_from(c.window, c.density, L)
    return {"window": w, "sinks": c.sinks, "block": c.block}, {"window": w, "sinks": c.sinks}


def _score_mods(site) -> tuple[dict, str]:
    """The op arguments that keep a site's own score modifications (ALiBi bias, logit softcap: the block-sparse core
    applies both on the pairs it computes), and their phrase for notes ("" when the site has none)."""
    args, words = {}, []
    if site.alibi_slopes:
        args["alibi"], words = [float(a) for a in site.alibi_slopes], ["ALiBi bias"]
    if site.softcap:
        args["softcap"] = float(site.softcap)
        words.append(f"logit softcap {site.softcap:g}")
    return args, " and ".join(words)


def _window_keep_semantics(site, kwargs: dict) -> tuple[dict | None, str]:
    """The model's ALiBi bias and logit softcap are kept as they are (_score_mods). A causal model window W
    and the pass's window w + s sinks: the pairs both allow are exactly a window of min(w, W) keys when w >= W (the
    sinks then lie inside W or nowhere) or when there are no sinks; with sinks and w < W, the sinks would be seen
    only by queries within W of them, which this op cannot say."""
    if site.window_right is not None or site.semantics_note or (site.window is not None and not site.causal):
        return None, f"window cannot keep the model's {site.semantics()}"
    mods, words = _score_mods(site)
    kept = f" and its {words}" if words else ""
    if site.window is None:
        return {**kwargs, **mods}, f"window={kwargs['window']} keeps the model's {words}"
    w, model = kwargs["window"], site.window
    if w >= model:
        return {**kwargs, **mods, "window": model, "sinks": 0}, \
            f"the model's own sliding window ({model}) is narrower than window={w}: kept the model's{kept}, no sinks"
    if kwargs["sinks"] == 0:
        return {**kwargs, **mods}, f"window={w} inside the model's sliding window ({model}){kept}"
    return None, (f"window={w} with {kwargs['sinks']} sinks inside the model's sliding window ({model}) would show "
                  "the sinks to some queries only; use sinks=0 on this layer")


register_method(AttentionMethod(
    name="window", config=WindowConfig, op=torch.ops.rewriter.window.default, budget=_window_budget,
    cost=window_cost, reference=window_attention_impl, onnx=translate_window_attention, pairs=window_pairs,
    colour="#4e79a7", density_knob="window", compose=_window_keep_semantics,
    summary="sliding-window attention plus sink tokens (StreamingLLM / neighbourhood)",
    candidates=({"density": 0.05, "sinks": 4}, {"density": 0.1, "sinks": 4}, {"density": 0.25, "sinks": 4},
                {"density": 0.5, "sinks": 4})))


@dataclass
class BlockTopkConfig(AttentionConfig):
    density: float = field(default=0.25, metadata={"help": "fraction of key blocks kept per query block"})
    block: int = 64
    pool: str = field(default="mean", metadata={"help": "mean | maxmin"})
    sink_blocks: int = 1
    local_blocks: int = 1

    def validate(self):
        self._density_ok("density", self.density, allow_zero=False)
        if self.pool not in POOLS:
            raise ValueError(f"pool must be mean or maxmin; got {self.pool!r}")
        if self.block < 1 or self.sink_blocks < 0 or self.local_blocks < 0:
            raise ValueError("block >= 1, sink_blocks >= 0, local_blocks >= 0")


def _block_topk_budget(c: BlockTopkConfig, L: int) -> tuple[dict, dict]:
    return ({"density": c.density, "block": c.block, "pool": c.pool, "sink_blocks": c.sink_blocks,
             "local_blocks": c.local_blocks}, {"block_density": c.density})


def _keep_score_mods(method: str):
    """compose for block methods that keep a model's ALiBi bias and logit softcap (on the pairs they compute) but no
    window: their layouts would read blocks the model's window forbids."""
    def compose(site, kwargs: dict) -> tuple[dict | None, str]:
        if site.window is not None or site.window_right is not None or site.semantics_note:
            return None, f"{method} cannot keep the model's {site.semantics()}"
        mods, words = _score_mods(site)
        return {**kwargs, **mods}, f"{method} keeps the model's {words}"
    return compose


register_method(AttentionMethod(
    name="block-topk", config=BlockTopkConfig, op=torch.ops.rewriter.block_topk.default,
    budget=_block_topk_budget, cost=block_topk_cost, reference=block_topk_attention_impl,
    onnx=translate_block_topk_attention, pairs=block_topk_pairs, colour="#59a14f",
    compose=_keep_score_mods("block-topk"),
    summary="training-free block-sparse attention: top-k key blocks by pooled scores (SeerAttention/Quest)",
    candidates=({"density": 0.1, "block": 32}, {"density": 0.25, "block": 32}, {"density": 0.5, "block": 32})))


@dataclass
class StridedConfig(AttentionConfig):
    stride: int = field(default=0, metadata={"help": "every stride-th key block per head; 0: from density"})
    density: float = 0.25
    local_blocks: int = 1
    sink_blocks: int = 1
    block: int = 64

    def validate(self):
        if self.stride < 0 or self.block < 1:
            raise ValueError("stride must be >= 0 and block >= 1")
        self._density_ok("density", self.density, allow_zero=self.stride > 0)


def _strided_budget(c: StridedConfig, L: int) -> tuple[dict, dict]:
    stride = c.stride if c.stride > 0 else max(1, int(round(1.0 / c.density)))
    return ({"stride": stride, "local_blocks": c.local_blocks, "sink_blocks": c.sink_blocks, "block": c.block},
            {"stride": stride})


register_method(AttentionMethod(
    name="strided", config=StridedConfig, op=torch.ops.rewriter.strided.default, budget=_strided_budget,
    cost=strided_cost, reference=strided_attention_impl, onnx=translate_strided_attention, pairs=strided_pairs,
    colour="#8cd17d", density_knob="stride", compose=_keep_score_mods("strided"),
    summary="S2-Attention heterogeneous sharding: local blocks plus a per-head strided set of blocks",
    candidates=({"stride": 8, "block": 32}, {"stride": 4, "block": 32})))


@dataclass
class LshConfig(AttentionConfig):
    n_hashes: int = 2
    bucket_size: int = field(default=64, metadata={"help": "queries per sorted chunk (tokens); overridden by density"})
    density: float = field(default=0.0, metadata={"help": "bucket_size = density x L / (2 n_hashes): each query "
                                                          "sees two chunks per round (0: bucket_size as given)"})
    seed: int = 0

    def validate(self):
        if self.n_hashes < 1 or self.bucket_size < 1:
            raise ValueError("n_hashes and bucket_size must be >= 1")
        self._density_ok("density", self.density)


def _lsh_budget(c: LshConfig, L: int) -> tuple[dict, dict]:
    bucket = max(1, int(round(c.density * L / (2 * c.n_hashes)))) if c.density > 0 else c.bucket_size
    return ({"n_hashes": c.n_hashes, "bucket_size": bucket, "seed": c.seed},
            {"n_hashes": c.n_hashes, "bucket_size": bucket})


register_method(AttentionMethod(
    name="lsh", config=LshConfig, op=torch.ops.rewriter.lsh.default, budget=_lsh_budget, cost=lsh_cost,
    reference=lsh_attention_impl, onnx=translate_lsh_attention, pairs=lsh_pairs, colour="#b07aa1",
    density_knob="bucket_size",
    summary="angular LSH attention (Reformer / HyperAttention sortLSH), rounds merged by log-sum-exp",
    candidates=({"n_hashes": 2, "bucket_size": 32}, {"n_hashes": 4, "bucket_size": 32})))
