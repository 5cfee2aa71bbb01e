"""`rewriter::decode_attention`: the decode step's attention as one op, one query token per row against the cache.

    decode_attention(q (B, Hkv, G, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), mask (B|1, 1, 1, L) bool, scale,
                     q_extra (B, Hkv, G, Dx)?, k_extra (B, Hkv, R, Dx)?, extra_start (1,) long?,
                     v_up (U, Dout, Dv)?, v_offset (U, Dout)?) -> (B, Hkv, G, Dv), or (B, Hkv, G, Dout) with v_up

q holds the G = H / Hkv query heads of each KV head (the step's folded form, cache._decode_attention); mask marks
the valid slots. The optional second key region adds q_extra . k_extra[s - extra_start] to the scores of slots
extra_start .. extra_start + R - 1 before the softmax: dynamic ThinK's keys decoded after the prompt, whose pruned
channels live in k_pruned (cache._ExplicitCache). The reference is SDPA (with that term as an additive mask), so the
CPU step computes exactly what it did before the op existed; on CUDA the op runs the split-K Triton kernel
(triton_decode.py), reading each chunk of keys and values once per KV head. The optional up-projection maps each
head's output through a matrix of its group (the Hkv x G heads in U equal groups, in order) plus an offset:
MLA's absorbed step (absorbed.py) attends in its latent and multiplies by P_v,h there; the kernel does it in its
reduce, one kernel instead of three (REWRITER_DECODE_FUSED_UP=0: the attention kernel, then the matmul and add).

The captured step program keeps the model's SDPA call (its canonical attention sites), except dynamic ThinK's,
whose second key region has no SDPA form; `lower_step_attention` turns the step's folded SDPA calls into this op
when the runtime builds its in-place step (runtime.inplace_step): lowering picks the implementation, not the graph.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512     # triton_decode.MAX_HEAD_DIM (not imported here: Triton is optional)
_force_reference = False


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, q_extra: Optional[Tensor], k_extra: Optional[Tensor],
           extra_start: Optional[Tensor], v_up: Optional[Tensor] = None, v_offset: Optional[Tensor] = None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode_attention takes q (B, Hkv, G, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hkv, _, D = q.shape
    if k.shape[:2] != (B, Hkv) or v.shape[:3] != k.shape[:3] or k.shape[-1] != D:
        raise ValueError(f"decode_attention: k must be (B, Hkv, L, {D}) and v (B, Hkv, L, Dv) for q "
                         f"{tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[0] not in (1, B) \
            or mask.shape[3] != k.shape[2]:
        raise ValueError(f"decode_attention: mask must be bool (B or 1, 1, 1, {k.shape[2]}); got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if (q_extra is None) != (k_extra is None) or (q_extra is None) != (extra_start is None):
        raise ValueError("decode_attention: q_extra, k_extra and extra_start come together (or none)")
    if q_extra is not None and (q_extra.shape[:3] != q.shape[:3] or k_extra.shape[:2] != (B, Hkv)
                                or k_extra.shape[-1] != q_extra.shape[-1] or extra_start.numel() != 1):
        raise ValueError(f"decode_attention: q_extra must be (B, Hkv, G, Dx), k_extra (B, Hkv, R, Dx), extra_start "
                         f"(1,); got {tuple(q_extra.shape)}, {tuple(k_extra.shape)}, {tuple(extra_start.shape)}")
    if v_offset is not None and v_up is None:
        raise ValueError("decode_attention: v_offset needs v_up")
    if v_up is not None and (v_up.dim() != 3 or v_up.shape[-1] != v.shape[-1] or (Hkv * q.shape[2]) % v_up.shape[0]
                             or (v_offset is not None and v_offset.shape != v_up.shape[:2]) or v_up.dtype != v.dtype):
        raise ValueError(f"decode_attention: v_up must be (U, Dout, {v.shape[-1]}) in v's dtype with U dividing the "
                         f"{Hkv * q.shape[2]} heads, v_offset (U, Dout); got {tuple(v_up.shape)}"
                         f"{'' if v_offset is None else ', ' + str(tuple(v_offset.shape))}")


def extra_scores(q_extra: Tensor, k_extra: Tensor, extra_start: Tensor, slots: int, scale: float) -> Tensor:
    """scale * q_extra . k_extra[s - extra_start] on slots extra_start .. + R - 1, 0 elsewhere: (B, Hkv, G, slots)."""
    R = k_extra.shape[2]
    scores = q_extra @ k_extra.transpose(-1, -2)                                  # (B, Hkv, G, R)
    index = torch.arange(slots, device=q_extra.device) - extra_start              # slot -> index in k_extra
    inside = (index >= 0) & (index < R)
    scores = scores.gather(-1, index.clamp(0, R - 1).expand(*scores.shape[:-1], slots))
    return torch.where(inside, scores * scale, 0.0)


def up_projection(out: Tensor, v_up: Tensor, v_offset: Optional[Tensor] = None) -> Tensor:
    """out (B, Hkv, G, Dv): head i of the Hkv x G (in order) through v_up[i // (Hkv G / U)] (U, Dout, Dv), plus
    v_offset (U, Dout): (B, Hkv, G, Dout), in out's dtype (the ops absorbed.py ran before the op took them)."""
    B, Hkv, G, Dv = out.shape
    U = v_up.shape[0]
    y = out.reshape(B, U, Hkv * G // U, Dv) @ v_up.transpose(-1, -2)
    if v_offset is not None:
        y = y + v_offset[:, None, :]
    return y.reshape(B, Hkv, G, -1)


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                               q_extra: Optional[Tensor] = None, k_extra: Optional[Tensor] = None,
                               extra_start: Optional[Tensor] = None, v_up: Optional[Tensor] = None,
                               v_offset: Optional[Tensor] = None) -> Tensor:
    if q_extra is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        bias = extra_scores(q_extra, k_extra, extra_start, k.shape[2], scale).masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out if v_up is None else up_projection(out, v_up, v_offset)


@torch.library.custom_op("rewriter::decode_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, Tensor? q_extra=None, Tensor? k_extra=None, "
    "Tensor? extra_start=None, Tensor? v_up=None, Tensor? v_offset=None) -> Tensor"))
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, q_extra: Optional[Tensor] = None,
                     k_extra: Optional[Tensor] = None, extra_start: Optional[Tensor] = None,
                     v_up: Optional[Tensor] = None, v_offset: Optional[Tensor] = None) -> Tensor:
    _check(q, k, v, mask, q_extra, k_extra, extra_start, v_up, v_offset)
    return decode_attention_reference(q, k, v, mask, scale, q_extra, k_extra, extra_start, v_up, v_offset)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, mask, scale, q_extra=None, k_extra=None, extra_start=None, v_up=None,
                           v_offset=None):
    _check(q, k, v, mask, q_extra, k_extra, extra_start, v_up, v_offset)
    if v_up is None:
        return q.new_empty(*q.shape[:3], v.shape[-1])
    dtype = q.dtype if v_offset is None else torch.promote_types(q.dtype, v_offset.dtype)
    return q.new_empty(*q.shape[:3], v_up.shape[1], dtype=dtype)


