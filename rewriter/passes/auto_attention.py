"""auto-attention: measure every head, then choose a method and budget per head.

Heads differ: spiky heads suit sparse methods, flat ones low-rank methods, and heads need very different numbers
of keys. This pass analyses each head on one split of the calibration data (rewriter.analysis), then allocates
by a Lagrangian over the measured per-head error curves: each head takes the candidate minimising
err^2 + lambda * cost (cost = its attention FLOPs relative to exact), with lambda searched so that the plan meets
the target - an average attention-FLOPs `density`, or a model-output `max_error` / `min_cosine` (checked by running
the rewritten model). The plan is then verified on the held-out split and written into the recipe, so `--recipe`
replays it without analysing again.

Generic text rarely makes a head fetch a token from far back, so on it a retrieval (induction / copy) head looks
local, and a window seems to cost it nothing. `recall_probe` adds, for every analysed sample, a copy whose second
half repeats its first half: heads that copy from half a sequence back then show what a short reach costs them.
It doubles the analysis; on the trained decoder, calibrating at the evaluation length (2048 tokens of packed real
text) already kept its passkey head exact without it (README "Quality on the trained decoder"). Densities resolve to
integer budgets at the calibration length, so calibrate at the length the model will run at."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from ..analysis import analyze, candidate_label
from ..attention import METHODS
from ..calibration import compare_outputs
from ..canonical import canonicalize
from ..config import PassConfig, parse_scalar, split_top_level
from ..errors import RewriterError
from ..graph import attention_key_mask, aten, erase_dead, head_group_inputs, index_buffer
from ..pipeline import PassResult, Pass, SiteChange, make_pass, register_pass
from ..report import PLOTS_SKIPPED, plan_picture
from ..sites import attention_sites, select

EXACT = "exact"


def parse_label(label: str) -> tuple[str, dict]:
    """'window(window=51,sinks=4)' -> ('window', {'window': 51, 'sinks': 4}); 'exact' -> ('exact', {})."""
    m = re.fullmatch(r"\s*([\w-]+)\s*(?:\((.*)\))?\s*", label)
    if not m:
        raise RewriterError(f"cannot read plan entry {label!r}", "write method(key=value,...) or exact")
    if m.group(1) in METHODS and METHODS[m.group(1)].fit is not None:
        raise RewriterError(f"plan entry {label!r}: {m.group(1)} learns its parameters per site, which auto-attention "
                            "does not fit yet", f"run the {m.group(1)} pass on those layers instead")
    opts = {}
    for item in split_top_level(m.group(2) or ""):
        key, _, val = item.partition("=")
        opts[key.strip()] = parse_scalar(val.strip())
    return m.group(1), opts


def concrete_options(method: str, options: dict, budget: dict) -> dict:
    """Replace a density by the integer budget it became at the calibration length, so replays need no length."""
    opts = dict(options)
    knob = METHODS[method].density_knob if method in METHODS else None
    if knob and knob in budget and "density" in opts:
        opts.pop("density")
        opts[knob] = budget[knob]
    return opts


@dataclass
class AutoAttentionConfig(PassConfig):
    density: float = field(default=0.0, metadata={"help": "target average attention FLOPs / exact (0: unused)"})
    max_error: float = field(default=0.0, metadata={"help": "target relative error of the model output (0: unused)"})
    min_cosine: float = field(default=0.0, metadata={"help": "target mean-pooled embedding (or output) cosine"})
    holdout: float = field(default=0.5, metadata={"help": "share of calibration samples kept for verification"})
    recall_probe: bool = field(default=False, metadata={
        "help": "also analyse each sample with its second half repeating its first, so long-range copy heads show"})
    candidates: list[str] = field(default_factory=list, metadata={"help": "override: method(key=val,...) labels"})
    plan: list[dict] = field(default_factory=list, metadata={"help": "per site: {site, heads: [label per head]}"})

    def validate(self):
        targets = [t for t in (self.density, self.max_error, self.min_cosine) if t]
        if not self.plan and len(targets) != 1:
            raise ValueError("give exactly one target: density, max_error or min_cosine (or a plan to replay)")
        if not 0 <= self.density <= 1 or not 0 <= self.min_cosine <= 1 or self.max_error < 0:
            raise ValueError("density and min_cosine in [0, 1], max_error >= 0")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1); got {self.holdout}")
        for entry in self.plan:
            if not isinstance(entry, dict) or "site" not in entry or "heads" not in entry:
                raise ValueError("each plan entry needs 'site' and 'heads'")


def apply_plan(gm: fx.GraphModule, sites: dict, plan: dict[str, list[str]]) -> int:
    """Rewrite each planned site: heads grouped by label, one op per group (exact_attention for exact heads),
    outputs reassembled in the original head order. Returns the number of sites changed."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    changed = 0
    for path, labels in plan.items():
        site = sites.get(path)
        if site is None:
            raise RewriterError(f"plan names site {path}, which this model does not have")
        if len(labels) != site.heads:
            raise RewriterError(f"plan for {path} has {len(labels)} heads; the site has {site.heads}")
        if all(lab == EXACT for lab in labels):
            continue
        node = nodes[site.node]
        q, k, v = node.args[:3]
        groups: dict[str, list[int]] = {}
        for h, lab in enumerate(labels):
            groups.setdefault(lab, []).append(h)
        rep = site.heads // site.kv_heads
        order: list[int] = []
        outs = []
        with graph.inserting_before(node):
            km = attention_key_mask(graph, node)
            for g, (lab, heads) in enumerate(groups.items()):
                qg, kg, vg = head_group_inputs(gm, f"auto_{site.node}_{g}", q, k, v, heads, rep)
                method, opts = parse_label(lab)
                if method == EXACT:   # the canonical node for these heads (the model's window, ALiBi, softcap kept)
                    window, alibi, softcap = site.exact_arguments()[0] or (0, None, 0.0)
                    out = graph.call_function(METHODS["exact-attention"].op, (
                        qg, kg, vg, km, site.causal, site.scale, window, [alibi[h] for h in heads] if alibi else None,
                        softcap))
                else:
                    p = make_pass(method, opts)
                    args, _ = p.method_args(site, 0)
                    out = graph.call_function(p.op, (qg, kg, vg, km, site.causal, site.scale, *args))
                outs.append(out)
                order.extend(heads)
            cat = graph.call_function(aten.cat.default, (outs, 1))
            inverse = [order.index(h) for h in range(site.heads)]
            inv = index_buffer(gm, f"auto_{site.node}_inverse", inverse)
            new = graph.call_function(aten.index_select.default, (cat, 1, graph.get_attr(inv)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed += 1
    erase_dead(gm)
    return changed


def recall_probe(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of each sample whose real tokens' second half repeats their first half (padding stays where it is):
    answering the repeat well needs heads that reach half the sequence back, as a passkey or a quoted name does."""
    ids = inputs["input_ids"].clone()
    mask = inputs.get("attention_mask")
    for i in range(ids.shape[0]):
        where = mask[i].bool() if mask is not None else torch.ones_like(ids[i], dtype=torch.bool)
        real = ids[i][where]
        half = real.numel() // 2
        ids[i][where] = torch.cat([real[: real.numel() - half], real[:half]])
    return {**inputs, "input_ids": ids}


def method_colour(method: str) -> str:
    """The plan picture's colour of a method (its registry entry's; exact heads in exact attention's)."""
    entry = METHODS.get("exact-attention" if method == EXACT else method)
    return entry.colour if entry is not None else "#999999"


@register_pass
class AutoAttention(Pass):
    name = "auto-attention"
    config_class = AutoAttentionConfig
    plans = True   # --dry-run runs the analysis so the printed recipe holds the plan
    summary = "per-head choice of attention method and budget under a FLOPs or error target"
    streaming = ""   # with a density target: each block is planned (and meets the target) on its own
    distributed = "its per-head errors are measured on the samples each process holds and not summed across them"

    def stream_refusal(self) -> str:
        cfg: AutoAttentionConfig = self.config
        if not cfg.plan and (cfg.max_error or cfg.min_cosine):
            return ("its max_error / min_cosine target is measured on the whole model's output; layer by layer, give "
                    "a density target (every block meets it) or a plan")
        return ""

    def run(self, gm, ctx) -> PassResult:
        cfg: AutoAttentionConfig = self.config
        all_sites = ctx.attention_sites(gm)
        sites = {s.module_path: s for s in select(all_sites, cfg, "attention site", self.name)}
        result = PassResult()
        refused = [s for s in sites.values() if not s.plain()]
        if refused and not cfg.plan:
            sites = {p: s for p, s in sites.items() if s.plain()}
            result.summary["refused_sites"] = [{"site": s.module_path, "reason": f"keeps the model's {s.semantics()}"}
                                               for s in refused]
            result.notes.append(f"{len(refused)} site(s) left exact: their attention has the model's own "
                                f"{refused[0].semantics()} (first: {refused[0].module_path}), which the per-head "
                                "methods do not compose with yet")
            if not sites:
                raise RewriterError(f"{self.name}: every selected attention site has the model's own "
                                    f"{refused[0].semantics()}; no per-head method keeps it",
                                    "leave these layers exact (exclude them), or use window with sinks=0 there")
        if cfg.plan:
            plan = {e["site"]: list(e["heads"]) for e in cfg.plan}
            n = apply_plan(gm, {s.module_path: s for s in all_sites}, plan)
            result.summary = {"replayed_plan": True, "sites": n}
            for path, labels in plan.items():
                result.changes.append(SiteChange(path, "attention", {"heads": labels}))
            return result
        plan, summary = self.make_plan(ctx, sites)
        apply_plan(gm, sites, plan)
        if cfg.recall_probe and not summary["recall_probes"]:
            result.notes.append("recall_probe skipped: the calibration inputs hold no token ids to repeat (images, or "
                                "a block's hidden states); long-range heads were measured on the samples alone")
        if cfg.density and summary["attention_flops_ratio"] > cfg.density + 1e-9:
            result.notes.append(f"density {cfg.density} is below the cheapest candidates at this length; the plan "
                                f"uses {summary['attention_flops_ratio']:.3f} of exact attention FLOPs")
        picture = plan_picture({p: [parse_label(lab) for lab in labels] for p, labels in plan.items()},
                               {p: sites[p].layer for p in plan}, method_colour)
        if picture is None:
            result.notes.append("auto_attention_plan.png skipped: " + PLOTS_SKIPPED.format(what="the plan picture"))
        else:
            result.artifacts["auto_attention_plan.png"] = picture
        cfg.plan = [{"site": p, "heads": labels} for p, labels in plan.items()]   # the recipe now replays it
        result.summary = {**summary, **result.summary}
        for path, labels in plan.items():
            result.changes.append(SiteChange(path, "attention", {"heads": labels, **summary["per_site"][path]}))
        return result

    # --- planning -------------------------------------------------------------------------------------------
    def make_plan(self, ctx, sites: dict) -> tuple[dict[str, list[str]], dict]:
        cfg: AutoAttentionConfig = self.config
        inputs = ctx.calib_inputs
        n = next(iter(inputs.values())).shape[0]
        n_hold = max(1, int(round(n * cfg.holdout)))
        if n - n_hold < 1:
            raise RewriterError(f"auto-attention needs at least 2 calibration samples; got {n}", "raise --samples")
        fit = {k: v[: n - n_hold] for k, v in inputs.items()}
        hold = {k: v[n - n_hold:] for k, v in inputs.items()}
        probed = 0
        if cfg.recall_probe and "input_ids" in fit:
            probe = recall_probe(fit)
            probed = next(iter(probe.values())).shape[0]
            fit = {k: torch.cat([v, probe[k]]) for k, v in fit.items()}
        candidates = [parse_label(c) for c in cfg.candidates] if cfg.candidates else None
        ctx.progress(f"{self.name}: analysing {len(sites)} sites on {n - n_hold} samples"
                     + (f" and {probed} recall probes" if probed else ""))
        analysis = analyze(ctx.program, fit, candidates, progress=lambda m: ctx.progress(f"{self.name}: {m}"))
        table = self._options(analysis, sites)

        def plan_for(lam: float):
            plan, flops, dense = {}, 0.0, 0.0
            for path, heads in table.items():
                labels = []
                for opts in heads:
                    best = min(opts, key=lambda o: o["err"] ** 2 + lam * o["flops"] / o["dense"])
                    labels.append(best["label"])
                    flops += best["flops"]
                    dense += best["dense"]
                plan[path] = labels
            return plan, flops / dense

        reference_fit = ctx.program.run(**fit)

        def model_metric(plan) -> dict:
            g = ctx.program.module()
            canonicalize(g)
            apply_plan(g, {s.module_path: s for s in attention_sites(g, ctx.program.causal_modules)}, plan)
            with torch.no_grad():
                out = g(**{k: fit[k] for k in ctx.program.input_names})
            return compare_outputs(reference_fit, tuple(out), ctx.program.output_names, fit)

        def meets(m: dict) -> bool:
            if cfg.max_error:
                return m["relative_error"] <= cfg.max_error
            return m.get("embedding_cosine", m["cosine"]) >= cfg.min_cosine

        if cfg.density:
            # cost falls as lambda grows: bracket the smallest lambda within the FLOPs budget, then bisect
            lo, hi = 0.0, 1e-6
            while plan_for(hi)[1] > cfg.density and hi < 1e9:
                lo, hi = hi, hi * 4
            for _ in range(50):
                mid = (lo + hi) / 2
                if plan_for(mid)[1] <= cfg.density:
                    hi = mid
                else:
                    lo = mid
            plan, ratio = plan_for(hi)
            predicted = model_metric(plan)
        else:
            # error target: the cheapest plan (largest lambda) whose model output still meets it, on a log grid
            best = None
            for lam in [0.0] + [10 ** e for e in torch.linspace(-6, 2, 17).tolist()]:
                plan, ratio = plan_for(lam)
                ctx.progress(f"{self.name}: lambda={lam:.2g} flops={ratio:.3f}")
                m = model_metric(plan)
                if meets(m):
                    best = (plan, ratio, m)
                else:
                    break
            if best is None:
                plan = {p: [EXACT] * sites[p].heads for p in sites}
                ratio, predicted = 1.0, model_metric(plan)
            else:
                plan, ratio, predicted = best
        ctx.progress(f"{self.name}: verifying on {n_hold} held-out samples")
        measured = self._holdout_metric(ctx, plan, hold)
        per_site = {}
        for path, labels in plan.items():
            opts = {o["label"]: o for o in sum(table[path], [])}
            heads = [next(o for o in table[path][h] if o["label"] == lab) for h, lab in enumerate(labels)]
            per_site[path] = {"flops_ratio": sum(o["flops"] for o in heads) / sum(o["dense"] for o in heads),
                              "predicted_head_errors": [round(o["err"], 5) for o in heads],
                              "methods": sorted({parse_label(lab)[0] for lab in labels})}
        counts: dict[str, int] = {}
        for labels in plan.values():
            for lab in labels:
                counts[parse_label(lab)[0]] = counts.get(parse_label(lab)[0], 0) + 1
        summary = {
            "target": {"density": cfg.density or None, "max_error": cfg.max_error or None,
                       "min_cosine": cfg.min_cosine or None},
            "attention_flops_ratio": ratio, "heads_by_method": counts,
            "predicted": {k: predicted[k] for k in ("relative_error", "cosine", "embedding_cosine") if k in predicted},
            "measured_holdout": {k: measured[k] for k in ("relative_error", "cosine", "embedding_cosine") if k in measured},
            "fit_samples": n - n_hold, "recall_probes": probed, "holdout_samples": n_hold, "seq_len": analysis.seq_len,
            "per_site": per_site,
        }
        self.analysis = analysis
        return plan, summary

    @staticmethod
    def _options(analysis, sites) -> dict[str, list[list[dict]]]:
        """site -> head -> candidate dicts (label, err, flops, dense), exact included."""
        table = {}
        for path, results in analysis.candidates.items():
            if path not in sites:
                continue
            H = sites[path].heads
            heads = []
            for h in range(H):
                dense = results[0].dense_flops if results else 1.0
                opts = [{"label": EXACT, "err": 0.0, "flops": dense, "dense": dense}]
                for r in results:
                    label = candidate_label(r.method, concrete_options(r.method, r.options, r.budget))
                    opts.append({"label": label, "err": r.errors[h], "flops": r.flops, "dense": r.dense_flops})
                heads.append(opts)
            table[path] = heads
        return table

    @staticmethod
    def _holdout_metric(ctx, plan, hold) -> dict:
        g = ctx.program.module()
        canonicalize(g)
        apply_plan(g, {s.module_path: s for s in attention_sites(g, ctx.program.causal_modules)}, plan)
        with torch.no_grad():
            out = g(**{k: hold[k] for k in ctx.program.input_names})
        ref = ctx.program.run(**hold)
        return compare_outputs(ref, tuple(out), ctx.program.output_names, hold)
