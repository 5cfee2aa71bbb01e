"""Attention approximation passes: one generic pass per method registered in ``rewriter.attention.METHODS``; each
replaces the canonical attention node (exact_attention, see rewriter.capture) of the selected sites with the method's
op, and reports per site the budget, counted cost and measured error. `exact-attention` itself is a no-op: capture
already made every site exact attention on the key-padding mask; the name stays so that recipes naming it replay.

Budgets speak one vocabulary: every approximation takes `density` besides its native knobs (window, stride,
bucket_size, features), and a density is resolved at the model's maximum length (max_position_embeddings; the
calibration length for models without one): `window:density=0.1` on MiniLM (512 positions) is a 51-token
window, which is density 0.1 at 512 tokens and more (closer to exact) on shorter inputs, never less. The report
states per site the integer budget, the length it was resolved at, and the counted density and FLOPs ratio at the
calibration length and at that maximum length. Explicit knobs (window=128) are used as given. Per-site budgets:
run the pass several times with different include/exclude/layers filters (e.g. layers "0-1" untouched, "2-"
windowed).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..program import max_length
from ..errors import RewriterError
from ..graph import erase_dead, is_exact_attention, key_mask_value, record_node_inputs, replace_attention
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..sites import AttentionSite, select
from ..attention import METHODS, AttentionMethod
from ..attention import _contract as _common


# --- the pass: one class over the attention-method registry ------------------------------------------------------

class AttentionPass(Pass):
    """Replace the selected sites' SDPA with `method`'s op; one subclass per registered method (below)."""
    method: ClassVar[AttentionMethod]
    op_name: ClassVar[str] = ""          # the op's name in torch.ops.rewriter

    def method_args(self, site: AttentionSite, L: int) -> tuple[tuple, dict]:
        """(the op's arguments after `scale`, in schema order; the budget as reported). A density resolves at L.
        The method's own budget only: what analysis compares per head."""
        kwargs, reported = self.method.budget(self.config, L)
        return self.method.positional(kwargs), reported

    def site_kwargs(self, site: AttentionSite, L: int) -> tuple[dict | None, dict, str]:
        """The op arguments by name for rewriting `site`: sites whose attention has the model's own semantics (a
        sliding window, ALiBi) get arguments that keep them, with a note, or None and the reason the method refuses
        the site. A learned method's tensors are not among them yet (see `fit`)."""
        kwargs, reported = self.method.budget(self.config, L)
        kept, note = self.method.keep_semantics(site, kwargs)
        if kept is None:
            return None, reported, note
        return kept, {k: kept.get(k, v) for k, v in reported.items()}, note

    def fit(self, site: AttentionSite, q, k, v, km, kwargs: dict, progress) -> tuple[dict, dict]:
        """A learned method's tensors for `site`, fitted on its recorded calibration inputs, and the fit's
        statistics; ({}, {}) for methods that learn nothing."""
        if self.method.fit is None:
            return {}, {}
        return self.method.fit(self.config, q, k, v, km, site.causal, site.scale, kwargs, progress)

    def cost(self, site: AttentionSite, B: int, L: int, args: tuple) -> _common.AttentionCost:
        """Counted cost of one call at batch B and length L with the op arguments `args`."""
        return self.method.cost(B, site.heads, site.kv_heads, L, L, site.head_dim, site.value_dim, site.causal,
                                **dict(zip(self.method.args, args)))

    def measured_density(self, q, k, km, site: AttentionSite, method_args: tuple) -> float | None:
        """Share of the allowed score entries the method computes exactly on these inputs (sparse methods; the
        dense check is skipped past 4096 tokens, where the counted layout density stands in)."""
        if self.method.pairs is None or k.shape[2] > 4096:
            return None
        from ..attention.sparse import measured_density
        return measured_density(self.name, q, k, km, site.causal, site.scale,
                                **dict(zip(self.method.args, method_args)))

    @property
    def op(self):
        return self.method.op

    def is_exact(self) -> bool:
        return self.method.exact

    def run(self, gm, ctx) -> PassResult:
        sites = select(ctx.attention_sites(gm), self.config, "attention site", self.name)
        result = PassResult()
        if not sites:
            result.notes.append("no attention site matched the filter")
            return result
        nodes = {n.name: n for n in gm.graph.nodes}
        ctx.progress(f"{self.name}: recording attention inputs on calibration data")
        lora = self._lora_projections(gm, ctx, sites, nodes)
        recorded = record_node_inputs(gm, ctx.calib_inputs, {s.node for s in sites} | {
            n.name for proj in lora.values() for n in (proj["q"][0], proj["k"][0], proj["v"][0], proj["o"])})
        errors, costs, at_max, refused, fits = [], [], [], [], []
        for i, site in enumerate(sites):
            args, kwargs = recorded[site.node]
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            B, L = q.shape[0], k.shape[2]
            km = key_mask_value(mask, B)
            L_max = max(L, max_length(ctx.program.config) or L)
            op_kwargs, budget, note = self.site_kwargs(site, L_max)
            if op_kwargs is None:
                refused.append({"site": site.module_path, "reason": note})
                continue
            where = f"{self.name}: site {i + 1}/{len(sites)} ({site.module_path})"
            learned, fit_info = self.fit(site, q, k, v, km, op_kwargs, lambda msg: ctx.progress(f"{where}: {msg}"))
            method_args = self.method.positional({**op_kwargs, **learned})
            if site.module_path in lora:
                from .lora_correction import fit_lora
                cfg = self.config
                fit_info["lora"] = fit_lora(site, lora[site.module_path], {s.node: s for s in ctx.linear_sites(gm)}, gm,
                                            recorded, q, k, v, km, self.method.reference, method_args, cfg.lora_rank,
                                            cfg.lora_steps, cfg.lora_lr, getattr(cfg, "seed", 0),
                                            lambda msg: ctx.progress(f"{where}: {msg}"))
            if fit_info:
                fits.append({"site": site.module_path, "layer": site.layer, **fit_info})
            replace_attention(gm, nodes[site.node], self.op, site.causal, site.scale, method_args,
                              constant_prefix=f"{self.name.replace('-', '_')}_{site.node}")
            # error of this site alone, on its own recorded inputs (exact attention as the reference)
            rows = _measured_rows(q.shape[2], q.device)
            exact = self._exact(q, k, v, km, site, rows)
            approx = self.op(q, k, v, km, site.causal, site.scale, *method_args)[:, :, rows]
            valid = km[:, None, rows, None] if (km is not None and not site.causal) else None
            err = _rel_error(exact, approx, valid)
            cost = self.cost(site, B, L, method_args)
            density = self.measured_density(q, k, km, site, method_args)
            long = self.cost(site, B, L_max, method_args) if L_max != L else cost
            errors.append(err)
            costs.append(cost)
            at_max.append(long)
            result.changes.append(SiteChange(site.module_path, "attention", {
                "method": self.name, "layer": site.layer, "seq_len": L, **budget,
                **({"model_semantics": note} if note else {}),
                "density": round(density if density is not None else min(1.0, cost.density), 5),
                "computed_entries_ratio": round(cost.density, 5), "attention_rel_error": err,
                "flops_ratio": cost.flops / cost.dense_flops, "memory_ratio": cost.memory_bytes / cost.dense_memory_bytes,
                "max_length": L_max, "computed_entries_ratio_at_max_length": round(long.density, 5),
                "flops_ratio_at_max_length": long.flops / long.dense_flops,
                "memory_ratio_at_max_length": long.memory_bytes / long.dense_memory_bytes}))
        erase_dead(gm)
        for r in refused:
            result.notes.append(f"refused {r['site']}: {r['reason']} (left exact)")
        if not result.changes:
            raise RewriterError(f"{self.name}: every selected attention site was refused: {refused[0]['reason']}",
                                "select other layers (layers=..., exclude=...); those sites stay exact")
        result.summary = {
            "sites": len(sites), "mean_attention_rel_error": sum(errors) / len(errors),
            "attention_flops_ratio": sum(c.flops for c in costs) / sum(c.dense_flops for c in costs),
            "attention_memory_ratio": sum(c.memory_bytes for c in costs) / sum(c.dense_memory_bytes for c in costs),
            "computed_entries_ratio": sum(c.score_entries for c in costs) / sum(c.dense_score_entries for c in costs),
            "density": sum(c.details["density"] for c in result.changes) / len(result.changes),
            "max_length": L_max,
            "attention_flops_ratio_at_max_length": sum(c.flops for c in at_max) / sum(c.dense_flops for c in at_max),
            "attention_memory_ratio_at_max_length": sum(c.memory_bytes for c in at_max) /
            sum(c.dense_memory_bytes for c in at_max),
            **({"refused_sites": refused} if refused else {}), **({"fit": fits} if fits else {})}
        first = result.changes[0].details
        shown = {k: first[k] for k in self.method.budget(self.config, L_max)[1]}
        if shown:
            result.notes.append(
                f"budget {', '.join(f'{k}={v}' for k, v in shown.items())} (a density resolves at {L_max} tokens); "
                f"attention FLOPs vs exact: {result.summary['attention_flops_ratio']:.3g} at the calibration length "
                f"{first['seq_len']}, {result.summary['attention_flops_ratio_at_max_length']:.3g} at {L_max}")
        return result

    def _lora_projections(self, gm, ctx, sites, nodes) -> dict:
        """site path -> its q/k/v/o projections, for a method config asking for a LoLCATs low-rank correction
        (`lora_rank` > 0; passes/lora_correction.py); sites without single-linear projections are refused."""
        if not getattr(self.config, "lora_rank", 0):
            return {}
        from .lora_correction import projection_nodes
        linears = {s.node: s for s in ctx.linear_sites(gm)}
        out = {}
        for site in sites:
            node = nodes[site.node]
            proj = projection_nodes(node, linears) if is_exact_attention(node) else None
            if proj is None:
                raise RewriterError(f"{self.name}: lora_rank needs single q / k / v / output linears around "
                                    f"{site.module_path}, which it does not have", "use lora_rank=0 here")
            out[site.module_path] = proj
        return out

    @staticmethod
    def _exact(q, k, v, km, site: AttentionSite, rows: torch.Tensor) -> torch.Tensor:
        """The model's own attention (float64, its window, ALiBi bias and softcap included) for the given query rows
        only."""
        return _common.model_attention_float64(q, k, v, km, site.causal, site.scale, site.window, site.alibi_slopes,
                                               rows, site.softcap)


class ExactAttentionPass(AttentionPass):
    """exact-attention: a no-op since capture makes every attention site exact attention on the key-padding mask
    (kept so that recipes and command lines naming it replay). Its report says so, and names the sites capture kept
    in the model's SDPA form because the op cannot state their mask."""

    def run(self, gm, ctx) -> PassResult:
        sites = select(ctx.attention_sites(gm), self.config, "attention site", self.name)
        result = PassResult()
        nodes = {n.name: n for n in gm.graph.nodes}
        exact = [s for s in sites if is_exact_attention(nodes[s.node])]
        result.notes.append(f"already exact since capture: {len(exact)} of {len(sites)} selected attention sites are "
                            "exact_attention on the key-padding mask; nothing to do")
        for s in sites:
            if s not in exact:
                result.notes.append(f"{s.module_path} keeps the model's attention form: "
                                    f"{s.exact_arguments()[1] or 'not captured in canonical form'}")
        result.summary = {"sites": len(sites), "already_exact": len(exact)}
        return result


def _pass_for(method: AttentionMethod) -> type[AttentionPass]:
    cls_name = "".join(part.capitalize() for part in method.name.split("-")) + "Pass"
    base = ExactAttentionPass if method.name == "exact-attention" else AttentionPass
    # a method's rewrite of a site needs nothing but that site: it streams; a learned one fits on the samples it is
    # given, so processes holding different samples would learn different tensors
    distributed = (f"{method.name} fits its tensors on the calibration samples, so processes holding different "
                   "samples would learn different ones" if method.fit is not None else "")
    return register_pass(type(cls_name, (base,), {
        "name": method.name, "config_class": method.config, "method": method, "summary": method.summary,
        "op_name": method.op_name.split("::")[1], "__doc__": method.summary, "streaming": "",
        "distributed": distributed}))


ATTENTION_PASSES = {name: _pass_for(m) for name, m in METHODS.items()}


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
