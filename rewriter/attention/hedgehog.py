"""Hedgehog: linear attention with learned feature maps fitted to the model's own softmax attention (attention
transfer), optionally as LoLCATs' hybrid with an exact sliding window.

Per head a feature map (Hedgehog, Zhang et al. 2024)

    phi(x) = [softmax(W x + b), softmax(-(W x + b))]       W (F, D), b (F): 2F features

with separate maps for queries (one per query head) and keys (one per kv head, so GQA models share a key map
across the query heads that read the same kv head). Linear attention then weights key j for query i by
phi_q(q_i).phi_k(k_j), normalised over the keys the query may see (``feature_map.linear_attention_core``).

With `window`/`sinks` > 0 it is LoLCATs' hybrid with one shared normaliser: on the support S (the sliding
window band and the first `sinks` keys) the weight is the exact softmax weight exp(scale q_i.k_j - m_i), m_i the
row's largest exact score over S, and elsewhere exp(g_h) phi_q(q_i).phi_k(k_j), g_h a learned per-head gain;
both kinds of weight share the row's normaliser (``feature_map.sparse_plus_lowrank_attention`` with
``support_max_offset``).

The maps are fitted layer by layer with the model frozen (``fit_maps``): the attention pass records each site's
q, k, v on the calibration inputs and calls the method's ``fit`` hook; the fitted tensors become constants of
the program (buffers) and the op's Tensor arguments. Losses: "xent", Hedgehog's cross-entropy between the softmax
attention weights and the learned normalised weights (reported as KL divergence, the same gradient), or "mse",
LoLCATs' stage-1 mean squared error between the attention outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _onnx as ox
from ._contract import (AttentionConfig, AttentionMethod, allowed_mask, check_qkv, empty_output, expand_kv,
                        register_method, window_extents)
from .feature_map import (_acc_dtype, _check_window_sinks, _lowrank_cost, _normalise, linear_attention_core,
                          sparse_plus_lowrank_attention)

LOSSES = ("xent", "mse")
MAP_ARGS = ("q_weight", "q_bias", "k_weight", "k_bias", "window_gain")


# --------------------------------------------------------------------------------------------------------------
# Feature maps and the dense definition
# --------------------------------------------------------------------------------------------------------------

def identity_maps(heads: int, kv_heads: int, head_dim: int, features: int, device=None) -> dict[str, Tensor]:
    """The fit's starting point: W = the (F, D) identity (rows cycle through the D dims when F > D), b = 0,
    g = 0, float32."""
    eye = torch.eye(head_dim, device=device)[torch.arange(features, device=device) % head_dim]
    return {"q_weight": eye.expand(heads, -1, -1).clone(), "q_bias": torch.zeros(heads, features, device=device),
            "k_weight": eye.expand(kv_heads, -1, -1).clone(), "k_bias": torch.zeros(kv_heads, features, device=device),
            "window_gain": torch.zeros(heads, device=device)}


def hedgehog_features(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """phi(x) = [softmax(W x + b), softmax(-(W x + b))] per head: x (B, h, L, D), weight (h, F, D), bias (h, F)
    -> (B, h, L, 2F), in x's dtype."""
    z = torch.einsum("bhld,hfd->bhlf", x, weight.to(x.dtype)) + bias.to(x.dtype)[None, :, None, :]
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


def support_mask(Lq: int, Lk: int, causal: bool, window: int, sinks: int, device) -> Tensor:
    """(Lq, Lk) bool: the pairs on the exact support S (the window band of ``window_extents`` and the first
    `sinks` keys; queries at key positions Lk - Lq ..)."""
    i = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    on = j < sinks
    if window > 0:
        left, right = window_extents(window, causal)
        on = on | ((j >= i - left) & (j <= i + right))
    return on


