"""ONNX backend: dynamo export of a captured program, onnxscript translations of the `rewriter::*` ops in
standard ONNX ops (opset 18, so onnxruntime's CPU provider runs the file with no custom-op library), and
validation against PyTorch in onnxruntime.

Translations are traced Python functions: tensor arguments arrive as symbolic ONNX values (static dims are
ints, batch/sequence are symbols) and the op's scalar arguments (causal, scale, window, ...) as Python values,
so each call emits only the branch its arguments select. None of them builds an Lq x Lk tensor:
  * linear / performer attention: phi_q (phi_k^T [v, 1]) bidirectionally; causal by chunks of CHUNK tokens
    (masked CHUNK x CHUNK products inside a chunk, an exclusive CumSum of per-chunk states across chunks);
  * window attention and the exact band of the hybrids (linear with window/sinks, scatterbrain): key blocks
    of `block` tokens gathered per query block (the same layout as ``lowrank_attention._support_layout``), so
    scores are (L/block) x block x (K block) with K fixed by the window;
  * block-topk, strided: a block layout chosen in the graph (TopK of pooled block scores; a static function of
    the lengths and head), then the same gathered key blocks, K = the most blocks any query block keeps;
  * LSH: per round, (L/bucket) sorted query chunks x two sorted key chunks.
A translation that cannot avoid L x L registers with quadratic=True and the export report says so.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..errors import RewriterError

CHUNK = 64                 # causal linear attention: tokens per chunk (intra-chunk products are CHUNK x CHUNK)
EXTERNAL_DATA_BYTES = 1_800_000_000   # below protobuf's 2 GiB limit, with room for the graph itself
PROVIDER = "CPUExecutionProvider"


class OnnxValidationError(RewriterError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class Translation:
    fn: Callable
    quadratic: bool = False    # True when the ONNX form holds an Lq x Lk tensor


TRANSLATIONS: dict[str, Translation] = {}


def onnx_translation(op_name: str, *, quadratic: bool = False):
    """Register `fn` as the ONNX translation of the custom op `op_name` ("namespace::name")."""
    if "::" not in op_name:
        raise ValueError(f"op_name must be 'namespace::name'; got {op_name!r}")

    def register(fn: Callable) -> Callable:
        TRANSLATIONS[op_name] = Translation(fn, quadratic)
        return fn
    return register


# --------------------------------------------------------------------------------------------------------------
# Small ONNX helpers (the `op` namespace is onnxscript's opset 18)
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Feature maps (mirror ``lowrank_attention.feature_map``)
# --------------------------------------------------------------------------------------------------------------

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


def _performer_features(q, k, key_mask, scale: float, features: int, seed: int, d: int):
    """(phi_q, phi_k, log_q (B, H, Lq), log_k (B, H, 1)) with the same offsets as the reference."""
    import onnx_ir as ir
    from ..attention.feature_map import performer_projection
    op = _op()
    w_t = performer_projection(features, d, seed).T.contiguous().to(torch.float32).numpy()
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


# --------------------------------------------------------------------------------------------------------------
# Linear attention core: [num, den] (B, H, Lq, Dv+1) without Lq x Lk
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Block-gathered support: the window band + sinks (mirrors ``_support_layout`` / ``_support_mask``)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class _Support:
    allowed: object      # (B or 1, 1, nqb, block, K*block) bool: pair in S, causal, padding, real slot
    gather: Callable     # (x (B, H, Lk, E), E) -> (B, H, nqb, K*block, E)
    blocks: Callable     # (x (B, H, Lq, E), E) -> (B, H, nqb, block, E)
    rows: Callable       # (y (B, H, nqb, block, E), E) -> (B, H, Lq, E)


def _support(q, k, key_mask, causal: bool, window: int, sinks: int, block: int) -> _Support:
    from ..attention._contract import window_extents
    op = _op()
    lq, lk = _dim(q, 2), _dim(k, 2)
    offset = op.Sub(lk, lq)
    bs = _ints([block])
    nqb = op.Div(op.Add(lq, _ints([block - 1])), bs)
    nkb = op.Div(op.Add(lk, _ints([block - 1])), bs)
    last_block = op.Sub(nkb, _ints([1]))
    qb = op.Unsqueeze(op.Range(_int(0), op.Squeeze(nqb, _ints([0])), _int(1)), _ints([1]))  # (nqb, 1)
    sink_blocks = (sinks + block - 1) // block
    index, valid = [], []
    if sink_blocks:
        slots = _ints(range(sink_blocks))
        index.append(op.Expand(op.Min(slots, last_block), op.Concat(nqb, _ints([sink_blocks]), axis=0)))
        valid.append(op.Expand(op.Less(slots, nkb), op.Concat(nqb, _ints([sink_blocks]), axis=0)))
    left = right = 0
    if window > 0:
        left, right = window_extents(window, causal)
        start = op.Mul(qb, bs)
        first_pos = op.Max(op.Sub(op.Add(start, offset), _ints([left])), _ints([0]))
        last_q = op.Min(op.Add(start, _ints([block - 1])), op.Sub(lq, _ints([1])))
        last_pos = op.Min(op.Add(op.Add(last_q, offset), _ints([right])), op.Sub(lk, _ints([1])))
        span = (block + left + right - 2) // block + 2
        band = op.Add(op.Div(first_pos, bs), _ints(range(span)))                   # (nqb, span)
        index.append(op.Min(band, last_block))
        valid.append(op.And(op.LessOrEqual(band, op.Div(last_pos, bs)),
                            op.GreaterOrEqual(band, _ints([sink_blocks]))))
    kv_index = op.Concat(*index, axis=1)                                           # (nqb, K)
    slot_valid = op.Concat(*valid, axis=1)
    # token positions; keys of unused slots get a position no predicate accepts
    k_pos = op.Add(op.Mul(op.Unsqueeze(kv_index, _ints([2])), bs), _ints(range(block)))   # (nqb, K, block)
    k_pos = op.Where(op.Unsqueeze(slot_valid, _ints([2])), k_pos, _ints([2**60]))
    k_pos = op.Unsqueeze(op.Reshape(k_pos, _ints([0, -1])), _ints([1]))            # (nqb, 1, K*block)
    q_pos = op.Add(op.Range(_int(0), op.Squeeze(op.Mul(nqb, bs), _ints([0])), _int(1)), offset)
    q_pos = op.Unsqueeze(op.Reshape(q_pos, _ints([-1, block])), _ints([2]))         # (nqb, block, 1)
    allowed = op.Less(k_pos, _ints([sinks]))
    if window > 0:
        band_ok = op.And(op.GreaterOrEqual(k_pos, op.Sub(q_pos, _ints([left]))),
                         op.LessOrEqual(k_pos, op.Add(q_pos, _ints([right]))))
        allowed = op.Or(allowed, band_ok)
    allowed = op.And(allowed, op.Less(k_pos, lk))
    if causal:
        allowed = op.And(allowed, op.LessOrEqual(k_pos, q_pos))
    allowed = op.Unsqueeze(allowed, _ints([0, 1]))                                 # (1, 1, nqb, block, K*block)
    if key_mask is not None:
        real = op.Reshape(_pad_axis(key_mask, 1, block, op.Constant(value=_bool_false())), _ints([0, -1, block]))
        real = op.Reshape(op.Gather(real, kv_index, axis=1), _ints([0, 0, 1, -1]))   # (B, nqb, 1, K*block)
        allowed = op.And(allowed, op.Unsqueeze(real, _ints([1])))

    def gather(x, e: int):
        xb = op.Reshape(_pad_axis(x, 2, block), _ints([0, 0, -1, block, e]))
        return op.Reshape(op.Gather(xb, kv_index, axis=2), _ints([0, 0, 0, -1, e]))

    def blocks(x, e: int):
        return op.Reshape(_pad_axis(x, 2, block), _ints([0, 0, -1, block, e]))

    def rows(y, e: int):
        flat = op.Reshape(y, _ints([0, 0, -1, e]))
        return op.Slice(flat, _ints([0]), lq, _ints([2]))

    return _Support(allowed, gather, blocks, rows)


def _bool_false():
    import onnx_ir as ir
    import numpy as np
    return ir.tensor(np.array(False))


def _masked_scores(q_blocks, k_gathered, allowed, scale: float):
    op = _op()
    s = op.Mul(op.MatMul(q_blocks, op.Transpose(k_gathered, perm=[0, 1, 2, 4, 3])), _float(scale))
    return op.Where(allowed, s, _float(-math.inf))


def _finite_row_max(s):
    op = _op()
    m = op.ReduceMax(s, _ints([-1]), keepdims=1)
    return op.Where(op.IsInf(m), _float(0.0), m)


def _acc(x):
    return _op().Cast(x, to=1)   # FLOAT: every translation accumulates in fp32, as the references do


# --------------------------------------------------------------------------------------------------------------
# Translations
# --------------------------------------------------------------------------------------------------------------

def _heads_fp32(q, k, v):
    """q, k, v in fp32 with kv heads expanded to the query heads; (q, k, v, (H, D, Dv))."""
    heads, d, dv = q.shape[1], q.shape[3], v.shape[3]
    kv_heads = k.shape[1]
    return (_acc(q), _expand_heads(_acc(k), kv_heads, heads, d), _expand_heads(_acc(v), kv_heads, heads, dv),
            (heads, d, dv))


def translate_window_attention(q, k, v, key_mask=None, causal=False, scale=1.0, window=1, sinks=0, block=64):
    """Exact softmax over the band of ``window_extents(window, causal)`` plus the first `sinks` keys."""
    op = _op()
    qa, ka, va, (_, d, dv) = _heads_fp32(q, k, v)
    sup = _support(qa, ka, key_mask, causal, window, sinks, block)
    s = _masked_scores(sup.blocks(qa, d), sup.gather(ka, d), sup.allowed, scale)
    p = op.Exp(op.Sub(s, _finite_row_max(s)))                    # exp(-inf) = 0 off the support
    out = op.MatMul(p, sup.gather(_with_ones(va), dv + 1))
    return op.CastLike(_normalise(sup.rows(out, dv + 1), dv), q)


onnx_translation("rewriter::window_attention")(translate_window_attention)


@onnx_translation("rewriter::exact_attention", quadratic=True)
def translate_exact_attention(q, k, v, key_mask=None, causal=False, scale=1.0):
    """Dense softmax attention over the real keys (and, if causal, positions <= the query's); rows with no key: 0."""
    op = _op()
    qa, ka, va, (_, d, dv) = _heads_fp32(q, k, v)
    s = op.Mul(op.MatMul(qa, op.Transpose(ka, perm=[0, 1, 3, 2])), _float(scale))     # (B, H, Lq, Lk)
    allowed = None
    if causal:
        lq, lk = _dim(qa, 2), _dim(ka, 2)
        q_pos = op.Add(op.Range(_int(0), op.Squeeze(lq, _ints([0])), _int(1)), op.Sub(lk, lq))
        k_pos = op.Range(_int(0), op.Squeeze(lk, _ints([0])), _int(1))
        allowed = op.LessOrEqual(op.Unsqueeze(k_pos, _ints([0])), op.Unsqueeze(q_pos, _ints([1])))   # (Lq, Lk)
    if key_mask is not None:
        real = op.Unsqueeze(key_mask, _ints([1, 2]))                                      # (B, 1, 1, Lk)
        allowed = real if allowed is None else op.And(allowed, real)
    if allowed is not None:
        s = op.Where(allowed, s, _float(-math.inf))
    p = op.Exp(op.Sub(s, _finite_row_max(s)))
    return op.CastLike(_normalise(op.MatMul(p, _with_ones(va)), dv), q)


def _lowrank_attention(q, k, v, key_mask, causal, scale, phi_q, phi_k, dims, window, sinks, log_q=None, log_k=None,
                       block=64):
    """Mirror of ``sparse_plus_lowrank_attention`` on (B, H, ...) fp32 tensors; window == sinks == 0 is plain
    linear attention. dims = (D, Dv, F)."""
    op = _op()
    d, dv, f = dims
    va = _with_ones(v)
    lowrank = _linear_core(phi_q, _masked_keys(phi_k, key_mask), _masked_keys(va, key_mask), causal, f, dv + 1)
    if window == 0 and sinks == 0:
        return _normalise(lowrank, dv)
    sup = _support(q, k, key_mask, causal, window, sinks, block)
    s = _masked_scores(sup.blocks(q, d), sup.gather(k, d), sup.allowed, scale)
    row_max = op.ReduceMax(s, _ints([-1]), keepdims=1)                             # (B, H, nqb, block, 1)
    if log_q is None:   # fixed feature maps carry no offset
        rowb = op.Mul(row_max, _float(0.0))
        rowb = op.Where(op.IsNaN(rowb), _float(0.0), rowb)
    else:
        rowb = sup.blocks(op.Unsqueeze(op.Add(log_q, log_k), _ints([3])), 1)
    stabiliser = op.Max(rowb, row_max)
    lowrank_weight = op.Exp(op.Sub(rowb, stabiliser))                              # (B, H, nqb, block, 1)
    phi_dot = op.MatMul(sup.blocks(phi_q, f), op.Transpose(sup.gather(phi_k, f), perm=[0, 1, 2, 4, 3]))
    correction = op.Sub(op.Exp(op.Sub(s, stabiliser)), op.Mul(lowrank_weight, phi_dot))
    correction = op.Where(sup.allowed, correction, _float(0.0))
    corrected = sup.rows(op.MatMul(correction, sup.gather(va, dv + 1)), dv + 1)
    out = op.Add(op.Mul(sup.rows(lowrank_weight, 1), lowrank), corrected)
    return _normalise(out, dv)


@onnx_translation("rewriter::linear_attention")
def translate_linear_attention(q, k, v, key_mask=None, causal=False, scale=1.0, feature_map="elu", window=0, sinks=0):
    from ..attention.feature_map import feature_dim
    qa, ka, va, (_, d, dv) = _heads_fp32(q, k, v)
    phi_q, phi_k = _fixed_feature_map(feature_map, qa, scale, d), _fixed_feature_map(feature_map, ka, scale, d)
    dims = (d, dv, feature_dim(feature_map, d))
    return _op().CastLike(_lowrank_attention(qa, ka, va, key_mask, causal, scale, phi_q, phi_k, dims, window, sinks), q)


@onnx_translation("rewriter::performer_attention")
def translate_performer_attention(q, k, v, key_mask=None, causal=False, scale=1.0, features=1, seed=0):
    qa, ka, va, (_, d, dv) = _heads_fp32(q, k, v)
    phi_q, phi_k, _, _ = _performer_features(qa, ka, key_mask, scale, features, seed, d)   # offsets cancel
    out = _lowrank_attention(qa, ka, va, key_mask, causal, scale, phi_q, phi_k, (d, dv, features), 0, 0)
    return _op().CastLike(out, q)


@onnx_translation("rewriter::scatterbrain_attention")
def translate_scatterbrain_attention(q, k, v, key_mask=None, causal=False, scale=1.0, features=1, window=1, sinks=0,
                                     seed=0):
    qa, ka, va, (_, d, dv) = _heads_fp32(q, k, v)
    phi_q, phi_k, log_q, log_k = _performer_features(qa, ka, key_mask, scale, features, seed, d)
    out = _lowrank_attention(qa, ka, va, key_mask, causal, scale, phi_q, phi_k, (d, dv, features), window, sinks,
                             log_q, log_k)
    return _op().CastLike(out, q)


# --------------------------------------------------------------------------------------------------------------
# Block layouts chosen in the graph (block-topk, strided): kv_index (B, H, nqb, K) + slot_valid, then the gathered
# key blocks only, as ``block_sparse_attention_reference`` does (K grows with the density, never with L x L)
# --------------------------------------------------------------------------------------------------------------

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
                              d: int, dv: int):
    """Exact softmax over the chosen key blocks (kv_index (B', H', nqb, K), broadcast to (B, H, ..)) with the
    token-level predicate (padding, causal, real key); qa/ka/va (B, H, L, *) fp32. Returns (B, H, Lq, Dv) fp32."""
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
    if causal:
        nqb = op.Div(op.Add(lq, _ints([block - 1])), bs)
        q_pos = op.Add(op.Range(_int(0), op.Squeeze(op.Mul(nqb, bs), _ints([0])), _int(1)), op.Sub(lk, lq))
        q_pos = op.Unsqueeze(op.Reshape(q_pos, _ints([-1, block])), _ints([2]))     # (nqb, block, 1)
        allowed = op.And(allowed, op.LessOrEqual(op.Unsqueeze(k_pos, _ints([3])), q_pos))
    q_blocks = op.Reshape(_pad_axis(qa, 2, block), _ints([0, 0, -1, block, d]))
    s = _masked_scores(q_blocks, gather(ka, d), allowed, scale)
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


