"""Low-rank and linear attention: Performer (FAVOR+), kernelised linear attention, and their sparse + low-rank
hybrids (BASED / LoLCATs sliding window, Scatterbrain).

Every method here replaces exp(scale q.k) by a kernel phi(q).phi(k) with phi: R^D -> R^F, so that

    out_i = sum_j w_ij v_j / sum_j w_ij,   w_ij = phi(q_i).phi(k_j)

factorises: the sums over keys become (F x Dv) states and no Lq x Lk matrix is ever built
(``linear_attention_core``). The hybrids compute the softmax weight exactly on a support S (a token band of
`window` keys around each query plus the first `sinks` keys) and phi.phi elsewhere
(``sparse_plus_lowrank_attention``):

    w_ij = exp(scale q_i.k_j)   if j in S
           phi(q_i).phi(k_j)    otherwise

which is also Scatterbrain's unbiased estimator phi.phi + 1[S](exp - phi.phi).

Features carry a log offset so that large exponents never overflow: a feature map returns (phi, log_offset)
with true features phi * exp(log_offset). Query offsets are per row (B, H, Lq); key offsets are one constant
per (batch, kv head) (B, Hkv), because only a constant shared by every key factors out of the key sums.

Op conventions (shapes, GQA, key_mask, causal alignment) are those of ``_contract.py``.
"""
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _onnx as ox
from ._contract import (AttentionConfig, AttentionCost, AttentionMethod, check_qkv, empty_output, exact_attention_cost,
                        register_method, window_extents, window_from)
from .block_sparse import _pad_to, band_layout, num_blocks

FEATURE_MAPS = ("elu", "relu", "taylor2", "performer")
LINEAR_FEATURE_MAPS = ("elu", "relu", "taylor2")
DEFAULT_CHUNK = 64
DEFAULT_BLOCK = 64


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------------------------

def performer_projection(features: int, dim: int, seed: int) -> Tensor:
    """FAVOR+ positive orthogonal random features: W (features, dim) float64 on CPU.

    Stacked blocks of `dim` orthonormal rows (Q of the QR of a Gaussian matrix), each row rescaled by the norm
    of an independent Gaussian vector (chi distribution with `dim` degrees of freedom) so that rows have the
    marginal law of Gaussian rows. Drawn from a CPU generator seeded by `seed`: same seed, same features, on
    every device.
    """
    if features < 1:
        raise ValueError(f"features must be >= 1; got {features}")
    return _cached_projection(features, dim, seed).clone()