def hedgehog_weights(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, q_weight: Tensor,
                     q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, window_gain: Tensor, window: int = 0,
                     sinks: int = 0, rows: Optional[Tensor] = None) -> Tensor:
    """The method's normalised attention weights, dense (B, H, Lq, Lk) (or only the query rows `rows`), in q's
    dtype: what the fit trains and what the op computes without building them. Rows that see no key are 0."""
    H = q.shape[1]
    allowed, exact, band = _fixed_parts(q, k, key_mask, causal, scale, window, sinks, rows)
    rows = torch.arange(q.shape[2], device=q.device) if rows is None else rows
    phi_q = hedgehog_features(q[:, :, rows], q_weight, q_bias)
    phi_k = expand_kv(hedgehog_features(k, k_weight, k_bias), H)
    return _combine(phi_q, phi_k, allowed, exact, band, window_gain)


def _fixed_parts(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, window: int, sinks: int,
                 rows: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """What the weights of the query rows `rows` take from the model alone, not from the maps: the pairs allowed
    (causal, padding), the pairs on the exact support S, and there exp(scale q.k - m) with m the row's largest
    score on S (0 for a row with no key on S)."""
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    rows = torch.arange(Lq, device=q.device) if rows is None else rows
    allowed = allowed_mask(Lq, Lk, causal, key_mask, q.device)[:, :, rows]
    if window == 0 and sinks == 0:
        return allowed, None, None
    exact = allowed & support_mask(Lq, Lk, causal, window, sinks, q.device)[rows]
    s = (torch.matmul(q[:, :, rows], expand_kv(k, H).transpose(-1, -2)) * scale).masked_fill(~exact, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return allowed, exact, torch.exp(s - m)


def _combine(phi_q: Tensor, phi_k: Tensor, allowed: Tensor, exact: Optional[Tensor], band: Optional[Tensor],
             window_gain: Tensor) -> Tensor:
    """Normalised weights: the exact weights `band` on S, exp(g_h) phi_q.phi_k elsewhere, 0 where not allowed."""
    w = torch.matmul(phi_q, phi_k.transpose(-1, -2))
    if exact is not None:
        w = torch.where(exact, band, torch.exp(window_gain.to(w.dtype))[None, :, None, None] * w)
    w = w.masked_fill(~allowed, 0.0)
    den = w.sum(dim=-1, keepdim=True)
    return torch.where(den > 0, w / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(w))


# --------------------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------------------

def _check_maps(q: Tensor, k: Tensor, q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor,
                window_gain: Tensor) -> int:
    """F, after checking the maps' shapes against q (B, H, L, D) and k (B, Hkv, L, D)."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    if q_weight.dim() != 3 or q_weight.shape[0] != H or q_weight.shape[2] != D:
        raise ValueError(f"q_weight must be (heads, F, head_dim) = ({H}, F, {D}); got {tuple(q_weight.shape)}")
    Fdim = q_weight.shape[1]
    for name, t, shape in (("q_bias", q_bias, (H, Fdim)), ("k_weight", k_weight, (Hkv, Fdim, D)),
                           ("k_bias", k_bias, (Hkv, Fdim)), ("window_gain", window_gain, (H,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape}; got {tuple(t.shape)}")
    return Fdim


@torch.library.custom_op("rewriter::hedgehog", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, Tensor q_weight, Tensor q_bias, "
    "Tensor k_weight, Tensor k_bias, Tensor window_gain, int window=0, int sinks=0) -> Tensor"))
def hedgehog_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                       q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, window_gain: Tensor,
                       window: int = 0, sinks: int = 0) -> Tensor:
    """Linear attention with learned Hedgehog feature maps; window/sinks > 0: LoLCATs' window + linear hybrid."""
    return hedgehog_reference(q, k, v, key_mask, causal, scale, q_weight, q_bias, k_weight, k_bias, window_gain,
                              window, sinks).contiguous()


def hedgehog_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                       q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, window_gain: Tensor,
                       window: int = 0, sinks: int = 0) -> Tensor:
    """The op's readable PyTorch body (CPU, and CUDA without its kernel); never builds Lq x Lk."""
    check_qkv(q, k, v, key_mask)
    _check_maps(q, k, q_weight, q_bias, k_weight, k_bias, window_gain)
    _check_window_sinks(window, sinks)
    acc = _acc_dtype(q)
    phi_q = hedgehog_features(q.to(acc), q_weight, q_bias)
    phi_k = hedgehog_features(k.to(acc), k_weight, k_bias)
    if window == 0 and sinks == 0:
        num, den = linear_attention_core(phi_q, phi_k, v, causal, key_mask)
        return _normalise(num, den).to(q.dtype)
    return sparse_plus_lowrank_attention(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks,
                                         support_max_offset=window_gain)


@hedgehog_attention.register_fake
def _hedgehog_attention_fake(q, k, v, key_mask, causal, scale, q_weight, q_bias, k_weight, k_bias, window_gain,
                             window=0, sinks=0):
    _check_maps(q, k, q_weight, q_bias, k_weight, k_bias, window_gain)
    _check_window_sinks(window, sinks)
    return empty_output(q, v)


def hedgehog_cost(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4,
                  *, q_weight: Tensor, window: int = 0, sinks: int = 0, **_maps):
    """Counted cost: the (F x D) map, two softmaxes over F per token, then linear attention over 2F features
    plus the exact band (as the fixed-map hybrid)."""
    _check_window_sinks(window, sinks)
    Fdim = q_weight.shape[1]
    per_token = 2 * Fdim * D + 6 * Fdim          # W x, and exp / sum / divide for each of the two softmaxes
    return _lowrank_cost(B, H, Hkv, Lq, Lk, D, Dv, causal, elem_bytes, 2 * Fdim, per_token, window, sinks)


def translate_hedgehog(q, k, v, key_mask=None, causal=False, scale=1.0, q_weight=None, q_bias=None, k_weight=None,
                       k_bias=None, window_gain=None, window=0, sinks=0):
    """ONNX: the maps are initializers; the features are a MatMul and two Softmax per head, then the shared
    linear / hybrid core."""
    op = ox._op()
    qa, ka, va, (heads, d, dv) = ox._heads_fp32(q, k, v)
    kv_heads, f2 = k.shape[1], 2 * q_weight.shape[1]

    def features(x, weight, bias):
        wt = op.Unsqueeze(op.Transpose(ox._acc(weight), perm=[0, 2, 1]), ox._ints([0]))     # (1, h, D, F)
        z = op.Add(op.MatMul(x, wt), op.Unsqueeze(ox._acc(bias), ox._ints([0, 2])))          # (B, h, L, F)
        return op.Concat(op.Softmax(z, axis=-1), op.Softmax(op.Neg(z), axis=-1), axis=3)

    phi_q = features(qa, q_weight, q_bias)
    phi_k = ox._expand_heads(features(ox._acc(k), k_weight, k_bias), kv_heads, heads, f2)
    gain = ox._acc(window_gain) if (window or sinks) else None
    out = ox._lowrank_attention(qa, ka, va, key_mask, causal, scale, phi_q, phi_k, (d, dv, f2), window, sinks,
                                support_max_offset=gain)
    return op.CastLike(out, q)


# --------------------------------------------------------------------------------------------------------------
# Fitting (attention transfer, one site at a time, the model frozen)
# --------------------------------------------------------------------------------------------------------------

def _exact_weights(q: Tensor, k: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                   rows: Tensor) -> Tensor:
    """Softmax attention weights of the query rows `rows` (B, H, len(rows), Lk); rows that see no key: 0."""
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    allowed = allowed_mask(Lq, Lk, causal, key_mask, q.device)[:, :, rows]
    s = (torch.matmul(q[:, :, rows], expand_kv(k, H).transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)


@dataclass
class _Batch:
    """Calibration activations of one site (some samples) at a fixed set of query rows, with everything the
    weights of those rows take from the model alone (the maps are what the fit changes)."""
    q: Tensor               # (N, H, r, D): the queries of the rows
    k: Tensor
    vv: Tensor              # values, expanded to the query heads
    allowed: Tensor
    exact: Optional[Tensor]
    band: Optional[Tensor]
    target: Tensor          # exact softmax weights of the rows
    entropy: Tensor         # their entropy per row (KL = cross-entropy - entropy)
    exact_out: Tensor       # exact attention output of the rows
    real: Tensor            # (N, H, r) bool: rows of real queries (padding queries carry no information)


def _batch(q, k, v, key_mask, causal, scale, window, sinks, rows) -> _Batch:
    H = q.shape[1]
    if key_mask is None or causal or q.shape[2] != k.shape[2]:
        real = torch.ones(q.shape[0], H, rows.numel(), dtype=torch.bool, device=q.device)
    else:
        real = key_mask[:, None, rows].to(torch.bool).expand(-1, H, -1)
    allowed, exact, band = _fixed_parts(q, k, key_mask, causal, scale, window, sinks, rows)
    target = _exact_weights(q, k, key_mask, causal, scale, rows)
    vv = expand_kv(v, H)
    entropy = -(target * torch.log(target.clamp_min(1e-30))).sum(-1)
    return _Batch(q[:, :, rows], k, vv, allowed, exact, band, target, entropy, torch.matmul(target, vv), real)


def _losses(maps: dict, b: _Batch) -> tuple[Tensor, Tensor]:
    """(KL(softmax weights || learned weights) averaged over the real rows, squared attention-output error
    relative to the exact output's square) on the batch's rows."""
    phi_q = hedgehog_features(b.q, maps["q_weight"], maps["q_bias"])
    phi_k = expand_kv(hedgehog_features(b.k, maps["k_weight"], maps["k_bias"]), b.q.shape[1])
    approx = _combine(phi_q, phi_k, b.allowed, b.exact, b.band, maps["window_gain"])
    real = b.real[..., None].to(approx.dtype)
    mse = ((b.exact_out - torch.matmul(approx, b.vv)) * real).pow(2).sum() / (b.exact_out * real).pow(2).sum()
    cross = -(b.target * torch.log(approx.clamp_min(1e-30))).sum(-1)
    kl = ((cross - b.entropy) * b.real).sum() / b.real.sum()
    return kl, mse


def _rows(L: int, n: int, device, generator=None) -> Tensor:
    """n query rows: evenly spaced (generator None), else drawn at random without repetition."""
    if n >= L:
        return torch.arange(L, device=device)
    if generator is None:
        return torch.linspace(0, L - 1, n, device=device).round().long()
    return torch.randperm(L, generator=generator)[:n].sort().values.to(device)


def fit_maps(config: "HedgehogConfig", q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
             scale: float, args: dict, progress: Callable[[str], None] = lambda msg: None
             ) -> tuple[dict[str, Tensor], dict]:
    """The method's fit hook: feature maps for one site, trained with Adam from identity maps on that site's
    calibration activations q (N, H, L, D), k, v (N, Hkv, L, D) with the model frozen. A quarter of the samples
    (at least one, when there are two or more) is held out: the statistics report the KL divergence and the
    attention-output relative error on them before and after the fit, whichever loss trained the maps."""
    window, sinks = int(args.get("window", 0)), int(args.get("sinks", 0))
    t0 = time.perf_counter()
    N, H, L, D = q.shape
    Fdim = config.features or D
    dev = q.device
    q, k, v = q.detach().float(), k.detach().float(), v.detach().float()
    held = max(1, N // 4) if N >= 2 else 0
    train = slice(0, N - held)
    test = slice(N - held, N) if held else slice(0, N)
    km = (lambda s: None if key_mask is None else key_mask[s])
    test_batch = _batch(q[test], k[test], v[test], km(test), causal, scale, window, sinks,
                        _rows(L, config.rows_held_out, dev))
    gen = torch.Generator().manual_seed(config.seed)
    # one fixed set of training rows: their targets are computed once
    train_batch = _batch(q[train], k[train], v[train], km(train), causal, scale, window, sinks,
                         _rows(L, config.rows, dev, gen))

    def evaluate(m):
        with torch.no_grad():
            kl, mse = _losses(m, test_batch)
        return float(kl), float(mse.sqrt())

    maps = {name: t.requires_grad_(True) for name, t in identity_maps(H, k.shape[1], D, Fdim, dev).items()}
    kl0, err0 = evaluate(maps)
    trained = [t for name, t in maps.items() if name != "window_gain" or window or sinks]
    opt = torch.optim.Adam(trained, lr=config.lr)
    with torch.enable_grad():
        for step in range(config.steps):
            kl, mse = _losses(maps, train_batch)
            loss = kl if config.loss == "xent" else mse
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % max(1, config.steps // 4) == 0 or step + 1 == config.steps:
                progress(f"fit step {step + 1}/{config.steps}, {config.loss} loss {loss.item():.4g}")
    kl1, err1 = evaluate(maps)
    info = {"loss": config.loss, "steps": config.steps, "features": 2 * Fdim, "train_samples": N - held,
            "held_out_samples": held, "held_out_kl_before": round(kl0, 5), "held_out_kl": round(kl1, 5),
            "held_out_attention_rel_error_before": round(err0, 5), "held_out_attention_rel_error": round(err1, 5),
            "seconds": round(time.perf_counter() - t0, 2)}
    progress(f"fitted: held-out attention error {err0:.3f} -> {err1:.3f}, KL {kl0:.3f} -> {kl1:.3f} "
             f"({info['seconds']} s)")
    return {name: t.detach() for name, t in maps.items()}, info


# --------------------------------------------------------------------------------------------------------------
# Config and registry entry
# --------------------------------------------------------------------------------------------------------------

@dataclass
class HedgehogConfig(AttentionConfig):
    features: int = field(default=0, metadata={"help": "F: each map is (F x head_dim) and phi has 2F features "
                                                       "(0: the head dim)"})
    window: int = field(default=0, metadata={"help": "LoLCATs hybrid: exact softmax over a window of this many keys"})
    density: float = field(default=0.0, metadata={"help": "hybrid window = density x L (the model's maximum length)"})
    sinks: int = 0
    loss: str = field(default="xent", metadata={"help": "xent (Hedgehog: cross-entropy to the softmax weights) | "
                                                        "mse (LoLCATs: attention outputs)"})
    steps: int = field(default=200, metadata={"help": "Adam steps per site"})
    lr: float = 0.01
    rows: int = field(default=64, metadata={"help": "query rows per calibration sample the fit trains on (the "
                                                    "targets hold rows x sequence length weights per head)"})
    rows_held_out: int = field(default=256, metadata={"help": "query rows per held-out sample in the fit report"})
    seed: int = 0
    lora_rank: int = field(default=0, metadata={
        "help": "LoLCATs: rank of the corrections of the q/k/v/o projections fitted to the site's output after the "
                "maps (merged into the weights; 0: none)"})
    lora_steps: int = field(default=50, metadata={
        "help": "Adam steps refining the correction per site (from the output projection's closed-form one)"})
    lora_lr: float = 0.0005

    def validate(self):
        if self.lora_rank < 0 or self.lora_steps < 0 or not (self.lora_lr > 0):
            raise ValueError("lora_rank >= 0, lora_steps >= 0 and lora_lr > 0")
        if self.features < 0 or self.window < 0 or self.sinks < 0:
            raise ValueError("features, window and sinks must be >= 0")
        self._density_ok("density", self.density)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.steps < 0 or self.rows < 1 or self.rows_held_out < 1 or not (self.lr > 0):
            raise ValueError("steps >= 0, rows >= 1, rows_held_out >= 1 and lr > 0")


def _hedgehog_budget(c: HedgehogConfig, L: int) -> tuple[dict, dict]:
    w = c.window if c.window > 0 else (int(round(c.density * L)) if c.density > 0 else 0)
    return {"window": w, "sinks": c.sinks}, {"window": w, "sinks": c.sinks}


register_method(AttentionMethod(
    name="hedgehog", config=HedgehogConfig, op=torch.ops.rewriter.hedgehog.default,
    budget=_hedgehog_budget, cost=hedgehog_cost, reference=hedgehog_reference, onnx=translate_hedgehog,
    colour="#b07aa1", density_knob="window", fit=fit_maps,
    summary="Hedgehog learned feature maps fitted to the model's attention (linear in length), optionally "
            "LoLCATs' sliding window + learned linear hybrid"))
