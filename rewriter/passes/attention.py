"""Attention approximation passes: each replaces the canonical SDPA node of the selected sites with a
`rewriter::<method>_attention` op, and reports per site the budget, counted cost and measured error.

Budgets speak one vocabulary: `density` (fraction of score entries computed exactly) for sparse methods,
`features` (m) for low-rank ones, both for Scatterbrain. A density becomes a token window (or stride) at the
calibration length; the report states the resulting integer budget. Per-site budgets: run the pass several
times with different include/exclude/layers filters (e.g. layers "0-1" untouched, "2-" windowed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import fx

from ..canonical import SDPA
from ..config import PassConfig
from ..graph import aten, erase_dead, record_node_inputs
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..sites import AttentionSite
from ..attention import _contract as _common


# --- the graph side: mask -> key_mask, SDPA -> op ---------------------------------------------------------------

def key_mask_node(graph: fx.Graph, mask: fx.Node | None, q: fx.Node) -> fx.Node | None:
    """(B, Lk) bool 'key is real' from an SDPA mask (B|1, 1|H, Lq, Lk), bool or additive float.

    HF builds masks as padding & causal; the last query row sees every real key under both bidirectional and
    causal masks, so it is the key-padding mask."""
    if mask is None:
        return None
    padding = _padding_mask_input(mask)
    if padding is not None:   # read the (B, L) padding mask directly: HF's (B, 1, L, L) mask then goes dead
        return _shared_key_mask(graph, padding)
    m = graph.call_function(aten.select.int, (mask, 1, 0))
    m = graph.call_function(aten.select.int, (m, 1, -1))
    dtype = mask.meta["val"].dtype if "val" in mask.meta else torch.bool
    if dtype != torch.bool:
        m = graph.call_function(aten.gt.Scalar, (m, -1.0e4))   # additive masks: 0 keep, ~-3e38 drop
    b = graph.call_function(aten.sym_size.int, (q, 0))
    return graph.call_function(aten.expand.default, (m, [b, -1]))


def _shared_key_mask(graph: fx.Graph, padding: fx.Node) -> fx.Node:
    """One `attention_mask != 0` node for every site (right after the inputs): all layers then get the same tensor,
    so the CUDA kernels' all-keys-real check (one device sync) runs once per forward, not once per layer."""
    for user in padding.users:
        if user.op == "call_function" and user.target is aten.ne.Scalar and user.args == (padding, 0):
            return user
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        node = graph.call_function(aten.ne.Scalar, (padding, 0))
    if "val" in padding.meta:
        node.meta["val"] = padding.meta["val"] != 0
    return node


def _padding_mask_input(mask: fx.Node) -> fx.Node | None:
    """The program's `attention_mask` input (B, Lk) when the SDPA mask is built from it with the same batch and key
    length (HF text models: padding & causal/bidirectional); None otherwise (the decode programs' explicit 4D masks,
    vision models, cached keys). The last query row of an HF mask is exactly this padding mask."""
    seen, stack, found = set(), [mask], None
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n.target == "attention_mask":
                found = n
            continue
        stack.extend(n.all_input_nodes)
    if found is None:
        return None
    pv, mv = found.meta.get("val"), mask.meta.get("val")
    if pv is None or mv is None or pv.dim() != 2 or mv.dim() != 4:
        return None
    same = str(pv.shape[-1]) == str(mv.shape[-1]) and (str(pv.shape[0]) == str(mv.shape[0]) or mv.shape[0] == 1)
    return found if same else None