@functools.lru_cache(maxsize=64)
def _cached_projection(features: int, dim: int, seed: int) -> Tensor:
    # Drawing W (QRs on the CPU) takes milliseconds, more than a GPU reference call; callers must copy it.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for _ in range(num_blocks(features, dim)):
        gaussian = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        orthogonal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthogonal.T)
    rows = torch.cat(blocks, dim=0)[:features]
    norms = torch.randn(features, dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return rows * norms[:, None]


def _performer_logits(x: Tensor, projection: Tensor, scale: float) -> Tensor:
    """log of the unstabilised FAVOR+ feature times sqrt(m): W x' - |x'|^2 / 2 with x' = x * scale^(1/2)."""
    xs = x * math.sqrt(scale)
    return torch.matmul(xs, projection.T) - 0.5 * (xs * xs).sum(dim=-1, keepdim=True)


def feature_map(name: str, x: Tensor, scale: float, *, role: str = "query", projection: Optional[Tensor] = None,
                key_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """phi(x) for x (B, H, L, D), computed in x's dtype; returns (phi (B, H, L, F), log_offset).

    True features are phi * exp(log_offset); log_offset is (B, H, L) for role="query" and (B, H) for
    role="key" (a constant per head, see the module docstring). How `scale` is folded in:
      elu      phi(x) = elu(x s^1/2) + 1                        (scale split evenly between q and k)
      relu     phi(x) = relu(x s^1/2)                           (so phi(q).phi(k) = s relu(q).relu(k))
      taylor2  phi(x) = [1, x s^1/2, vec(x x^T) s / sqrt(2)]    (phi(q).phi(k) = 1 + s q.k + (s q.k)^2 / 2,
                                                                 the 2nd-order Taylor expansion of exp(s q.k))
      performer  phi(x) = exp(W x' - |x'|^2/2 - c) / sqrt(m),  x' = x s^1/2, W = `projection` (m, D)
                 (E[phi(q).phi(k)] = exp(s q.k) exp(-c_q - c_k)). c for queries is the row max of the exponent
                 (it cancels between num and den); c for keys is one max per (batch, head) over the real keys
                 (`key_mask`), since a per-key constant would reweight keys and bias the estimate. Padding
                 keys get phi = 0 (they are left out of c, so their exp could overflow).
    Only performer has nonzero offsets.
    """
    if role not in ("query", "key"):
        raise ValueError(f"role must be 'query' or 'key'; got {role!r}")
    offset_shape = x.shape[:-1] if role == "query" else x.shape[:2]
    no_offset = x.new_zeros(offset_shape)
    if name == "elu":
        return F.elu(x * math.sqrt(scale)) + 1, no_offset
    if name == "relu":
        return F.relu(x * math.sqrt(scale)), no_offset
    if name == "taylor2":
        xs = x * math.sqrt(scale)
        second = (xs[..., :, None] * xs[..., None, :]).flatten(-2) / math.sqrt(2)
        return torch.cat([torch.ones_like(x[..., :1]), xs, second], dim=-1), no_offset
    if name == "performer":
        if projection is None:
            raise ValueError("the performer feature map needs a projection (performer_projection(features, D, seed))")
        logits = _performer_logits(x, projection.to(x.dtype), scale)
        norm = 1.0 / math.sqrt(projection.shape[0])
        if role == "query":
            offset = logits.amax(dim=-1)
            return torch.exp(logits - offset[..., None]) * norm, offset
        per_key = logits.amax(dim=-1)
        if key_mask is not None:
            per_key = per_key.masked_fill(~key_mask[:, None, :].to(torch.bool), float("-inf"))
        offset = per_key.amax(dim=-1)
        offset = torch.where(torch.isfinite(offset), offset, torch.zeros_like(offset))
        phi = torch.exp(logits - offset[..., None, None]) * norm
        if key_mask is not None:
            phi = torch.where(key_mask[:, None, :, None].to(torch.bool), phi, torch.zeros_like(phi))
        return phi, offset
    raise ValueError(f"unknown feature map {name!r}; allowed: {', '.join(FEATURE_MAPS)}")


def feature_dim(name: str, head_dim: int, features: int = 0) -> int:
    """F, the number of features phi produces for head dim D."""
    if name in ("elu", "relu"):
        return head_dim
    if name == "taylor2":
        return 1 + head_dim + head_dim * head_dim
    if name == "performer":
        return features
    raise ValueError(f"unknown feature map {name!r}; allowed: {', '.join(FEATURE_MAPS)}")


# --------------------------------------------------------------------------------------------------------------
# Cores
# --------------------------------------------------------------------------------------------------------------

def linear_attention_core(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, key_mask: Optional[Tensor] = None,
                          chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """num (B, H, Lq, Dv) and den (B, H, Lq) of linear attention, in fp32 (fp64 for fp64 phi_q).

    num_i = sum over allowed j of (phi_q_i . phi_k_j) v_j; den_i the same without v. phi_q (B, H, Lq, F),
    phi_k (B, Hkv, Lk, F), v (B, Hkv, Lk, Dv); query head h reads kv head h // (H // Hkv). Padding zeroes phi_k
    at masked keys. Never builds Lq x Lk:
      bidirectional: state = phi_k^T [v, 1] (F x (Dv+1)), then phi_q @ state;
      causal (bottom-right aligned): keys before the first query position form the initial state; the rest is
      split into chunks of `chunk` positions: masked (chunk x chunk) products inside each chunk, plus the running
      state of all earlier chunks (Lightning Attention-2), accumulated in fp32.
    """
    B, H, Lq, Fdim = phi_q.shape
    Hkv, Lk, Dv = phi_k.shape[1], phi_k.shape[2], v.shape[-1]
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    acc = _acc_dtype(phi_q)
    group = H // Hkv
    pq = phi_q.to(acc).reshape(B, Hkv, group, Lq, Fdim)
    pk = phi_k.to(acc)
    if key_mask is not None:
        pk = torch.where(key_mask[:, None, :, None].to(torch.bool), pk, torch.zeros_like(pk))
    # A ones column turns the value sums into (num, den) in one product.
    va = torch.cat([v.to(acc), torch.ones_like(v[..., :1], dtype=acc)], dim=-1)

    if not causal:
        state = torch.matmul(pk.transpose(-1, -2), va)                          # (B, Hkv, F, Dv+1)
        out = torch.matmul(pq, state[:, :, None])                                # (B, Hkv, G, Lq, Dv+1)
    else:
        offset = Lk - Lq
        state = torch.matmul(pk[:, :, :offset].transpose(-1, -2), va[:, :, :offset])
        pk, va = pk[:, :, offset:], va[:, :, offset:]
        n = num_blocks(Lq, chunk)
        qc = _pad_to(pq, 3, n * chunk).view(B, Hkv, group, n, chunk, Fdim)
        kc = _pad_to(pk, 2, n * chunk).view(B, Hkv, n, chunk, Fdim)
        vc = _pad_to(va, 2, n * chunk).view(B, Hkv, n, chunk, Dv + 1)
        lower = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).tril()
        scores = torch.matmul(qc, kc[:, :, None].transpose(-1, -2)) * lower       # (B, Hkv, G, n, C, C)
        intra = torch.matmul(scores, vc[:, :, None])                             # (B, Hkv, G, n, C, Dv+1)
        inter = []
        for c in range(n):
            inter.append(torch.matmul(qc[:, :, :, c], state[:, :, None]))
            state = state + torch.matmul(kc[:, :, c].transpose(-1, -2), vc[:, :, c])
        out = (intra + torch.stack(inter, dim=3)).reshape(B, Hkv, group, n * chunk, Dv + 1)[:, :, :, :Lq]
    out = out.reshape(B, H, Lq, Dv + 1)
    return out[..., :Dv], out[..., Dv]


def _support_mask(kv_index: Tensor, slot_valid: Tensor, Lq: int, Lk: int, causal: bool, window: int, sinks: int,
                  block: int, key_mask: Optional[Tensor]) -> Tensor:
    """Token-level predicate on the gathered blocks, (B or 1, nqb, block, K * block) bool: the pair is in S,
    allowed by causal and padding, and its slot is real."""
    dev = kv_index.device
    nqb, K = kv_index.shape
    k_pos = (kv_index[:, :, None] * block + torch.arange(block, device=dev)).reshape(nqb, K * block)
    q_pos = (torch.arange(nqb * block, device=dev) + (Lk - Lq)).view(nqb, block)
    kp, qp = k_pos[:, None, :], q_pos[:, :, None]
    in_support = kp < sinks
    if window > 0:
        left, right = window_extents(window, causal)
        in_support = in_support | ((kp >= qp - left) & (kp <= qp + right))
    in_support = in_support & slot_valid.repeat_interleave(block, dim=1)[:, None, :] & (kp < Lk)
    if causal:
        in_support = in_support & (kp <= qp)
    in_support = in_support[None]
    if key_mask is not None:
        nkb = num_blocks(Lk, block)
        real = _pad_to(key_mask.to(torch.bool), 1, nkb * block, False).view(key_mask.shape[0], nkb, block)
        in_support = in_support & real[:, kv_index].reshape(key_mask.shape[0], nqb, 1, K * block)
    return in_support


def sparse_plus_lowrank_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
    phi_q: Tensor, phi_k: Tensor, window: int, sinks: int = 0,
    log_phi_q: Optional[Tensor] = None, log_phi_k: Optional[Tensor] = None,
    block: int = DEFAULT_BLOCK, chunk: int = DEFAULT_CHUNK, support_max_offset: Optional[Tensor] = None,
) -> Tensor:
    """Attention with weight exp(scale q.k) on the support S and phi(q).phi(k) off it; (B, H, Lq, Dv) in q's dtype.

    S = the token band of ``window_extents(window, causal)`` (none when window == 0) plus the first `sinks`
    keys, restricted by causal and padding. True features are phi_q * exp(log_phi_q[..., None]) (log_phi_q
    (B, H, Lq)) and phi_k * exp(log_phi_k) (log_phi_k (B, Hkv), one constant per head); None means 0.

    Computed as the low-rank num/den over every allowed key (``linear_attention_core``) plus a correction
    (exp - phi.phi) over S, gathered by key blocks of `block` tokens. Both terms share one row stabiliser
    r_i = max(log_phi_q_i + log_phi_k, max over S of scale q_i.k_j), so no exponent is positive. Rows with
    den <= 0 (no key seen, or a non-positive feature map) give 0.

    support_max_offset (H,) (learned maps, LoLCATs' hybrid): the true query features are instead
    phi_q * exp(m_i + g_h), with m_i the row's largest exact score over S (0 for a row with no key in S): the
    linear weights are measured against the row's largest softmax weight, scaled per head by exp(g_h)
    (log_phi_q and log_phi_k must then be None).
    """
    B, H, Hkv, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv = v.shape[-1]
    acc = _acc_dtype(q)
    group = H // Hkv
    dev = q.device
    if log_phi_q is None:
        log_phi_q = torch.zeros(B, H, Lq, dtype=acc, device=dev)
    if log_phi_k is None:
        log_phi_k = torch.zeros(B, Hkv, dtype=acc, device=dev)
    num, den = linear_attention_core(phi_q, phi_k, v, causal, key_mask, chunk)
    lowrank = torch.cat([num, den[..., None]], dim=-1).reshape(B, Hkv, group, Lq, Dv + 1)
    row_log = log_phi_q.to(acc).reshape(B, Hkv, group, Lq) + log_phi_k.to(acc)[:, :, None, None]
    if window == 0 and sinks == 0:
        out = lowrank
    else:
        nqb, nkb = num_blocks(Lq, block), num_blocks(Lk, block)
        left, right = window_extents(window, causal) if window > 0 else (None, None)
        kv_index, kv_count = band_layout(Lq, Lk, block, left, right, sinks, causal, dev)
        kv_index, kv_count = kv_index[0, 0].long(), kv_count[0, 0]
        K = kv_index.shape[1]
        slot_valid = torch.arange(K, device=dev) < kv_count[:, None]
        Fdim = phi_q.shape[-1]

        def key_blocks(x: Tensor) -> Tensor:
            # (B, Hkv, Lk, E) -> the visited blocks of each query block: (B, Hkv, nqb, K * block, E)
            xb = _pad_to(x, 2, nkb * block).view(B, Hkv, nkb, block, x.shape[-1])
            return xb[:, :, kv_index].reshape(B, Hkv, nqb, K * block, x.shape[-1])

        va = torch.cat([v.to(acc), torch.ones_like(v[..., :1], dtype=acc)], dim=-1)
        kg, pkg, vg = key_blocks(k.to(acc)), key_blocks(phi_k.to(acc)), key_blocks(va)

        in_support = _support_mask(kv_index, slot_valid, Lq, Lk, causal, window, sinks, block, key_mask)
        in_support = in_support[:, None, None]                                   # (., 1, 1, nqb, block, K*block)

        qb = _pad_to(q.to(acc), 2, nqb * block).view(B, Hkv, group, nqb, block, D)
        pqb = _pad_to(phi_q.to(acc), 2, nqb * block).view(B, Hkv, group, nqb, block, Fdim)
        rowb = _pad_to(row_log, 3, nqb * block).view(B, Hkv, group, nqb, block)
        scores = torch.matmul(qb, kg[:, :, None].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~in_support, float("-inf"))
        support_max = scores.amax(dim=-1)
        if support_max_offset is not None:
            finite = torch.where(torch.isfinite(support_max), support_max, torch.zeros_like(support_max))
            rowb = finite + support_max_offset.to(acc).view(1, Hkv, group, 1, 1)
        stabiliser = torch.maximum(rowb, support_max)
        lowrank_weight = torch.exp(rowb - stabiliser)                             # (B, Hkv, G, nqb, block)
        phi_dot = torch.matmul(pqb, pkg[:, :, None].transpose(-1, -2))
        correction = torch.exp(scores - stabiliser[..., None]) - lowrank_weight[..., None] * phi_dot
        correction = torch.where(in_support, correction, torch.zeros_like(correction))
        corrected = torch.matmul(correction, vg[:, :, None]).reshape(B, Hkv, group, nqb * block, Dv + 1)[..., :Lq, :]
        scale_lowrank = lowrank_weight.reshape(B, Hkv, group, nqb * block)[..., :Lq, None]
        out = scale_lowrank * lowrank + corrected
    out = out.reshape(B, H, Lq, Dv + 1)
    return _normalise(out[..., :Dv], out[..., Dv]).to(q.dtype)


def _normalise(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (rows that saw no key); the CUDA implementations use it too."""
    positive = den > 0
    safe = torch.where(positive, den, torch.ones_like(den))
    return torch.where(positive[..., None], num / safe[..., None], torch.zeros_like(num))


# --------------------------------------------------------------------------------------------------------------
# Ops (explicit schemas: budgets are plain ints, not SymInts)
# --------------------------------------------------------------------------------------------------------------

def _check_features(features: int) -> None:
    if features < 1:
        raise ValueError(f"features must be >= 1; got {features}")


def _check_window_sinks(window: int, sinks: int) -> None:
    if window < 0:
        raise ValueError(f"window must be >= 0 tokens (0 = no exact band); got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0 tokens; got {sinks}")


def _check_linear_budget(feature_map_name: str, window: int, sinks: int) -> None:
    if feature_map_name not in LINEAR_FEATURE_MAPS:
        raise ValueError(f"unknown feature map {feature_map_name!r} for linear_attention; allowed: "
                         f"{', '.join(LINEAR_FEATURE_MAPS)} (use performer_attention for random features)")
    _check_window_sinks(window, sinks)


def _check_scatterbrain_budget(features: int, window: int, sinks: int) -> None:
    _check_features(features)
    if window < 1:
        raise ValueError(f"scatterbrain window must be >= 1 token; got {window}")
    _check_window_sinks(window, sinks)


def _performer_features(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float, features: int, seed: int):
    acc = _acc_dtype(q)
    # .to(copy=True): the cached tensor itself never leaves this module.
    projection = _cached_projection(features, q.shape[-1], seed).to(device=q.device, dtype=acc, copy=True)
    phi_q, log_q = feature_map("performer", q.to(acc), scale, role="query", projection=projection)
    phi_k, log_k = feature_map("performer", k.to(acc), scale, role="key", projection=projection, key_mask=key_mask)
    return phi_q, phi_k, log_q, log_k


def _fixed_features(name: str, q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # Outside the op body: its `feature_map` argument (the schema's name) shadows the function there.
    acc = _acc_dtype(q)
    return feature_map(name, q.to(acc), scale, role="query")[0], feature_map(name, k.to(acc), scale, role="key")[0]


@torch.library.custom_op("rewriter::performer", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, int features, int seed=0) -> Tensor"))
def performer_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                        features: int, seed: int = 0) -> Tensor:
    """Performer (FAVOR+): linear attention with `features` positive orthogonal random features (seeded)."""
    return performer_reference(q, k, v, key_mask, causal, scale, features, seed).contiguous()


def performer_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                        features: int, seed: int = 0) -> Tensor:
    """The op's readable PyTorch body (CPU, and CUDA without its kernel)."""
    check_qkv(q, k, v, key_mask)
    _check_features(features)
    phi_q, phi_k, _, _ = _performer_features(q, k, key_mask, scale, features, seed)
    num, den = linear_attention_core(phi_q, phi_k, v, causal, key_mask)        # offsets cancel in num / den
    return _normalise(num, den).to(q.dtype)


@performer_attention.register_fake
def _performer_attention_fake(q, k, v, key_mask, causal, scale, features, seed=0):
    _check_features(features)
    return empty_output(q, v)


@torch.library.custom_op("rewriter::linear", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, str feature_map, int window=0, "
    "int sinks=0) -> Tensor"))
def linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                     feature_map: str, window: int = 0, sinks: int = 0) -> Tensor:
    """Linear attention with a fixed feature map (elu, relu, taylor2); window/sinks > 0 make it the training-free
    BASED / LoLCATs hybrid: exact softmax weights on the window band and sinks, phi.phi elsewhere."""
    return linear_reference(q, k, v, key_mask, causal, scale, feature_map, window, sinks).contiguous()


