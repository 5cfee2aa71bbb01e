"""AOTInductor packages of a program: ``OUT/model.aoti.pt2``, loadable with ``torch._inductor.aoti_load_package`` in a
process that never imports rewriter.

An AOTInductor package cannot call back into Python, so no ``rewriter::`` op may reach it: before compiling, every
one is decomposed into aten ops (``ExportedProgram.run_decompositions`` with a table op -> traceable function). The
table holds, per op, a body that traces with the program's dynamic batch and sequence; every layout is built from the
(symbolic) lengths, never from a cache or the data's shape, and no body builds an Lq x Lk tensor:
- exact attention: its own body without the all-real-keys check (a data-dependent branch): SDPA on the dense mask;
  on CUDA with a key mask the ``rewriter::exact_triton`` triton_op, the band kernel with no band (SDPA's masked
  kernels read the L x L mask: the compiled captured 1.1B ran at 0.45x its eager program at 32K). A ``torch.cond``
  on "every key real" around SDPA's flash path was tried and left out: Inductor refused branches whose outputs'
  strides differ (the CPU flash kernel returns (B, L, H, D) memory) and the AOTInductor package of the tiny Llama
  gave wrong numbers even with both branches masked (torch 2.13, CPU);
- window: on the CPU one SDPA over blocks of query rows, each against the run of keys its band reaches, sinks
  joined (``_window_sdpa``, O(L x (rows + window))); on CUDA the band layout feeds the Triton block-sparse kernel
  through the ``rewriter::window_triton`` triton_op (``wrap_triton``), which Inductor compiles into the package (not
  run here: no GPU; benchmarks/h200_check.sh AOTI_ONLY=1 checks it); otherwise (ALiBi, softcaps, float64, CUDA without
  Triton) the band layout (``_band_blocks``) and a gathered-block softmax;
- performer / scatterbrain: FAVOR+ features from the seeded projection, which becomes a buffer of the package
  (``_bind_projections``: before export each op becomes a twin op taking the projection buffer as an input; a tensor
  created inside a decomposition is not registered as a constant, "Constant tensor ... lifted_tensor_0 is not in the
  constants dictionary", pytorch #164461), then the linear core, O(L x features), plus for scatterbrain the exact
  band + sinks on key runs (``_key_runs``, as the CPU window), O(L x (rows + window + sinks));
- linear / hedgehog (plain, or the window hybrid): the same core and band; causal sums by chunks, the chunk states'
  exclusive prefix sum a cumsum (the reference's Python loop over chunks would pin the length);
- block top-k / strided: the routing of the ops with a fixed number of slots per query block from the lengths, a
  bound no row exceeds (strided: ceil(nkb / stride) + local + 1 + sinks; block top-k: ceil(density x nkb) + local +
  1 + sinks), the rows' own counts (padding-dependent for block top-k) as slot flags; block top-k's pooled routing
  scores are nqb x nkb, its attention O(L x kept blocks x block) as the op's;
- binary_linear: its reference;
- rms_norm, silu_mul (the `fuse` pass): their references, the model's own aten ops, which Inductor fuses itself.
LSH stays refused by name (its buckets sort tokens by the data and its chunk sizes are data-sized).
The decompositions are traced with size-oblivious sizes and the bodies written so that no shape fact of the traced
example is guarded (``_size_oblivious``, ``_rows``, ``_pad``): a guard would pin the package to lengths like the
example's (tests: batch 1 and 3, 1-2 tokens, whole numbers of blocks, BERT / GPT-2 / Llama / ViT).
Inductor then fuses the aten graph (norms, activations, the gathers) into C++ (CPU) or Triton (CUDA) code.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .attention._contract import first_rows as _rows, pad_contiguous as _pad
from .attention.block_sparse import layout_keys, layout_sdpa
from .errors import RewriterError

PACKAGE_FILE = "model.aoti.pt2"
TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------------------------
# Traceable bodies of the ops (aten only, no data-dependent Python branch)
# --------------------------------------------------------------------------------------------------------------

def _exact_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                     window: int = 0, alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """``exact.exact_attention_impl`` with a key mask always applied (the op skips it when every key is real: a
    check on the data that a compiled graph cannot branch on; the masked SDPA gives the same numbers). A softcap
    takes the op's own dense form, which has no such check; no key mask, SDPA's causal flash path when the lengths
    are equal (the op's own check compares symbolic lengths, which SDPA's is_causal refuses)."""
    from .attention._contract import expand_kv
    from .attention.exact import exact_attention_impl, masked_sdpa
    if softcap > 0:
        return exact_attention_impl(q, k, v, key_mask, causal, scale, window, alibi, softcap)
    H = q.shape[1]
    if key_mask is None and window <= 0 and not alibi and \
            (not causal or statically_known_true(q.shape[2] == k.shape[2])):   # SDPA's flash path
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != H)
    return masked_sdpa(q, expand_kv(k, H), expand_kv(v, H), key_mask, causal, scale, window, alibi)


def _exact_triton(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                  window: int = 0, alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """CUDA: exact attention with a key mask as the ``rewriter::exact_triton`` triton_op (the band kernel over every
    key the model can see; Inductor compiles it into the package). Without a key mask SDPA's flash path stays; ALiBi
    and softcap sites take the aten form."""
    if key_mask is None or alibi or softcap > 0:
        return _exact_attention(q, k, v, key_mask, causal, scale, window, alibi, softcap)
    return torch.ops.rewriter.exact_triton(q, k, v, key_mask, causal, scale, window)


def _band_blocks(Lq, Lk, block: int, left: int, right: int, sinks: int, device) -> tuple[Tensor, Tensor]:
    """``block_sparse.band_layout`` from the (symbolic) lengths: per query block the sink blocks, then a fixed
    number of band slots; returns (kv_index (nqb, K) long, clamped into range; slot_valid (nqb, K) bool)."""
    nqb, nkb = (Lq + block - 1) // block, (Lk + block - 1) // block
    qb = torch.arange(nqb, device=device)[:, None]
    sink_blocks = (sinks + block - 1) // block
    index, valid = [], []
    if sink_blocks:
        slots = torch.arange(sink_blocks, device=device)[None, :].expand(nqb, sink_blocks)
        index.append(torch.clamp(slots, max=nkb - 1))
        valid.append(slots < nkb)
    # first and last key block of each query block's band; the floor divisions stay on Python (symbolic) ints, as
    # (qb * block + c) // block == qb + c // block (Inductor mis-lowers a tensor floor division of clamped values)
    offset = Lk - Lq
    first = torch.clamp(qb + (offset - left) // block, min=0)
    last = torch.clamp(torch.clamp(qb + (block - 1 + offset + right) // block, max=(Lq - 1 + offset + right) // block),
                       max=(Lk - 1) // block)
    span = (block + left + right - 2) // block + 2
    band = first + torch.arange(span, device=device)[None, :]
    index.append(torch.clamp(band, max=nkb - 1))
    valid.append((band <= last) & (band >= sink_blocks))
    return torch.cat(index, 1), torch.cat(valid, 1)


def traceable_window_layout(Lq, Lk, block: int, window: int, sinks: int, causal: bool, device):
    """The window op's layout in the block-sparse kernel's form, traceable: (window_left, window_right, kv_index
    (1, 1, nqb, K) int32 with the valid slots first in ascending block order, kv_count (1, 1, nqb) int32)."""
    from .attention._contract import window_extents
    left, right = window_extents(window, causal)
    index, valid = _band_blocks(Lq, Lk, block, left, right, sinks, device)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    kv_index = index.gather(-1, order).to(torch.int32)
    return left, right, kv_index[None, None], valid.sum(-1).to(torch.int32)[None, None]


def _window_triton(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                   window: int, sinks: int, block: int = 64, alibi: Optional[list[float]] = None,
                   softcap: float = 0.0) -> Tensor:
    """CUDA: the window op as the Triton triton_op (the kernel goes into the package; the op is defined by
    ``rewriter.attention.triton.registry``, which ``import rewriter`` loads). The triton_op takes no ALiBi or softcap
    yet: such a window takes the aten form."""
    if alibi or softcap:
        return _window_attention(q, k, v, key_mask, causal, scale, window, sinks, block, alibi, softcap)
    return torch.ops.rewriter.window_triton(q, k, v, key_mask, causal, scale, window, sinks, block)


def _key_runs(Lq, Lk, left: int, right: int, sinks: int, causal: bool, key_mask: Optional[Tensor], rows: int,
              band: bool, device) -> tuple[Tensor, Tensor]:
    """The key-run layout from the (symbolic) lengths: per block of `rows` query rows the contiguous run of keys its
    rows' bands [q - left, q + right] reach (moved inside [0, Lk), cut to Lk keys; none when not `band`) with the
    first `sinks` keys in front. Returns (pos (nqb, S) key positions, clamped into range; allowed (B or 1, nqb, rows,
    S) bool: the reference's token predicate (a sink inside a run counts once, as a sink), causal, the key mask)."""
    offset = Lk - Lq                               # query i sits at key position i + offset
    nqb = (Lq + rows - 1) // rows
    pieces, span = [], 0
    if sinks:
        pieces.append(torch.arange(sinks, device=device).expand(nqb, sinks))
    if band:
        span = torch.sym_min(rows + left + right, Lk)
        starts = torch.clamp(torch.clamp(torch.arange(nqb, device=device) * rows + (offset - left), min=0),
                             max=Lk - span)
        pieces.append(starts[:, None] + torch.arange(span, device=device))
    raw = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]                       # (nqb, S)
    S = sinks + span
    q_pos = (torch.arange(nqb * rows, device=device) + offset).view(nqb, rows, 1)
    d = raw[:, None, :] - q_pos                                                        # (nqb, rows, S)
    is_sink = (torch.arange(S, device=device) < sinks)[None, None, :]
    in_band = (d >= -left) & (d <= right) & (raw >= sinks)[:, None, :] if band else torch.zeros_like(is_sink)
    allowed = torch.where(is_sink, raw[:, None, :] < Lk, in_band)
    if causal:
        allowed = allowed & (d <= 0)
    pos = torch.clamp(raw, max=Lk - 1)                                                # sinks past a short input
    if key_mask is not None:
        B = key_mask.shape[0]
        return pos, allowed[None] & key_mask.to(torch.bool).index_select(1, pos.reshape(-1)).view(B, nqb, 1, S)
    return pos, allowed[None]