@onnx_translation("rewriter::block_topk_attention")
def translate_block_topk_attention(q, k, v, key_mask=None, causal=False, scale=1.0, density=1.0, block=64,
                                   pool="mean", sink_blocks=1, local_blocks=1):
    """Pooled block scores, TopK per query block of max(ceil(density x n_eligible), n_forced) blocks (forced ones
    ranked +inf, ineligible ones -inf, as ``block_topk_layout``), then the gathered blocks. Blocks whose pooled
    scores tie may be chosen differently from torch.sort (TopK breaks ties its own way)."""
    op = _op()
    qa, ka, va, (_, d, dv) = _heads_fp32(q, k, v)
    scores, has_key = _pooled_block_scores(qa, ka, key_mask, scale, block, pool, d)
    eligible, forced = _base_blocks(qa, ka, block, causal, local_blocks, sink_blocks)
    eligible, forced = op.And(eligible, has_key), op.And(forced, has_key)        # (B, 1, nqb, nkb)
    n_eligible = op.ReduceSum(op.Cast(eligible, to=11), _ints([-1]), keepdims=0)  # float64, as the reference
    n_forced = op.ReduceSum(op.Cast(forced, to=7), _ints([-1]), keepdims=0)
    # the slack keeps ceil exact where density x n is an integer that floats land just above (as the reference)
    keep = op.Cast(op.Ceil(op.Sub(op.Mul(n_eligible, _double(density)), _double(1e-9))), to=7)
    keep = op.Max(keep, n_forced)                                                 # (B, 1, nqb)
    ranked = op.Where(forced, _float(math.inf), op.Where(eligible, scores, _float(-math.inf)))
    kv_index, slot_valid = _top_blocks(ranked, op.Expand(keep, op.Shape(ranked, start=0, end=3)))
    out = _gathered_block_attention(qa, ka, va, key_mask, causal, scale, kv_index, slot_valid, block, d, dv)
    return op.CastLike(out, q)