def linear_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                     feature_map: str, window: int = 0, sinks: int = 0) -> Tensor:
    """The op's readable PyTorch body (CPU, and CUDA without its kernel)."""
    check_qkv(q, k, v, key_mask)
    _check_linear_budget(feature_map, window, sinks)
    phi_q, phi_k = _fixed_features(feature_map, q, k, scale)
    if window == 0 and sinks == 0:
        num, den = linear_attention_core(phi_q, phi_k, v, causal, key_mask)
        return _normalise(num, den).to(q.dtype)
    return sparse_plus_lowrank_attention(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks)


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, key_mask, causal, scale, feature_map, window=0, sinks=0):
    _check_linear_budget(feature_map, window, sinks)
    return empty_output(q, v)


@torch.library.custom_op("rewriter::scatterbrain", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, int features, int window, "
    "int sinks=0, int seed=0) -> Tensor"))
def scatterbrain_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                           features: int, window: int, sinks: int = 0, seed: int = 0) -> Tensor:
    """Scatterbrain: exact softmax weights on the window band and sinks, Performer features elsewhere."""
    return scatterbrain_reference(q, k, v, key_mask, causal, scale, features, window, sinks, seed).contiguous()


def scatterbrain_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                           features: int, window: int, sinks: int = 0, seed: int = 0) -> Tensor:
    """The op's readable PyTorch body (CPU, and CUDA without its kernel)."""
    check_qkv(q, k, v, key_mask)
    _check_scatterbrain_budget(features, window, sinks)
    phi_q, phi_k, log_q, log_k = _performer_features(q, k, key_mask, scale, features, seed)
    return sparse_plus_lowrank_attention(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks,
                                         log_phi_q=log_q, log_phi_k=log_k)