def _window_sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                 window: int, sinks: int, block: int = 64, alibi: Optional[list[float]] = None,
                 softcap: float = 0.0) -> Tensor:
    """The window op as one SDPA call over blocks of ``band_rows(window)`` query rows, each against the contiguous
    run of keys its rows' bands reach (kept inside the sequence, at most Lk keys) with the sink keys joined in front,
    under the reference's token predicate as a boolean mask (a sink inside a band is attended once, as a sink):
    O(L x (rows + window + sinks)) scores, and no more than dense SDPA's when the input is shorter than a run, in the
    CPU flash kernel's blocked softmax. The gathered key blocks of ``_window_attention`` ran MiniLM's window-128
    package at 0.58x / 0.47x its eager program at 128 / 512 tokens on two cores (aoti_cpu_v2.json). Rows that see no
    key give 0. ALiBi, softcaps and float64 take the gathered form."""
    if alibi or softcap or q.dtype == torch.float64:
        return _window_attention(q, k, v, key_mask, causal, scale, window, sinks, block, alibi, softcap)
    from .attention._contract import band_rows, check_qkv, expand_kv, window_extents
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv, dev = v.shape[-1], q.device
    left, right = window_extents(window, causal)
    rows = band_rows(window)
    pos, allowed = _key_runs(Lq, Lk, left, right, sinks, causal, key_mask, rows, True, dev)
    nqb, S = pos.shape
    flat = pos.reshape(-1)

    def gathered(x: Tensor) -> Tensor:    # (B, Hkv, Lk, E) -> (B nqb, Hkv, S, E), the (B nqb, S, Hkv, E) memory
        # the CPU flash kernel reads its inputs in (batch, length, heads, dim) order: gathered so, no copy after
        g = x.transpose(1, 2).index_select(1, flat)                                    # (B, nqb S, Hkv, E)
        return g.view(B * nqb, S, x.shape[1], x.shape[-1]).transpose(1, 2)

    ks, vs = gathered(k), gathered(v)
    qs = _pad(q.transpose(1, 2), (0, 0, 0, 0, 0, nqb * rows - Lq)).view(B * nqb, rows, H, D).transpose(1, 2)
    if Hkv != H:
        ks, vs = expand_kv(ks, H), expand_kv(vs, H)
    mask = allowed.expand(B, nqb, rows, S).reshape(B * nqb, 1, rows, S)
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)         # (B nqb, H, rows, Dv)
    o = torch.where(mask.any(-1, keepdim=True), o, torch.zeros((), dtype=o.dtype, device=dev))
    out = o.view(B, nqb, H, rows, Dv).transpose(1, 2).clone(memory_format=torch.contiguous_format)
    return _rows(out.view(B, H, nqb * rows, Dv), Lq).to(q.dtype)