@decode_attention.register_kernel("cuda")
def _decode_attention_cuda(q, k, v, mask, scale, q_extra=None, k_extra=None, extra_start=None, v_up=None,
                           v_offset=None):
    """The split-K Triton kernel; the reference under `reference_attention()`, REWRITER_ATTENTION_REFERENCE=1,
    without Triton, for float64 or rows wider than MAX_HEAD_DIM."""
    _check(q, k, v, mask, q_extra, k_extra, extra_start, v_up, v_offset)
    if not use_triton(q, v, q_extra, v_up):
        return decode_attention_reference(q, k, v, mask, scale, q_extra, k_extra, extra_start, v_up, v_offset)
    from .triton_decode import decode_attention_triton
    valid = mask[:, 0, 0, :].expand(q.shape[0], k.shape[2])
    if v_up is not None and os.environ.get("REWRITER_DECODE_FUSED_UP", "1") == "0":    # A / B: the unfused form
        out = decode_attention_triton(q, k, v, valid, scale, q_extra, k_extra, extra_start)
        return up_projection(out, v_up, v_offset)
    return decode_attention_triton(q, k, v, valid, scale, q_extra, k_extra, extra_start, v_up=v_up,
                                   v_offset=v_offset)


def use_triton(q: Tensor, v: Tensor, q_extra: Optional[Tensor] = None, v_up: Optional[Tensor] = None) -> bool:
    from ..attention.triton import triton_available, use_reference
    dims = (q.shape[-1], v.shape[-1], 0 if q_extra is None else q_extra.shape[-1],
            0 if v_up is None else v_up.shape[1])
    return not (_force_reference or use_reference() or not triton_available() or q.dtype not in KERNEL_DTYPES
                or max(dims) > MAX_HEAD_DIM)


@contextlib.contextmanager
def reference_attention():
    """Run rewriter::decode_attention's reference on CUDA too while inside (the benchmark's check of the kernel: a
    CUDA graph captured earlier keeps the kernel it captured)."""
    global _force_reference
    old, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = old


def lower_step_attention(gm: torch.fx.GraphModule) -> int:
    """Replace the decode step's folded SDPA calls (one query row per query head of each KV head: q (B, Hkv, G, D)
    against k (B, Hkv, L, D) under a bool (B, 1, 1, L) mask, no dropout, not causal) by rewriter::decode_attention.
    Returns how many were replaced (the caller recompiles)."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not sdpa:
            continue
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), node.args))
        args.update(node.kwargs)
        q, k, v, mask = (args.get(n) for n in ("query", "key", "value", "attn_mask"))
        if mask is None or args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False) \
                or args.get("enable_gqa", False):
            continue
        vals = [getattr(x, "meta", {}).get("val") for x in (q, k, v, mask)]
        if any(x is None for x in vals):
            continue
        qv, kv, vv, mv = vals
        if qv.dim() != 4 or kv.dim() != 4 or qv.shape[1] != kv.shape[1] or mv.dtype != torch.bool \
                or mv.dim() != 4 or mv.shape[1] != 1 or mv.shape[2] != 1:
            continue
        scale = args.get("scale")
        scale = float(qv.shape[-1]) ** -0.5 if scale is None else float(scale)
        node.target = torch.ops.rewriter.decode_attention.default
        node.args, node.kwargs = (q, k, v, mask, scale), {}
        replaced += 1
    return replaced
