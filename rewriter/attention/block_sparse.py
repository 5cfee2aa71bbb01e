"""Block-sparse attention: the one reference that every sparse method lowers to.

Layout (shared with the Triton kernel in ``rewriter.attention.triton``):
    block     int: query blocks and key blocks are `block` tokens (the last one may be short)
    kv_index  (B', H', nQB, K) int32: for each query block the key blocks it visits, ascending;
              slots past kv_count are ignored. B' is B or 1 and H' is H or 1 (broadcast).
    kv_count  (B', H', nQB) int32: how many slots of kv_index are used.
Inside a visited block a token-level predicate still applies:
    key_mask[b, j] (padding), causal (k_pos <= q_pos), window_left / window_right (-1 = unlimited:
    q_pos - window_left <= k_pos <= q_pos + window_right), except that keys with k_pos < sinks always pass
    the window test (never the causal or padding test).
q_pos / k_pos (B, H, Lq) / (B, H, Lk) int64 give each token's original position when the sequence was
permuted (LSH sorts tokens by bucket); by default q_pos = arange(Lq) + (Lk - Lq) and k_pos = arange(Lk).
Score modifications, in this order, on the pairs computed (FlexAttention's score_mod): a logit softcap
cap * tanh(s / cap) of the scaled score (Gemma2), then an ALiBi bias slope_h * (k_pos - q_pos).

The reference gathers only the visited key blocks: memory and FLOPs scale with the density, never L x L.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._contract import check_qkv, first_rows, pad_contiguous, softcapped


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


def _pad_to(x: Tensor, dim: int, size: int, value=0) -> Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = extra
    return torch.cat([x, x.new_full(pad_shape, value)], dim=dim)


# --------------------------------------------------------------------------------------------------------------
# Layouts built from the shape alone (the window band and sinks), shared by the ops, the kernels and the hybrids
# --------------------------------------------------------------------------------------------------------------

def _query_block_span(Lq: int, Lk: int, block: int, device) -> tuple[Tensor, Tensor]:
    """(first, last) key position of each query block's queries, (nqb,) long each."""
    start = torch.arange(num_blocks(Lq, block), device=device) * block
    return start + (Lk - Lq), torch.clamp(start + block, max=Lq) - 1 + (Lk - Lq)


