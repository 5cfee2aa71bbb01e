"""Conventions shared by every attention op in ``rewriter.attention``.

Every attention approximation is a ``torch.library.custom_op`` named ``rewriter::<method>`` (the pass name, ``-`` -> ``_``) with
the leading arguments

    q        (B, H,   Lq, D)   queries
    k        (B, Hkv, Lk, D)   keys; H % Hkv == 0 (GQA: query head h reads kv head h // (H // Hkv))
    v        (B, Hkv, Lk, Dv)  values
    key_mask (B, Lk) bool or None: True where the key is a real token (padding is False)
    causal   bool: query i sees key j only when j <= i + (Lk - Lq) (aligned bottom-right)
    scale    float: softmax scale (HF passes 1/sqrt(D) unless the model says otherwise)

followed by the method's own budget arguments, and returns (B, H, Lq, Dv) in q's dtype. A query row that
sees no key at all returns zeros (never NaN).
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PassConfig


def check_qkv(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return (B, H, Hkv, Lq, Lk, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != Lk or Dk != D:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[0] != B or key_mask.shape[1] != Lk):
        raise ValueError(f"key_mask must be (B, Lk) = ({B}, {Lk}); got {tuple(key_mask.shape)}")
    return B, H, Hkv, Lq, Lk, D


def use_reference() -> bool:
    """REWRITER_ATTENTION_REFERENCE=1 forces the PyTorch reference implementations of the attention ops."""
    return os.environ.get("REWRITER_ATTENTION_REFERENCE") == "1"


def pad_contiguous(x: Tensor, pad, value: float = 0.0) -> Tensor:
    """F.pad of x made contiguous first. Every body views its padded tensors as blocks; a traced pad of a symbolic
    amount is a fresh contiguous tensor, but where the amount is 0 at run time (a whole number of blocks) aten's pad
    returns a copy with x's own strides, and the recorded view of a transposed q / k failed ("view size is not
    compatible with input tensor's size and stride", a block top-k program at 128 tokens)."""
    return F.pad(x.contiguous(), pad, value=value)


def first_rows(x: Tensor, n) -> Tensor:
    """The first n rows (dim 2) of x as a fresh tensor of exactly n rows: a slice of a padded length traces to
    Min(L, padded), which the tracer cannot prove equal to L (a guard on the length)."""
    return x.index_select(2, torch.arange(n, device=x.device))


def expand_kv(x: Tensor, heads: int) -> Tensor:
    """Repeat kv heads so that x has `heads` heads (GQA -> MHA view, used by references only)."""
    hkv = x.shape[1]
    if hkv == heads:
        return x
    return x.repeat_interleave(heads // hkv, dim=1)


def allowed_mask(Lq: int, Lk: int, causal: bool, key_mask: Tensor | None, device, window: int = 0) -> Tensor:
    """Dense (B or 1, 1, Lq, Lk) bool of the pairs exact attention may use (causal + padding, and the model's own
    sliding window when `window` > 0: key j is visible to query i when i - j < window, HF's convention)."""
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    i = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    if causal:
        allowed = j <= i
    if window > 0:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].to(torch.bool)
    return allowed


def alibi_bias(slopes, Lq: int, Lk: int, device, dtype=torch.float32) -> Tensor:
    """(1, H, Lq, Lk) additive ALiBi bias slope_h * (j - i), queries at key positions Lk - Lq .. (score units:
    added after the softmax scale)."""
    s = torch.as_tensor(list(slopes), dtype=dtype, device=device)
    i = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    return (s[:, None, None] * (j - i).to(dtype))[None]