@scatterbrain_attention.register_fake
def _scatterbrain_attention_fake(q, k, v, key_mask, causal, scale, features, window, sinks=0, seed=0):
    _check_scatterbrain_budget(features, window, sinks)
    return empty_output(q, v)


# --------------------------------------------------------------------------------------------------------------
# Costs (counted, not timed; compared with exact attention on the same shape)
# --------------------------------------------------------------------------------------------------------------

def support_entries(Lq: int, Lk: int, causal: bool, window: int, sinks: int) -> int:
    """Per (batch, head): how many (query, key) pairs lie in the support S (band + sinks, causal, no padding)."""
    if window == 0 and sinks == 0:
        return 0
    left, right = window_extents(window, causal) if window > 0 else (0, -1)
    offset = Lk - Lq
    total = 0
    for i in range(Lq):
        p = i + offset
        hi_visible = min(Lk - 1, p) if causal else Lk - 1
        lo, hi = max(0, p - left), min(hi_visible, p + right)
        band = max(0, hi - lo + 1) if window > 0 else 0
        sink_hi = min(sinks, hi_visible + 1) - 1
        overlap = max(0, min(sink_hi, hi) - lo + 1) if band else 0
        total += band + (sink_hi + 1) - overlap
    return total


def _lowrank_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int,
                  feature_count: int, feature_flops_per_token: int, window: int, sinks: int) -> AttentionCost:
    Fd, E = feature_count, Dv + 1                                   # E: values plus the ones column (den)
    flops = float(feature_flops_per_token * B * (H * Lq + Hkv * Lk))
    flops += 2.0 * B * Hkv * Lk * Fd * E + 2.0 * B * H * Lq * Fd * E  # state build + readout
    largest = max(B * H * Lq * Fd, B * Hkv * Fd * E)
    if causal:
        padded = num_blocks(Lq, DEFAULT_CHUNK) * DEFAULT_CHUNK
        flops += 2.0 * B * H * padded * DEFAULT_CHUNK * (Fd + E)    # masked intra-chunk products
        largest = max(largest, B * H * padded * DEFAULT_CHUNK)
    entries = float(B * H * support_entries(Lq, Lk, causal, window, sinks))
    if entries:
        flops += 2.0 * entries * (D + Fd + E)                       # q.k, phi.phi and the correction times v
        slots = min(num_blocks(sinks, DEFAULT_BLOCK), num_blocks(Lk, DEFAULT_BLOCK))
        if window > 0:
            left, right = window_extents(window, causal)
            slots += min(num_blocks(Lk, DEFAULT_BLOCK), (DEFAULT_BLOCK + left + right - 2) // DEFAULT_BLOCK + 2)
        padded = num_blocks(Lq, DEFAULT_BLOCK) * DEFAULT_BLOCK
        largest = max(largest, B * H * padded * slots * DEFAULT_BLOCK)
    dense = exact_attention_cost(B, H, Lq, Lk, D, Dv, causal, elem_bytes)
    return AttentionCost(entries, dense.dense_score_entries, flops, dense.dense_flops,
                         float(largest * elem_bytes), dense.dense_memory_bytes)


def performer_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4,
                   *, features: int, seed: int = 0) -> AttentionCost:
    """Cost of performer_attention: the (m x D) projection and exp per token, then O(L m Dv) products."""
    _check_features(features)
    return _lowrank_cost(B, H, Hkv, Lq, Lk, D, Dv, causal, elem_bytes, features, 2 * features * (D + 1), 0, 0)