def layout_from_block_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(..., nqb, nkb) bool -> (kv_index (..., nqb, K) int32 ascending, kv_count (..., nqb) int32), K = max count."""
    count = mask.sum(dim=-1)
    width = max(1, int(count.max())) if count.numel() else 1
    # A stable sort of "not chosen" puts the chosen blocks first, in ascending block order.
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return order.to(torch.int32), count.to(torch.int32)


def band_layout(Lq: int, Lk: int, block: int, window_left: int | None, window_right: int | None, sinks: int,
                causal: bool = False, device=None) -> tuple[Tensor, Tensor]:
    """Key blocks overlapping each query block's band [q - window_left, q + window_right] (-1: unlimited on that
    side; None for both: no band, sinks only) plus the blocks holding the `sinks` first keys (under causal, only those at or before the query block's
    last query). Returns (kv_index (1, 1, nqb, K) int32 ascending, kv_count (1, 1, nqb) int32), for queries at
    arange(Lq) + Lk - Lq. The one band layout: the window op, exact attention with a model window, the
    window + feature-map hybrids and the Triton kernels all use it.

    The layout depends on the shape alone, so it is computed on the CPU and kept per device (read-only: callers
    must not write to it): every layer of a forward, and later forwards of that length, reuse it with no device
    sync (computing it on the GPU took a sync per call for K)."""
    return _device_copy(("band", Lq, Lk, block, window_left, window_right, sinks, causal), device,
                        lambda: _band_layout_cpu(Lq, Lk, block, window_left, window_right, sinks, causal))


_LAYOUTS: dict = {}
_LAYOUT_CACHE_SIZE = 256


def _device_copy(key: tuple, device, build):
    """build() (CPU tensors) once per key, and once per key and device for its copies there (bounded cache)."""
    if not all(type(v) in (int, bool, str) for v in key):   # symbolic sizes (tracing): no cache
        return tuple(t.to(device) for t in build()) if device is not None else build()
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    full = (key, str(device))
    hit = _LAYOUTS.get(full)
    if hit is None:
        cpu = _LAYOUTS.get((key, "cpu"))
        if cpu is None:
            cpu = build()
        if len(_LAYOUTS) >= _LAYOUT_CACHE_SIZE:
            _LAYOUTS.clear()
        _LAYOUTS[(key, "cpu")] = cpu
        hit = _LAYOUTS[full] = tuple(t.to(device) for t in cpu)
    return hit


def _band_layout_cpu(Lq: int, Lk: int, block: int, window_left: int, window_right: int, sinks: int, causal: bool):
    first, last = _query_block_span(Lq, Lk, block, None)
    kb = torch.arange(num_blocks(Lk, block))[None, :]
    band = torch.full((len(first), kb.shape[1]), window_left is not None)
    if window_right is not None and window_right >= 0:
        band = band & (kb * block <= (last + window_right)[:, None])
    if window_left is not None and window_left >= 0:
        band = band & ((kb + 1) * block - 1 >= (first - window_left)[:, None])
    sink = kb * block < sinks
    if causal:
        sink = sink & (kb * block <= last[:, None])
    kv_index, kv_count = layout_from_block_mask(band | sink)
    return kv_index[None, None].contiguous(), kv_count[None, None].contiguous()


def check_alibi(alibi: Tensor | list | None, H: int) -> None:
    """ALiBi slopes, a (H,) tensor (the core) or a list (the ops' argument): one real slope per query head."""
    if isinstance(alibi, (list, tuple)):
        if alibi and len(alibi) != H:
            raise ValueError(f"alibi must be ({H},) real slopes, one per query head; got ({len(alibi)},)")
    elif alibi is not None and (alibi.dim() != 1 or alibi.shape[0] != H or alibi.is_complex()):
        raise ValueError(f"alibi must be ({H},) real slopes, one per query head; got {tuple(alibi.shape)}")


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, kv_count: Tensor, block: int,
    key_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
    window_left: int = -1, window_right: int = -1, sinks: int = 0,
    q_pos: Tensor | None = None, k_pos: Tensor | None = None, alibi: Tensor | None = None, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) float32; -inf where a row saw no key).
    softcap > 0: the scaled score s becomes softcap * tanh(s / softcap) (logit softcapping).
    alibi (H,) float: the score of pair (i, j) gets + alibi[h] * (k_pos - q_pos) after the scale and softcap."""
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    check_alibi(alibi, H)
    Dv = v.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = num_blocks(Lq, block), num_blocks(Lk, block)
    K = kv_index.shape[-1]
    group = H // Hkv
    dev = q.device

    kv_index = kv_index.to(torch.long).expand(B, H, nqb, K)
    slot_used = torch.arange(K, device=dev) < kv_count.to(torch.long).expand(B, H, nqb)[..., None]
    kv_index = torch.where(slot_used, kv_index, torch.zeros_like(kv_index))

    # Key side, padded to whole blocks and viewed per block: (B, Hkv, nkb, block, *)
    kb = _pad_to(k.to(acc), 2, nkb * block).view(B, Hkv, nkb, block, D)
    vb = _pad_to(v.to(acc), 2, nkb * block).view(B, Hkv, nkb, block, Dv)
    if k_pos is None:
        k_pos = torch.arange(Lk, device=dev).expand(B, H, Lk)
    if q_pos is None:
        q_pos = (torch.arange(Lq, device=dev) + (Lk - Lq)).expand(B, H, Lq)
    kvalid = torch.ones(B, Lk, dtype=torch.bool, device=dev) if key_mask is None else key_mask.to(torch.bool)
    kvalid = _pad_to(kvalid, 1, nkb * block, False).view(B, 1, nkb, block).expand(B, H, nkb, block)
    kposb = _pad_to(k_pos.expand(B, H, Lk), 2, nkb * block).view(B, H, nkb, block)

    # Gather visited blocks for each query block: (B, H, nqb, K*block, *)
    head_kv = torch.arange(H, device=dev) // group
    bi = torch.arange(B, device=dev)[:, None, None, None]
    hi = torch.arange(H, device=dev)[None, :, None, None]
    kg = kb[bi, head_kv[None, :, None, None], kv_index].reshape(B, H, nqb, K * block, D)
    vg = vb[bi, head_kv[None, :, None, None], kv_index].reshape(B, H, nqb, K * block, Dv)
    ok = (kvalid[bi, hi, kv_index] & slot_used[..., None]).reshape(B, H, nqb, K * block)
    kp = kposb[bi, hi, kv_index].reshape(B, H, nqb, K * block)

    qb = _pad_to(q.to(acc), 2, nqb * block).view(B, H, nqb, block, D)
    qp = _pad_to(q_pos.expand(B, H, Lq), 2, nqb * block).view(B, H, nqb, block)

    s = softcapped(torch.matmul(qb, kg.transpose(-1, -2)) * scale, softcap)   # (B, H, nqb, block, K*block)
    allowed = ok[..., None, :].expand(B, H, nqb, block, K * block)
    qpe, kpe = qp[..., :, None], kp[..., None, :]
    if alibi is not None:
        s = s + alibi.to(device=dev, dtype=acc).view(1, H, 1, 1, 1) * (kpe - qpe).to(acc)
    if causal:
        allowed = allowed & (kpe <= qpe)
    in_window = torch.ones_like(allowed)
    if window_left >= 0:
        in_window = in_window & (kpe >= qpe - window_left)
    if window_right >= 0:
        in_window = in_window & (kpe <= qpe + window_right)
    if sinks > 0:
        in_window = in_window | (kpe < sinks)
    allowed = allowed & in_window

    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vg) / den.clamp_min(torch.finfo(acc).tiny)
    lse = (m + torch.log(den)).squeeze(-1)                           # -inf where den == 0
    out = out.reshape(B, H, nqb * block, Dv)[:, :, :Lq]
    lse = lse.reshape(B, H, nqb * block)[:, :, :Lq]
    return out.to(q.dtype), lse.to(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Fixed slot layouts as one SDPA call: the CPU kernels of block top-k and strided, and their package bodies
# --------------------------------------------------------------------------------------------------------------

def layout_keys(q: Tensor, k: Tensor, key_mask: Tensor | None, kv_index: Tensor, slot_valid: Tensor, block: int):
    """A layout's visited key blocks: (key_blocks, k_pos, key_ok) with key_blocks(x) the blocks of x (B, Hkv, Lk, E)
    per query head and block, (B, H, nqb, K * block, E); k_pos their key positions and key_ok the keys' predicate
    (used slot, inside the input, the key mask), both (B, H, nqb, 1, K * block)."""
    B, H, Lq = q.shape[:3]
    Lk, dev = k.shape[2], q.device
    nqb, nkb = (Lq + block - 1) // block, (Lk + block - 1) // block
    K, Hkv = kv_index.shape[-1], k.shape[1]
    kv_index, slot_valid = kv_index.expand(B, H, nqb, K), slot_valid.expand(B, H, nqb, K)
    k_pos = (kv_index[..., None] * block + torch.arange(block, device=dev)).reshape(B, H, nqb, 1, K * block)
    # every visited key of x (B, Hkv, Lk, E) by advanced indexing on its own dimensions (batch and kv head as
    # aranges, the position clamped to the input: keys past it are dropped by the predicate), so that the only
    # indirect load per key is its block index. Gathering blocks of the padded, head-expanded x instead made Inductor
    # recompute the padding's and the reshape's divisions per element (2.6 of 6.9 ms per MiniLM layer at 512
    # tokens, aoti_cpu_v6_blocks.json), and rows of x flattened to (B Hkv Lk, E) still cost two divisions per key
    batch = torch.arange(B, device=dev).view(B, 1, 1, 1)
    head = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1, 1)
    tok = torch.clamp(k_pos.view(B, H, nqb, K * block), max=Lk - 1)

    def key_blocks(x: Tensor) -> Tensor:
        return x[batch, head, tok]

    key_ok = slot_valid[..., None].expand(B, H, nqb, K, block).reshape(B, H, nqb, 1, K * block) & (k_pos < Lk)
    if key_mask is not None:
        real = pad_contiguous(key_mask.to(torch.bool), (0, nkb * block - Lk), value=False).reshape(B * nkb, block)
        batch_base = torch.arange(B, device=dev).view(B, 1, 1, 1) * nkb
        key_ok = key_ok & real.index_select(0, (kv_index + batch_base).reshape(-1)).view(B, H, nqb, 1, K * block)
    return key_blocks, k_pos, key_ok


def layout_sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float,
                kv_index: Tensor, slot_valid: Tensor, block: int) -> Tensor:
    """Attention over a layout of K key-block slots per query block, kv_index (B', H', nqb, K) long (every slot a
    block inside the input, used or not) and slot_valid (B', H', nqb, K) bool, B' in (1, B), H' in (1, H), as one
    SDPA call: every (head, query block) a batch entry of its `block` query rows against its K gathered key blocks,
    the keys' predicate (``layout_keys``) as a boolean mask broadcast over the rows (with the causal term where
    causal); rows that see no key give 0, from a reduction over keys only (non-causal) or the block's first usable
    key position (causal), never over the full mask. Inductor inlined the
    predicate into the scores' mask and recomputed it with element-wise gathers: MiniLM's block-topk / strided
    packages ran 0.10x / 0.22x their eager programs at 512 tokens (aoti_cpu_v5_blocks.json)."""
    B, H, Lq, D = q.shape
    Lk, Dv, dev = k.shape[2], v.shape[-1], q.device
    nqb = (Lq + block - 1) // block
    key_blocks, k_pos, key_ok = layout_keys(q, k, key_mask, kv_index, slot_valid, block)
    S = k_pos.shape[-1]
    if causal:
        q_pos = (torch.arange(nqb * block, device=dev) + (Lk - Lq)).view(nqb, block, 1)
        mask = (key_ok & (k_pos <= q_pos)).reshape(B, H * nqb, block, S)
        first = torch.where(key_ok, k_pos, Lk).amin(-1, keepdim=True)                      # (B, H, nqb, 1, 1)
        seen = (first <= q_pos).reshape(B, H * nqb, block, 1)
    else:
        mask = key_ok.reshape(B, H * nqb, 1, S)
        seen = key_ok.any(-1, keepdim=True).reshape(B, H * nqb, 1, 1)
    qb = pad_contiguous(q, (0, 0, 0, nqb * block - Lq)).view(B, H * nqb, block, D)
    kg, vg = (key_blocks(x).view(B, H * nqb, S, x.shape[-1]) for x in (k, v))
    o = F.scaled_dot_product_attention(qb, kg, vg, attn_mask=mask, scale=scale)
    o = torch.where(seen, o, torch.zeros((), dtype=o.dtype, device=dev))
    return first_rows(o.view(B, H, nqb * block, Dv), Lq).to(q.dtype)
