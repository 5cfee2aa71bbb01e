"""Canonicalisation: every attention becomes one `aten.scaled_dot_product_attention` node, so that sites and
passes see a single form.

    softmax(q @ k^T * scale + mask) [-> to(dtype)] [-> dropout] @ v    ==>  sdpa(q, k, v, mask, scale=scale)
    sdpa(q, repeat_kv(k), repeat_kv(v), ...)                             ==>  sdpa(q, k, v, ..., enable_gqa=True)

Logit softcapping (Gemma2 eager: tanh(q @ k^T * scale / cap) * cap before the mask) has no SDPA form. Capture asks
for it (`softcap=True`): the chain becomes an SDPA node with meta["softcap"] = cap, which capture turns into
exact_attention(..., softcap=cap) at once, or back into the eager chain (rewriter.graph.expand_softcapped_sdpa) where
exact_attention cannot state the mask. Every other caller leaves softcapped chains as they are (an SDPA node would
drop the cap) and they are reported as unmatched.

repeat_kv is the expand/reshape of HF's GQA helper: reshape(expand(unsqueeze(x, 2), [B, Hkv, rep, L, D]), [B, H, L, D]).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .graph import aten, erase_dead, is_call, module_path, real_users, val

SDPA = aten.scaled_dot_product_attention.default
_PASS_THROUGH = (aten.to.dtype, aten.dropout.default, aten.clone.default, aten.contiguous.default,
                 aten.type_as.default)


@dataclass
class CanonicalReport:
    eager_attention: int = 0     # softmax chains turned into SDPA
    gqa: int = 0                 # repeat_kv removed in favour of enable_gqa
    unmatched_softmax: list[str] | None = None   # softmax nodes that looked like attention but did not match
    unmatched_attention: list[dict] | None = None  # the same, with module path and what was seen (see below)


def _is_last_two_transpose(node) -> bool:
    if not is_call(node, aten.transpose.int):
        return False
    rank = len(val(node).shape)
    d0, d1 = sorted(d % rank for d in node.args[1:3])
    return (d0, d1) == (rank - 2, rank - 1)


def _softcap_source(node) -> tuple[fx.Node, float] | None:
    """(s, cap) when node is cap * tanh(s / cap) (the division may be a multiplication by 1 / cap)."""
    if not (is_call(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)) and node.args[1] > 0):
        return None
    cap, t = float(node.args[1]), node.args[0]
    if not is_call(t, aten.tanh.default):
        return None
    d = t.args[0]
    if is_call(d, aten.div.Tensor) and isinstance(d.args[1], (int, float)) and d.args[1]:
        inner_cap = float(d.args[1])
    elif is_call(d, aten.mul.Tensor) and isinstance(d.args[1], (int, float)) and d.args[1]:
        inner_cap = 1.0 / float(d.args[1])
    else:
        return None
    if abs(inner_cap - cap) > 1e-6 * cap or not isinstance(d.args[0], fx.Node):
        return None
    return d.args[0], cap


def _match_eager(softmax: fx.Node, softcap: bool = False):
    """Return (q, k, v, mask, scale, final_matmul, cap or None) or None; a softcapped chain only when `softcap`."""
    if len(softmax.args) > 1 and softmax.args[1] not in (-1, 3):
        return None
    x = softmax.args[0]
    mask = None
    if is_call(x, aten.add.Tensor):
        a, b = x.args
        scores_side = a if isinstance(a, fx.Node) and _leads_to_qk(a) else b
        mask = b if scores_side is a else a
        if not isinstance(scores_side, fx.Node) or not _leads_to_qk(scores_side):
            return None
        x = scores_side
    cap = None
    capped = _softcap_source(x)
    if capped is not None:
        if not softcap:
            return None
        x, cap = capped
    scale = 1.0
    if is_call(x, aten.mul.Tensor) and isinstance(x.args[1], (int, float)):
        scale, x = float(x.args[1]), x.args[0]
    elif is_call(x, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
        scale, x = 1.0 / float(x.args[1]), x.args[0]
    if not is_call(x, aten.matmul.default) or not _is_last_two_transpose(x.args[1]):
        return None
    q, k = x.args[0], x.args[1].args[0]
    if len(val(q).shape) != 4 or len(val(k).shape) != 4:
        return None
    walked = _after_softmax(softmax)
    if walked is None:
        return None
    node, u = walked
    if is_call(u, aten.matmul.default) and u.args[0] is node:
        v = u.args[1]
        if not isinstance(v, fx.Node) or len(val(v).shape) != 4:
            return None
        return q, k, v, mask, scale, u, cap
    return None


def _after_softmax(softmax: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(the last of softmax's single-user pass-through chain (casts, inference dropout), its one real user), or
    None when the probabilities fan out or go through training-mode dropout."""
    node = softmax
    while True:
        users = real_users(node)
        if len(users) != 1:
            return None
        (u,) = users
        if not is_call(u, *_PASS_THROUGH):
            return node, u
        if is_call(u, aten.dropout.default) and len(u.args) > 2 and u.args[2]:
            return None  # training-mode dropout is not attention inference
        node = u