def _gathered_pairs(kv_index: Tensor, slot_valid: Tensor, block: int, Lq, Lk, left: int, right: int, sinks: int,
                    causal: bool, key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The token-level predicate on gathered key blocks (``_band_blocks``' layout): (allowed (B or 1, 1, nqb, block,
    K * block) bool, key positions (nqb, 1, K * block), query positions (nqb, block, 1)) for the sinks, the band
    [q - left, q + right], used slots, real keys, causal and the key mask."""
    nqb, K = kv_index.shape
    dev = kv_index.device
    k_pos = (kv_index[..., None] * block + torch.arange(block, device=dev)).reshape(nqb, 1, K * block)
    q_pos = (torch.arange(nqb * block, device=dev) + (Lk - Lq)).view(nqb, block, 1)
    allowed = (k_pos < sinks) | ((k_pos >= q_pos - left) & (k_pos <= q_pos + right))
    used = slot_valid[..., None].expand(nqb, K, block).reshape(nqb, 1, K * block)
    allowed = allowed & used & (k_pos < Lk)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    allowed = allowed[None, None]
    if key_mask is not None:
        nkb = (Lk + block - 1) // block
        B = key_mask.shape[0]
        real = _pad(key_mask.to(torch.bool), (0, nkb * block - Lk), value=False).view(B, nkb, block)
        allowed = allowed & real.index_select(1, kv_index.reshape(-1)).reshape(B, 1, nqb, 1, K * block)
    return allowed, k_pos, q_pos


def _gathered_softmax(s: Tensor, allowed: Tensor, vg: Tensor, Lq) -> Tensor:
    """Softmax of the gathered-block scores s (B, H, nqb, block, K * block) over the allowed pairs, times the
    gathered values vg; rows that see no key give 0. Returns the first Lq rows (B, H, Lq, Dv) in s's dtype."""
    B, H, nqb, block = s.shape[:4]
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    out = torch.matmul(p, vg) / p.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return _rows(out.reshape(B, H, nqb * block, vg.shape[-1]), Lq)


def _window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                      window: int, sinks: int, block: int = 64, alibi: Optional[list[float]] = None,
                      softcap: float = 0.0) -> Tensor:
    """The window op (``window_extents(window, causal)`` band + `sinks` first keys) on gathered key blocks: the same
    pairs and softmax as the reference (the softcap, then the ALiBi bias, on the scores), written so that it traces
    with dynamic lengths."""
    from .attention._contract import check_qkv, expand_kv, softcapped, window_extents
    B, H, _, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv, dev = v.shape[-1], q.device
    left, right = window_extents(window, causal)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = (Lq + block - 1) // block, (Lk + block - 1) // block
    kv_index, slot_valid = _band_blocks(Lq, Lk, block, left, right, sinks, dev)
    K = kv_index.shape[1]

    def blocks(x: Tensor, n, length) -> Tensor:          # (B, H, L, E) -> (B, H, n, block, E), zero padded
        return _pad(x, (0, 0, 0, n * block - length)).view(x.shape[0], x.shape[1], n, block, x.shape[-1])

    qb = blocks(q.to(acc), nqb, Lq)
    flat = kv_index.reshape(-1)
    kg = blocks(expand_kv(k.to(acc), H), nkb, Lk).index_select(2, flat).reshape(B, H, nqb, K * block, D)
    vg = blocks(expand_kv(v.to(acc), H), nkb, Lk).index_select(2, flat).reshape(B, H, nqb, K * block, Dv)
    allowed, k_pos, q_pos = _gathered_pairs(kv_index, slot_valid, block, Lq, Lk, left, right, sinks, causal,
                                            key_mask)
    s = softcapped(torch.matmul(qb, kg.transpose(-1, -2)) * scale, softcap)
    if alibi:
        slopes = torch.tensor(alibi, dtype=acc, device=dev).view(1, -1, 1, 1, 1)
        s = s + slopes * (k_pos - q_pos).to(acc)[None, None]
    return _gathered_softmax(s, allowed, vg, Lq).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Feature-map attention: performer, scatterbrain, linear and hedgehog (with or without a window band)
# --------------------------------------------------------------------------------------------------------------

