"""Structured attention reductions: `head-prune` (drop whole heads) and `share-attention` (EchoAtt: a layer reuses
the previous layer's attention map).

head-prune: the importance of a head (for GQA: of a KV group, the KV head and every query head that reads it) is
the error its removal causes at the site's output on calibration data. The output projection is linear, so removing
group g changes the site's output by exactly X[:, cols_g] W_o[:, cols_g]^T (X: the attention output over real tokens,
cols_g: the group's channels): its score is that norm relative to the norm of X W_o^T. Groups are dropped in
ascending score over all selected sites (`count` groups, a `ratio` of them, or while the scores add up to at most
`error`); every site keeps at least one group. A dropped head leaves the program physically: the q / k / v
projections lose its output rows (GPT-2's fused c_attn: its columns in each of the three parts), the output
projection its input columns, and the attention node its head (and ALiBi slope). Dense exactness: the pruned model
equals the original with those heads' contributions to the output projection set to zero.

share-attention: for adjacent selected layers (l, l+1) the attention maps P = softmax(q k^T * scale, masked) are
compared on calibration data (mean total variation distance over heads and real query rows). The `count` closest
disjoint pairs (or, with `error`, pairs in that order while the receivers' relative output errors add up to at most
`error`) are rewritten: layer l computes P once (its output P v_l is exact) and layer l+1 computes P v_{l+1}; its q.k
is gone, and its q / k projections with it (dropped as dead code; GPT-2's fused c_attn makes v too and stays).
On GPT-2 the views splitting q / k / v into heads get their head count written out first (GPT-2 leaves it -1, which the
re-capture would turn into a shape guard failing at batch 1). Both passes leave plain aten ops and smaller weights, so
ONNX export needs no new translation."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..config import PassConfig
from ..errors import RewriterError
from ..graph import (attention_projections, aten, drop_unused_attributes, erase_dead, get_attr_tensor,
                     is_exact_attention, key_mask_value, record_node_inputs, rescale_head_shapes, set_attr_tensor)
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..program import WRAPPER_PREFIX
from ..sites import select


def _one_of(name: str, cfg, fields: tuple[str, ...]) -> None:
    given = [f for f in fields if getattr(cfg, f)]
    if len(given) > 1:
        raise ValueError(f"{name} takes at most one of {', '.join(fields)}; got {', '.join(given)}")


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, C) or (B * L, C) as (real tokens, C) float64."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        x = x[mask.bool()]
    elif mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
        x = x[mask.bool().reshape(-1)]
    return x.reshape(-1, x.shape[-1]).double()


# --- head-prune -----------------------------------------------------------------------------------------------------

@dataclass
class HeadPruneConfig(PassConfig):
    count: int = field(default=0, metadata={"help": "KV groups dropped over the selected sites (MHA: heads)"})
    ratio: float = field(default=0.0, metadata={"help": "share of the selected sites' KV groups dropped, in [0, 1)"})
    error: float = field(default=0.0, metadata={
        "help": "drop the least important groups while their site-output relative errors add up to at most this"})

    def validate(self):
        if self.count < 0:
            raise ValueError(f"head-prune count must be >= 0; got {self.count}")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"head-prune ratio must be in [0, 1); got {self.ratio}")
        if self.error < 0:
            raise ValueError(f"head-prune error must be >= 0; got {self.error}")
        _one_of("head-prune", self, ("count", "ratio", "error"))


def _projection_sites(gm, ctx, sites, result: PassResult) -> list[tuple]:
    """(site, attention node, projections) for the sites whose q / k / v / o linears can be found."""
    linears = {s.node: s for s in ctx.linear_sites(gm)}
    nodes = {n.name: n for n in gm.graph.nodes}
    linear_nodes = {nodes[name] for name in linears}
    out = []
    for site in sites:
        node = nodes[site.node]
        proj = attention_projections(node, linear_nodes) if is_exact_attention(node) else None
        if proj is None:
            result.notes.append(f"{site.module_path}: skipped (its q / k / v / output projections are not single "
                                "linears joined by shape ops)")
            continue
        out.append((site, node, proj, linears))
    return out


def prune_heads(gm, site, node, proj, linears, keep_kv: list[int]) -> dict:
    """Keep KV heads `keep_kv` (and the query heads that read them) at one site: slice the projections' weights,
    the shape constants between them and the attention node's ALiBi slopes. Returns size details."""
    H, Hkv, D, Dv = site.heads, site.kv_heads, site.head_dim, site.value_dim
    g = H // Hkv
    keep_q = [j * g + i for j in keep_kv for i in range(g)]
    H2, Hkv2 = len(keep_q), len(keep_kv)
    rows = {"q": [h * D + d for h in keep_q for d in range(D)],
            "k": [j * D + d for j in keep_kv for d in range(D)],
            "v": [j * Dv + d for j in keep_kv for d in range(Dv)]}
    by_linear: dict = {}
    for part in "qkv":
        lin, offset = proj[part]
        by_linear.setdefault(lin, []).append((offset, [offset + r for r in rows[part]]))
    mapping = {H: H2, Hkv: Hkv2, H * D: H2 * D, Hkv * D: Hkv2 * D, Hkv * Dv: Hkv2 * Dv, H * Dv: H2 * Dv}
    removed = 0
    for lin, parts in by_linear.items():
        ls = linears[lin.name]
        index = torch.tensor([r for _, rs in sorted(parts) for r in rs], dtype=torch.long)
        if len(parts) > 1:
            widths = {len(rs) for _, rs in parts}
            if len(widths) > 1:
                raise RewriterError(f"head-prune: {ls.module_path} makes q, k and v in one linear of unequal parts "
                                    "after pruning", "exclude the site")
            mapping[ls.out_features] = len(index)
        w = get_attr_tensor(gm, ls.weight)
        removed += w.numel()
        w = w[:, index] if ls.transposed else w[index]
        removed -= w.numel()
        set_attr_tensor(gm, ls.weight, w.contiguous())
        if ls.bias:
            b = get_attr_tensor(gm, ls.bias)
            set_attr_tensor(gm, ls.bias, b[index].contiguous())
            removed += b.numel() - len(index)
    os_ = linears[proj["o"].name]
    cols = torch.tensor([h * Dv + d for h in keep_q for d in range(Dv)], dtype=torch.long)
    w = get_attr_tensor(gm, os_.weight)
    removed += w.numel()
    w = w[cols] if os_.transposed else w[:, cols]
    removed -= w.numel()
    set_attr_tensor(gm, os_.weight, w.contiguous())
    mapping = {k: v for k, v in mapping.items() if k != v}
    rescale_head_shapes(proj["path"], mapping)
    if site.alibi_slopes:
        args = list(node.args)
        args[7] = [site.alibi_slopes[h] for h in keep_q]
        node.args = tuple(args)
    return {"heads_before": H, "heads_after": H2, "kv_heads_before": Hkv, "kv_heads_after": Hkv2,
            "parameters_removed": removed}


