"""The decode step's matrix-vector products as ops: `rewriter::gemv` and `rewriter::swiglu_gemv`.

    gemv(x (..., K), [w0, w1, ...] (Ni, K)) -> cat([linear(x, wi)], -1)        (..., N0 + N1 + ...)
    swiglu_gemv(x (..., K), w_gate, w_up (N, K)) -> silu_mul(linear(x, w_gate), linear(x, w_up))

The references are those aten calls, so on the CPU (and for x of more than one row, on CUDA) the op computes what
the captured step computes. On CUDA with one row (batch-1 decode) one Triton kernel runs each (triton_gemv.py): the
q, k and v projections that read one normed x become one launch, and SwiGLU's gate and up projections with
silu(gate) * up another. Like rotary, the ops live in the runtime's step only (`fuse_gemv`, called by
runtime.fused_step), never in a saved program. The kernels sum K in another order than cuBLAS, so 16-bit outputs can
differ from cuBLAS's in the last place (both accumulate in fp32 and round once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from ..graph import aten, get_attr_tensor, is_call, replace_with_op
from ..linear.fused import silu_mul_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: Tensor, weights: list[Tensor]) -> None:
    if not weights:
        raise ValueError("gemv needs at least one weight")
    for w in weights:
        if w.dim() != 2 or x.dim() < 1 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"gemv needs x (..., K) and weights (N, K); got {tuple(x.shape)} and {tuple(w.shape)}")
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"gemv needs weights of x's dtype and device; got {w.dtype} on {w.device} for "
                             f"{x.dtype} on {x.device}")


def _check_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor) -> None:
    _check(x, [w_gate, w_up])
    if w_gate.shape != w_up.shape:
        raise ValueError(f"swiglu_gemv needs gate and up weights of one shape; got {tuple(w_gate.shape)} and "
                         f"{tuple(w_up.shape)}")


def gemv_reference(x: Tensor, weights: list[Tensor]) -> Tensor:
    outs = [F.linear(x, w) for w in weights]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def swiglu_gemv_reference(x: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    return silu_mul_reference(F.linear(x, w_gate), F.linear(x, w_up))


def _use_kernel(x: Tensor, weights: list[Tensor]) -> bool:
    from ..attention.triton import triton_available, use_reference
    from .triton_gemv import GEMV_MAX_M, MAX_WEIGHTS
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (not use_reference() and triton_available() and x.dtype in _DTYPES and rows == GEMV_MAX_M
            and len(weights) <= MAX_WEIGHTS and all(w.is_contiguous() for w in weights))


@torch.library.custom_op("rewriter::gemv", mutates_args=())
def gemv(x: Tensor, weights: list[Tensor]) -> Tensor:
    """cat([x @ w.T for w in weights], -1). The weights must be constants of the program, not results of the kernels
    before it (fuse_gemv takes get_attr weights only): with PDL on sm_90 the CUDA kernel reads its first weight block
    while the kernel ahead of it is still running (linear/triton/fused.pdl)."""
    _check(x, weights)
    return gemv_reference(x, weights)


@gemv.register_fake
def _gemv_fake(x, weights):
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


@gemv.register_kernel("cuda")
def _gemv_cuda(x, weights):
    _check(x, weights)
    if not _use_kernel(x, weights):
        return gemv_reference(x, weights)
    from .triton_gemv import gemv_triton
    return gemv_triton(x, weights)


@torch.library.custom_op("rewriter::swiglu_gemv", mutates_args=())
def swiglu_gemv(x: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    """silu(x @ w_gate.T) * (x @ w_up.T) with rewriter::silu_mul's roundings; constant weights, as rewriter::gemv's."""
    _check_swiglu(x, w_gate, w_up)
    return swiglu_gemv_reference(x, w_gate, w_up)


@swiglu_gemv.register_fake
def _swiglu_gemv_fake(x, w_gate, w_up):
    return x.new_empty(*x.shape[:-1], w_gate.shape[0])


@swiglu_gemv.register_kernel("cuda")
def _swiglu_gemv_cuda(x, w_gate, w_up):
    _check_swiglu(x, w_gate, w_up)
    if not _use_kernel(x, [w_gate, w_up]):
        return swiglu_gemv_reference(x, w_gate, w_up)
    from .triton_gemv import swiglu_gemv_triton
    return swiglu_gemv_triton(x, w_gate, w_up)


# --- the step graph -----------------------------------------------------------------------------------------------

def _weight(gm: fx.GraphModule, node) -> Tensor | None:
    """The weight of `linear(x, w)` / `linear(x, w, None)` when it is a 2-D attribute of x's dtype, else None."""
    if not is_call(node, aten.linear.default) or len(node.args) < 2 or node.kwargs.get("bias") is not None \
            or (len(node.args) > 2 and node.args[2] is not None):
        return None
    w = node.args[1]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    t = get_attr_tensor(gm, w.target)
    x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if t.dim() != 2 or not isinstance(x, torch.Tensor) or x.dtype != t.dtype or t.dtype not in _DTYPES:
        return None
    return t