def _linear_core(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, key_mask: Optional[Tensor],
                 chunk: int = 64) -> tuple[Tensor, Tensor]:
    """``feature_map.linear_attention_core`` written to trace with dynamic lengths: (num (B, H, Lq, Dv), den (B, H,
    Lq)). Bidirectional: the (F x Dv+1) key state, then phi_q @ state. Causal (bottom-right aligned): masked
    (chunk x chunk) products inside each chunk, plus the exclusive prefix sum (cumsum) of the chunks' states where
    the reference loops over chunks (a Python loop over a symbolic chunk count would pin the length). Memory
    O(L x F x Dv / chunk + L x chunk) per head, never Lq x Lk. Key states / kv heads are repeated per query head:
    a matmul that broadcasts the group dim reshapes an expanded tensor, which guards on the length (!= 1)."""
    from .attention._contract import expand_kv
    B, H, Lq, Fdim = phi_q.shape
    Hkv, Lk, Dv = phi_k.shape[1], phi_k.shape[2], v.shape[-1]
    acc = torch.float64 if phi_q.dtype == torch.float64 else torch.float32
    pq, pk = phi_q.to(acc), phi_k.to(acc)
    if key_mask is not None:
        pk = torch.where(key_mask[:, None, :, None].to(torch.bool), pk, torch.zeros_like(pk))
    va = torch.cat([v.to(acc), torch.ones_like(v[..., :1], dtype=acc)], dim=-1)
    if not causal:
        state = expand_kv(torch.matmul(pk.transpose(-1, -2), va), H)                    # (B, H, F, Dv+1)
        out = torch.matmul(pq, state)                                                    # (B, H, Lq, Dv+1)
    else:
        pk, va = expand_kv(pk, H), expand_kv(va, H)
        state = None
        if not statically_known_true(Lk == Lq):   # keys before the first query (a slice by Lk - Lq that the tracer
            offset = Lk - Lq                       # cannot size; self-attention has none)
            state = torch.matmul(pk[:, :, :offset].transpose(-1, -2), va[:, :, :offset])
            pk, va = pk[:, :, offset:], va[:, :, offset:]
        n = (Lq + chunk - 1) // chunk
        pad = n * chunk - Lq
        qc = _pad(pq, (0, 0, 0, pad)).view(B, H, n, chunk, Fdim)
        kc = _pad(pk, (0, 0, 0, pad)).view(B, H, n, chunk, Fdim)
        vc = _pad(va, (0, 0, 0, pad)).view(B, H, n, chunk, Dv + 1)
        lower = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).tril()
        intra = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * lower, vc)        # (B, H, n, C, Dv+1)
        per_chunk = torch.matmul(kc.transpose(-1, -2), vc)                               # (B, H, n, F, Dv+1)
        # exclusive prefix sums, a fresh tensor (a view of a padded one guarded the chunk count != 1 in matmul)
        before = torch.cat([torch.zeros_like(per_chunk[:, :, :1]), torch.cumsum(per_chunk, dim=2)[:, :, :-1]], dim=2)
        if state is not None:
            before = before + state[:, :, None]
        out = _rows((intra + torch.matmul(qc, before)).reshape(B, H, n * chunk, Dv + 1), Lq)
    return out[..., :Dv], out[..., Dv]


def _sparse_plus_lowrank(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                         phi_q: Tensor, phi_k: Tensor, window: int, sinks: int, log_phi_q: Optional[Tensor] = None,
                         log_phi_k: Optional[Tensor] = None, support_max_offset: Optional[Tensor] = None) -> Tensor:
    """``feature_map.sparse_plus_lowrank_attention`` (exact softmax weights on the band + sinks S, phi.phi
    elsewhere; same stabiliser, same correction) on key runs built from the lengths (``_key_runs``: per block of
    query rows the keys its bands reach, the sinks in front), so it traces with dynamic lengths: O(L x (rows + window
    + sinks)) for S plus O(L x F) for the low-rank sums, never Lq x Lk. Computed on kv heads repeated per query head
    and on query rows padded to whole blocks, the first Lq rows taken at the end (``_rows``): both keep the traced
    shapes free of guards on the length. Returns (B, H, Lq, Dv) in q's dtype."""
    from .attention._contract import band_rows, expand_kv, window_extents
    from .attention.feature_map import _normalise
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    num, den = _linear_core(phi_q, phi_k, v, causal, key_mask)
    lowrank = torch.cat([num, den[..., None]], dim=-1)                                  # (B, H, Lq, Dv+1)
    if window == 0 and sinks == 0:
        return _normalise(lowrank[..., :Dv], lowrank[..., Dv]).to(q.dtype)
    row_log = torch.zeros((), dtype=acc, device=dev)
    if log_phi_q is not None:
        row_log = row_log + log_phi_q.to(acc)
    if log_phi_k is not None:
        row_log = row_log + log_phi_k.to(acc).repeat_interleave(H // Hkv, dim=1)[:, :, None]
    row_log = row_log.expand(B, H, Lq)
    left, right = window_extents(window, causal) if window > 0 else (0, 0)
    rows = band_rows(window)
    pos, support = _key_runs(Lq, Lk, left, right, sinks, causal, key_mask, rows, window > 0, dev)
    support = support[:, None]                                                         # (B|1, 1, nqb, rows, S)
    nqb, S = pos.shape
    flat = pos.reshape(-1)

    def key_blocks(x: Tensor) -> Tensor:      # (B, Hkv, Lk, E) -> each block's keys per query head (B, H, nqb, S, E)
        return expand_kv(x, H).index_select(2, flat).view(B, H, nqb, S, x.shape[-1])

    def query_blocks(x: Tensor) -> Tensor:    # (B, H, Lq, ...) -> (B, H, nqb, rows, ...)
        pad = [0, 0] * (x.dim() - 3) + [0, nqb * rows - Lq]
        return _pad(x, pad).view(B, H, nqb, rows, *x.shape[3:])

    va = torch.cat([v.to(acc), torch.ones_like(v[..., :1], dtype=acc)], dim=-1)
    kg, pkg, vg = key_blocks(k.to(acc)), key_blocks(phi_k.to(acc)), key_blocks(va)

    scores = torch.matmul(query_blocks(q.to(acc)), kg.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~support, float("-inf"))
    support_max = scores.amax(dim=-1)                                                   # (B, H, nqb, block)
    rowb = query_blocks(row_log)
    if support_max_offset is not None:
        finite = torch.where(torch.isfinite(support_max), support_max, torch.zeros_like(support_max))
        rowb = finite + support_max_offset.to(acc).view(1, H, 1, 1)
    stabiliser = torch.maximum(rowb, support_max)
    lowrank_weight = torch.exp(rowb - stabiliser)
    phi_dot = torch.matmul(query_blocks(phi_q.to(acc)), pkg.transpose(-1, -2))
    correction = torch.exp(scores - stabiliser[..., None]) - lowrank_weight[..., None] * phi_dot
    correction = torch.where(support, correction, torch.zeros_like(correction))
    out = lowrank_weight[..., None] * query_blocks(lowrank) + torch.matmul(correction, vg)
    out = _rows(out.reshape(B, H, nqb * rows, Dv + 1), Lq)
    return _normalise(out[..., :Dv], out[..., Dv]).to(q.dtype)


def _performer_phi(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float, projection: Tensor):
    """FAVOR+ features of q and k (``feature_map.feature_map``, traceable) from a projection given as a tensor."""
    from .attention.feature_map import feature_map
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    projection = projection.to(acc)
    phi_q, log_q = feature_map("performer", q.to(acc), scale, role="query", projection=projection)
    phi_k, log_k = feature_map("performer", k.to(acc), scale, role="key", projection=projection, key_mask=key_mask)
    return phi_q, phi_k, log_q, log_k


def performer_lowered(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], projection: Tensor, causal: bool,
                      scale: float) -> Tensor:
    """rewriter::performer with its random projection (features, D) an input: FAVOR+ features and the linear core,
    O(L x features) (the query and key offsets cancel between num and den)."""
    from .attention.feature_map import _normalise
    phi_q, phi_k, _, _ = _performer_phi(q, k, key_mask, scale, projection)
    num, den = _linear_core(phi_q, phi_k, v, causal, key_mask)
    return _normalise(num, den).to(q.dtype)


