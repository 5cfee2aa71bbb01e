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

from typing import Optional

import torch
from torch import Tensor, fx

from ..graph import aten, is_call, replace_with_op, val

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


def _check_channels(x: Tensor, channels: Tensor, group: int) -> None:
    if channels.dim() != 2 or channels.dtype != torch.long or group < 1 or x.dim() != 4 \
            or channels.shape[0] * group != x.shape[1] or channels.shape[1] > x.shape[-1]:
        raise ValueError(f"rotary_gather needs x (B, H, L, D) and long channels (H / group, Dk <= D); got x "
                         f"{tuple(x.shape)}, channels {tuple(channels.shape)} {channels.dtype}, group {group}")


def rotary_gather_reference(x: Tensor, cos: Tensor, sin: Tensor, channels: Tensor, group: int) -> Tensor:
    """rotary(x) then, per head h, its channels channels[h // group] (ThinK's kept query / key channels), as the
    captured step gathers them."""
    rotated = rotary_reference(x, cos, sin)
    index = channels.repeat_interleave(group, dim=0)
    return torch.gather(rotated, -1, index[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1))


@torch.library.custom_op("rewriter::rotary_gather", mutates_args=())
def rotary_gather(x: Tensor, cos: Tensor, sin: Tensor, channels: Tensor, group: int) -> Tensor:
    """rotary(x, cos, sin)[b, h, l, channels[h // group]], contiguous (B, H, L, Dk)."""
    _check(x, cos, sin)
    _check_channels(x, channels, group)
    return rotary_gather_reference(x, cos, sin, channels, group).contiguous()


@rotary_gather.register_fake
def _rotary_gather_fake(x, cos, sin, channels, group):
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return x.new_empty(*x.shape[:-1], channels.shape[-1], dtype=dtype)


@rotary_gather.register_kernel("cuda")
def _rotary_gather_cuda(x, cos, sin, channels, group):
    _check(x, cos, sin)
    _check_channels(x, channels, group)
    from ..attention.triton import triton_available, use_reference
    if use_reference() or not triton_available() or x.shape[-1] > 256 \
            or any(t.dtype not in _DTYPES for t in (x, cos, sin)):
        return rotary_gather_reference(x, cos, sin, channels, group).contiguous()
    from .triton_rotary import rotary_triton
    return rotary_triton(x, cos, sin, channels if channels.stride(-1) == 1 else channels.contiguous(), group)


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
        replace_with_op(gm, node, op, found)
        done += 1
    return done


# --- the absorbed MLA step's query product with RoPE' on its first columns, in one op --------------------------------