def linear_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4,
                *, feature_map: str, window: int = 0, sinks: int = 0) -> AttentionCost:
    """Cost of linear_attention: elementwise (elu, relu) or outer-product (taylor2) features, plus the band."""
    _check_linear_budget(feature_map, window, sinks)
    per_token = D * D + D if feature_map == "taylor2" else D
    return _lowrank_cost(B, H, Hkv, Lq, Lk, D, Dv, causal, elem_bytes, feature_dim(feature_map, D), per_token,
                         window, sinks)


def scatterbrain_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool,
                      elem_bytes: int = 4, *, features: int, window: int, sinks: int = 0,
                      seed: int = 0) -> AttentionCost:
    """Cost of scatterbrain_attention: performer's cost plus the exact band and its correction."""
    _check_scatterbrain_budget(features, window, sinks)
    return _lowrank_cost(B, H, Hkv, Lq, Lk, D, Dv, causal, elem_bytes, features, 2 * features * (D + 1),
                         window, sinks)


# --------------------------------------------------------------------------------------------------------------
# ONNX translations (onnxscript, opset 18; helpers in _onnx.py)
# --------------------------------------------------------------------------------------------------------------

def translate_linear_attention(q, k, v, key_mask=None, causal=False, scale=1.0, feature_map="elu", window=0, sinks=0):
    qa, ka, va, (_, d, dv) = ox._heads_fp32(q, k, v)
    phi_q, phi_k = ox._fixed_feature_map(feature_map, qa, scale, d), ox._fixed_feature_map(feature_map, ka, scale, d)
    dims = (d, dv, feature_dim(feature_map, d))
    return ox._op().CastLike(ox._lowrank_attention(qa, ka, va, key_mask, causal, scale, phi_q, phi_k, dims, window, sinks), q)