def scatterbrain_lowered(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], projection: Tensor,
                         causal: bool, scale: float, window: int, sinks: int) -> Tensor:
    """rewriter::scatterbrain with its random projection an input: exact weights on the band + sinks, FAVOR+
    features elsewhere; O(L x (window + sinks)) + O(L x features)."""
    phi_q, phi_k, log_q, log_k = _performer_phi(q, k, key_mask, scale, projection)
    return _sparse_plus_lowrank(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks, log_q, log_k)


def _linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                      feature_map: str, window: int = 0, sinks: int = 0) -> Tensor:
    """rewriter::linear (elu / relu / taylor2 features; window / sinks > 0: the BASED / LoLCATs hybrid)."""
    from .attention.feature_map import _fixed_features
    phi_q, phi_k = _fixed_features(feature_map, q, k, scale)
    return _sparse_plus_lowrank(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks)


def _hedgehog_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                        q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, window_gain: Tensor,
                        window: int = 0, sinks: int = 0) -> Tensor:
    """rewriter::hedgehog (learned maps, op arguments; window / sinks > 0: LoLCATs' hybrid)."""
    from .attention.hedgehog import hedgehog_features
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    phi_q, phi_k = hedgehog_features(q.to(acc), q_weight, q_bias), hedgehog_features(k.to(acc), k_weight, k_bias)
    gain = window_gain if window or sinks else None
    return _sparse_plus_lowrank(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks,
                                support_max_offset=gain)


# Ops whose body needs a constant the op computes from its arguments (the seeded FAVOR+ projection). Before export
# the op's node is replaced by a twin op that takes the projection as an input, read from a buffer of the module, so
# that it becomes a constant of the package (a tensor created inside a decomposition is not: run_decompositions left
# it out of the constants table, "Constant tensor ... lifted_tensor_0 is not in the constants dictionary", pytorch
# #164461); the twin is then lowered like every other op. (Tracing the body itself at export instead guarded the
# whole model's shapes, see ``_size_oblivious``.)

@torch.library.custom_op("rewriter::aoti_performer", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor projection, bool causal, float scale) -> Tensor"))
def _aoti_performer(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], projection: Tensor, causal: bool,
                    scale: float) -> Tensor:
    """rewriter::performer with its projection an input (only inside ``lower``)."""
    return performer_lowered(q, k, v, key_mask, projection, causal, scale)


@torch.library.custom_op("rewriter::aoti_scatterbrain", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor projection, bool causal, float scale, int window, "
    "int sinks) -> Tensor"))
def _aoti_scatterbrain(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], projection: Tensor, causal: bool,
                       scale: float, window: int, sinks: int) -> Tensor:
    """rewriter::scatterbrain with its projection an input (only inside ``lower``)."""
    return scatterbrain_lowered(q, k, v, key_mask, projection, causal, scale, window, sinks)


@_aoti_performer.register_fake
def _aoti_performer_fake(q, k, v, key_mask, projection, causal, scale):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


@_aoti_scatterbrain.register_fake
def _aoti_scatterbrain_fake(q, k, v, key_mask, projection, causal, scale, window, sinks):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


# name -> (twin op, how the op's arguments after (q, k, v, key_mask) map to the twin's after the projection)
PROJECTED_OPS = {
    "rewriter::performer": (torch.ops.rewriter.aoti_performer.default,
                            lambda causal, scale, features, seed=0: ((causal, scale), features, seed)),
    "rewriter::scatterbrain": (torch.ops.rewriter.aoti_scatterbrain.default,
                               lambda causal, scale, features, window, sinks=0, seed=0:
                               ((causal, scale, window, sinks), features, seed)),
}
TWINS = {"rewriter::aoti_performer": "rewriter::performer", "rewriter::aoti_scatterbrain": "rewriter::scatterbrain"}


def _bind_projections(gm: torch.fx.GraphModule, device) -> torch.fx.GraphModule:
    """Replace every performer / scatterbrain call of `gm` by its twin op reading the projection from a buffer (one
    per (features, head dim, seed, dtype), on `device`), which export lifts with the weights. Returns gm, changed in
    place."""
    from .attention.feature_map import performer_projection
    graph, buffers = gm.graph, {}
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "rewriter":
            continue
        name = node.target._schema.name
        if name not in PROJECTED_OPS:
            continue
        body, split = PROJECTED_OPS[name]
        schema_args = [a.name for a in node.target._schema.arguments]
        values = dict(zip(schema_args, node.args))
        values.update(node.kwargs)
        q, k, v, key_mask = (values.get(a) for a in ("q", "k", "v", "key_mask"))
        rest, features, seed = split(**{a: values[a] for a in schema_args[4:] if a in values})
        q_val = q.meta.get("val") if hasattr(q, "meta") else None
        if q_val is None:
            raise RewriterError(f"{name}: the graph does not record the query's shape (node {node.name})",
                                "re-run `rewriter optimize` to capture the program again")
        acc = torch.float64 if q_val.dtype == torch.float64 else torch.float32
        key = (int(features), int(q_val.shape[-1]), int(seed), acc)
        if key not in buffers:
            buffers[key] = f"_aoti_projection_{len(buffers)}"
            projection = performer_projection(key[0], key[1], key[2]).to(device=device, dtype=acc)
            gm.register_buffer(buffers[key], projection)
        with graph.inserting_before(node):
            proj = graph.get_attr(buffers[key])
            new = graph.call_function(body, (q, k, v, key_mask, proj, *rest))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    gm.recompile()
    return gm


