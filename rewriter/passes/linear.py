"""Linear-layer passes: low-rank factorisation (plain SVD, SVD-LLM whitening, ASVD), sparse + low-rank, and
BiPFT-style binarisation. Each replaces a LinearSite by a small module (traced into aten ops and
`rewriter::binary_linear` on re-capture) and reports per site parameters, bytes and output error on the
calibration activations."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import distributed as dist
from ..config import PassConfig
from ..graph import drop_unused_attributes, erase_dead, get_attr_tensor, record_node_inputs
from ..linear import lowrank as lr
from ..linear.binary import binarize_weight, binary_linear_bytes
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..program import WRAPPER_PREFIX
from ..sites import LinearSite, select


class LowRankLinear(nn.Module):
    """y = (x A^T) B^T + bias."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B, self.bias)


class SparseLowRankLinear(nn.Module):
    """y = (x A^T) B^T + x S^T + bias, S as COO (rows, cols, vals)."""

    def __init__(self, A, B, rows, cols, vals, bias):
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.vals = nn.Parameter(vals, requires_grad=False)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x):
        return lr.sparse_lowrank_apply(x, self.A, self.B, self.rows, self.cols, self.vals, self.bias)


class BinaryLinear(nn.Module):
    """y = alpha * (x sign^T) + mu * sum(x) + bias [+ (x A_r^T) B_r^T]; signs packed 8 per byte."""

    def __init__(self, packed, alpha, mu, bias, in_features: int, residual_a=None, residual_b=None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.alpha = nn.Parameter(alpha, requires_grad=False)
        self.mu = nn.Parameter(mu, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.in_features = in_features
        self.residual_a = nn.Parameter(residual_a, requires_grad=False) if residual_a is not None else None
        self.residual_b = nn.Parameter(residual_b, requires_grad=False) if residual_b is not None else None

    def forward(self, x):
        y = torch.ops.rewriter.binary_linear(x, self.packed, self.alpha, self.mu, self.bias, self.in_features)
        if self.residual_a is not None:
            y = y + F.linear(F.linear(x, self.residual_a), self.residual_b)
        return y


def _activations(x: torch.Tensor, site: LinearSite, mask: torch.Tensor | None) -> torch.Tensor:
    """Calibration inputs of a linear as (tokens, in), padding tokens dropped where they can be told apart."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        x = x[mask.bool()]
    return x.reshape(-1, site.in_features).double()


@dataclass
class LinearStats:
    """What a linear pass knows of a site's calibration inputs X (tokens, in): sums over tokens, so calibration split
    across processes (rewriter.distributed) adds up to the one-process statistics exactly."""
    gram: torch.Tensor       # X^T X, (in, in) float64
    abs_sum: torch.Tensor    # sum |X| per input channel, (in,)
    tokens: int

    @classmethod
    def of(cls, X: torch.Tensor) -> "LinearStats":
        from ..distributed import all_reduce_sum
        gram = all_reduce_sum(X.T @ X)
        abs_sum = all_reduce_sum(X.abs().sum(0))
        tokens = int(all_reduce_sum(torch.tensor([X.shape[0]], dtype=torch.float64, device=X.device)).item())
        return cls(gram, abs_sum, tokens)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    def output_rel_error(self, W: torch.Tensor, W_new: torch.Tensor) -> float:
        """||X W_new^T - X W^T||_F / ||X W^T||_F, from the gram."""
        G, Wd = self.gram, W.double()
        D = W_new.double() - Wd
        err = ((D @ G) * D).sum().clamp_min(0)
        ref = ((Wd @ G) * Wd).sum().clamp_min(torch.finfo(torch.float64).tiny)
        return float((err / ref).sqrt())


def _effective_weight(module: nn.Module, bias: torch.Tensor | None, in_features: int, device) -> torch.Tensor:
    """The (out, in) float64 matrix a replacement module applies: from its factors, or its outputs on the identity
    with the bias removed."""
    if isinstance(module, LowRankLinear):
        return module.B.double() @ module.A.double()
    if isinstance(module, SparseLowRankLinear):
        W = module.B.double() @ module.A.double()
        W[module.rows.long(), module.cols.long()] += module.vals.double()
        return W
    eye = torch.eye(in_features, dtype=torch.float64, device=device)
    out = module.double()(eye) - (bias.double() if bias is not None else 0)
    return out.T


def _install(gm: fx.GraphModule, node: fx.Node, site: LinearSite, module: nn.Module, suffix: str) -> None:
    """Put `module` in place of the linear node, under the site's own module path (so reports keep layer names)."""
    target = f"{WRAPPER_PREFIX}{site.module_path}.{suffix}"
    gm.add_submodule(target, module)
    x = node.args[1] if site.transposed else node.args[0]   # addmm(bias, x, W) vs linear(x, W, b)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (x,))
    new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


class LinearPass(Pass):
    """Shared mechanics: select sites, record calibration activations, rewrite each, measure."""
    needs_activations: ClassVar[bool] = True
    streaming = ""     # per-site statistics are sums over tokens (LinearStats)

    def rewrite(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, site: LinearSite
                ) -> tuple[nn.Module, dict] | None:
        """Return (replacement module, details) or None to leave the site alone (with details['skipped'])."""
        raise NotImplementedError

    def run(self, gm, ctx) -> PassResult:
        sites = select(ctx.linear_sites(gm), self.config, "linear site", self.name)
        result = PassResult()
        if not sites:
            result.notes.append("no linear site matched the filter")
            return result
        nodes = {n.name: n for n in gm.graph.nodes}
        ctx.progress(f"{self.name}: recording activations of {len(sites)} linear sites")
        recorded = record_node_inputs(gm, ctx.calib_inputs, {s.node for s in sites})
        mask = ctx.calib_inputs.get("attention_mask")
        skipped = 0
        for i, site in enumerate(sites):
            ctx.progress(f"{self.name}: {site.module_path} ({i + 1}/{len(sites)})")
            args, _ = recorded[site.node]
            stats = LinearStats.of(_activations(args[1] if site.transposed else args[0], site, mask))
            del recorded[site.node]
            W = site.weight_matrix(gm).detach()
            bias = get_attr_tensor(gm, site.bias).detach() if site.bias else None
            out = None
            if dist.world_size() == 1 or dist.rank() == dist.owner(i):
                # across processes, each site's decomposition is done by one rank and sent to the others
                out = self.rewrite(W, bias, stats, site)
                if out is not None:
                    module, details = out
                    details["output_rel_error"] = stats.output_rel_error(
                        W, _effective_weight(module, bias, site.in_features, W.device))
                    module.to(W.dtype)
                    out = (module.cpu(), details) if dist.world_size() > 1 else (module, details)
            if dist.world_size() > 1:
                out = dist.broadcast_object(out, src=dist.owner(i))
            if out is None:
                skipped += 1
                continue
            module, details = out
            module.to(W.device)
            _install(gm, nodes[site.node], site, module, self.name.replace("-", "_"))
            result.changes.append(SiteChange(site.module_path, "linear", details))
        erase_dead(gm)
        drop_unused_attributes(gm)
        if skipped:
            result.notes.append(f"{skipped} site(s) left dense: the factorised form would not be smaller")
        if result.changes:
            before = sum(c.details["params_before"] for c in result.changes)
            after = sum(c.details["params_after"] for c in result.changes)
            b0 = sum(c.details["bytes_before"] for c in result.changes)
            b1 = sum(c.details["bytes_after"] for c in result.changes)
            result.summary = {"sites": len(result.changes), "params_before": before, "params_after": after,
                              "param_ratio": after / before, "bytes_before": b0, "bytes_after": b1,
                              "bytes_ratio": b1 / b0}
        return result


def _rank(cfg, W: torch.Tensor, stats: LinearStats) -> int:
    out_f, in_f = W.shape
    if cfg.rank > 0:
        return min(cfg.rank, out_f, in_f)
    if cfg.energy > 0:
        return lr.rank_for_energy(torch.linalg.svdvals(W.double()), cfg.energy)
    if cfg.error > 0:
        method = "whitened" if getattr(cfg, "method", "svd") != "svd" else "svd"
        return lr.rank_for_error(W.double(), stats.gram, cfg.error, method=method)
    return lr.rank_for_ratio(out_f, in_f, cfg.ratio)


@dataclass
class LowRankConfig(PassConfig):
    ratio: float = field(default=0.5, metadata={"help": "factor parameters / dense parameters (PELA rule)"})
    rank: int = field(default=0, metadata={"help": "explicit rank (overrides ratio)"})
    energy: float = field(default=0.0, metadata={"help": "keep this share of singular-value energy (overrides ratio)"})
    error: float = field(default=0.0, metadata={"help": "smallest rank with this output rel. error on calibration"})
    method: str = field(default="svd", metadata={"help": "svd | whitened (SVD-LLM) | asvd"})
    asvd_alpha: float = 0.5

    def validate(self):
        if self.method not in ("svd", "whitened", "asvd"):
            raise ValueError(f"method must be svd, whitened or asvd; got {self.method!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1]; got {self.ratio}")
        if self.rank < 0 or not 0 <= self.energy <= 1 or self.error < 0:
            raise ValueError("rank >= 0, energy in [0, 1], error >= 0")


@register_pass
class LowRank(LinearPass):
    name = "lowrank"
    config_class = LowRankConfig
    summary = "factorise linears as two thin linears (SVD, SVD-LLM whitened, or ASVD)"

    def rewrite(self, W, bias, stats, site):
        cfg: LowRankConfig = self.config
        out_f, in_f = W.shape
        r = _rank(cfg, W, stats)
        if r * (out_f + in_f) >= out_f * in_f:
            return None
        if cfg.method == "whitened":
            A, B = lr.whitened_svd_factors(W.double(), stats.gram, r)
        elif cfg.method == "asvd":
            A, B = lr.asvd_factors(W.double(), stats.abs_mean, r, cfg.asvd_alpha)
        else:
            A, B = lr.svd_factors(W.double(), r)
        nb = bias.numel() if bias is not None else 0
        esize = W.element_size()
        details = {"rank": r, "method": cfg.method, "params_before": W.numel() + nb,
                   "params_after": r * (out_f + in_f) + nb, "bytes_before": (W.numel() + nb) * esize,
                   "bytes_after": (r * (out_f + in_f) + nb) * esize}
        return LowRankLinear(A, B, bias.double() if bias is not None else None), details


@dataclass
class SparseLowRankConfig(PassConfig):
    ratio: float = field(default=0.4, metadata={"help": "low-rank factor parameters / dense parameters"})
    rank: int = 0
    sparsity: float = field(default=0.98, metadata={"help": "fraction of zeros in the sparse residual S"})
    method: str = field(default="magnitude", metadata={"help": "magnitude | rpca"})
    iters: int = 3

    def validate(self):
        if not 0 < self.ratio <= 1 or not 0 <= self.sparsity < 1 or self.rank < 0 or self.iters < 1:
            raise ValueError("ratio in (0, 1], sparsity in [0, 1), rank >= 0, iters >= 1")
        if self.method not in ("magnitude", "rpca"):
            raise ValueError(f"method must be magnitude or rpca; got {self.method!r}")


@register_pass
class SparseLowRank(LinearPass):
    name = "sparse-lowrank"
    config_class = SparseLowRankConfig
    summary = "W ~ U V + S: low-rank plus the largest residual entries, stored as COO"

    def rewrite(self, W, bias, stats, site):
        cfg: SparseLowRankConfig = self.config
        out_f, in_f = W.shape
        r = min(cfg.rank, out_f, in_f) if cfg.rank > 0 else lr.rank_for_ratio(out_f, in_f, cfg.ratio)
        A, B, rows, cols, vals = lr.sparse_plus_lowrank(W.double(), r, cfg.sparsity, cfg.method, cfg.iters)
        esize = W.element_size()
        nb = bias.numel() if bias is not None else 0
        cost = lr.sparse_lowrank_bytes(out_f, in_f, r, int(vals.numel()), value_bytes=esize, bias=bias is not None)
        if cost["bytes"] >= cost["dense_bytes"]:
            return None
        details = {"rank": r, "nnz": int(vals.numel()), "params_before": W.numel() + nb,
                   "params_after": int(cost["params"]), "bytes_before": int(cost["dense_bytes"]),
                   "bytes_after": int(cost["bytes"])}
        return SparseLowRankLinear(A, B, rows, cols, vals, bias.double() if bias is not None else None), details


@dataclass
class BinarizeConfig(PassConfig):
    residual_rank: int = field(default=0, metadata={"help": "rank of the low-rank residual W - W_b (0: none)"})
    residual_ratio: float = field(default=0.0, metadata={"help": "residual rank from a parameter ratio (PELA rule)"})

    def validate(self):
        if self.residual_rank < 0 or not 0 <= self.residual_ratio <= 1:
            raise ValueError("residual_rank >= 0 and residual_ratio in [0, 1]")


@register_pass
class Binarize(LinearPass):
    name = "binarize"
    config_class = BinarizeConfig
    summary = "BiPFT-style alpha * sign(W - mu) + mu with 1-bit packed signs, optional low-rank residual"

    def rewrite(self, W, bias, stats, site):
        cfg: BinarizeConfig = self.config
        out_f, in_f = W.shape
        r = cfg.residual_rank
        if r == 0 and cfg.residual_ratio > 0:
            r = lr.rank_for_ratio(out_f, in_f, cfg.residual_ratio)
        r = min(r, out_f, in_f)
        b = binarize_weight(W.double(), r)
        nb = bias.numel() if bias is not None else 0
        esize = W.element_size()
        cost = binary_linear_bytes(out_f, in_f, r, value_bytes=esize)
        details = {"residual_rank": r, "params_before": W.numel() + nb,
                   "params_after": 2 * out_f + r * (out_f + in_f) + nb,   # alpha, mu, residual (+ 1-bit signs)
                   "sign_bits": out_f * in_f, "bytes_before": (W.numel() + nb) * esize,
                   "bytes_after": int(cost["bytes"]) + nb * esize}
        module = BinaryLinear(b["packed"], b["alpha"], b["mu"], bias.double() if bias is not None else None, in_f,
                              b["residual_a"], b["residual_b"])
        return module, details