@register_pass
class HeadPrunePass(Pass):
    name = "head-prune"
    config_class = HeadPruneConfig
    summary = "drop whole attention heads (GQA: KV groups) of least output error on calibration data; the q/k/v/o " \
              "projections become smaller"

    def is_exact(self) -> bool:
        cfg: HeadPruneConfig = self.config
        return not (cfg.count or cfg.ratio or cfg.error)

    def run(self, gm, ctx) -> PassResult:
        cfg: HeadPruneConfig = self.config
        result = PassResult()
        targets = _projection_sites(gm, ctx, select(ctx.attention_sites(gm), cfg, "attention site", self.name), result)
        if not targets or self.is_exact():
            result.notes.append("no head dropped" + ("" if targets else ": no site with separable projections"))
            return result
        ctx.progress(f"head-prune: recording the output projections' inputs at {len(targets)} sites")
        recorded = record_node_inputs(gm, ctx.calib_inputs, {proj["o"].name for _, _, proj, _ in targets})
        mask = ctx.calib_inputs.get("attention_mask")
        scores = []   # (score, target index, kv head)
        for t, (site, _, proj, linears) in enumerate(targets):
            o = linears[proj["o"].name]
            args = recorded[proj["o"].name][0]
            X = _token_rows(args[1] if o.transposed else args[0], mask)
            W = o.weight_matrix(gm).double()
            full = (X @ W.T).norm().clamp_min(1e-30)
            g, Dv = site.heads // site.kv_heads, site.value_dim
            for j in range(site.kv_heads):
                cols = slice(j * g * Dv, (j + 1) * g * Dv)
                scores.append((float((X[:, cols] @ W[:, cols].T).norm() / full), t, j))
        scores.sort()
        left = [site.kv_heads for site, *_ in targets]
        total = sum(left)
        n = cfg.count if cfg.count else int(cfg.ratio * total + 1e-9) if cfg.ratio else total
        dropped: dict[int, list[int]] = {}
        spent = 0.0
        for score, t, j in scores:
            if sum(len(v) for v in dropped.values()) >= n or left[t] == 1:
                continue
            if cfg.error and spent + score > cfg.error:
                break
            dropped.setdefault(t, []).append(j)
            left[t] -= 1
            spent += score
        if cfg.count and cfg.count > sum(len(v) for v in dropped.values()):
            raise RewriterError(f"head-prune count {cfg.count} exceeds the {total - len(targets)} KV groups that can "
                                f"go (every one of the {len(targets)} sites keeps one)", "lower count")
        by_target = {(t, j): s for s, t, j in scores}
        for t, js in sorted(dropped.items()):
            site, node, proj, linears = targets[t]
            keep = [j for j in range(site.kv_heads) if j not in js]
            details = prune_heads(gm, site, node, proj, linears, keep)
            g = site.heads // site.kv_heads
            result.changes.append(SiteChange(site.module_path, "attention", {
                "method": "head-prune", "layer": site.layer, **details,
                "pruned_kv_heads": sorted(js), "pruned_heads": sorted(j * g + i for j in js for i in range(g)),
                "head_errors": [round(by_target[(t, j)], 6) for j in sorted(js)],
                "attention_flops_ratio": details["heads_after"] / details["heads_before"]}))
        erase_dead(gm)
        heads = sum(site.heads for site, *_ in targets)
        kept = heads - sum(c.details["heads_before"] - c.details["heads_after"] for c in result.changes)
        result.meta["head_prune"] = {c.module_path: c.details["pruned_heads"] for c in result.changes}
        result.summary = {"sites": len(targets), "heads_before": heads, "heads_after": kept,
                          "attention_flops_ratio": kept / heads, "error_sum": spent,
                          "parameters_removed": sum(c.details["parameters_removed"] for c in result.changes)}
        return result