_SCORE_PRODUCERS = (aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default)


def describe_unmatched(softmax: fx.Node, depth: int = 12) -> dict | None:
    """What an attention-like softmax that did not match looks like: the ops between its scores (the nearest matmul /
    bmm / baddbmm upstream, searched breadth-first) and the softmax, and the reason in words. None when no score
    product feeds the softmax within `depth` ops."""
    start = softmax.args[0]
    if not isinstance(start, fx.Node):
        return None
    parent: dict[fx.Node, fx.Node | None] = {start: None}
    frontier, found = [start], None
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if node.op != "call_function":
                continue
            if node.target in _SCORE_PRODUCERS:
                found = node
                break
            for a in node.all_input_nodes:
                if a not in parent:
                    parent[a] = node
                    nxt.append(a)
        if found is not None or not nxt:
            break
        frontier = nxt
    if found is None:
        return None
    chain, node = [], found
    while node is not None:
        chain.append(getattr(node.target, "__name__", str(node.target)).split(".")[0])
        node = parent[node]
    if "tanh" in chain:
        reason = "logit softcapping (tanh of the scores before softmax)"
    elif chain[0] == "baddbmm":
        reason = "an additive score bias through baddbmm on (batch * heads) scores (ALiBi-style)"
    elif "add" in chain[1:]:
        reason = "extra additive score terms beside the mask (e.g. relative-position attention)"
    else:
        reason = "a score computation the matcher does not know"
    return {"node": softmax.name, "module_path": module_path(softmax), "seen": " -> ".join(chain + ["softmax"]),
            "reason": reason}


def _merged_heads_source(node) -> fx.Node | None:
    """x (B, H, L, D) when node is reshape(x, [B * H, L, D]) (Bloom keeps batch and heads merged)."""
    if not is_call(node, aten.reshape.default, aten.view.default) or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    s, o = val(src).shape, val(node).shape
    if len(s) != 4 or len(o) != 3 or str(o[0]) != str(s[0] * s[1]) or str(o[-1]) != str(s[-1]):
        return None
    return src


def _match_merged_heads(softmax: fx.Node):
    """Attention on (B * H)-merged tensors, the Bloom form:

        softmax(view(baddbmm(bias, q3, k3^T, beta, alpha), [B, H, L, L]) + mask) -> view(B * H) -> bmm(., v3) -> view

    Returns (q, k, v, bias, beta, mask, scale, scores_view, final_view) or None."""
    x, mask = softmax.args[0], None
    if is_call(x, aten.add.Tensor):
        a, b = x.args
        x, mask = (a, b) if is_call(a, aten.view.default, aten.reshape.default) else (b, a)
    if not is_call(x, aten.view.default, aten.reshape.default) or len(val(x).shape) != 4:
        return None
    scores_view, scores = x, x.args[0]
    if is_call(scores, aten.baddbmm.default):
        bias, q3, kt3 = scores.args[:3]
        beta, alpha = float(scores.kwargs.get("beta", 1.0)), float(scores.kwargs.get("alpha", 1.0))
    elif is_call(scores, aten.bmm.default):
        (q3, kt3), bias, beta, alpha = scores.args[:2], None, 1.0, 1.0
    else:
        return None
    if not (is_call(kt3, aten.transpose.int) and sorted(d % 3 for d in kt3.args[1:3]) == [1, 2]):
        return None
    q, k = _merged_heads_source(q3), _merged_heads_source(kt3.args[0])
    if q is None or k is None:
        return None
    walked = _after_softmax(softmax)
    if walked is None:
        return None
    u = walked[1]
    if not (is_call(u, aten.view.default, aten.reshape.default) and len(val(u).shape) == 3):
        return None
    users = real_users(u)
    if len(users) != 1 or not is_call(users[0], aten.bmm.default) or users[0].args[0] is not u:
        return None
    pv = users[0]
    v = _merged_heads_source(pv.args[1])
    finals = real_users(pv)
    if v is None or len(finals) != 1 or not is_call(finals[0], aten.view.default, aten.reshape.default) \
            or len(val(finals[0]).shape) != 4:
        return None
    return q, k, v, bias, beta, mask, alpha, scores_view, finals[0]


