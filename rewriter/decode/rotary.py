"""`rewriter::rotary`: RoPE applied to one tensor as one op, for the decode runtime's step.

    rotary(x (B, H, L, D), cos, sin) -> x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

cos and sin broadcast to x (HF's (B, 1, L, D) after unsqueeze). The reference is those aten ops, in that order and
in the promoted dtype, so the op computes what the model computes; on CUDA one Triton kernel does the five (mul,
neg, cat, mul, add) with the same roundings: each product rounded to the result dtype, then the sum
(triton_rotary.py). At batch 1 a decode step is a few hundred small kernels, and RoPE on the query and the key was
ten of about thirty per layer. `fuse_rotary` finds HF's apply_rotary_pos_emb in a step graph and puts the op there
(runtime.fused_step); the op lives in the runtime's step only, never in a saved program.
"""
from __future__ import annotations

import torch
from torch import Tensor, fx

from ..graph import aten, is_call, val

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"rotary needs x (..., D) with D even; got {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        try:
            shape = torch.broadcast_shapes(x.shape, t.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"rotary: {name} {tuple(t.shape)} must broadcast to x {tuple(x.shape)}")


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's apply_rotary_pos_emb for one tensor, op for op (the op's definition)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@torch.library.custom_op("rewriter::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, contiguous."""
    _check(x, cos, sin)
    return rotary_reference(x, cos, sin).contiguous()


@rotary.register_fake
def _rotary_fake(x, cos, sin):
    return x.new_empty(x.shape, dtype=torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype))


@rotary.register_kernel("cuda")
def _rotary_cuda(x, cos, sin):
    """One Triton kernel for 4-D x of fp16 / bf16 / fp32; the reference otherwise."""
    _check(x, cos, sin)
    from ..attention.triton import triton_available, use_reference
    if use_reference() or not triton_available() or x.dim() != 4 or x.shape[-1] > 256 \
            or any(t.dtype not in _DTYPES for t in (x, cos, sin)):
        return rotary_reference(x, cos, sin).contiguous()
    from .triton_rotary import rotary_triton
    return rotary_triton(x, cos, sin)


def _slice_of(node, x: fx.Node, dim: int, start: int, end: int) -> bool:
    """node is x[..., start:end] along dim (end: anything from `end` on means to the end)."""
    if not is_call(node, aten.slice.Tensor) or node.args[0] is not x:
        return False
    args = list(node.args[1:]) + [None] * 4
    d, s, e, step = args[0], args[1] or 0, args[2], args[3] or 1
    if isinstance(d, int) and d < 0:
        d += val(x).dim()
    return d == dim and s == start and step == 1 and isinstance(e, int) and (e == end or (end == val(x).shape[-1]
                                                                                         and e >= end))


def _match(add: fx.Node):
    """(x, cos, sin) when `add` is x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin (either operand order)."""
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
        return None
    for m1, m2 in (add.args, add.args[::-1]):
        if not (is_call(m1, aten.mul.Tensor) and is_call(m2, aten.mul.Tensor)):
            continue
        for x, cos in (m1.args[:2], m1.args[1::-1]):
            for rot, sin in (m2.args[:2], m2.args[1::-1]):
                if not all(isinstance(n, fx.Node) for n in (x, cos, rot, sin)) or not is_call(rot, aten.cat.default):
                    continue
                xv, out = val(x), val(add)
                if not (isinstance(xv, torch.Tensor) and isinstance(out, torch.Tensor) and xv.dim() >= 1):
                    continue
                D = xv.shape[-1]
                if not isinstance(D, int) or D % 2 or tuple(out.shape) != tuple(xv.shape):
                    continue
                parts = rot.args[0]
                dim = rot.args[1] if len(rot.args) > 1 else rot.kwargs.get("dim", 0)
                if dim < 0:
                    dim += xv.dim()
                if len(parts) != 2 or dim != xv.dim() - 1 or not is_call(parts[0], aten.neg.default):
                    continue
                last, half = xv.dim() - 1, D // 2
                if _slice_of(parts[0].args[0], x, last, half, D) and _slice_of(parts[1], x, last, 0, half):
                    return x, cos, sin
    return None


def fuse_rotary(gm: fx.GraphModule) -> int:
    """Put rewriter::rotary in place of every RoPE application (HF's apply_rotary_pos_emb, per tensor) in `gm`;
    returns how many (the pattern's other nodes go dead; the caller removes them and recompiles)."""
    op = torch.ops.rewriter.rotary.default
    done = 0
    for node in list(gm.graph.nodes):
        found = _match(node)
        if found is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op, found)
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done += 1
    return done