def translate_performer_attention(q, k, v, key_mask=None, causal=False, scale=1.0, features=1, seed=0):
    qa, ka, va, (_, d, dv) = ox._heads_fp32(q, k, v)
    phi_q, phi_k, _, _ = ox._performer_features(qa, ka, key_mask, scale, performer_projection(features, d, seed))   # offsets cancel
    out = ox._lowrank_attention(qa, ka, va, key_mask, causal, scale, phi_q, phi_k, (d, dv, features), 0, 0)
    return ox._op().CastLike(out, q)


def translate_scatterbrain_attention(q, k, v, key_mask=None, causal=False, scale=1.0, features=1, window=1, sinks=0,
                                     seed=0):
    qa, ka, va, (_, d, dv) = ox._heads_fp32(q, k, v)
    phi_q, phi_k, log_q, log_k = ox._performer_features(qa, ka, key_mask, scale, performer_projection(features, d, seed))
    out = ox._lowrank_attention(qa, ka, va, key_mask, causal, scale, phi_q, phi_k, (d, dv, features), window, sinks,
                             log_q, log_k)
    return ox._op().CastLike(out, q)


# --------------------------------------------------------------------------------------------------------------
# Configs and registry entries
# --------------------------------------------------------------------------------------------------------------

@dataclass
class PerformerConfig(AttentionConfig):
    features: int = field(default=64, metadata={"help": "random features m; overridden by density"})
    density: float = field(default=0.0, metadata={"help": "features = density x L: m features cost about m / L of "
                                                          "exact attention (0: features as given)"})
    seed: int = 0

    def validate(self):
        if self.features < 1:
            raise ValueError(f"features must be >= 1; got {self.features}")
        self._density_ok("density", self.density)