# --- share-attention ------------------------------------------------------------------------------------------------

def attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, causal: bool,
                    scale: float, groups: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) over allowed keys, (B, H, Lq, Lk); kv heads repeated for GQA. A row with no allowed key
    (a padding query under causal masking) is uniform instead of NaN: it is padding, and the output stays finite."""
    # groups is a constant in programs: a head count read off shapes is symbolic there (GPT-2 views with -1)
    k = _repeat_kv(k, q.shape[1] // k.shape[1] if groups is None else groups)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    Lq, Lk = q.shape[2], k.shape[2]
    allowed = None
    if key_mask is not None:
        allowed = key_mask[:, None, None, :].bool()
    if causal:
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class AttentionMap(nn.Module):
    """The donor layer's attention probabilities, computed once and read by its own output and the receiver's."""

    def __init__(self, causal: bool, scale: float, heads: int, kv_heads: int):
        super().__init__()
        self.causal, self.scale, self.heads, self.kv_heads = causal, scale, heads, kv_heads

    def forward(self, q, k, key_mask=None):
        # head counts as constants: GPT-2's views leave them symbolic, and broadcasting the key mask then guards on
        # an expression that fails at batch 1
        q = q.reshape(q.shape[0], self.heads, q.shape[2], q.shape[3])
        k = k.reshape(k.shape[0], self.kv_heads, k.shape[2], k.shape[3])
        return attention_probs(q, k, key_mask, self.causal, self.scale, self.heads // self.kv_heads)


class MapTimesValues(nn.Module):
    def __init__(self, groups: int, kv_heads: int):
        super().__init__()
        self.groups, self.kv_heads = groups, kv_heads

    def forward(self, p, v):
        # the kv head count as a constant too: GPT-2's values have a symbolic one, and a matmul of a map with constant
        # heads against it re-captures with a guard that fails at batch 1
        v = v.reshape(v.shape[0], self.kv_heads, v.shape[2], v.shape[3])
        return torch.matmul(p, _repeat_kv(v, self.groups))


def _pin_head_views(node, site) -> None:
    """The (B, L, -1, D) views that split q / k / v of an attention node into heads, with the head count written out.
    GPT-2 leaves it -1, and the count export then infers is an expression of the batch and length that the shared
    map's matmul turns into a guard failing at batch 1."""
    for arg, heads in zip(node.args[:3], (site.heads, site.kv_heads, site.kv_heads)):
        todo, seen = [arg], set()
        while todo:
            n = todo.pop()
            if not isinstance(n, fx.Node) or n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
                shape = list(n.args[1])
                if len(shape) == 4 and shape[2] == -1:
                    shape[2] = heads
                    n.args = (n.args[0], shape, *n.args[2:])
                continue
            if n.target in (aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default):
                todo.append(n.args[0])