def softcapped(scores: Tensor, softcap: float) -> Tensor:
    """Logit softcapping (Gemma2): cap * tanh(scores / cap) on the scaled scores, before any bias or mask; a cap of 0
    leaves the scores as they are."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def check_softcap(softcap: float) -> None:
    """A logit softcap is a cap > 0, or 0 for none (tanh of scores / cap: a negative or non-finite cap is no cap)."""
    if not (softcap == 0 or 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a positive cap, or 0 for none; got {softcap}")


def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float,
                             bias: Tensor | None = None, softcap: float = 0.0) -> Tensor:
    """Exact attention restricted to `allowed` (broadcastable to (B, H, Lq, Lk)), with the scaled scores softcapped
    (`softcap` > 0) and then an optional additive score bias; rows with no key give 0.

    Dense: for references and tests only.
    """
    H = q.shape[1]
    k, v = expand_kv(k, H), expand_kv(v, H)
    s = softcapped(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / den.clamp_min(torch.finfo(p.dtype).tiny)
    return out


def model_attention_float64(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float,
                            window: int | None = None, alibi=None, rows: Tensor | None = None,
                            softcap: float | None = None) -> Tensor:
    """A model's own exact attention in float64 (padding, causal, its sliding window, logit softcap and ALiBi bias),
    for the query rows `rows` only (all when None): the reference every pass and analysis measures an approximation
    against."""
    Lq, Lk = q.shape[2], k.shape[2]
    rows = torch.arange(Lq, device=q.device) if rows is None else rows
    allowed = allowed_mask(Lq, Lk, causal, key_mask, q.device, window=window or 0)[:, :, rows]
    bias = alibi_bias(alibi, Lq, Lk, q.device, torch.float64)[:, :, rows] if alibi else None
    return masked_softmax_attention(q[:, :, rows].double(), k.double(), v.double(), allowed, scale, bias,
                                    softcap or 0.0)


def band_rows(window: int) -> int:
    """Query rows per block of the key-run layout (the CPU package's window body and the band of the hybrids,
    ``compile._key_runs``; the ONNX translations' ``_onnx._run_support``): about half the window, 64 to 512. A block
    of r rows reaches r + window - 1 keys: more rows mean fewer, larger problems but more keys outside each row's
    band, 1.5x the band's pairs at half the window."""
    return int(min(512, max(64, 2 ** round(math.log2(max(window, 2) / 2)))))


def window_extents(window: int, causal: bool) -> tuple[int, int]:
    """(window_left, window_right) so that every query row sees exactly `window` keys (fewer at the edges).

    Causal: the `window` most recent keys, the query's own position included. Bidirectional: window // 2 keys
    to the left, the rest (self included) to the right.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 token; got {window}")
    if causal:
        return window - 1, 0
    left = window // 2
    return left, window - 1 - left


@dataclass(frozen=True)
class AttentionCost:
    """What one attention call costs, counted (not timed), next to exact attention on the same shape.

    score_entries: q.k products the method evaluates exactly; flops: 2 x multiply-adds of the whole method
    (scores, P.V, feature maps, low-rank products); memory_bytes: the largest intermediate the method holds
    at once (score blocks or low-rank state), in the given element size. Causal exact attention counts the
    lower triangle only.
    """
    score_entries: float
    dense_score_entries: float
    flops: float
    dense_flops: float
    memory_bytes: float
    dense_memory_bytes: float

    @property
    def density(self) -> float:
        return self.score_entries / self.dense_score_entries if self.dense_score_entries else 0.0


def dense_score_entries(B: int, H: int, Lq: int, Lk: int, causal: bool) -> float:
    if causal:
        offset = Lk - Lq
        # row i sees min(Lk, i + offset + 1) keys
        full = sum(min(Lk, i + offset + 1) for i in range(Lq)) if Lq <= 65536 else Lq * (Lk - Lq / 2)
        return float(B * H * full)
    return float(B * H * Lq * Lk)


def exact_attention_cost(B: int, H: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, elem_bytes: int = 4) -> AttentionCost:
    entries = dense_score_entries(B, H, Lq, Lk, causal)
    flops = 2.0 * entries * (D + Dv)
    mem = float(B * H * Lq * Lk * elem_bytes)
    return AttentionCost(entries, entries, flops, flops, mem, mem)


_last_mask_check: tuple = (None, -1, False)   # (weakref to the mask last checked, its version, all real)


def drop_full_mask(key_mask: Optional[Tensor]) -> Optional[Tensor]:
    """None for a key mask with every key real (an unpadded batch): the kernels then skip the per-key loads and
    the block-sparse kernel its predicate on interior blocks. The check costs a device sync; it is remembered for
    the mask tensor last checked (the attention passes give every layer the same mask tensor), so a forward pays
    it once."""
    global _last_mask_check
    if key_mask is None:
        return None
    ref, version, full = _last_mask_check
    if ref is None or ref() is not key_mask or version != key_mask._version:
        full = bool(key_mask.all())
        _last_mask_check = (weakref.ref(key_mask), key_mask._version, full)
    return None if full else key_mask


# --------------------------------------------------------------------------------------------------------------
# The attention-method registry: one entry per method, read by the generic attention pass, analysis,
# auto-attention, the ONNX exporter and the tests. A method module defines its op and registers one entry.
# --------------------------------------------------------------------------------------------------------------

@dataclass
class AttentionConfig(PassConfig):
    """Base of every method's config (site filters come from PassConfig)."""

    def _density_ok(self, name: str, value: float, allow_zero: bool = True) -> None:
        if not (0 < value <= 1) and not (allow_zero and value == 0):
            raise ValueError(f"{name} must be in (0, 1]; got {value}")


@dataclass
class AttentionMethod:
    """Everything the rest of rewriter needs to know about one attention method.

    name       the one spelling: pass name in the CLI, recipes, reports and plots
    config     the method's config dataclass (an AttentionConfig)
    op         the custom op (an OpOverload, rewriter::...); its schema is the one place the argument order lives
    budget     (config, L) -> (op arguments after `scale` by name, the budget as reported per site); L is the
               length a density is resolved at
    cost       (B, H, Hkv, Lq, Lk, D, Dv, causal, elem_bytes=4, **op arguments) -> AttentionCost, counted
    reference  the readable PyTorch body, (q, k, v, key_mask, causal, scale, **op arguments) -> (B, H, Lq, Dv)
    onnx       onnxscript translation, called with the op's arguments
    summary, colour                      for `rewriter passes` and the auto-attention plan picture
    candidates option dicts analysis and auto-attention try per head (empty: never a candidate)
    pairs      (q, k, key_mask, causal, scale, **op arguments) -> bool (B|1, H|1, Lq, Lk) of the pairs computed
               exactly (sparse methods; the report's measured density), or None
    compose    (site, op arguments) -> (op arguments that keep the model's own attention semantics, a note) or
               (None, why not), for sites whose attention is more than padding + causal (AttentionSite.plain()):
               a sliding window, an ALiBi bias, ... None: the method refuses every such site
    exact      the method keeps the model's outputs (a pipeline of exact passes gets a default --max-error)
    density_knob  the native knob a density resolves to (window, stride), replaced by its integer value when a
               plan is written down so that replays need no length; None when density is itself the knob
    onnx_quadratic  the ONNX form holds an Lq x Lk tensor
    fit        learned methods: (config, q, k, v, key_mask, causal, scale, op arguments, progress) ->
               (tensor op arguments by name, a dict of fit statistics for the report), called by the attention pass
               once per site with that site's recorded calibration inputs; the tensors become constants of the
               program (buffers read by get_attr), the op's Tensor arguments. None: nothing is learned
    """
    name: str
    config: type
    op: Any
    budget: Callable
    cost: Callable
    reference: Callable
    onnx: Callable
    summary: str
    colour: str = "#999999"
    candidates: tuple = ()
    pairs: Optional[Callable] = None
    density_knob: Optional[str] = None
    onnx_quadratic: bool = False
    compose: Optional[Callable] = None
    exact: bool = False
    fit: Optional[Callable] = None

    @property
    def op_name(self) -> str:
        """'rewriter::window'."""
        return self.op._schema.name

    @property
    def args(self) -> tuple[str, ...]:
        """The op's budget arguments after (q, k, v, key_mask, causal, scale), in schema order."""
        return tuple(a.name for a in self.op._schema.arguments[6:])

    def positional(self, kwargs: dict) -> tuple:
        """The op's arguments after `scale`, in schema order, from their names (schema defaults fill the rest)."""
        out = []
        for a in self.op._schema.arguments[6:]:
            if a.name in kwargs:
                out.append(kwargs[a.name])
            elif a.has_default_value():
                out.append(a.default_value)
            else:
                raise KeyError(f"{self.name}: no value for the op argument {a.name!r}")
        return tuple(out)

    def keep_semantics(self, site, kwargs: dict) -> tuple[dict | None, str]:
        """Op arguments for `site` that keep the model's own attention, or (None, the reason it is refused)."""
        if site.plain():
            return kwargs, ""
        if self.compose is None:
            return None, f"{self.name} cannot keep the model's {site.semantics()}"
        return self.compose(site, kwargs)


METHODS: dict[str, AttentionMethod] = {}


def register_method(method: AttentionMethod) -> AttentionMethod:
    if method.name in METHODS:
        raise ValueError(f"attention method {method.name!r} is registered twice")
    if method.op_name != "rewriter::" + method.name.replace("-", "_"):
        raise ValueError(f"attention method {method.name!r}: its op must be named "
                         f"'rewriter::{method.name.replace('-', '_')}', not {method.op_name!r}")
    METHODS[method.name] = method
    return method


def empty_output(q: Tensor, v: Tensor) -> Tensor:
    """The fake (meta) result of every attention op: (B, H, Lq, Dv) in q's dtype, contiguous. Each op's
    implementations return exactly this layout (the op bodies end in ``.contiguous()``, the CUDA registrations are
    wrapped the same way): SDPA's output follows its inputs' layout, HF's transposed heads give (B, Lq, H, Dv) memory,
    and Inductor checks a custom op's strides against its fake's (torch.compile failed on captured programs)."""
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


def window_from(window: int, density: float, L: int) -> int:
    """Explicit window wins; else density x L (at least 1 token)."""
    return window if window > 0 else max(1, int(round(density * L)))