def _performer_budget(c: PerformerConfig, L: int) -> tuple[dict, dict]:
    features = max(1, int(round(c.density * L))) if c.density > 0 else c.features
    return {"features": features, "seed": c.seed}, {"features": features}


register_method(AttentionMethod(
    name="performer", config=PerformerConfig, op=torch.ops.rewriter.performer.default,
    budget=_performer_budget, cost=performer_cost, reference=performer_reference,
    onnx=translate_performer_attention, colour="#f28e2b", density_knob="features",
    summary="Performer FAVOR+ positive orthogonal random features (linear in length)",
    candidates=({"features": 32}, {"features": 128})))


@dataclass
class LinearConfig(AttentionConfig):
    feature_map: str = field(default="elu", metadata={"help": "elu | relu | taylor2"})
    window: int = field(default=0, metadata={"help": "hybrid: exact softmax over a window of this many keys"})
    density: float = field(default=0.0, metadata={"help": "hybrid window = density x L (the model's maximum length)"})
    sinks: int = 0

    def validate(self):
        if self.feature_map not in LINEAR_FEATURE_MAPS:
            raise ValueError(f"feature_map must be elu, relu or taylor2; got {self.feature_map!r}")
        if self.window < 0 or self.sinks < 0:
            raise ValueError("window and sinks must be >= 0")
        self._density_ok("density", self.density)