@dataclass
class ShareAttentionConfig(PassConfig):
    count: int = field(default=1, metadata={"help": "layer pairs (l, l+1) whose l+1 reuses l's attention map"})
    error: float = field(default=0.0, metadata={
        "help": "instead of count: pairs in order of map agreement while the receivers' relative output errors add "
                "up to at most this"})

    def validate(self):
        if self.count < 0 or self.error < 0:
            raise ValueError(f"share-attention count and error must be >= 0; got {self.count}, {self.error}")


def _real_rows(t: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, X) -> (real query rows * H, X): padding queries left out (key mask = query mask when Lq = Lk)."""
    if key_mask is not None and key_mask.shape[-1] == t.shape[2]:
        t = t.transpose(1, 2)[key_mask]
    return t.reshape(-1, t.shape[-1])


@register_pass
class ShareAttentionPass(Pass):
    name = "share-attention"
    config_class = ShareAttentionConfig
    summary = "EchoAtt: layer l+1 reuses layer l's attention map for the best-agreeing pairs; its q.k and q/k " \
              "projections go"

    def is_exact(self) -> bool:
        return not (self.config.count or self.config.error)

    def run(self, gm, ctx) -> PassResult:
        cfg: ShareAttentionConfig = self.config
        result = PassResult()
        sites = select(ctx.attention_sites(gm), cfg, "attention site", self.name)
        nodes = {n.name: n for n in gm.graph.nodes}
        usable = [s for s in sites if is_exact_attention(nodes[s.node]) and s.plain()]
        if len(usable) < len(sites):
            result.notes.append(f"{len(sites) - len(usable)} site(s) with windows, ALiBi or softcaps skipped")
        pairs = [(a, b) for a, b in zip(usable, usable[1:]) if a.layer is not None and b.layer == a.layer + 1
                 and a.heads == b.heads and a.causal == b.causal and a.value_dim == b.value_dim]
        if not pairs or self.is_exact():
            result.notes.append("no layer pair shares its attention map")
            return result
        ctx.progress(f"share-attention: recording q, k, v at {len(usable)} sites")
        recorded = record_node_inputs(gm, ctx.calib_inputs, {s.node for pair in pairs for s in pair})
        probs, values, masks = {}, {}, {}
        for s in {s.node: s for pair in pairs for s in pair}.values():
            args = recorded[s.node][0]
            q, k, v = (a.double() for a in args[:3])
            km = key_mask_value(args[3], q.shape[0])
            probs[s.node], values[s.node], masks[s.node] = attention_probs(q, k, km, s.causal, s.scale), v, km
        ranked = []
        for a, b in pairs:
            km = masks[b.node]
            tv = float(0.5 * _real_rows(probs[a.node] - probs[b.node], km).abs().sum(-1).mean())
            vb = _repeat_kv(values[b.node], b.heads // b.kv_heads)
            want, got = probs[b.node] @ vb, probs[a.node] @ vb
            err = float(_real_rows(got - want, km).norm() / _real_rows(want, km).norm().clamp_min(1e-30))
            ranked.append((tv, err, a, b))
        ranked.sort(key=lambda r: r[0])
        chosen, used, spent = [], set(), 0.0
        for tv, err, a, b in ranked:
            if a.node in used or b.node in used:
                continue
            if cfg.error:
                if spent + err > cfg.error:
                    break
            elif len(chosen) >= cfg.count:
                break
            chosen.append((tv, err, a, b))
            used |= {a.node, b.node}
            spent += err
        if cfg.count and not cfg.error and len(chosen) < cfg.count:
            raise RewriterError(f"share-attention count {cfg.count}: only {len(chosen)} disjoint adjacent layer pairs "
                                "among the selected sites", "lower count or widen the filter")
        for tv, err, a, b in chosen:
            self._share(gm, nodes[a.node], nodes[b.node], a, b)
            result.changes.append(SiteChange(b.module_path, "attention", {
                "method": "share-attention", "layer": b.layer, "donor": a.module_path, "donor_layer": a.layer,
                "map_distance": tv, "site_relative_error": err, "attention_flops_ratio": 0.5}))
        erase_dead(gm)
        drop_unused_attributes(gm)
        result.meta["share_attention"] = {c.module_path: c.details["donor"] for c in result.changes}
        result.summary = {"pairs": len(chosen), "sites": len(usable), "error_sum": spent,
                          "attention_flops_ratio": (len(usable) - 0.5 * len(chosen)) / len(usable)}
        return result

    @staticmethod
    def _share(gm, donor, receiver, a, b) -> None:
        graph = gm.graph
        for node, site in ((donor, a), (receiver, b)):
            _pin_head_views(node, site)
        keep = ("nn_module_stack", "stack_trace")
        base = f"{WRAPPER_PREFIX}{a.module_path}.shared_attention_map"
        gm.add_submodule(base, AttentionMap(a.causal, a.scale, a.heads, a.kv_heads))
        gm.add_submodule(f"{base}_values", MapTimesValues(a.heads // a.kv_heads, a.kv_heads))
        gm.add_submodule(f"{base}_receiver_values", MapTimesValues(b.heads // b.kv_heads, b.kv_heads))
        with graph.inserting_before(donor):
            p = graph.call_module(base, (donor.args[0], donor.args[1], donor.args[3]))
            out_a = graph.call_module(f"{base}_values", (p, donor.args[2]))
        with graph.inserting_before(receiver):
            out_b = graph.call_module(f"{base}_receiver_values", (p, receiver.args[2]))
        for new, old in ((p, donor), (out_a, donor), (out_b, receiver)):
            new.meta = {k: v for k, v in old.meta.items() if k in keep}
        donor.replace_all_uses_with(out_a)
        receiver.replace_all_uses_with(out_b)
        graph.erase_node(donor)
        graph.erase_node(receiver)