@onnx_translation("rewriter::strided_attention")
def translate_strided_attention(q, k, v, key_mask=None, causal=False, scale=1.0, stride=1, local_blocks=1,
                                sink_blocks=1, block=64):
    """Head h keeps key blocks kb with (kb + h) % stride == 0 plus local and sink blocks (causal-eligible only):
    the layout of ``strided_layout``, built from the lengths, then the gathered blocks."""
    op = _op()
    qa, ka, va, (heads, d, dv) = _heads_fp32(q, k, v)
    eligible, forced = _base_blocks(qa, ka, block, causal, local_blocks, sink_blocks)   # (nqb, nkb)
    _, nkb, _, _ = _block_grid(qa, ka, block)
    kb = op.Range(_int(0), op.Squeeze(nkb, _ints([0])), _int(1))
    head = op.Unsqueeze(_ints(range(heads)), _ints([1]))                          # (H, 1)
    strided = op.Equal(op.Mod(op.Add(op.Unsqueeze(kb, _ints([0])), head), _ints([stride])), _ints([0]))
    chosen = op.Or(op.And(op.Unsqueeze(strided, _ints([1])), eligible), forced)   # (H, nqb, nkb)
    count = op.ReduceSum(op.Cast(chosen, to=7), _ints([-1]), keepdims=0)
    kv_index, slot_valid = _top_blocks(op.Cast(chosen, to=1), count)
    out = _gathered_block_attention(qa, ka, va, key_mask, causal, scale, op.Unsqueeze(kv_index, _ints([0])),
                                    op.Unsqueeze(slot_valid, _ints([0])), block, d, dv)
    return op.CastLike(out, q)