def _replace_merged_heads(graph: fx.Graph, q, k, v, bias, beta, mask, scale, scores_view, final) -> None:
    """SDPA on the (B, H, L, D) sources; an additive (B * H, 1|L, L) bias joins the mask as (B, H, 1|L, L)."""
    scores = val(scores_view)          # (B, H, Lq, Lk): the new mask nodes get fake values of their shapes
    with graph.inserting_before(final):
        attn_mask = mask
        if bias is not None:
            B, H = scores_view.args[1][:2]
            rows = int(val(bias).shape[1])
            b = graph.call_function(aten.view.default, (bias, [B, H, rows, -1]))
            b.meta["val"] = scores[:, :, :1, :] if rows == 1 else scores
            if beta != 1.0:
                b = graph.call_function(aten.mul.Tensor, (b, beta))
                b.meta["val"] = b.args[0].meta["val"]
            attn_mask = b
            if mask is not None:
                attn_mask = graph.call_function(aten.add.Tensor, (b, mask))
                attn_mask.meta["val"] = scores
        sdpa = graph.call_function(SDPA, (q, k, v, attn_mask), {"scale": scale})
    sdpa.meta = dict(final.meta)
    final.replace_all_uses_with(sdpa)
    graph.erase_node(final)


def _leads_to_qk(node: fx.Node) -> bool:
    x = node
    capped = _softcap_source(x)
    if capped is not None:
        x = capped[0]
    if is_call(x, aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
        x = x.args[0]
    return is_call(x, aten.matmul.default) and _is_last_two_transpose(x.args[1])


def _repeat_kv_source(node) -> tuple[fx.Node, int] | None:
    """If node is repeat_kv(x), return (x, rep)."""
    if not is_call(node, aten.reshape.default, aten.view.default):
        return None
    e = node.args[0]
    if not is_call(e, aten.expand.default):
        return None
    u = e.args[0]
    if not (is_call(u, aten.unsqueeze.default) and u.args[1] in (2, -3)):
        return None
    src = u.args[0]
    s_shape, out_shape = val(src).shape, val(node).shape
    if len(s_shape) != 4 or len(out_shape) != 4 or not isinstance(out_shape[1], int) or not isinstance(s_shape[1], int):
        return None
    if out_shape[1] % s_shape[1] != 0:
        return None
    return src, out_shape[1] // s_shape[1]


def canonicalize(gm: fx.GraphModule, softcap: bool = False) -> CanonicalReport:
    """Rewrite gm in place to the canonical attention form (softcapped chains too when `softcap`: capture only, see
    the module docstring)."""
    report = CanonicalReport(unmatched_softmax=[], unmatched_attention=[])
    graph = gm.graph
    for softmax in [n for n in graph.nodes if is_call(n, aten.softmax.int, aten._softmax.default)]:
        m = _match_eager(softmax, softcap)
        merged = _match_merged_heads(softmax) if m is None else None
        if merged is not None:
            _replace_merged_heads(graph, *merged)
            report.eager_attention += 1
            continue
        if m is None:
            unmatched = describe_unmatched(softmax)
            if unmatched is not None or _leads_to_qk(softmax.args[0]) or is_call(softmax.args[0], aten.add.Tensor):
                report.unmatched_softmax.append(softmax.name)
                report.unmatched_attention.append(unmatched or {
                    "node": softmax.name, "module_path": module_path(softmax), "seen": "softmax",
                    "reason": "a score computation the matcher does not know"})
            continue
        q, k, v, mask, scale, final, cap = m
        with graph.inserting_before(final):
            sdpa = graph.call_function(SDPA, (q, k, v, mask), {"scale": scale})
        sdpa.meta = dict(final.meta)
        if cap is not None:
            sdpa.meta["softcap"] = cap
        final.replace_all_uses_with(sdpa)
        graph.erase_node(final)
        report.eager_attention += 1
    for node in [n for n in graph.nodes if is_call(n, SDPA)]:
        if node.kwargs.get("enable_gqa"):
            continue
        rk, rv = _repeat_kv_source(node.args[1]), _repeat_kv_source(node.args[2])
        if rk is None or rv is None or rk[1] != rv[1]:
            continue
        args = list(node.args)
        args[1], args[2] = rk[0], rv[0]
        node.args = tuple(args)
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        report.gqa += 1
    erase_dead(gm)
    if not report.unmatched_softmax:
        report.unmatched_softmax = None
        report.unmatched_attention = None
    return report