def fuse_gemv(gm: fx.GraphModule, max_group: int = 3) -> int:
    """Bias-free linears on 2-D weights in a step graph -> rewriter::swiglu_gemv (a silu_mul of two linears of one x,
    read by nothing else) and rewriter::gemv (the other linears of one x, up to max_group per op, sliced back apart).
    Returns the linears replaced (the caller erases dead nodes and recompiles)."""
    graph, replaced = gm.graph, 0
    keep = ("nn_module_stack", "val", "stack_trace")
    swiglu = torch.ops.rewriter.silu_mul.default
    for node in list(graph.nodes):
        if not is_call(node, swiglu) or len(node.args) != 2:
            continue
        gate, up = node.args
        if any(_weight(gm, p) is None for p in (gate, up)) or gate.args[0] is not up.args[0] \
                or len(gate.users) != 1 or len(up.users) != 1 \
                or get_attr_tensor(gm, gate.args[1].target).shape != get_attr_tensor(gm, up.args[1].target).shape:
            continue
        replace_with_op(gm, node, torch.ops.rewriter.swiglu_gemv.default, (gate.args[0], gate.args[1], up.args[1]))
        graph.erase_node(gate)
        graph.erase_node(up)
        replaced += 2
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if _weight(gm, node) is not None:
            groups.setdefault(node.args[0], []).append(node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for x, linears in groups.items():
        for i in range(0, len(linears), max_group):
            group = linears[i:i + max_group]          # in graph order
            first = group[0]
            for n in group[1:]:
                if order[n.args[1]] > order[first]:
                    first.prepend(n.args[1])           # the weight's get_attr before the joint call
            with graph.inserting_before(first):
                y = graph.call_function(torch.ops.rewriter.gemv.default, (x, [n.args[1] for n in group]))
                start = 0
                for n in group:
                    rows = get_attr_tensor(gm, n.args[1].target).shape[0]
                    part = y if len(group) == 1 else graph.call_function(aten.slice.Tensor,
                                                                         (y, -1, start, start + rows))
                    part.meta = {k: v for k, v in n.meta.items() if k in keep}
                    start += rows
                    n.replace_all_uses_with(part)
            for n in group:
                graph.erase_node(n)
            replaced += len(group)
    return replaced


def join_slices(gm: fx.GraphModule) -> int:
    """cat([slice(y, -1, a, b), slice(y, -1, b, c), ...], -1) -> slice(y, -1, a, c): the absorbed MLA step joins the
    k and v projections, which fuse_gemv made neighbouring slices of one gemv output (a copy kernel per layer saved).
    Returns the cats replaced (the caller erases dead nodes)."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.cat.default) or not isinstance(node.args[0], (list, tuple)) or len(node.args[0]) < 2:
            continue
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or dim not in (-1, val.dim() - 1):
            continue
        ok = all(is_call(p, aten.slice.Tensor) and len(p.args) == 4 and p.args[0] is parts[0].args[0]
                 and p.args[1] in (-1, val.dim() - 1) for p in parts)
        if not ok or any(isinstance(a, fx.Node) for p in parts for a in p.args[2:]) \
                or any(a.args[3] != b.args[2] for a, b in zip(parts, parts[1:])):
            continue
        replace_with_op(gm, node, aten.slice.Tensor, (parts[0].args[0], -1, parts[0].args[2], parts[-1].args[3]))
        replaced += 1
    return replaced


def _constant(gm: fx.GraphModule, node) -> Tensor | None:
    """The tensor of a get_attr node or of select(get_attr, dim, index) chains on one, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        t = get_attr_tensor(gm, node.target)
        return t if isinstance(t, Tensor) else None
    if is_call(node, aten.select.int) and isinstance(node.args[1], int) and isinstance(node.args[2], int):
        base = _constant(gm, node.args[0])
        return None if base is None else base.select(node.args[1], node.args[2])
    return None


def fold_gemv_matmul(gm: fx.GraphModule) -> int:
    """matmul(slice(gemv(x, [w0, .., wi, .., wn]), -1, a, end), W), the slice being exactly the rows of the trailing
    weights wi .. wn and read by nothing else, W a constant (rows of wi .. wn, N') -> the gemv computes W^T [wi; ..;
    wn] x directly: gemv(x, [w0, .., W^T [wi; ..; wn]]) (the product folded once, in float64, rounded to the weights'
    dtype). The absorbed MLA step's latent c = P^T [k | v]: k_proj and v_proj (2 x 2 MB per layer of the 1.1B
    benchmark model) and P (1 MB) become one 2 MB weight in the q / k / v launch, and the matmul's kernel goes.
    Returns the matmuls folded (the caller erases dead nodes)."""
    folded = 0
    gemv = torch.ops.rewriter.gemv.default
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.matmul.default) or len(node.args) != 2:
            continue
        part, w = node.args
        if not is_call(part, aten.slice.Tensor) or len(part.args) != 4 or len(part.users) != 1 \
                or not is_call(part.args[0], gemv):
            continue
        g = part.args[0]
        W = _constant(gm, w)
        weights = list(g.args[1])
        tensors = [get_attr_tensor(gm, n.target) if isinstance(n, fx.Node) and n.op == "get_attr" else None
                   for n in weights]
        if W is None or W.dim() != 2 or any(t is None for t in tensors) or W.dtype != tensors[0].dtype:
            continue
        bounds = [0]
        for t in tensors:
            bounds.append(bounds[-1] + t.shape[0])
        start, end = part.args[2], min(part.args[3], bounds[-1]) if isinstance(part.args[3], int) else None
        if part.args[1] not in (-1, g.meta["val"].dim() - 1 if "val" in g.meta else -1) \
                or start not in bounds[:-1] or end != bounds[-1] or W.shape[0] != end - start:
            continue
        first = bounds.index(start)
        for u in [u for u in g.users if u is not part and not u.users]:      # dead slices (join_slices' parts)
            gm.graph.erase_node(u)
        others = [u for u in g.users if u is not part]
        if not all(is_call(u, aten.slice.Tensor) and len(u.args) == 4 and isinstance(u.args[3], int)
                   and u.args[3] <= start for u in others):
            continue
        fold = (W.double().T @ torch.cat(tensors[first:]).double()).to(W.dtype).contiguous()
        name = f"_folded_gemv_{folded}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, fold)
        with gm.graph.inserting_before(g):
            attr = gm.graph.get_attr(name)
            new = gm.graph.call_function(gemv, (g.args[0], weights[:first] + [attr]))
        new.meta = {k: v for k, v in g.meta.items() if k != "val"}
        replace_with_op(gm, node, aten.slice.Tensor, (new, -1, start, start + fold.shape[0]))
        gm.graph.erase_node(part)
        g.replace_all_uses_with(new)
        gm.graph.erase_node(g)
        folded += 1
    return folded