def _sdpa_mask(node: fx.Node):
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def replace_attention(gm: fx.GraphModule, node: fx.Node, op, causal: bool, scale: float, method_args: tuple) -> fx.Node:
    graph = gm.graph
    q, k, v = node.args[:3]
    with graph.inserting_before(node):
        km = key_mask_node(graph, _sdpa_mask(node), q)
        new = graph.call_function(op, (q, k, v, km, causal, scale, *method_args))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def key_mask_value(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The same reduction on concrete tensors (for per-site error measurement)."""
    if mask is None:
        return None
    m = mask[:, 0, -1, :]
    if m.dtype != torch.bool:
        m = m > -1.0e4
    return m.expand(batch, -1)


# --- the passes ---------------------------------------------------------------------------------------------------

@dataclass
class AttentionConfig(PassConfig):
    def _density_ok(self, name: str, value: float, allow_zero: bool = True) -> None:
        if not (0 < value <= 1) and not (allow_zero and value == 0):
            raise ValueError(f"{name} must be in (0, 1]; got {value}")


def _window_from(window: int, density: float, L: int) -> int:
    """Explicit window wins; else density x calibration length (at least 1 token)."""
    return window if window > 0 else max(1, int(round(density * L)))


class AttentionPass(Pass):
    """Shared mechanics; a method supplies `op_name`, `method_args(site, L)` and `cost(...)`."""
    op_name: ClassVar[str] = ""
    site_kind = "attention"

    def method_args(self, site: AttentionSite, L: int) -> tuple[tuple, dict]:
        """(positional args after `scale` for the op, the integer budget for the report)."""
        raise NotImplementedError

    def cost(self, site: AttentionSite, B: int, L: int, budget: dict) -> _common.AttentionCost:
        raise NotImplementedError

    sparse_method: ClassVar[str] = ""      # name in ops.sparse_attention.measured_density, for sparse methods
    sparse_args: ClassVar[tuple[str, ...]] = ()   # the op's budget argument names, in order

    def measured_density(self, q, k, km, site: AttentionSite, method_args: tuple) -> float | None:
        """Share of the allowed score entries the method computes exactly on these inputs (sparse methods; the
        dense check is skipped past 4096 tokens, where the counted layout density stands in)."""
        if not self.sparse_method or k.shape[2] > 4096:
            return None
        from ..attention.sparse import measured_density
        return measured_density(self.sparse_method, q, k, km, site.causal, site.scale,
                                **dict(zip(self.sparse_args, method_args)))

    @property
    def op(self):
        from .. import attention  # noqa: F401  (registers the ops)
        return getattr(torch.ops.rewriter, self.op_name).default

    def run(self, gm, ctx) -> PassResult:
        keep = self.config.site_filter()
        sites = [s for s in ctx.attention_sites(gm) if keep(s)]
        result = PassResult()
        if not sites:
            result.notes.append("no attention site matched the filter")
            return result
        nodes = {n.name: n for n in gm.graph.nodes}
        ctx.progress(f"{self.name}: recording attention inputs on calibration data")
        recorded = record_node_inputs(gm, ctx.calib_inputs, {s.node for s in sites})
        errors, costs = [], []
        for site in sites:
            args, kwargs = recorded[site.node]
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            B, L = q.shape[0], k.shape[2]
            method_args, budget = self.method_args(site, L)
            replace_attention(gm, nodes[site.node], self.op, site.causal, site.scale, method_args)
            # error of this site alone, on its own recorded inputs (exact attention as the reference)
            km = key_mask_value(mask, B)
            rows = _measured_rows(q.shape[2], q.device)
            exact = self._exact(q, k, v, km, site, rows)
            approx = self.op(q, k, v, km, site.causal, site.scale, *method_args)[:, :, rows]
            valid = km[:, None, rows, None] if (km is not None and not site.causal) else None
            err = _rel_error(exact, approx, valid)
            cost = self.cost(site, B, L, budget)
            density = self.measured_density(q, k, km, site, method_args)
            errors.append(err)
            costs.append(cost)
            result.changes.append(SiteChange(site.module_path, "attention", {
                "method": self.name, "layer": site.layer, "seq_len": L, **budget,
                "density": round(density if density is not None else min(1.0, cost.density), 5),
                "computed_entries_ratio": round(cost.density, 5), "attention_rel_error": err,
                "flops_ratio": cost.flops / cost.dense_flops, "memory_ratio": cost.memory_bytes / cost.dense_memory_bytes}))
        erase_dead(gm)
        result.summary = {
            "sites": len(sites), "mean_attention_rel_error": sum(errors) / len(errors),
            "attention_flops_ratio": sum(c.flops for c in costs) / sum(c.dense_flops for c in costs),
            "attention_memory_ratio": sum(c.memory_bytes for c in costs) / sum(c.dense_memory_bytes for c in costs),
            "computed_entries_ratio": sum(c.score_entries for c in costs) / sum(c.dense_score_entries for c in costs),
            "density": sum(c.details["density"] for c in result.changes) / len(result.changes)}
        return result

    @staticmethod
    def _exact(q, k, v, km, site: AttentionSite, rows: torch.Tensor) -> torch.Tensor:
        """Exact attention (float64) for the given query rows only."""
        allowed = _common.allowed_mask(q.shape[2], k.shape[2], site.causal, km, q.device)[:, :, rows]
        return _common.masked_softmax_attention(q[:, :, rows].double(), k.double(), v.double(), allowed, site.scale)


MAX_MEASURED_ROWS = 1024


def _measured_rows(Lq: int, device) -> torch.Tensor:
    """Query rows whose error is measured: all of them up to 1024, else 1024 evenly spaced rows (the float64
    reference is Lq x Lk per head; at 32K tokens a full one would not fit in memory)."""
    if Lq <= MAX_MEASURED_ROWS:
        return torch.arange(Lq, device=device)
    return torch.linspace(0, Lq - 1, MAX_MEASURED_ROWS, device=device).round().long()


def _rel_error(exact: torch.Tensor, approx: torch.Tensor, valid: torch.Tensor | None) -> float:
    d = exact - approx.double()
    if valid is not None:   # padded query rows carry no information; padding keys are masked in both
        valid = valid.expand_as(d)
        d, exact = d[valid], exact[valid]
    return float(d.norm() / exact.norm().clamp_min(1e-30))


def _cost_fn(module: str, name: str) -> Callable:
    import importlib
    return getattr(importlib.import_module(f"rewriter.attention.{module}"), name)


# Exact --------------------------------------------------------------------------------------------------------------

@dataclass
class ExactAttentionConfig(AttentionConfig):
    pass


@register_pass
class ExactAttention(AttentionPass):
    name = "exact-attention"
    config_class = ExactAttentionConfig
    op_name = "exact_attention"
    summary = ("attention stays exact; HF's dense L x L mask becomes the key-padding mask, so SDPA takes its "
               "causal flash / cuDNN path on unpadded batches (put it last: it leaves no SDPA site for the "
               "attention and KV passes)")

    def method_args(self, site, L):
        return (), {}

    def cost(self, site, B, L, budget):
        return _cost_fn("exact", "exact_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                         site.value_dim, site.causal)


# Sparse -------------------------------------------------------------------------------------------------------------

@dataclass
class WindowConfig(AttentionConfig):
    window: int = field(default=0, metadata={"help": "keys per query (tokens); 0: from density"})
    density: float = field(default=0.25, metadata={"help": "window = density x calibration length"})
    sinks: int = field(default=4, metadata={"help": "first tokens always visible"})
    block: int = 64

    def validate(self):
        if self.window < 0 or self.sinks < 0 or self.block < 1:
            raise ValueError("window, sinks must be >= 0 and block >= 1")
        self._density_ok("density", self.density, allow_zero=self.window > 0)


@register_pass
class WindowAttention(AttentionPass):
    name = "window"
    config_class = WindowConfig
    op_name = "window_attention"
    sparse_method, sparse_args = "window", ("window", "sinks", "block")
    summary = "sliding-window attention plus sink tokens (StreamingLLM / neighbourhood)"

    def method_args(self, site, L):
        c = self.config
        w = _window_from(c.window, c.density, L)
        return (w, c.sinks, c.block), {"window": w, "sinks": c.sinks}

    def cost(self, site, B, L, budget):
        return _cost_fn("sparse", "window_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                           site.value_dim, site.causal, window=budget["window"],
                                                           sinks=budget["sinks"], block=self.config.block)


@dataclass
class BlockTopkConfig(AttentionConfig):
    density: float = field(default=0.25, metadata={"help": "fraction of key blocks kept per query block"})
    block: int = 64
    pool: str = field(default="mean", metadata={"help": "mean | maxmin"})
    sink_blocks: int = 1
    local_blocks: int = 1

    def validate(self):
        self._density_ok("density", self.density, allow_zero=False)
        if self.pool not in ("mean", "maxmin"):
            raise ValueError(f"pool must be mean or maxmin; got {self.pool!r}")
        if self.block < 1 or self.sink_blocks < 0 or self.local_blocks < 0:
            raise ValueError("block >= 1, sink_blocks >= 0, local_blocks >= 0")


@register_pass
class BlockTopkAttention(AttentionPass):
    name = "block-topk"
    config_class = BlockTopkConfig
    op_name = "block_topk_attention"
    sparse_method, sparse_args = "block_topk", ("density", "block", "pool", "sink_blocks", "local_blocks")
    summary = "training-free block-sparse attention: top-k key blocks by pooled scores (SeerAttention/Quest)"

    def method_args(self, site, L):
        c = self.config
        return (c.density, c.block, c.pool, c.sink_blocks, c.local_blocks), {"block_density": c.density}

    def cost(self, site, B, L, budget):
        c = self.config
        return _cost_fn("sparse", "block_topk_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                               site.value_dim, site.causal, density=c.density,
                                                               block=c.block, sink_blocks=c.sink_blocks,
                                                               local_blocks=c.local_blocks)


@dataclass
class StridedConfig(AttentionConfig):
    stride: int = field(default=0, metadata={"help": "every stride-th key block per head; 0: from density"})
    density: float = 0.25
    local_blocks: int = 1
    sink_blocks: int = 1
    block: int = 64

    def validate(self):
        if self.stride < 0 or self.block < 1:
            raise ValueError("stride must be >= 0 and block >= 1")
        self._density_ok("density", self.density, allow_zero=self.stride > 0)


@register_pass
class StridedAttention(AttentionPass):
    name = "strided"
    config_class = StridedConfig
    op_name = "strided_attention"
    sparse_method, sparse_args = "strided", ("stride", "local_blocks", "sink_blocks", "block")
    summary = "S2-Attention heterogeneous sharding: local blocks plus a per-head strided set of blocks"

    def method_args(self, site, L):
        c = self.config
        stride = c.stride if c.stride > 0 else max(1, int(round(1.0 / c.density)))
        return (stride, c.local_blocks, c.sink_blocks, c.block), {"stride": stride}

    def cost(self, site, B, L, budget):
        c = self.config
        return _cost_fn("sparse", "strided_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                            site.value_dim, site.causal, stride=budget["stride"],
                                                            local_blocks=c.local_blocks, sink_blocks=c.sink_blocks,
                                                            block=c.block)


@dataclass
class LshConfig(AttentionConfig):
    n_hashes: int = 2
    bucket_size: int = 64
    seed: int = 0

    def validate(self):
        if self.n_hashes < 1 or self.bucket_size < 1:
            raise ValueError("n_hashes and bucket_size must be >= 1")


@register_pass
class LshAttention(AttentionPass):
    name = "lsh"
    config_class = LshConfig
    op_name = "lsh_attention"
    sparse_method, sparse_args = "lsh", ("n_hashes", "bucket_size", "seed")
    summary = "angular LSH attention (Reformer / HyperAttention sortLSH), rounds merged by log-sum-exp"

    def method_args(self, site, L):
        c = self.config
        return (c.n_hashes, c.bucket_size, c.seed), {"n_hashes": c.n_hashes, "bucket_size": c.bucket_size}

    def cost(self, site, B, L, budget):
        c = self.config
        return _cost_fn("sparse", "lsh_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                        site.value_dim, site.causal, n_hashes=c.n_hashes,
                                                        bucket_size=c.bucket_size)


# Low-rank and linear --------------------------------------------------------------------------------------------

@dataclass
class PerformerConfig(AttentionConfig):
    features: int = field(default=64, metadata={"help": "random features m"})
    seed: int = 0

    def validate(self):
        if self.features < 1:
            raise ValueError(f"features must be >= 1; got {self.features}")


@register_pass
class PerformerAttention(AttentionPass):
    name = "performer"
    config_class = PerformerConfig
    op_name = "performer_attention"
    summary = "Performer FAVOR+ positive orthogonal random features (linear in length)"

    def method_args(self, site, L):
        c = self.config
        return (c.features, c.seed), {"features": c.features}

    def cost(self, site, B, L, budget):
        return _cost_fn("feature_map", "performer_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                               site.value_dim, site.causal, features=self.config.features)


@dataclass
class LinearConfig(AttentionConfig):
    feature_map: str = field(default="elu", metadata={"help": "elu | relu | taylor2"})
    window: int = field(default=0, metadata={"help": "hybrid: exact softmax over a window of this many keys"})
    density: float = field(default=0.0, metadata={"help": "hybrid window = density x calibration length"})
    sinks: int = 0

    def validate(self):
        if self.feature_map not in ("elu", "relu", "taylor2"):
            raise ValueError(f"feature_map must be elu, relu or taylor2; got {self.feature_map!r}")
        if self.window < 0 or self.sinks < 0:
            raise ValueError("window and sinks must be >= 0")
        self._density_ok("density", self.density)


@register_pass
class LinearAttention(AttentionPass):
    name = "linear"
    config_class = LinearConfig
    op_name = "linear_attention"
    summary = "kernel linear attention (elu+1, relu, Taylor-2), optionally hybrid with a sliding window (BASED/LoLCATs)"

    def method_args(self, site, L):
        c = self.config
        w = c.window if c.window > 0 else (int(round(c.density * L)) if c.density > 0 else 0)
        return (c.feature_map, w, c.sinks), {"feature_map": c.feature_map, "window": w, "sinks": c.sinks}

    def cost(self, site, B, L, budget):
        return _cost_fn("feature_map", "linear_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                            site.value_dim, site.causal,
                                                            feature_map=budget["feature_map"], window=budget["window"],
                                                            sinks=budget["sinks"])


@dataclass
class ScatterbrainConfig(AttentionConfig):
    features: int = field(default=32, metadata={"help": "random features m of the low-rank part"})
    density: float = field(default=0.1, metadata={"help": "sparse part: window = density x calibration length"})
    window: int = field(default=0, metadata={"help": "sparse part window in tokens (overrides density)"})
    sinks: int = 0
    seed: int = 0

    def validate(self):
        if self.features < 1 or self.window < 0 or self.sinks < 0:
            raise ValueError("features >= 1, window >= 0, sinks >= 0")
        self._density_ok("density", self.density, allow_zero=self.window > 0)


@register_pass
class ScatterbrainAttention(AttentionPass):
    name = "scatterbrain"
    config_class = ScatterbrainConfig
    op_name = "scatterbrain_attention"
    summary = "Scatterbrain: sliding-window sparse + Performer low-rank, combined unbiasedly"

    def method_args(self, site, L):
        c = self.config
        w = _window_from(c.window, c.density, L)
        return (c.features, w, c.sinks, c.seed), {"features": c.features, "window": w, "sinks": c.sinks}

    def cost(self, site, B, L, budget):
        return _cost_fn("feature_map", "scatterbrain_cost")(B, site.heads, site.kv_heads, L, L, site.head_dim,
                                                                  site.value_dim, site.causal,
                                                                  features=budget["features"], window=budget["window"],
                                                                  sinks=budget["sinks"])