# --------------------------------------------------------------------------------------------------------------
# LSH (mirrors ``_lsh_attention``): per round, sort q and k by (bucket, position), attend sorted query chunk i to
# sorted key chunks i-1 and i, count each pair once across rounds, merge rounds by log-sum-exp, fall back to the
# local blocks where no round saw a key
# --------------------------------------------------------------------------------------------------------------

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


@onnx_translation("rewriter::lsh_attention")
def translate_lsh_attention(q, k, v, key_mask=None, causal=False, scale=1.0, n_hashes=1, bucket_size=64, seed=0):
    """The hyperplanes of every possible bit count (``lsh_hyperplanes``, zero-padded to LSH_MAX_BITS columns)
    are one initializer; the graph picks the set for ceil(log2(n_chunks)) bits. Sorting is TopK on the unique
    key bucket x L + position. Dot products within float rounding of 0 may hash differently from PyTorch."""
    import onnx_ir as ir
    import numpy as np
    from ..attention.sparse import lsh_hyperplanes
    op = _op()
    qa, ka, va, (_, d, dv) = _heads_fp32(q, k, v)
    lq, lk = _dim(qa, 2), _dim(ka, 2)
    n_chunks = op.Div(op.Add(lq, _ints([bucket_size - 1])), _ints([bucket_size]))
    key_chunk = op.Div(op.Add(lk, op.Sub(n_chunks, _ints([1]))), n_chunks)
    bits = op.ReduceSum(op.Cast(op.Less(_ints([2**b for b in range(LSH_MAX_BITS)]), n_chunks), to=7), keepdims=0)
    planes = np.zeros((LSH_MAX_BITS + 1, n_hashes, d, LSH_MAX_BITS), dtype=np.float32)
    for b in range(LSH_MAX_BITS + 1):
        planes[b, :, :, :b] = lsh_hyperplanes(n_hashes, d, b, seed).to(torch.float32).numpy()
    planes = op.Gather(op.Constant(value=ir.tensor(planes, name="lsh_hyperplanes")), bits, axis=0)   # (R, D, bits)
    weights = _ints([2**b for b in range(LSH_MAX_BITS)])
    padding_bucket = op.Gather(_ints([2**b for b in range(LSH_MAX_BITS + 1)]), bits, axis=0)
    k_valid = _key_valid(ka, key_mask)                                            # (B, Lk)
    k_valid_h = op.Expand(op.Unsqueeze(k_valid, _ints([1])), op.Shape(ka, start=0, end=3))   # (B, H, Lk)

    def buckets(x, r):
        signs = op.Cast(op.Greater(op.MatMul(x, op.Gather(planes, _int(r), axis=0)), _float(0.0)), to=7)
        return op.ReduceSum(op.Mul(signs, weights), _ints([-1]), keepdims=0)     # (B, H, L)

    rounds = []
    for r in range(n_hashes):
        bk = op.Where(k_valid_h, buckets(ka, r), padding_bucket)                  # padding keys sort last
        rounds.append(_sort_by_bucket(buckets(qa, r), _ints([bucket_size])) + _sort_by_bucket(bk, key_chunk))

    q_len, k_len = op.Mul(n_chunks, _ints([bucket_size])), op.Mul(n_chunks, key_chunk)

    def chunked(x, e: int):
        """(B, H, n x c, e) -> (B, H, n, c, e)."""
        return op.Reshape(x, op.Concat(_ints([0, 0]), n_chunks, _ints([-1, e]), axis=0))

    va1 = _with_ones(va)
    offset = op.Sub(lk, lq)
    outs, lses = [], []
    for q_order, _, k_order, _ in rounds:
        qs = chunked(_pad_to_length(op.GatherND(qa, op.Unsqueeze(q_order, _ints([3])), batch_dims=2), 2, q_len), d)
        q_pos = chunked(_pad_to_length(op.Unsqueeze(q_order, _ints([3])), 2, q_len), 1)          # (B, H, n, qc, 1)
        k_index = op.Unsqueeze(k_order, _ints([3]))
        ks = _previous_and_own(chunked(_pad_to_length(op.GatherND(ka, k_index, batch_dims=2), 2, k_len), d))
        vs = _previous_and_own(chunked(_pad_to_length(op.GatherND(va1, k_index, batch_dims=2), 2, k_len), dv + 1))
        k_pos = _previous_and_own(chunked(_pad_to_length(k_index, 2, k_len), 1))                  # (B, H, n, 2kc, 1)
        k_pos = op.Squeeze(k_pos, _ints([4]))
        slot = op.Less(op.Range(_int(0), op.Squeeze(k_len, _ints([0])), _int(1)), lk)
        slot = op.Cast(_previous_and_own(chunked(op.Cast(op.Unsqueeze(slot, _ints([0, 1])), to=7), 1)), to=9)
        flat_k_pos = op.Reshape(k_pos, _ints([0, 0, -1]))
        ok = op.And(op.Squeeze(slot, _ints([4])), op.Reshape(op.GatherElements(k_valid_h, flat_k_pos, axis=2),
                                                             op.Shape(k_pos)))
        ok = op.Unsqueeze(ok, _ints([3]))                                         # (B, H, n, 1, 2kc)
        kp = op.Unsqueeze(k_pos, _ints([3]))
        if causal:
            ok = op.And(ok, op.LessOrEqual(kp, op.Add(q_pos, offset)))
        flat_q_pos = op.Reshape(q_pos, _ints([0, 0, -1]))
        seen = None
        for _, q_chunk, _, k_chunk in rounds:
            qch = op.Reshape(op.GatherElements(q_chunk, flat_q_pos, axis=2), op.Shape(q_pos))
            kch = op.Reshape(op.GatherElements(k_chunk, flat_k_pos, axis=2), op.Shape(kp))
            hit = op.Cast(op.Or(op.Equal(kch, qch), op.Equal(kch, op.Sub(qch, _ints([1])))), to=1)
            seen = hit if seen is None else op.Add(seen, hit)
        s = op.Mul(op.MatMul(qs, op.Transpose(ks, perm=[0, 1, 2, 4, 3])), _float(scale))
        s = op.Where(ok, op.Sub(s, op.Log(op.Max(seen, _float(1.0)))), _float(-math.inf))
        m = _finite_row_max(s)
        acc = op.MatMul(op.Exp(op.Sub(s, m)), vs)                                 # (B, H, n, qc, Dv + 1)
        acc = op.Slice(op.Reshape(acc, _ints([0, 0, -1, dv + 1])), _ints([0]), lq, _ints([2]))
        m = op.Slice(op.Reshape(m, _ints([0, 0, -1, 1])), _ints([0]), lq, _ints([2]))
        rank = op.Unsqueeze(op.ScatterElements(op.Mul(q_order, _ints([0])), q_order,
                                               op.Expand(op.Range(_int(0), op.Squeeze(lq, _ints([0])), _int(1)),
                                                         op.Shape(q_order)), axis=2), _ints([3]))
        acc = op.GatherND(acc, rank, batch_dims=2)                               # back to positions
        m = op.GatherND(m, rank, batch_dims=2)
        den = op.Slice(acc, _ints([dv]), _ints([dv + 1]), _ints([-1]))
        outs.append(op.Div(op.Slice(acc, _ints([0]), _ints([dv]), _ints([-1])), op.Max(den, _float(1.1754944e-38))))
        lses.append(op.Unsqueeze(op.Add(m, op.Log(den)), _ints([0])))            # (1, B, H, Lq, 1); -inf: no key
    lse_all = op.Concat(*lses, axis=0)
    top = op.ReduceMax(lse_all, _ints([0]), keepdims=1)
    top = op.Where(op.IsInf(top), _float(0.0), top)
    total = op.Add(top, op.Log(op.ReduceSum(op.Exp(op.Sub(lse_all, top)), _ints([0]), keepdims=1)))
    saw_key = op.Not(op.IsInf(total))
    weights_r = op.Where(saw_key, op.Exp(op.Sub(lse_all, op.Where(saw_key, total, _float(0.0)))), _float(0.0))
    out = op.ReduceSum(op.Mul(weights_r, op.Concat(*[op.Unsqueeze(o, _ints([0])) for o in outs], axis=0)),
                       _ints([0]), keepdims=0)
    _, forced = _base_blocks(qa, ka, bucket_size, causal, 1, 0)
    count = op.ReduceSum(op.Cast(forced, to=7), _ints([-1]), keepdims=0)
    kv_index, slot_valid = _top_blocks(op.Cast(forced, to=1), count)
    local = _gathered_block_attention(qa, ka, va, key_mask, causal, scale, op.Unsqueeze(kv_index, _ints([0, 1])),
                                      op.Unsqueeze(slot_valid, _ints([0, 1])), bucket_size, d, dv)
    return op.CastLike(op.Where(op.Squeeze(saw_key, _ints([0])), out, local), q)


