"""onnxscript building blocks shared by the attention methods' ONNX translations (opset 18, standard ops only).

Translations are traced Python functions: tensor arguments arrive as symbolic ONNX values (static dims are ints,
batch/sequence are symbols) and the op's scalar arguments as Python values, so each call emits only the branch
its arguments select. None of these helpers builds an Lq x Lk tensor (see backends/onnx.py for the list).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ._contract import band_rows, window_extents


CHUNK = 64                 # causal linear attention: tokens per chunk (intra-chunk products are CHUNK x CHUNK)


def _op():
    from onnxscript import opset18
    return opset18


def _ints(values) -> object:
    return _op().Constant(value_ints=[int(v) for v in values])


def _int(value: int) -> object:
    """A 0-D int64 constant (Range bounds, CumSum axis)."""
    return _op().Constant(value_int=int(value))


def _float(value: float) -> object:
    return _op().Constant(value_float=float(value))


def _dim(x, axis: int):
    """x.shape[axis] as a 1-D int64 tensor of one element."""
    return _op().Shape(x, start=axis, end=axis + 1)


def _pad_axis(x, axis: int, multiple: int, value=None):
    """Pad x at the end of `axis` up to a multiple of `multiple` (zeros, or `value`, a scalar tensor)."""
    op = _op()
    n = _dim(x, axis)
    m = _ints([multiple])
    extra = op.Mod(op.Sub(m, op.Mod(n, m)), m)
    pads = op.Concat(_ints([0]), extra, axis=0)
    return op.Pad(x, pads, value, _ints([axis])) if value is not None else op.Pad(x, pads, None, _ints([axis]))


def _expand_heads(x, kv_heads: int, heads: int, width: int):
    """(B, Hkv, L, E) -> (B, H, L, E): query head h reads kv head h // (H // Hkv).

    Static sizes come from the op's own inputs: values built inside a translation carry no shape."""
    op = _op()
    hkv, e = kv_heads, width
    if hkv == heads:
        return x
    x = op.Unsqueeze(x, _ints([2]))
    x = op.Expand(x, _ints([1, 1, heads // hkv, 1, 1]))
    return op.Reshape(x, _ints([0, heads, -1, e]))


def _masked_keys(x, key_mask):
    """Zero x (B, H, Lk, E) at padding keys."""
    if key_mask is None:
        return x
    op = _op()
    keep = op.Unsqueeze(key_mask, _ints([1, 3]))
    return op.Where(keep, x, op.CastLike(_float(0.0), x))


def _with_ones(v):
    """[v, 1]: one product gives numerator and denominator."""
    op = _op()
    ones = op.CastLike(op.Expand(_float(1.0), op.Concat(op.Shape(v, start=0, end=3), _ints([1]), axis=0)), v)
    return op.Concat(v, ones, axis=3)


def _normalise(out, dv: int):
    """out (.., Dv+1) = [num, den] -> num / den where den > 0, else 0."""
    op = _op()
    num = op.Slice(out, _ints([0]), _ints([dv]), _ints([-1]))
    den = op.Slice(out, _ints([dv]), _ints([dv + 1]), _ints([-1]))
    zero = op.CastLike(_float(0.0), den)
    positive = op.Greater(den, zero)
    safe = op.Where(positive, den, op.CastLike(_float(1.0), den))
    return op.Where(positive, op.Div(num, safe), op.CastLike(_float(0.0), num))


def _fixed_feature_map(name: str, x, scale: float, d: int):
    op = _op()
    xs = op.Mul(x, _float(math.sqrt(scale)))
    if name == "elu":
        return op.Add(op.Elu(xs), _float(1.0))
    if name == "relu":
        return op.Relu(xs)
    if name == "taylor2":
        outer = op.Mul(op.Unsqueeze(xs, _ints([4])), op.Unsqueeze(xs, _ints([3])))
        second = op.Mul(op.Reshape(outer, _ints([0, 0, 0, d * d])), _float(1.0 / math.sqrt(2.0)))
        ones = op.Expand(_float(1.0), op.Concat(op.Shape(x, start=0, end=3), _ints([1]), axis=0))
        return op.Concat(ones, xs, second, axis=3)
    raise ValueError(f"unknown feature map {name!r}; allowed: elu, relu, taylor2")


def _performer_features(q, k, key_mask, scale: float, projection: torch.Tensor):
    """(phi_q, phi_k, log_q (B, H, Lq), log_k (B, H, 1)) with the same offsets as the reference; projection:
    the (features, D) FAVOR+ matrix (``feature_map.performer_projection``)."""
    import onnx_ir as ir
    op = _op()
    features = projection.shape[0]
    w_t = projection.T.contiguous().to(torch.float32).numpy()
    proj = op.Constant(value=ir.tensor(w_t, name="performer_projection"))
    norm = _float(1.0 / math.sqrt(features))

    def logits(x):
        xs = op.Mul(x, _float(math.sqrt(scale)))
        sq = op.ReduceSum(op.Mul(xs, xs), _ints([-1]), keepdims=1)
        return op.Sub(op.MatMul(xs, proj), op.Mul(sq, _float(0.5)))

    lq = logits(q)
    log_q = op.ReduceMax(lq, _ints([-1]), keepdims=1)
    phi_q = op.Mul(op.Exp(op.Sub(lq, log_q)), norm)
    lk = logits(k)
    per_key = op.ReduceMax(lk, _ints([-1]), keepdims=1)                          # (B, H, Lk, 1)
    if key_mask is not None:
        keep = op.Unsqueeze(key_mask, _ints([1, 3]))
        per_key = op.Where(keep, per_key, _float(-math.inf))
    log_k = op.ReduceMax(per_key, _ints([2]), keepdims=1)                         # (B, H, 1, 1)
    log_k = op.Where(op.IsInf(log_k), _float(0.0), log_k)
    phi_k = _masked_keys(op.Mul(op.Exp(op.Sub(lk, log_k)), norm), key_mask)
    return phi_q, phi_k, op.Squeeze(log_q, _ints([3])), op.Squeeze(log_k, _ints([3]))


def _linear_core(phi_q, phi_k, va, causal: bool, f: int, e: int):
    """phi_q (B, H, Lq, F), phi_k (B, H, Lk, F) (zero at padding), va = [v, 1] (B, H, Lk, E)."""
    op = _op()
    if not causal:
        state = op.MatMul(op.Transpose(phi_k, perm=[0, 1, 3, 2]), va)            # (B, H, F, E)
        return op.MatMul(phi_q, state)
    lq, lk = _dim(phi_q, 2), _dim(phi_k, 2)
    offset = op.Sub(lk, lq)
    # keys before the first query position (Lk > Lq) form the initial state
    early_k = op.Slice(phi_k, _ints([0]), offset, _ints([2]))
    early_v = op.Slice(va, _ints([0]), offset, _ints([2]))
    init = op.Unsqueeze(op.MatMul(op.Transpose(early_k, perm=[0, 1, 3, 2]), early_v), _ints([2]))  # (B,H,1,F,E)
    big = _ints([2**62])
    pk = op.Slice(phi_k, offset, big, _ints([2]))
    pv = op.Slice(va, offset, big, _ints([2]))
    qc = op.Reshape(_pad_axis(phi_q, 2, CHUNK), _ints([0, 0, -1, CHUNK, f]))      # (B, H, n, C, F)
    kc = op.Reshape(_pad_axis(pk, 2, CHUNK), _ints([0, 0, -1, CHUNK, f]))
    vc = op.Reshape(_pad_axis(pv, 2, CHUNK), _ints([0, 0, -1, CHUNK, e]))
    lower = op.Constant(value_floats=torch.ones(CHUNK, CHUNK).tril().flatten().tolist())
    lower = op.CastLike(op.Reshape(lower, _ints([CHUNK, CHUNK])), qc)
    scores = op.Mul(op.MatMul(qc, op.Transpose(kc, perm=[0, 1, 2, 4, 3])), lower)
    intra = op.MatMul(scores, vc)
    chunk_states = op.MatMul(op.Transpose(kc, perm=[0, 1, 2, 4, 3]), vc)           # (B, H, n, F, E)
    before = op.Add(op.CumSum(chunk_states, _int(2), exclusive=1), init)
    inter = op.MatMul(qc, before)
    out = op.Reshape(op.Add(intra, inter), _ints([0, 0, -1, e]))
    return op.Slice(out, _ints([0]), lq, _ints([2]))


@dataclass
class _Support:
    allowed: object      # (B or 1, 1, nqb, rows, S) bool: pair in the band or a sink, causal, padding
    gather: Callable     # (x (B, H, Lk, E), E) -> (B, H, nqb, S, E): each block's keys
    blocks: Callable     # (x (B, H, Lq, E), E) -> (B, H, nqb, rows, E)
    rows: Callable       # (y (B, H, nqb, rows, E), E) -> (B, H, Lq, E)
    alibi: Callable      # (slopes list or None) -> (1, H, nqb, rows, S) bias slope_h * (j - i), or None


def _run_support(q, k, key_mask, causal: bool, window: int, sinks: int) -> _Support:
    """The window's support as key runs: query rows in blocks of ``band_rows(window)``, each block against the
    contiguous run of keys its rows' bands reach (moved inside the sequence, at most Lk keys long), the first `sinks`
    keys in front of every run, and the token predicate on those (a sink inside a run counts once, as a sink). Fewer
    scores than the gathered 64-key blocks it replaced (MiniLM's window 128 + 4 sinks: 195 keys per query row against
    320) and none for an input shorter than a run beyond dense attention's."""
    op = _op()
    rows = band_rows(window)
    left, right = window_extents(window, causal)
    lq, lk = _dim(q, 2), _dim(k, 2)
    offset = op.Sub(lk, lq)
    nqb = op.Div(op.Add(lq, _ints([rows - 1])), _ints([rows]))
    span = op.Min(_ints([rows + left + right]), lk)                                   # (1,)
    qb = op.Range(_int(0), op.Squeeze(nqb, _ints([0])), _int(1))                        # (nqb,)
    starts = op.Min(op.Max(op.Add(op.Mul(qb, _ints([rows])), op.Sub(offset, _ints([left]))), _ints([0])),
                    op.Sub(lk, span))
    pos = op.Add(op.Unsqueeze(starts, _ints([1])), op.Range(_int(0), op.Squeeze(span, _ints([0])), _int(1)))
    is_sink = op.Expand(op.Constant(value=_bool_false()), span)                         # (span,)
    if sinks:
        sink_pos = op.Expand(_ints(range(sinks)), op.Concat(nqb, _ints([sinks]), axis=0))
        pos = op.Concat(sink_pos, pos, axis=1)                                          # (nqb, S)
        is_sink = op.Concat(op.Expand(op.Constant(value=_bool_true()), _ints([sinks])), is_sink, axis=0)
    q_pos = op.Add(op.Range(_int(0), op.Squeeze(op.Mul(nqb, _ints([rows])), _ints([0])), _int(1)), offset)
    q_pos = op.Unsqueeze(op.Reshape(q_pos, _ints([-1, rows])), _ints([2]))              # (nqb, rows, 1)
    k_pos = op.Unsqueeze(pos, _ints([1]))                                               # (nqb, 1, S)
    dist = op.Sub(k_pos, q_pos)                                                         # (nqb, rows, S)
    band = op.And(op.And(op.GreaterOrEqual(dist, _ints([-left])), op.LessOrEqual(dist, _ints([right]))),
                  op.GreaterOrEqual(k_pos, _ints([sinks])))
    allowed = op.Or(op.And(is_sink, op.Less(k_pos, lk)), band)    # band is false on the sink columns (pos < sinks)
    if causal:
        allowed = op.And(allowed, op.LessOrEqual(dist, _ints([0])))
    allowed = op.Unsqueeze(allowed, _ints([0, 1]))                                      # (1, 1, nqb, rows, S)
    flat = op.Reshape(op.Min(pos, op.Sub(lk, _ints([1]))), _ints([-1]))                # sinks past a short input
    if key_mask is not None:
        real = op.Reshape(op.Gather(key_mask, flat, axis=1), op.Concat(_ints([0]), nqb, _ints([1, -1]), axis=0))
        allowed = op.And(allowed, op.Unsqueeze(real, _ints([1])))                       # (B, 1, nqb, rows, S)

    def gather(x, e: int):
        return op.Reshape(op.Gather(x, flat, axis=2), op.Concat(_ints([0, 0]), nqb, _ints([-1, e]), axis=0))

    def blocks(x, e: int):
        return op.Reshape(_pad_axis(x, 2, rows), _ints([0, 0, -1, rows, e]))

    def rows_of(y, e: int):
        return op.Slice(op.Reshape(y, _ints([0, 0, -1, e])), _ints([0]), lq, _ints([2]))

    def alibi(slopes):
        if not slopes:
            return None
        return op.Mul(op.Reshape(op.Constant(value_floats=[float(a) for a in slopes]), _ints([1, -1, 1, 1, 1])),
                      op.Unsqueeze(op.Cast(dist, to=1), _ints([0, 1])))

    return _Support(allowed, gather, blocks, rows_of, alibi)


def _bool_false():
    import onnx_ir as ir
    import numpy as np
    return ir.tensor(np.array(False))


def _softcapped(s, softcap: float):
    """Logit softcapping on scaled scores, cap * tanh(s / cap) (``_contract.softcapped``); 0: none."""
    if not softcap:
        return s
    op = _op()
    return op.Mul(op.Tanh(op.Div(s, _float(softcap))), _float(softcap))


def _masked_scores(q_blocks, k_gathered, allowed, scale: float, bias=None, softcap: float = 0.0):
    op = _op()
    s = _softcapped(op.Mul(op.MatMul(q_blocks, op.Transpose(k_gathered, perm=[0, 1, 2, 4, 3])), _float(scale)),
                    softcap)
    if bias is not None:
        s = op.Add(s, bias)
    return op.Where(allowed, s, _float(-math.inf))


def _finite_row_max(s):
    op = _op()
    m = op.ReduceMax(s, _ints([-1]), keepdims=1)
    return op.Where(op.IsInf(m), _float(0.0), m)


def _acc(x):
    return _op().Cast(x, to=1)   # FLOAT: every translation accumulates in fp32, as the references do


def _heads_fp32(q, k, v):
    """q, k, v in fp32 with kv heads expanded to the query heads; (q, k, v, (H, D, Dv))."""
    heads, d, dv = q.shape[1], q.shape[3], v.shape[3]
    kv_heads = k.shape[1]
    return (_acc(q), _expand_heads(_acc(k), kv_heads, heads, d), _expand_heads(_acc(v), kv_heads, heads, dv),
            (heads, d, dv))


def _lowrank_attention(q, k, v, key_mask, causal, scale, phi_q, phi_k, dims, window, sinks, log_q=None, log_k=None,
                       support_max_offset=None):
    """Mirror of ``sparse_plus_lowrank_attention`` on (B, H, ...) fp32 tensors; window == sinks == 0 is plain
    linear attention. dims = (D, Dv, F); support_max_offset: an fp32 (H,) value (learned maps' hybrid)."""
    op = _op()
    d, dv, f = dims
    va = _with_ones(v)
    lowrank = _linear_core(phi_q, _masked_keys(phi_k, key_mask), _masked_keys(va, key_mask), causal, f, dv + 1)
    if window == 0 and sinks == 0:
        return _normalise(lowrank, dv)
    sup = _run_support(q, k, key_mask, causal, window, sinks)
    s = _masked_scores(sup.blocks(q, d), sup.gather(k, d), sup.allowed, scale)
    row_max = op.ReduceMax(s, _ints([-1]), keepdims=1)                             # (B, H, nqb, rows, 1)
    if support_max_offset is not None:
        rowb = op.Add(op.Where(op.IsInf(row_max), _float(0.0), row_max),
                      op.Reshape(support_max_offset, _ints([1, -1, 1, 1, 1])))
    elif log_q is None:   # fixed feature maps carry no offset
        rowb = op.Mul(row_max, _float(0.0))
        rowb = op.Where(op.IsNaN(rowb), _float(0.0), rowb)
    else:
        rowb = sup.blocks(op.Unsqueeze(op.Add(log_q, log_k), _ints([3])), 1)
    stabiliser = op.Max(rowb, row_max)
    lowrank_weight = op.Exp(op.Sub(rowb, stabiliser))                              # (B, H, nqb, rows, 1)
    phi_dot = op.MatMul(sup.blocks(phi_q, f), op.Transpose(sup.gather(phi_k, f), perm=[0, 1, 2, 4, 3]))
    correction = op.Sub(op.Exp(op.Sub(s, stabiliser)), op.Mul(lowrank_weight, phi_dot))
    correction = op.Where(sup.allowed, correction, _float(0.0))
    corrected = sup.rows(op.MatMul(correction, sup.gather(va, dv + 1)), dv + 1)
    out = op.Add(op.Mul(sup.rows(lowrank_weight, 1), lowrank), corrected)
    return _normalise(out, dv)


def _block_grid(q, k, block: int):
    """(nqb, nkb) as 1-D int64 tensors, and the (first, last) key position of each query block, (nqb, 1) each."""
    op = _op()
    lq, lk = _dim(q, 2), _dim(k, 2)
    bs = _ints([block])
    nqb = op.Div(op.Add(lq, _ints([block - 1])), bs)
    nkb = op.Div(op.Add(lk, _ints([block - 1])), bs)
    start = op.Mul(op.Unsqueeze(op.Range(_int(0), op.Squeeze(nqb, _ints([0])), _int(1)), _ints([1])), bs)
    offset = op.Sub(lk, lq)
    first = op.Add(start, offset)
    last = op.Add(op.Sub(op.Min(op.Add(start, bs), lq), _ints([1])), offset)
    return nqb, nkb, first, last


def _base_blocks(q, k, block: int, causal: bool, local_blocks: int, sink_blocks: int):
    """(causal-eligible, forced = (local | sink) & eligible), both (nqb, nkb) bool: mirrors ``_base_block_mask``."""
    op = _op()
    nqb, nkb, first, last = _block_grid(q, k, block)
    bs = _ints([block])
    kb = op.Unsqueeze(op.Range(_int(0), op.Squeeze(nkb, _ints([0])), _int(1)), _ints([0]))   # (1, nkb)
    grid = op.Concat(nqb, nkb, axis=0)
    eligible = op.Expand(op.LessOrEqual(op.Mul(kb, bs), last) if causal else op.Constant(value=_bool_true()), grid)
    if local_blocks > 0:
        first_b = op.Div(first, bs)
        last_b = op.Div(op.Min(last, op.Sub(_dim(k, 2), _ints([1]))), bs)
        forced = op.And(op.GreaterOrEqual(kb, op.Sub(first_b, _ints([local_blocks - 1]))), op.LessOrEqual(kb, last_b))
        forced = op.Or(forced, op.Less(kb, _ints([sink_blocks])))
    else:
        forced = op.Expand(op.Less(kb, _ints([sink_blocks])), grid)
    return eligible, op.And(forced, eligible)


def _double(value: float):
    import onnx_ir as ir
    import numpy as np
    return _op().Constant(value=ir.tensor(np.array(value, dtype=np.float64)))


def _bool_true():
    import onnx_ir as ir
    import numpy as np
    return ir.tensor(np.array(True))


def _key_valid(k, key_mask):
    """(B, Lk) bool: key_mask, or all True."""
    op = _op()
    if key_mask is not None:
        return key_mask
    return op.Expand(op.Constant(value=_bool_true()), op.Concat(_dim(k, 0), _dim(k, 2), axis=0))


def _top_blocks(ranked, n_keep):
    """kv_index (.., nqb, K) int64 and slot_valid (.., nqb, K) bool: the n_keep (.., nqb) best blocks of ranked
    (.., nqb, nkb); K = max(1, max n_keep)."""
    op = _op()
    width = op.Max(op.Reshape(op.ReduceMax(n_keep, keepdims=0), _ints([1])), _ints([1]))
    width = op.Min(width, op.Shape(ranked, start=-1))
    _, kv_index = op.TopK(ranked, width, axis=-1, largest=1, sorted=1)
    slot = op.Range(_int(0), op.Squeeze(width, _ints([0])), _int(1))
    return kv_index, op.Less(slot, op.Unsqueeze(n_keep, _ints([-1])))


def _gathered_block_attention(qa, ka, va, key_mask, causal: bool, scale: float, kv_index, slot_valid, block: int,
                              d: int, dv: int, alibi=None, softcap: float = 0.0):
    """Exact softmax over the chosen key blocks (kv_index (B', H', nqb, K), broadcast to (B, H, ..)) with the
    token-level predicate (padding, causal, real key), the scores softcapped when `softcap` > 0 and, with `alibi`
    slopes, + slope_h * (j - i); qa/ka/va (B, H, L, *) fp32. Returns (B, H, Lq, Dv) fp32."""
    op = _op()
    lq, lk = _dim(qa, 2), _dim(ka, 2)
    bs = _ints([block])
    full = op.Concat(_dim(qa, 0), _dim(qa, 1), _ints([1, 1]), axis=0)
    kv_index = op.Expand(kv_index, full)                                           # (B, H, nqb, K)
    slot_valid = op.Expand(slot_valid, full)
    flat_index = op.Unsqueeze(op.Reshape(kv_index, _ints([0, 0, -1])), _ints([3]))  # (B, H, nqb*K, 1)
    per_query_block = op.Concat(op.Shape(kv_index, start=0, end=3), _ints([-1]), axis=0)

    def gather(x, e: int):
        xb = op.Reshape(_pad_axis(x, 2, block), _ints([0, 0, -1, block, e]))       # (B, H, nkb, block, e)
        g = op.GatherND(xb, flat_index, batch_dims=2)                              # (B, H, nqb*K, block, e)
        return op.Reshape(g, op.Concat(per_query_block, _ints([e]), axis=0))        # (B, H, nqb, K*block, e)

    real = op.Reshape(_pad_axis(_key_valid(ka, key_mask), 1, block, op.Constant(value=_bool_false())),
                      _ints([0, 1, -1, block]))                                    # (B, 1, nkb, block)
    real = op.Expand(real, op.Concat(_dim(qa, 0), _dim(qa, 1), _ints([1, 1]), axis=0))
    real = op.Reshape(op.GatherND(real, flat_index, batch_dims=2), per_query_block)  # (B, H, nqb, K*block)
    k_pos = op.Add(op.Mul(op.Unsqueeze(kv_index, _ints([4])), bs), _ints(range(block)))   # (B, H, nqb, K, block)
    k_pos = op.Where(op.Unsqueeze(slot_valid, _ints([4])), k_pos, _ints([2**60]))
    k_pos = op.Reshape(k_pos, per_query_block)
    allowed = op.Unsqueeze(op.And(real, op.Less(k_pos, lk)), _ints([3]))           # (B, H, nqb, 1, K*block)
    nqb = op.Div(op.Add(lq, _ints([block - 1])), bs)
    q_pos = op.Add(op.Range(_int(0), op.Squeeze(op.Mul(nqb, bs), _ints([0])), _int(1)), op.Sub(lk, lq))
    q_pos = op.Unsqueeze(op.Reshape(q_pos, _ints([-1, block])), _ints([2]))         # (nqb, block, 1)
    if causal:
        allowed = op.And(allowed, op.LessOrEqual(op.Unsqueeze(k_pos, _ints([3])), q_pos))
    bias = None
    if alibi:
        dist = op.Cast(op.Sub(op.Unsqueeze(k_pos, _ints([3])), q_pos), to=1)        # (B, H, nqb, block, K*block)
        bias = op.Mul(op.Reshape(op.Constant(value_floats=[float(a) for a in alibi]), _ints([1, -1, 1, 1, 1])), dist)
    q_blocks = op.Reshape(_pad_axis(qa, 2, block), _ints([0, 0, -1, block, d]))
    s = _masked_scores(q_blocks, gather(ka, d), allowed, scale, bias, softcap)
    p = op.Exp(op.Sub(s, _finite_row_max(s)))
    out = op.Reshape(op.MatMul(p, gather(_with_ones(va), dv + 1)), _ints([0, 0, -1, dv + 1]))
    return _normalise(op.Slice(out, _ints([0]), lq, _ints([2])), dv)


def _pooled_block_scores(qa, ka, key_mask, scale: float, block: int, pool: str, d: int):
    """(scores (B, H, nqb, nkb), key block holds a real key (B, 1, 1, nkb)): mirrors ``_pooled_block_scores``."""
    op = _op()
    lq = _dim(qa, 2)
    nqb, _, _, _ = _block_grid(qa, ka, block)
    bs = _ints([block])
    starts = op.Mul(op.Range(_int(0), op.Squeeze(nqb, _ints([0])), _int(1)), bs)
    rows = op.Cast(op.Min(op.Sub(lq, starts), bs), to=1)                          # (nqb,)
    q_sum = op.ReduceSum(op.Reshape(_pad_axis(qa, 2, block), _ints([0, 0, -1, block, d])), _ints([3]), keepdims=0)
    q_mean = op.Div(q_sum, op.Unsqueeze(rows, _ints([1])))                        # (B, H, nqb, D)
    valid = op.Reshape(_pad_axis(_key_valid(ka, key_mask), 1, block, op.Constant(value=_bool_false())),
                       _ints([0, 1, -1, block, 1]))                                # (B, 1, nkb, block, 1)
    kb = op.Reshape(_pad_axis(ka, 2, block), _ints([0, 0, -1, block, d]))        # (B, H, nkb, block, D)
    n_valid = op.ReduceSum(op.Cast(valid, to=1), _ints([3]), keepdims=0)          # (B, 1, nkb, 1)
    zero = _float(0.0)
    k_mean = op.Div(op.ReduceSum(op.Where(valid, kb, zero), _ints([3]), keepdims=0), op.Max(n_valid, _float(1.0)))
    pooled_q, pooled_k = q_mean, k_mean
    if pool == "maxmin":
        empty = op.Equal(n_valid, zero)
        k_max = op.Where(empty, zero, op.ReduceMax(op.Where(valid, kb, _float(-math.inf)), _ints([3]), keepdims=0))
        k_min = op.Where(empty, zero, op.ReduceMin(op.Where(valid, kb, _float(math.inf)), _ints([3]), keepdims=0))
        pooled_k = op.Concat(k_mean, k_max, k_min, axis=3)
        pooled_q = op.Concat(q_mean, q_mean, q_mean, axis=3)
    scores = op.Mul(op.MatMul(pooled_q, op.Transpose(pooled_k, perm=[0, 1, 3, 2])), _float(scale))
    has_key = op.Unsqueeze(op.Greater(op.Squeeze(n_valid, _ints([3])), zero), _ints([2]))   # (B, 1, 1, nkb)
    return scores, has_key


LSH_MAX_BITS = 16   # hyperplane sets are exported for 2^0 .. 2^16 query chunks (Lq up to 65536 x bucket_size)


def _pad_to_length(x, axis: int, length):
    """Pad x with zeros at the end of `axis` to `length` (1-D int64 tensor)."""
    op = _op()
    return op.Pad(x, op.Concat(_ints([0]), op.Sub(length, _dim(x, axis)), axis=0), None, _ints([axis]))


def _sort_by_bucket(buckets, chunk):
    """(order (B, H, L), chunk id of each position (B, H, L)) sorting positions by (bucket, position)."""
    op = _op()
    length = _dim(buckets, 2)
    positions = op.Range(_int(0), op.Squeeze(length, _ints([0])), _int(1))
    key = op.Add(op.Mul(buckets, length), positions)
    _, order = op.TopK(key, length, axis=-1, largest=0, sorted=1)
    rank = op.ScatterElements(op.Mul(order, _ints([0])), order, op.Expand(positions, op.Shape(order)), axis=2)
    return order, op.Div(rank, chunk)


def _previous_and_own(x):
    """(B, H, n, c, *) -> (B, H, n, 2c, *): chunk i-1 (zeros for i = 0), then chunk i."""
    op = _op()
    zeros = op.Mul(op.Slice(x, _ints([0]), _ints([1]), _ints([2])), op.CastLike(_int(0), x))
    before = op.Concat(zeros, op.Slice(x, _ints([0]), _ints([-1]), _ints([2])), axis=2)
    return op.Concat(before, x, axis=3)


# --------------------------------------------------------------------------------------------------------------
# onnxruntime's contrib attention ops (export target "ort"): used only where they compute exactly what the op does;
# each returns None where they would not, and the caller emits the standard translation instead.
# --------------------------------------------------------------------------------------------------------------

ORT_DOMAIN = "com.microsoft"
_MASK_FILTER = -1e30      # MHA adds this to padding keys' scores (its default, -10000, is not -inf for large scores)


def _contrib_op(name: str, inputs: list[tuple[str, str, bool]], outputs: int, attributes: dict[str, str]):
    """An onnxscript op of onnxruntime's com.microsoft domain. The onnx package holds no schemas for that domain and
    the exporter binds arguments through one, so the op's own (ORT's contrib-op documentation) is declared here:
    inputs (name, type, optional), `outputs` outputs of type T, attributes name -> "INT" | "FLOAT"."""
    import onnx
    from onnxscript.values import Op, Opset
    S = onnx.defs.OpSchema
    option = {False: S.FormalParameterOption.Single, True: S.FormalParameterOption.Optional}
    schema = S(name, ORT_DOMAIN, 1,
               inputs=[S.FormalParameter(n, t, param_option=option[opt]) for n, t, opt in inputs],
               outputs=[S.FormalParameter(f"output_{i}", "T") for i in range(outputs)],
               type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
               attributes=[S.Attribute(n, getattr(S.AttrType, t), "", required=False)
                           for n, t in attributes.items()])
    return Op(Opset(ORT_DOMAIN, 1), name, schema)


def _multi_head_attention_op():
    return _contrib_op("MultiHeadAttention",
                       [("query", "T", False), ("key", "T", True), ("value", "T", True), ("bias", "T", True),
                        ("key_padding_mask", "M", True), ("attention_bias", "T", True)], 1,
                       {"num_heads": "INT", "scale": "FLOAT", "mask_filter_value": "FLOAT", "unidirectional": "INT"})


def _group_query_attention_op():
    return _contrib_op("GroupQueryAttention",
                       [("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T", True),
                        ("past_value", "T", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False)],
                       3, {"num_heads": "INT", "kv_num_heads": "INT", "local_window_size": "INT", "scale": "FLOAT"})


def _same_dim(a, b) -> bool:
    """Two dims of the traced values are provably equal (the same static int or the same symbol)."""
    return a is not None and str(a) == str(b)


def _to_bsd(x, width: int):
    """(B, N, L, E) -> (B, L, N*E), the layout of the contrib ops' inputs."""
    op = _op()
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), _ints([0, 0, -1]))


def _from_bsd(y, heads: int, width: int):
    op = _op()
    return op.Transpose(op.Reshape(y, _ints([0, 0, heads, width])), perm=[0, 2, 1, 3])


def _rows_with_key(key_mask, causal: bool):
    """(B, 1, L or 1, 1) bool: the query row sees at least one real key (self-attention, Lq == Lk)."""
    op = _op()
    real = op.Cast(key_mask, to=6)                                                  # int32
    seen = op.CumSum(real, _int(1)) if causal else op.ReduceMax(real, _ints([1]), keepdims=1)
    return op.Unsqueeze(op.Greater(seen, op.CastLike(_int(0), seen)), _ints([1, 3]))


def ort_multi_head_attention(q, k, v, key_mask, causal: bool, scale: float):
    """``com.microsoft.MultiHeadAttention`` for exact softmax attention over the real keys (and, if causal, the keys
    at or before the query, Lq == Lk): q, k, v (B, N, L, E) float32, kv heads expanded to the query heads; rows that
    see no key are 0 as the op's contract says. None where the op would not be exact (float16/64: the -1e30 mask
    filter; Dv != D; causal with Lq and Lk not provably equal: `unidirectional` aligns queries top-left)."""
    heads, d, dv, kv_heads = q.shape[1], q.shape[3], v.shape[3], k.shape[1]
    if dv != d or getattr(q.dtype, "name", str(q.dtype)).upper() != "FLOAT":
        return None
    if causal and not _same_dim(q.shape[2], k.shape[2]):
        return None
    op = _op()
    k, v = _expand_heads(k, kv_heads, heads, d), _expand_heads(v, kv_heads, heads, dv)
    mask = None if key_mask is None else op.Cast(key_mask, to=6)
    out = _multi_head_attention_op()(_to_bsd(q, d), _to_bsd(k, d), _to_bsd(v, dv), None, mask,
                                     num_heads=heads, scale=float(scale), mask_filter_value=_MASK_FILTER,
                                     unidirectional=int(causal))
    out = _from_bsd(out, heads, dv)
    if key_mask is not None:
        out = op.Where(_rows_with_key(key_mask, causal), out, op.CastLike(_float(0.0), out))
    return out


def ort_group_query_attention(q, k, v, key_mask, causal: bool, scale: float, window: int, sinks: int):
    """``com.microsoft.GroupQueryAttention`` with ``local_window_size`` for a causal sliding window of `window` keys
    (the query's own included: key j with i - window < j <= i; local_window_size = window keeps exactly those,
    checked against the dense oracle in tests/test_onnx_ort.py) and no sinks, over a
    whole unpadded self-attention prompt (no past, seqlens_k = L - 1). The op is decoder-oriented: it takes
    right-padding as sequence lengths, not a key mask, so a site with a key mask keeps the standard form."""
    heads, d, dv, kv_heads = q.shape[1], q.shape[3], v.shape[3], k.shape[1]
    if not causal or sinks or key_mask is not None or dv != d or not _same_dim(q.shape[2], k.shape[2]):
        return None
    dtype = getattr(q.dtype, "name", str(q.dtype)).upper()
    if "DOUBLE" in dtype or "BFLOAT" in dtype:
        return None
    op = _op()
    length = _dim(q, 2)                                                              # (1,) int64
    seqlens_k = op.Cast(op.Expand(op.Sub(length, _ints([1])), _dim(q, 0)), to=6)     # (B,) int32: L - 1
    total = op.Cast(op.Squeeze(length, _ints([0])), to=6)
    out = _group_query_attention_op()(_to_bsd(q, d), _to_bsd(k, d), _to_bsd(v, dv), None, None, seqlens_k, total,
                                      num_heads=heads, kv_num_heads=kv_heads, local_window_size=int(window),
                                      scale=float(scale))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return _from_bsd(out, heads, dv)