def _linear_budget(c: LinearConfig, L: int) -> tuple[dict, dict]:
    w = c.window if c.window > 0 else (int(round(c.density * L)) if c.density > 0 else 0)
    return ({"feature_map": c.feature_map, "window": w, "sinks": c.sinks},
            {"feature_map": c.feature_map, "window": w, "sinks": c.sinks})


register_method(AttentionMethod(
    name="linear", config=LinearConfig, op=torch.ops.rewriter.linear.default,
    budget=_linear_budget, cost=linear_cost, reference=linear_reference, onnx=translate_linear_attention,
    colour="#e15759", density_knob="window",
    summary="kernel linear attention (elu+1, relu, Taylor-2), optionally hybrid with a sliding window (BASED/LoLCATs)",
    candidates=({"feature_map": "elu"}, {"feature_map": "elu", "density": 0.1, "sinks": 4})))


@dataclass
class ScatterbrainConfig(AttentionConfig):
    features: int = field(default=32, metadata={"help": "random features m of the low-rank part"})
    density: float = field(default=0.1, metadata={"help": "sparse part: window = density x L (the model's maximum length)"})
    window: int = field(default=0, metadata={"help": "sparse part window in tokens (overrides density)"})
    sinks: int = 0
    seed: int = 0

    def validate(self):
        if self.features < 1 or self.window < 0 or self.sinks < 0:
            raise ValueError("features >= 1, window >= 0, sinks >= 0")
        self._density_ok("density", self.density, allow_zero=self.window > 0)


def _scatterbrain_budget(c: ScatterbrainConfig, L: int) -> tuple[dict, dict]:
    w = window_from(c.window, c.density, L)
    return ({"features": c.features, "window": w, "sinks": c.sinks, "seed": c.seed},
            {"features": c.features, "window": w, "sinks": c.sinks})


register_method(AttentionMethod(
    name="scatterbrain", config=ScatterbrainConfig, op=torch.ops.rewriter.scatterbrain.default,
    budget=_scatterbrain_budget, cost=scatterbrain_cost, reference=scatterbrain_reference,
    onnx=translate_scatterbrain_attention, colour="#76b7b2", density_knob="window",
    summary="Scatterbrain: sliding-window sparse + Performer low-rank, combined unbiasedly",
    candidates=({"density": 0.05, "features": 32}, {"density": 0.1, "features": 32},
                {"density": 0.25, "features": 64})))