@onnx_translation("rewriter::binary_linear")
def translate_binary_linear(x, packed, alpha, mu, bias=None, in_features=1):
    """Signs unpacked with BitShift + BitwiseAnd on uint8 (bit j of byte k is column 8k + j)."""
    import onnx_ir as ir
    import numpy as np
    op = _op()
    shifts = op.Constant(value=ir.tensor(np.arange(8, dtype=np.uint8)))
    bits = op.BitwiseAnd(op.BitShift(op.Unsqueeze(packed, _ints([2])), shifts, direction="RIGHT"),
                         op.Constant(value=ir.tensor(np.array(1, dtype=np.uint8))))
    bits = op.Slice(op.Reshape(bits, _ints([0, -1])), _ints([0]), _ints([in_features]), _ints([1]))
    signs = op.Sub(op.Mul(op.Cast(bits, to=1), _float(2.0)), _float(1.0))          # (out, in) +-1
    xa = _acc(x)
    y = op.Add(op.Mul(op.MatMul(xa, op.Transpose(signs, perm=[1, 0])), _acc(alpha)),
               op.Mul(op.ReduceSum(xa, _ints([-1]), keepdims=1), _acc(mu)))
    if bias is not None:
        y = op.Add(y, _acc(bias))
    return op.CastLike(y, x)