def _check_matmul_rotary(x: Tensor, w: Tensor, cos: Tensor, sin: Tensor, rope: int) -> None:
    if x.dim() != 4 or w.dim() != 3 or w.shape[0] != x.shape[1] or w.shape[1] != x.shape[3]:
        raise ValueError(f"matmul_rotary needs x (B, Hkv, G, D) and w (Hkv, D, N); got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if not (0 < rope <= w.shape[2]) or rope % 2:
        raise ValueError(f"matmul_rotary: rope must be even and within w's {w.shape[2]} columns; got {rope}")
    _check(x.new_empty(x.shape[:3] + (rope,), device="meta"), cos, sin)     # its shape only


def matmul_rotary_reference(x: Tensor, w: Tensor, cos: Tensor, sin: Tensor, rope: int) -> Tensor:
    """What the absorbed step computes (absorbed.absorbed_attention): the product, rounded to its dtype, then RoPE'
    on its first `rope` columns as rotary rounds it."""
    y = x @ w
    return torch.cat([rotary_reference(y[..., :rope], cos, sin), y[..., rope:]], -1)


@torch.library.custom_op("rewriter::matmul_rotary", mutates_args=())
def matmul_rotary(x: Tensor, w: Tensor, cos: Tensor, sin: Tensor, rope: int) -> Tensor:
    """x (B, Hkv, G, D) @ w (Hkv, D, N) with its first `rope` columns rotated: y[..., :rope] * cos +
    rotate_half(y[..., :rope]) * sin (cos / sin broadcastable to (B, Hkv, G, rope)); contiguous (B, Hkv, G, N)."""
    _check_matmul_rotary(x, w, cos, sin, rope)
    return matmul_rotary_reference(x, w, cos, sin, rope).contiguous()


@matmul_rotary.register_fake
def _matmul_rotary_fake(x, w, cos, sin, rope):
    return x.new_empty(x.shape[:3] + (w.shape[2],))


@matmul_rotary.register_kernel("cuda")
def _matmul_rotary_cuda(x, w, cos, sin, rope):
    """One Triton kernel for one dtype of fp16 / bf16 / fp32 throughout and rows up to 256 wide; the reference
    otherwise."""
    _check_matmul_rotary(x, w, cos, sin, rope)
    from ..attention.triton import triton_available, use_reference
    if use_reference() or not triton_available() or x.shape[-1] > 256 or x.dtype not in _DTYPES \
            or any(t.dtype != x.dtype for t in (w, cos, sin)):
        return matmul_rotary_reference(x, w, cos, sin, rope).contiguous()
    from .triton_rotary import matmul_rotary_triton
    return matmul_rotary_triton(x, w, cos, sin, rope)


def fuse_matmul_rotary(gm: fx.GraphModule) -> int:
    """The absorbed MLA step's query (absorbed_attention, after fuse_rotary): qc = matmul(x, w) viewed as
    (B, 1, H, N), rotary(qc[..., :R], cos, sin) and qc[..., R:] -> one rewriter::matmul_rotary(x, w, cos, sin, R)
    whose view gives both (its first R columns already rotated). Taken only where every other reader of the view
    starts at or after column R, cos / sin vary along their last dim only (and the batch), and one dtype runs
    throughout. Returns the sites fused; the matmul goes dead."""
    op = torch.ops.rewriter.matmul_rotary.default
    graph, done = gm.graph, 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for rot in [n for n in graph.nodes if is_call(n, torch.ops.rewriter.rotary.default)]:
        part, cos, sin = rot.args[:3]
        if not (is_call(part, aten.slice.Tensor) and len(part.users) == 1):
            continue
        view, mm = part.args[0], part.args[0]
        if is_call(view, aten.reshape.default, aten.view.default):
            mm = view.args[0]
        if not (is_call(mm, aten.matmul.default) and len(mm.users) == 1) or not all(
                isinstance(n, fx.Node) for n in (*mm.args, cos, sin)):
            continue
        x, w = mm.args
        xv, wv, yv, vv = val(x), val(w), val(mm), val(view)
        cv, sv, rv = val(cos), val(sin), val(part)
        if not all(isinstance(t, torch.Tensor) for t in (xv, wv, yv, vv, cv, sv, rv)) or xv.dim() != 4 \
                or wv.dim() != 3 or vv.shape[-1] != yv.shape[-1] or len({t.dtype for t in (xv, wv, cv, sv)}) != 1:
            continue
        R = rv.shape[-1]
        last = vv.dim() - 1
        if not isinstance(R, int) or not _slice_of(part, view, last, 0, R) or any(
                d != 1 for t in (cv, sv) for d in t.shape[(1 if t.dim() == 4 else 0):-1]):
            continue
        def after_rope(u) -> bool:      # a slice of the view's last dim that starts at column R or later
            start = u.args[2] if len(u.args) > 2 else 0
            return is_call(u, aten.slice.Tensor) and u.args[0] is view and u.args[1] in (-1, last) \
                and isinstance(start, int) and start >= R
        if not all(after_rope(u) for u in view.users if u is not part):
            continue
        if max(order[cos], order[sin]) > order[mm]:
            continue
        with graph.inserting_before(mm):
            new = graph.call_function(op, (x, w, cos, sin, R))
        new.meta = {k: v for k, v in mm.meta.items() if k in ("nn_module_stack", "val", "stack_trace")}
        mm.replace_all_uses_with(new)
        rot.replace_all_uses_with(part)
        graph.erase_node(rot)
        done += 1
    return done


# --- the step's cache write: RoPE on the new key, and the key and value into their slot, in one op ------------------

def _check_write(k_cache: Tensor, v_cache: Tensor, slot: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                 channels: Tensor | None = None):
    _check(k, cos, sin)
    if channels is not None:
        _check_channels(k, channels, 1)
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k.dim() != 4 or v.dim() != 4 or slot.dim() != 1 \
            or k.shape[:3] != v.shape[:3] or k.shape[2] != slot.shape[0] \
            or k_cache.shape[:2] != k.shape[:2] or v_cache.shape[:2] != v.shape[:2] \
            or k_cache.shape[3] != (k.shape[3] if channels is None else channels.shape[1]) \
            or v_cache.shape[3] != v.shape[3] or k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"rotary_kv_write_ needs caches (B, H, S, D), k / v (B, H, L, D) and slot (L,); got caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"slot {tuple(slot.shape)}")


def rotary_kv_write_reference(k_cache, v_cache, slot, k, v, cos, sin, channels=None) -> None:
    """What the captured step does: index_copy_ of rotary(k) (ThinK: its kept channels, channels[h] for KV head h)
    and of v into the caches' slots."""
    key = rotary_reference(k, cos, sin) if channels is None else rotary_gather_reference(k, cos, sin, channels, 1)
    k_cache.index_copy_(2, slot, key)
    v_cache.index_copy_(2, slot, v)


@torch.library.custom_op("rewriter::rotary_kv_write_", mutates_args=("k_cache", "v_cache"))
def rotary_kv_write_(k_cache: Tensor, v_cache: Tensor, slot: Tensor, k: Tensor, v: Tensor, cos: Tensor,
                     sin: Tensor, channels: Optional[Tensor] = None) -> None:
    """k_cache[:, :, slot] = rotary(k, cos, sin) (with channels: KV head h's channels[h] of it);
    v_cache[:, :, slot] = v."""
    _check_write(k_cache, v_cache, slot, k, v, cos, sin, channels)
    rotary_kv_write_reference(k_cache, v_cache, slot, k, v, cos, sin, channels)


@rotary_kv_write_.register_fake
def _rotary_kv_write_fake(k_cache, v_cache, slot, k, v, cos, sin, channels=None):
    return None


@rotary_kv_write_.register_kernel("cuda")
def _rotary_kv_write_cuda(k_cache, v_cache, slot, k, v, cos, sin, channels=None):
    """One Triton kernel (the rotation rounds as rotary's); the reference for what it does not take."""
    _check_write(k_cache, v_cache, slot, k, v, cos, sin, channels)
    from ..attention.triton import triton_available, use_reference
    dtype = torch.promote_types(torch.promote_types(k.dtype, cos.dtype), sin.dtype)
    if use_reference() or not triton_available() or max(k.shape[-1], v.shape[-1]) > 512 or dtype != k_cache.dtype \
            or v.dtype != v_cache.dtype or any(t.dtype not in _DTYPES for t in (k, v, cos, sin)):
        return rotary_kv_write_reference(k_cache, v_cache, slot, k, v, cos, sin, channels)
    from .triton_rotary import rotary_kv_write_triton
    rotary_kv_write_triton(k_cache, v_cache, slot, k, v, cos, sin,
                           None if channels is None or channels.stride(-1) == 1 else channels.contiguous())


def fuse_kv_write(gm: fx.GraphModule) -> int:
    """The step's per-layer cache write: index_copy_(k_view, 2, slot, rotary(k, cos, sin)) (or ThinK's
    rotary_gather(k, cos, sin, channels, 1)) and
    index_copy_(v_view, 2, slot, v) with the same slot -> one rewriter::rotary_kv_write_ (after fuse_rotary). Readers
    of the written views read the views (the op writes them in place before the later of the two writes' position).
    Returns the layers fused; the rotary nodes go dead."""
    op = torch.ops.rewriter.rotary_kv_write_.default
    graph, done = gm.graph, 0
    writes = [n for n in graph.nodes if is_call(n, aten.index_copy_.default) and len(n.args) == 4 and n.args[1] == 2]
    order = {n: i for i, n in enumerate(graph.nodes)}
    keys = [n for n in writes if len(n.args[3].users) == 1 and (
        is_call(n.args[3], torch.ops.rewriter.rotary.default)
        or (is_call(n.args[3], torch.ops.rewriter.rotary_gather.default) and n.args[3].args[4] == 1))]
    values = [n for n in writes if n not in keys]
    for kw in keys:
        slot = kw.args[2]
        vw = next((n for n in values if n.args[2] is slot and order[n] > order[kw]
                   and not any(order[kw] < order[u] < order[n] for u in kw.users)), None)
        if vw is None:
            continue
        values.remove(vw)
        k, cos, sin = kw.args[3].args[:3]
        channels = kw.args[3].args[3:4]           # rotary_gather's kept channels (ThinK), else none
        with graph.inserting_before(vw):
            new = graph.call_function(op, (kw.args[0], vw.args[0], slot, k, vw.args[3], cos, sin, *channels))
        new.meta = {m: x for m, x in vw.meta.items() if m in ("nn_module_stack", "stack_trace")}
        for w in (kw, vw):
            w.replace_all_uses_with(w.args[0])
        graph.erase_node(kw)
        graph.erase_node(vw)
        done += 1
    return done


def _kept_channels(index) -> tuple[fx.Node, int] | None:
    """(channels (Hc, Dk), group) when `index` is ThinK's gather index in a step graph:
    expand(unsqueeze(unsqueeze(src, 0), 2), [B, -1, 1, -1]) with src = channels (group 1, keys) or
    repeat_interleave(channels, group, -2) (the query heads of each KV head)."""
    if not is_call(index, aten.expand.default):
        return None
    size = index.args[1]
    inner = index.args[0]
    if len(size) != 4 or size[1] != -1 or size[2] != 1 or size[3] != -1 or not is_call(inner, aten.unsqueeze.default) \
            or inner.args[1] != 2 or not is_call(inner.args[0], aten.unsqueeze.default) or inner.args[0].args[1] != 0:
        return None
    src, group = inner.args[0].args[0], 1
    if is_call(src, aten.repeat_interleave.self_int) and len(src.args) >= 3 and src.args[2] in (0, -2) \
            and isinstance(src.args[1], int) and not src.kwargs:
        src, group = src.args[0], src.args[1]
    v = val(src)
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.dtype != torch.long:
        return None
    return src, group


def fuse_think_gather(gm: fx.GraphModule) -> int:
    """ThinK's gathers of the rotated query's and key's kept channels in a step graph (gather(rotary(x), -1,
    index), one new token): -> rewriter::rotary_gather, one kernel instead of the gather, its index copies and the
    rotary. Returns how many (the replaced nodes go dead)."""
    op = torch.ops.rewriter.rotary_gather.default
    done = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.gather.default) or len(node.args) != 3 or node.args[1] not in (-1, 3):
            continue
        rot, index = node.args[0], node.args[2]
        kept = _kept_channels(index)
        xv = val(rot.args[0]) if is_call(rot, torch.ops.rewriter.rotary.default) else None
        if kept is None or len(rot.users) != 1 or not isinstance(xv, torch.Tensor) or xv.dim() != 4 \
                or xv.shape[2] != 1:
            continue
        replace_with_op(gm, node, op, (*rot.args, *kept))
        gm.graph.erase_node(rot)
        done += 1
    return done
