"""`rewriter::add_rms_norm`: a residual add and the RMSNorm that reads it, as one op, for the decode runtime's step.

    add_rms_norm(x, residual, weight, eps) -> (x + residual, rms_norm(x + residual, weight, eps))

In a Llama-style layer the attention's and the MLP's outputs are added to the residual stream and the sum is normed
at once (the next sub-layer's input); the sum also goes on as the residual. The reference is the aten add and
rewriter::rms_norm's reference; on CUDA one Triton kernel (the rms_norm kernel with the add in front, rounding the
sum as torch's add does, so both outputs equal the two ops'). At batch 1 that is one kernel of about 2 us fewer per
add; `fuse_add_norm` finds the pairs in a step graph (runtime.fused_step), after the RMSNorms became rewriter::rms_norm.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

from ..graph import aten, is_call, val
from ..linear.fused import _check_rms_norm, rms_norm_reference


def _check(x: Tensor, residual: Tensor, weight: Tensor) -> None:
    _check_rms_norm(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm needs x and residual of one shape and dtype; got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(residual.shape)} {residual.dtype}")


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    total = x + residual
    return total, rms_norm_reference(total, weight, eps).contiguous()


@torch.library.custom_op("rewriter::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + residual, rms_norm(x + residual, weight, eps))."""
    _check(x, residual, weight)
    total, normed = add_rms_norm_reference(x, residual, weight, eps)
    return total.contiguous(), normed


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@add_rms_norm.register_kernel("cuda")
def _add_rms_norm_cuda(x, residual, weight, eps):
    _check(x, residual, weight)
    from ..attention.triton import triton_available, use_reference
    from ..linear.triton.fused import KERNEL_DTYPES, RMS_MAX_H
    if use_reference() or not triton_available() or x.shape[-1] > RMS_MAX_H or x.dtype not in KERNEL_DTYPES \
            or weight.dtype not in KERNEL_DTYPES:
        total, normed = add_rms_norm_reference(x, residual, weight, eps)
        return total.contiguous(), normed
    from ..linear.triton.fused import add_rms_norm_triton
    return add_rms_norm_triton(x, residual, weight, eps)


def fuse_add_norm(gm: fx.GraphModule) -> int:
    """rewriter::rms_norm(add(a, b), w, eps) with a, b of one shape and dtype -> add_rms_norm(a, b, w, eps): its sum
    takes the add's other readers. Returns the pairs fused (the caller recompiles)."""
    graph, done = gm.graph, 0
    norm_op = torch.ops.rewriter.rms_norm.default
    order = {n: i for i, n in enumerate(graph.nodes)}     # the original nodes' positions (all this compares)
    for norm in list(graph.nodes):
        if not is_call(norm, norm_op) or len(norm.args) != 3 or not is_call(norm.args[0], aten.add.Tensor):
            continue
        add = norm.args[0]
        if len(add.args) != 2 or add.kwargs or not all(isinstance(a, fx.Node) for a in add.args):
            continue
        vals = [val(a) for a in (*add.args, add)]
        # (symbolic dims compared by name: the step's batch is dynamic)
        if not all(isinstance(v, torch.Tensor) for v in vals) \
                or len({(tuple(map(str, v.shape)), v.dtype) for v in vals}) != 1:
            continue
        weight = norm.args[1]
        if isinstance(weight, fx.Node) and order[weight] > order[add]:
            add.prepend(weight)
        with graph.inserting_before(add):
            both = graph.call_function(torch.ops.rewriter.add_rms_norm.default, (*add.args, weight, norm.args[2]))
            total = graph.call_function(operator.getitem, (both, 0))
            normed = graph.call_function(operator.getitem, (both, 1))
        keep = ("nn_module_stack", "stack_trace")
        both.meta = {k: v for k, v in norm.meta.items() if k in keep}
        total.meta = {k: v for k, v in add.meta.items() if k in (*keep, "val")}
        normed.meta = {k: v for k, v in norm.meta.items() if k in (*keep, "val")}
        norm.replace_all_uses_with(normed)
        graph.erase_node(norm)
        add.replace_all_uses_with(total)
        graph.erase_node(add)
        done += 1
    return done