# --------------------------------------------------------------------------------------------------------------
# Routed block layouts: block top-k and strided (a fixed number of slots per query block, from the lengths)
# --------------------------------------------------------------------------------------------------------------

def _layout_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                      kv_index: Tensor, slot_valid: Tensor, block: int, alibi: Optional[list[float]] = None,
                      softcap: float = 0.0) -> Tensor:
    """``block_sparse_attention_reference`` (no window, no sinks: the layout carries them) on a layout with a fixed
    number K of slots per query block: kv_index (B' , H', nqb, K) long, slot_valid (B', H', nqb, K) bool, B' in
    (1, B), H' in (1, H). Gathers only the visited key blocks (``block_sparse.layout_keys``): O(L x K x block)
    scores, never Lq x Lk. Without ALiBi / softcap and below float64: one SDPA call over them
    (``block_sparse.layout_sdpa``)."""
    if not alibi and not softcap and q.dtype != torch.float64:
        return layout_sdpa(q, k, v, key_mask, causal, scale, kv_index, slot_valid, block)
    from .attention._contract import softcapped
    B, H, Lq, D = q.shape
    Lk, dev = k.shape[2], q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb = (Lq + block - 1) // block
    key_blocks, k_pos, allowed = layout_keys(q, k, key_mask, kv_index, slot_valid, block)
    kg, vg = key_blocks(k.to(acc)), key_blocks(v.to(acc))
    q_pos = (torch.arange(nqb * block, device=dev) + (Lk - Lq)).view(nqb, block, 1)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    qb = _pad(q.to(acc), (0, 0, 0, nqb * block - Lq)).view(B, H, nqb, block, D)
    s = softcapped(torch.matmul(qb, kg.transpose(-1, -2)) * scale, softcap)          # (B, H, nqb, block, K*block)
    if alibi:   # float32 slopes, as the op's (``sparse._slopes``)
        slopes = torch.tensor(alibi, dtype=torch.float32, device=dev).to(acc).view(1, -1, 1, 1, 1)
        s = s + slopes * (k_pos - q_pos).to(acc)
    return _gathered_softmax(s, allowed, vg, Lq).to(q.dtype)