def translation_table(ep: torch.export.ExportedProgram) -> tuple[dict, list[str]]:
    """The custom_translation_table for `ep` and the custom ops it uses; a custom op without a translation is
    an error that names it."""
    table, used, missing = {}, [], []
    for node in ep.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        namespace = target.namespace
        if namespace in ("aten", "prims", "_assert", "higher_order"):
            continue
        name = f"{namespace}::{target._opname}"
        if name in TRANSLATIONS:
            table[target] = TRANSLATIONS[name].fn
            if name not in used:
                used.append(name)
        elif name.split("::")[0] in {n.split("::")[0] for n in TRANSLATIONS} and name not in missing:
            missing.append(name)
    if missing:
        raise RewriterError(f"no ONNX translation for {', '.join(missing)}",
                            f"ops with one: {', '.join(sorted(TRANSLATIONS))}")
    return table, used


# --------------------------------------------------------------------------------------------------------------
# Export, validation
# --------------------------------------------------------------------------------------------------------------

def _state_bytes(ep: torch.export.ExportedProgram) -> int:
    tensors = list(ep.state_dict.values()) + [t for t in ep.constants.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _rename_dims(model, input_names: list[str], dim_names: dict[str, dict[int, str]]) -> None:
    """Give the symbolic dims the Program's names (batch, seq) everywhere in the graph."""
    import onnx_ir as ir
    inputs = {v.name: v for v in model.graph.inputs}
    rename = {}
    for name, dims in dim_names.items():
        value = inputs.get(name)
        if value is None or value.shape is None:
            continue
        for axis, label in dims.items():
            sym = value.shape[axis]
            if isinstance(sym, ir.SymbolicDim) and sym.value is not None:
                rename[sym.value] = label
    if not rename:
        return
    values = list(model.graph.inputs) + [o for node in model.graph.all_nodes() for o in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(rename.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d
                for d in value.shape]
        value.shape = ir.Shape(dims)


def _check_target(path: Path) -> Path:
    path = Path(path)
    if path.suffix != ".onnx":
        raise RewriterError(f"ONNX output {path} must end in .onnx")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RewriterError(f"cannot write {path}: folder {parent} does not exist", "create it first")
    if path.exists() and path.is_dir():
        raise RewriterError(f"cannot write {path}: it is a folder")
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.probe-")
        probe.close()
    except OSError as e:
        raise RewriterError(f"cannot write to {parent}: {e.strerror}", "choose a writable folder") from None
    return path


def export_onnx(ep: torch.export.ExportedProgram, path: str | Path, *, input_names: list[str],
                output_names: list[str], dim_names: dict[str, dict[int, str]] | None = None, opset: int = 18,
                external_data: bool | None = None,
                validate: Callable[[Path], dict] | None = None) -> tuple[Path, dict]:
    """Export `ep` (dynamic dims stay symbolic, named by `dim_names`: input -> {axis: name}) to `path`.

    Weights go to `<name>.data` beside the file when `external_data` is True, or when None and they exceed
    ~1.8 GB. The file is written into a temp folder beside `path` and moved into place only after
    `validate(temp_path)` returned (its dict is returned with the path); on any failure nothing is left.
    """
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (BitwiseAnd, Pad axes); got {opset}")
    path = _check_target(path)
    table, used = translation_table(ep)
    if external_data is None:
        external_data = _state_bytes(ep) > EXTERNAL_DATA_BYTES
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        try:
            program = torch.onnx.export(ep, (), dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), opset_version=opset,
                                        custom_translation_table=table, optimize=True, verbose=False)
        except torch.onnx.errors.OnnxExporterError as e:
            cause = next((ln for ln in str(e).splitlines() if "Error" in ln and "<class" in ln), str(e).splitlines()[0])
            raise RewriterError(f"torch.onnx could not convert the program: {cause.strip()}") from e
        if dim_names:
            _rename_dims(program.model, list(input_names), dim_names)
        staged = tmp / path.name
        program.save(str(staged), external_data=external_data)
        info = dict(validate(staged)) if validate is not None else {}
        info.update({"opset": opset, "external_data": bool(external_data), "custom_ops": used,
                     "quadratic_ops": [n for n in used if TRANSLATIONS[n].quadratic]})
        info["quadratic"] = bool(info["quadratic_ops"])
        data = tmp / f"{path.name}.data"
        if data.exists():
            data.replace(path.parent / data.name)
        staged.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, info


def validate_onnx(path: str | Path, reference_fn: Callable[..., tuple[Tensor, ...]], inputs: dict[str, Tensor], *,
                  atol: float = 1e-4, rtol: float = 0.0, token_mask: Tensor | None = None) -> dict:
    """Run `path` in onnxruntime (CPU) on `inputs` and compare each output with `reference_fn(**inputs)`.

    token_mask (B, L) bool, optional: outputs whose leading dims are (B, L) are compared only at True
    positions (padding tokens: a query that sees no key is 0 in ONNX and undefined in eager SDPA).
    Raises OnnxValidationError naming the first output beyond atol + rtol * |reference|.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=[PROVIDER])
    feed_names = [i.name for i in session.get_inputs()]
    missing = [n for n in feed_names if n not in inputs]
    if missing:
        raise ValueError(f"inputs lack {missing}; the ONNX file takes {feed_names}")
    got = session.run(None, {n: inputs[n].detach().cpu().numpy() for n in feed_names})
    with torch.no_grad():
        ref = reference_fn(**inputs)
    ref = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
    names = [o.name for o in session.get_outputs()]
    if len(ref) != len(got):
        raise OnnxValidationError(f"ONNX gives {len(got)} outputs, PyTorch {len(ref)}")
    result = {"provider": PROVIDER, "atol": atol, "rtol": rtol,
              "input_shapes": {n: list(inputs[n].shape) for n in feed_names}, "outputs": {}}
    failure = None
    for name, g, r in zip(names, got, ref):
        g = torch.from_numpy(g).to(torch.float64)
        r = r.detach().cpu().to(torch.float64)
        if tuple(g.shape) != tuple(r.shape):
            raise OnnxValidationError(f"output {name}: ONNX shape {tuple(g.shape)} != PyTorch {tuple(r.shape)}")
        diff, bound = (g - r).abs(), atol + rtol * r.abs()
        if token_mask is not None and r.dim() >= 2 and tuple(r.shape[:2]) == tuple(token_mask.shape):
            keep = token_mask.to(torch.bool)
            diff, bound = diff[keep], bound.expand_as(r)[keep]
        worst = float(diff.max()) if diff.numel() else 0.0
        finite = bool(torch.isfinite(diff).all())
        result["outputs"][name] = {"shape": list(r.shape), "max_abs_diff": worst}
        if failure is None and (not finite or bool((diff > bound).any())):
            failure = f"output {name}: max abs diff {worst:.3g} exceeds atol {atol:g}" + (f" + rtol {rtol:g}" if rtol else "")
    result["passed"] = failure is None
    if failure:
        raise OnnxValidationError(f"ONNX validation failed at input shapes {result['input_shapes']}: {failure}")
    return result


def _resized(x: Tensor, axis: int, size: int) -> Tensor:
    """x with `size` entries along `axis`, repeating its own entries (keeps dtype and value ranges)."""
    index = torch.arange(size) % x.shape[axis]
    return x.index_select(axis, index)


def shape_variants(program) -> list[dict[str, Tensor]]:
    """Inputs at two shapes other than the example's: one more batch row and a longer sequence, then batch 1
    and a shorter one (sequence lengths odd; bounds respected; vision inputs change batch only)."""
    example = program.example_inputs
    sizes = {}
    for name, dims in program.dynamic_dims.items():
        for axis, label in dims.items():
            sizes[label] = example[name].shape[axis]
    variants, seen = [], [sizes]
    for db, ds in ((1, 5), (None, -5)):
        target = {}
        if "batch" in sizes:
            lo, hi = program.dim_bounds["batch"]
            target["batch"] = min(hi, sizes["batch"] + db) if db else max(lo, 1)
        if "seq" in sizes:
            lo, hi = program.dim_bounds["seq"]
            target["seq"] = min(hi, max(lo, sizes["seq"] + ds))
        if target in seen:
            continue
        seen.append(target)
        inputs = {}
        for name in program.input_names:
            x = example[name]
            for axis, label in program.dynamic_dims.get(name, {}).items():
                x = _resized(x, axis, target[label])
            inputs[name] = x
        variants.append(inputs)
    return variants


def export_program(program, path: str | Path, *, atol: float = 1e-4, opset: int = 18,
                   external_data: bool | None = None) -> dict:
    """Export a Program to ONNX, validated in onnxruntime on its example inputs and two other shapes."""
    checks = [dict(program.example_inputs)] + shape_variants(program)

    def validate(staged: Path) -> dict:
        runs = []
        for inputs in checks:
            mask = inputs.get("attention_mask")
            runs.append(validate_onnx(staged, program.run, inputs, atol=atol,
                                      token_mask=None if mask is None else mask != 0))
        return {"provider": PROVIDER, "atol": atol, "rtol": 0.0, "passed": True,
                "max_abs_diff": max(o["max_abs_diff"] for r in runs for o in r["outputs"].values()),
                "checks": runs, "compared": "real tokens only (attention_mask != 0)"
                if "attention_mask" in program.input_names else "every element"}

    path, info = export_onnx(program.ep, path, input_names=program.input_names, output_names=program.output_names,
                             dim_names=program.dynamic_dims, opset=opset, external_data=external_data,
                             validate=validate)
    info["path"] = str(path)
    return info