def _base_blocks(Lq, Lk, block: int, causal: bool, local_blocks: int, sink_blocks: int, device):
    """``sparse._base_block_mask`` from the (symbolic) lengths: (causal-eligible, local | sink) key blocks per
    query block, (nqb, nkb) bool each; block indices by Python (symbolic) integer division, as ``_band_blocks``."""
    nqb, nkb = (Lq + block - 1) // block, (Lk + block - 1) // block
    qb = torch.arange(nqb, device=device)[:, None]
    kb = torch.arange(nkb, device=device)[None, :]
    offset = Lk - Lq
    last_b = torch.clamp(qb + (block - 1 + offset) // block, max=(Lk - 1) // block)   # block of the last query's key
    eligible = kb <= last_b if causal else torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    forced = kb < sink_blocks
    if local_blocks > 0:
        forced = forced | ((kb >= qb + offset // block - (local_blocks - 1)) & (kb <= last_b))
    return eligible, forced & eligible


def _forced_bound(Lq, Lk, local_blocks: int, sink_blocks: int) -> int:
    """At most how many forced (sink and local) blocks a query block has: its local run is local_blocks long where
    the queries sit at the keys' own positions (Lq == Lk, as in every prefill program), one longer where an offset
    Lk - Lq not a whole number of blocks makes the query block straddle two key blocks."""
    return sink_blocks + local_blocks + (0 if statically_known_true(Lq == Lk) else 1)


def _first_slots(chosen: Tensor, K) -> tuple[Tensor, Tensor]:
    """The chosen blocks of each row first, ascending (a stable sort of "not chosen"), cut to K slots:
    (kv_index (..., K) long, slot_valid (..., K) bool)."""
    order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[..., :K]
    return order, chosen.gather(-1, order)


def _strided_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                       stride: int, local_blocks: int = 1, sink_blocks: int = 1, block: int = 64,
                       alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """rewriter::strided: ``sparse.strided_layout`` from the lengths (query head h keeps key blocks kb with
    (kb + h) % stride == 0, plus local and sink blocks), cut to K = ceil(nkb / stride) + local_blocks + 1 +
    sink_blocks slots (at most nkb; ``_forced_bound``: without the 1 where Lq == Lk), which no row exceeds; cost
    O(L x K x block), 1/stride of dense."""
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    eligible, forced = _base_blocks(Lq, Lk, block, causal, local_blocks, sink_blocks, q.device)
    nkb = eligible.shape[-1]
    kb = torch.arange(nkb, device=q.device)
    strided = ((kb[None, :] + torch.arange(H, device=q.device)[:, None]) % stride == 0)[:, None, :]   # (H, 1, nkb)
    K = torch.sym_min(nkb, (nkb + stride - 1) // stride + _forced_bound(Lq, Lk, local_blocks, sink_blocks))
    kv_index, slot_valid = _first_slots((strided & eligible) | forced, K)                  # (H, nqb, K)
    return _layout_attention(q, k, v, key_mask, causal, scale, kv_index[None], slot_valid[None], block, alibi,
                             softcap)


def _pooled_scores(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float, block: int, pool: str):
    """``sparse._pooled_block_scores`` traceable: (scores (B, H, nqb, nkb), key block holds a real key
    (B, 1, 1, nkb))."""
    from .attention._contract import expand_kv
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = (Lq + block - 1) // block, (Lk + block - 1) // block
    rows = torch.clamp(Lq - torch.arange(nqb, device=q.device) * block, max=block).to(acc)
    q_sum = _pad(q.to(acc), (0, 0, 0, nqb * block - Lq)).view(B, H, nqb, block, D).sum(3)
    valid = torch.ones(B, Lk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.to(torch.bool)
    valid = _pad(valid, (0, nkb * block - Lk), value=False).view(B, 1, nkb, block, 1)
    kb = _pad(k.to(acc), (0, 0, 0, nkb * block - Lk)).view(B, k.shape[1], nkb, block, D)
    n_valid = valid.sum(3)                                                              # (B, 1, nkb, 1)
    k_mean = kb.masked_fill(~valid, 0.0).sum(3) / n_valid.clamp_min(1)
    pooled_q, pooled_k = q_sum, k_mean
    if pool == "maxmin":
        empty = n_valid == 0
        k_max = kb.masked_fill(~valid, float("-inf")).amax(3).masked_fill(empty, 0.0)
        k_min = kb.masked_fill(~valid, float("inf")).amin(3).masked_fill(empty, 0.0)
        pooled_k = torch.cat([k_mean, k_max, k_min], dim=-1)
        pooled_q = q_sum.repeat(1, 1, 1, 3)
    # an explicit bmm (torch.matmul's own batch folding of these reduced tensors guarded on nqb != 1); the query
    # means' division after the product
    E = pooled_q.shape[-1]
    scores = torch.bmm(pooled_q.reshape(B * H, nqb, E), expand_kv(pooled_k, H).reshape(B * H, nkb, E).transpose(1, 2))
    scores = scores.view(B, H, nqb, nkb) / rows.view(1, 1, nqb, 1) * scale
    return scores, (n_valid[..., 0] > 0)[:, :, None, :]


def _block_topk_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                          density: float, block: int = 64, pool: str = "mean", sink_blocks: int = 1,
                          local_blocks: int = 1, alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """rewriter::block_topk: ``sparse.block_topk_layout`` (pooled block scores; per query block the forced blocks
    and the best-scoring ones, max(ceil(density x n_eligible), n_forced) in all) with a fixed slot count from the
    lengths, K = max(ceil(density' x nkb), local_blocks + 1 + sink_blocks) (at most nkb; density' = density rounded
    up to 1/1024; ``_forced_bound``: without the 1 where Lq == Lk), which bounds every row's count (a row keeps the
    larger of its quota and its forced blocks, at most sink_blocks + local_blocks + 1; the sum of the two, used
    before, gathered 5 slots per query block of MiniLM at 512 tokens where rows keep 2); the rows' own counts stay
    data-dependent (padding), as slot flags.
    Cost: routing O(nqb x nkb) pooled scores, attention O(L x K x block), the op's own density."""
    eligible, forced = _base_blocks(q.shape[2], k.shape[2], block, causal, local_blocks, sink_blocks, q.device)
    scores, has_key = _pooled_scores(q, k, key_mask, scale, block, pool)
    eligible, forced = eligible & has_key, forced & has_key                             # (B, 1, nqb, nkb)
    keep = torch.ceil(eligible.sum(-1).to(torch.float64) * density - 1e-9).to(torch.long)
    keep = torch.maximum(keep, forced.sum(-1))
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(~eligible, float("-inf"))
    nkb = ranked.shape[-1]
    quota = math.ceil(density * 1024)
    K = torch.sym_min(nkb, torch.sym_max((nkb * quota + 1023) // 1024,
                                         _forced_bound(q.shape[2], k.shape[2], local_blocks, sink_blocks)))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :K]    # (B, H, nqb, K)
    slot_valid = (torch.arange(K, device=q.device) < keep[..., None]) & eligible.expand_as(ranked).gather(-1, order)
    return _layout_attention(q, k, v, key_mask, causal, scale, order, slot_valid, block, alibi, softcap)


def lowerings(device: str = "cpu") -> dict:
    """op -> the body the package is compiled from (see the module docstring): aten only, except that on CUDA (with
    Triton usable) the window op becomes the ``rewriter::window_triton`` triton_op and exact attention with a key mask
    ``rewriter::exact_triton``, which Inductor compiles in."""
    from .attention._contract import METHODS
    from .linear.binary import binary_linear_reference
    from .linear.fused import rms_norm_reference, silu_mul_reference
    table = {m.op: m.reference for m in METHODS.values()}
    table[torch.ops.rewriter.exact_attention.default] = _exact_attention
    table[torch.ops.rewriter.window.default] = _window_sdpa if torch.device(device).type == "cpu" else _window_attention
    if torch.device(device).type == "cuda":
        from .attention.triton import triton_available, use_reference
        if triton_available() and not use_reference():
            table[torch.ops.rewriter.window.default] = _window_triton
            table[torch.ops.rewriter.exact_attention.default] = _exact_triton
    table[torch.ops.rewriter.linear.default] = _linear_attention
    table[torch.ops.rewriter.hedgehog.default] = _hedgehog_attention
    table[torch.ops.rewriter.strided.default] = _strided_attention
    table[torch.ops.rewriter.block_topk.default] = _block_topk_attention
    for name, (twin, _) in PROJECTED_OPS.items():   # replaced by their twins before export (``_bind_projections``)
        table.pop(getattr(torch.ops.rewriter, name.split("::")[1]).default, None)
    table[torch.ops.rewriter.aoti_performer.default] = performer_lowered
    table[torch.ops.rewriter.aoti_scatterbrain.default] = scatterbrain_lowered
    table[torch.ops.rewriter.binary_linear.default] = binary_linear_reference
    table[torch.ops.rewriter.rms_norm.default] = rms_norm_reference      # Inductor fuses their aten ops itself
    table[torch.ops.rewriter.silu_mul.default] = silu_mul_reference
    return table


# --------------------------------------------------------------------------------------------------------------
# Lowering, compiling, checking
# --------------------------------------------------------------------------------------------------------------

def _rewriter_ops(ep: torch.export.ExportedProgram) -> dict:
    """{"rewriter::window": OpOverload, ...} of the rewriter ops the graph calls."""
    return {n.target._schema.name: n.target for n in ep.graph.nodes if n.op == "call_function"
            and getattr(n.target, "namespace", None) == "rewriter"}


def _strip_metadata_asserts(ep: torch.export.ExportedProgram) -> None:
    """Remove ``aten._assert_tensor_metadata`` nodes (dtype checks export records at ``.to`` calls; torch.compile of
    a program's module graph-breaks on them, issue 13). They check nothing a compiled graph needs. Whether
    AOTInductor on torch 2.11-2.13 itself needs this was not checked; the removal is cheap and keeps it out."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    ep.graph_module.recompile()


TRITON_OPS = {"rewriter::window_triton", "rewriter::exact_triton"}   # triton_ops: Inductor compiles them in
LONG_HINT = 509   # tokens: several blocks of every block size the ops take; odd, so never a whole number of blocks


def _with_long_hints(program) -> torch.export.ExportedProgram:
    """The program exported again with example inputs of batch 2 and LONG_HINT tokens (within its bounds). The
    decompositions trace with the example's sizes as hints, and a size of 1 (one block, one row) is specialised:
    a 16-token capture traced the window's block count as 1 and the lowered graph then asserted (63 + L) // 64 < 2;
    a length that is a whole number of blocks drops the padding and the final slice (a package traced at 128 tokens
    returned 24 rows for 21 tokens). The sequence hint is odd for that reason."""
    from .program import export
    target = {}
    for label, (lo, hi) in program.dim_bounds.items():
        size = min(hi, 2 if label == "batch" else LONG_HINT)
        if label != "batch" and size % 2 == 0 and size - 1 >= lo:
            size -= 1
        target[label] = max(lo, size)
    gm = _bind_projections(program.module(), program.device())
    return export(gm, _inputs_at(program, target), program.dynamic_shapes())


def _inputs_at(program, sizes: dict) -> dict:
    """The program's example inputs resized to `sizes` ({"batch": n, "seq": n}), repeating their own entries."""
    from .backends.onnx import _resized
    inputs = {}
    for name in program.input_names:
        x = program.example_inputs[name]
        for axis, label in program.dynamic_dims.get(name, {}).items():
            x = _resized(x, axis, sizes.get(label, x.shape[axis]))
        inputs[name] = x
    return inputs


def block_multiple_inputs(program, block: int = 64) -> list[dict]:
    """Inputs of two whole blocks of `block` tokens (the length a block-padding bug shows at), when the bounds allow."""
    lo, hi = program.dim_bounds.get("seq", (0, 0))
    if not lo <= 2 * block <= hi:
        return []
    return [_inputs_at(program, {"seq": 2 * block})]


def _size_oblivious():
    """Tracing with size-oblivious backed sizes (``torch.fx.experimental._config.backed_size_oblivious``, torch 2.7+),
    for the decompositions of the rewriter ops only: the blocked bodies reshape tensors with a block-count dimension,
    and torch's contiguity checks otherwise guard on the traced example's facts (block count >= 2). Plain export
    refused those guards for the dynamic length ("Constraints violated (seq)"); run_decompositions kept them as
    guards of the lowered program, whose module (a window of 64-token blocks traced at 127 tokens) then refused 64
    tokens or fewer ("Guard failed: (63 + L) // 64 >= 2"; whether the compiled package itself checked them was not
    measured). Not for the export of the whole model: there it made GPT-2's graph assert batch != 1."""
    import contextlib
    try:
        from torch.fx.experimental import _config
    except ImportError:   # pragma: no cover
        return contextlib.nullcontext()
    return _config.patch(backed_size_oblivious=True) if hasattr(_config, "backed_size_oblivious") \
        else contextlib.nullcontext()


def lower(program) -> torch.export.ExportedProgram:
    """The program's ExportedProgram with every rewriter op decomposed into aten ops (RewriterError naming the op
    when one does not trace)."""
    from . import attention, linear  # noqa: F401  (the ops and their registry)
    used = _rewriter_ops(program.ep)
    table = lowerings(program.device().type)
    unknown = sorted(name for name, op in used.items() if op not in table and name not in PROJECTED_OPS)
    if unknown:
        raise RewriterError(f"no AOTInductor lowering for {', '.join(unknown)}")
    ep = _with_long_hints(program)   # a fresh ExportedProgram: the program itself is never changed
    for name, op in sorted(_rewriter_ops(ep).items()):   # one op at a time, so that a failure names its op
        try:
            with _size_oblivious():
                ep = ep.run_decompositions({op: table[op]})
        except Exception as e:   # torch reports the trace failure from deep inside the tracer
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise RewriterError(f"{TWINS.get(name, name)} cannot be compiled into an AOTInductor package: its "
                                f"reference does not trace with dynamic lengths ({first})",
                                "use `rewriter export --onnx` or the eager program for this method") from None
    left = set(_rewriter_ops(ep)) - TRITON_OPS
    if left:
        raise RewriterError(f"rewriter ops left after lowering: {', '.join(sorted(left))}")
    _strip_metadata_asserts(ep)
    return ep


def compile_package(program, path: str | Path, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Lower and AOT-compile `program` for its device into the package file `path` (written to a temporary name
    beside it and renamed when complete). Returns {"seconds", "device", "bytes"}."""
    from torch._inductor import aoti_compile_and_package
    path = Path(path)
    t0 = time.perf_counter()
    progress("lowering rewriter ops to aten")
    ep = lower(program)
    progress(f"compiling an AOTInductor package for {program.device().type}")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.pt2")   # AOTInductor wants a .pt2 name
    try:
        aoti_compile_and_package(ep, package_path=str(tmp))
        tmp.replace(path)
    except RewriterError:
        raise
    except Exception as e:
        raise RewriterError(f"AOTInductor could not compile the program: {str(e).strip().splitlines()[0][:200]}") \
            from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"seconds": round(time.perf_counter() - t0, 2), "device": program.device().type,
            "bytes": path.stat().st_size}


def check_package(path: str | Path, program, inputs: dict[str, Tensor], tolerance: float = TOLERANCE) -> float:
    """Max abs difference between the package and the program on `inputs` (every output); RewriterError above
    `tolerance`."""
    from torch._inductor import aoti_load_package
    runner = aoti_load_package(str(path))
    feed = {n: inputs[n].to(program.device()) for n in program.input_names}
    with torch.no_grad():
        got = runner(**feed)
    want = program.run(**feed)
    got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    worst = 0.0
    for name, a, b in zip(program.output_names, got, want):
        diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        if not math.isfinite(diff) or diff > tolerance:
            raise RewriterError(f"the AOTInductor package differs from the program on output {name!r}: max abs "
                                f"difference {diff:.3g} > {tolerance:g}")
        worst = max(worst, diff)
    return worst
