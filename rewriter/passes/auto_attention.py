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

import dataclasses
import re
import time
from dataclasses import dataclass, field

import torch
from torch import fx

from ..analysis import DEFAULT_CANDIDATES, STRUCTURAL, analyze, candidate_label, may_share
from ..attention import METHODS
from ..calibration import compare_outputs
from ..canonical import canonicalize
from ..config import PassConfig, parse_scalar, split_top_level
from ..errors import RewriterError
from ..graph import (add_tensor, attention_key_mask, attention_projections, aten, drop_unused_attributes, erase_dead,
                     head_group_inputs, index_buffer, is_exact_attention, key_mask_value, record_node_inputs)
from ..pipeline import PassResult, Pass, SiteChange, make_pass, register_pass
from ..report import PLOTS_SKIPPED, plan_picture
from ..sites import attention_sites, linear_sites, select

EXACT = "exact"
PRUNED, SHARED = STRUCTURAL
# `learned=true`: Hedgehog maps fitted per site as candidates, pure (linear in length) and LoLCATs' window hybrids;
# fitting settings as in benchmarks/minilm_hedgehog.py
LEARNED_CANDIDATES: list[tuple[str, dict]] = [
    ("hedgehog", {"features": 32, "steps": 100, "rows": 128, "lr": 0.05}),
    ("hedgehog", {"features": 16, "window": 64, "sinks": 4, "steps": 100, "rows": 64, "lr": 0.05}),
    ("hedgehog", {"features": 16, "window": 128, "sinks": 4, "steps": 100, "rows": 64, "lr": 0.05}),
]
ERROR_SPACES = ("head", "output")


def parse_label(label: str) -> tuple[str, dict]:
    """'window(window=51,sinks=4)' -> ('window', {'window': 51, 'sinks': 4}); 'exact' -> ('exact', {})."""
    m = re.fullmatch(r"\s*([\w-]+)\s*(?:\((.*)\))?\s*", label)
    if not m:
        raise RewriterError(f"cannot read plan entry {label!r}", "write method(key=value,...) or exact")
    if m.group(1) not in METHODS and m.group(1) not in (EXACT, *STRUCTURAL):
        raise RewriterError(f"plan entry {label!r}: no attention method {m.group(1)!r}",
                            f"use exact, {', '.join(STRUCTURAL)} or one of {', '.join(sorted(METHODS))}")
    if m.group(1) in (EXACT, *STRUCTURAL) and m.group(2):
        raise RewriterError(f"plan entry {label!r}: {m.group(1)} takes no options", f"write {m.group(1)}")
    opts = {}
    for item in split_top_level(m.group(2) or ""):
        key, _, val = item.partition("=")
        opts[key.strip()] = parse_scalar(val.strip())
    if opts.get("lora_rank"):
        raise RewriterError(f"plan entry {label!r}: a lora_rank correction changes the whole site's projections, not "
                            "one head's attention", f"run the {m.group(1)} pass with lora_rank on those layers")
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
    candidates: list[str] = field(default_factory=list, metadata={
        "help": "override: method(key=val,...) labels; `pruned` and `shared` name the structural candidates"})
    learned: bool = field(default=False, metadata={
        "help": "also fit Hedgehog maps per site as candidates (pure, and window 64 / 128 hybrids; one fit per "
                "candidate and site)"})
    prune: bool = field(default=False, metadata={
        "help": "a head may be removed (zero FLOPs; its error is that of removing it; MHA sites with single q/k/v/o "
                "linears, which lose the head's rows and columns)"})
    share: bool = field(default=False, metadata={
        "help": "a layer may reuse the previous layer's attention map (all its heads; the previous layer stays exact)"})
    errors: str = field(default="head", metadata={
        "help": "per-head error: head (relative to the head's own output) | output (the head's share of the site's "
                "output through its output projection: what a removed head costs)"})
    plan: list[dict] = field(default_factory=list, metadata={"help": "per site: {site, heads: [label per head]}"})

    def validate(self):
        targets = [t for t in (self.density, self.max_error, self.min_cosine) if t]
        if not self.plan and len(targets) != 1:
            raise ValueError("give exactly one target: density, max_error or min_cosine (or a plan to replay)")
        if not 0 <= self.density <= 1 or not 0 <= self.min_cosine <= 1 or self.max_error < 0:
            raise ValueError("density and min_cosine in [0, 1], max_error >= 0")
        if self.errors not in ERROR_SPACES:
            raise ValueError(f"errors must be one of {', '.join(ERROR_SPACES)}; got {self.errors!r}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1); got {self.holdout}")
        for entry in self.plan:
            if not isinstance(entry, dict) or "site" not in entry or "heads" not in entry:
                raise ValueError("each plan entry needs 'site' and 'heads'")


def apply_plan(gm: fx.GraphModule, sites: dict, plan: dict[str, list[str]],
               learned: dict[str, dict[str, dict]] | None = None) -> int:
    """Rewrite each planned site: heads grouped by label, one op per group (exact_attention for exact heads),
    outputs reassembled in the original head order. `pruned` heads leave the program (their q/k/v rows and output
    projection columns with them); a site whose heads are all `shared` reads the previous layer's attention map
    (that layer all exact). `learned`: site path -> label -> a learned method's tensors for all the site's heads.
    Returns the number of sites changed."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    learned = learned or {}
    for path, labels in plan.items():
        site = sites.get(path)
        if site is None:
            raise RewriterError(f"plan names site {path}, which this model does not have")
        if len(labels) != site.heads:
            raise RewriterError(f"plan for {path} has {len(labels)} heads; the site has {site.heads}")
    changed = _share_sites(gm, sites, plan)
    for path, labels in plan.items():
        site = sites[path]
        if all(lab in (EXACT, SHARED) for lab in labels):
            continue
        node = nodes[site.node]
        kept = list(range(site.heads))
        if PRUNED in labels:
            kept = [h for h, lab in enumerate(labels) if lab != PRUNED]
            site = _prune_site(gm, site, node, kept)
            labels = [labels[h] for h in kept]
            changed += 1
            if all(lab == EXACT for lab in labels):
                continue
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
                elif method in STRUCTURAL:
                    raise RewriterError(f"plan for {path}: {method} heads mixed with others",
                                        "shared is for every head of a site; pruned heads are removed before")
                else:
                    p = make_pass(method, opts)
                    args = _group_args(gm, p, path, lab, learned, [kept[h] for h in heads], rep, f"auto_{site.node}_{g}")
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
    drop_unused_attributes(gm)
    return changed


def slice_learned(maps: dict[str, torch.Tensor], heads: list[int], heads_per_kv: int) -> dict[str, torch.Tensor]:
    """A learned method's tensors for all of a site's heads restricted to the query heads `heads`, in the layout of
    ``head_group_inputs`` (each query head gets its own copy of the kv head it reads): key maps ("k_...") are per kv
    head, the others per query head."""
    out = {}
    for name, t in maps.items():
        index = [h // heads_per_kv for h in heads] if name.startswith("k_") else heads
        out[name] = t[torch.tensor(index, dtype=torch.long, device=t.device)].contiguous()
    return out


def _group_args(gm, p, path: str, label: str, learned: dict, heads: list[int], rep: int, prefix: str) -> tuple:
    """A head group's op arguments after `scale`: the method's budget, and a learned method's tensors sliced to the
    group's heads (``slice_learned``), stored as buffers."""
    kwargs, _ = p.method.budget(p.config, 0)
    if p.method.fit is None:
        return p.method.positional(kwargs)
    maps = learned.get(path, {}).get(label)
    if maps is None:
        raise RewriterError(f"plan for {path}: {label} needs its fitted tensors, which were not fitted")
    args = []
    for name, value in zip(p.method.args, p.method.positional({**kwargs, **slice_learned(maps, heads, rep)})):
        if isinstance(value, torch.Tensor):
            value = gm.graph.get_attr(add_tensor(gm, f"{prefix}_{name}", value, parameter=False))
        args.append(value)
    return tuple(args)


def _prune_site(gm: fx.GraphModule, site, node: fx.Node, kept: list[int]):
    """Remove the heads not in `kept` from an MHA site (q/k/v rows, output projection columns); the site after."""
    from .heads import prune_heads
    if site.kv_heads != site.heads:
        raise RewriterError(f"plan prunes single heads of {site.module_path}, a GQA site",
                            "prune whole KV groups with head-prune")
    if not kept:
        raise RewriterError(f"plan prunes every head of {site.module_path}", "keep at least one head per site")
    linears = {s.node: s for s in linear_sites(gm)}
    proj = attention_projections(node, {n for n in gm.graph.nodes if n.name in linears}) \
        if is_exact_attention(node) else None
    if proj is None:
        raise RewriterError(f"plan prunes heads of {site.module_path}, whose q / k / v / output projections are not "
                            "single linears joined by shape ops", "leave its heads unpruned")
    prune_heads(gm, site, node, proj, linears, kept)
    return dataclasses.replace(site, heads=len(kept), kv_heads=len(kept),
                               alibi_slopes=[site.alibi_slopes[h] for h in kept] if site.alibi_slopes else None)


def _share_sites(gm: fx.GraphModule, sites: dict, plan: dict[str, list[str]]) -> int:
    """Sites whose heads are all `shared` read the previous layer's attention map (EchoAtt, as share-attention)."""
    from .heads import ShareAttentionPass
    nodes = {n.name: n for n in gm.graph.nodes}
    by_layer = {s.layer: s for s in sites.values() if s.layer is not None}
    changed = 0
    for path, labels in plan.items():
        if SHARED not in labels:
            continue
        site = sites[path]
        donor = by_layer.get(site.layer - 1) if site.layer is not None else None
        if set(labels) != {SHARED}:
            raise RewriterError(f"plan for {path}: shared for some heads only", "share every head of a site or none")
        if donor is None or not may_share(donor, site):
            raise RewriterError(f"plan for {path}: shared, but the previous layer has no attention site with the same "
                                "heads to share")
        if any(lab != EXACT for lab in plan.get(donor.module_path, [EXACT])):
            raise RewriterError(f"plan for {path}: shared, but its donor {donor.module_path} is not all exact")
        a, b = nodes[donor.node], nodes[site.node]
        if not (is_exact_attention(a) and is_exact_attention(b)):
            raise RewriterError(f"plan for {path}: shared needs both it and {donor.module_path} in exact attention form")
        ShareAttentionPass._share(gm, a, b, donor, site)
        changed += 2
    return changed


def structure_meta(plan: dict[str, list[str]], sites: dict) -> dict:
    """What a plan does beyond attention (program meta, read by the HF folder writer, which refuses it)."""
    meta = {}
    pruned = {p: [h for h, lab in enumerate(labels) if lab == PRUNED] for p, labels in plan.items() if PRUNED in labels}
    if pruned:
        meta["head_prune"] = pruned
    by_layer = {s.layer: s for s in sites.values() if s.layer is not None}
    shared = {p: by_layer[sites[p].layer - 1].module_path for p, labels in plan.items() if SHARED in labels}
    if shared:
        meta["share_attention"] = shared
    return meta


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
            by_path = {s.module_path: s for s in all_sites}
            learned = self._refit(gm, ctx, by_path, plan)
            n = apply_plan(gm, by_path, plan, learned)
            result.summary = {"replayed_plan": True, "sites": n}
            result.meta = structure_meta(plan, by_path)
            for path, labels in plan.items():
                result.changes.append(SiteChange(path, "attention", {"heads": labels}))
            return result
        plan, summary, learned = self.make_plan(ctx, sites)
        apply_plan(gm, sites, plan, learned)
        result.meta = structure_meta(plan, sites)
        if cfg.recall_probe and not summary["recall_probes"]:
            result.notes.append("recall_probe skipped: the calibration inputs hold no token ids to repeat (images, or "
                                "a block's hidden states); long-range heads were measured on the samples alone")
        if self.analysis.head_error_sites:
            result.notes.append(f"errors=output: {len(self.analysis.head_error_sites)} site(s) measured per head "
                                f"instead (no single output projection; first: {self.analysis.head_error_sites[0]})")
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
    def _split(self, inputs: dict) -> tuple[dict, dict, int]:
        """(samples the plan is made on, with recall probes when asked; held-out samples; probes added)."""
        cfg: AutoAttentionConfig = self.config
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
        return fit, hold, probed

    def _refit(self, gm, ctx, sites: dict, plan: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
        """A replayed plan's learned heads: each site's maps fitted again as the analysis fitted them (same samples,
        same settings, so the same tensors), before any site is rewritten."""
        wanted = {(path, lab) for path, labels in plan.items() for lab in set(labels)
                  if METHODS.get(parse_label(lab)[0]) is not None and METHODS[parse_label(lab)[0]].fit is not None}
        if not wanted:
            return {}
        fit, _, _ = self._split(ctx.calib_inputs)
        missing = sorted(p for p, _ in wanted if p not in sites)
        if missing:
            raise RewriterError(f"plan names site {missing[0]}, which this model does not have")
        recorded = record_node_inputs(gm, fit, {sites[p].node for p, _ in wanted})
        learned: dict[str, dict[str, dict]] = {}
        for path, lab in sorted(wanted):
            site = sites[path]
            args, kwargs = recorded[site.node]
            q, k, v = args[:3]
            km = key_mask_value(args[3] if len(args) > 3 else kwargs.get("attn_mask"), q.shape[0])
            p = make_pass(*parse_label(lab))
            op_kwargs, _, why = p.site_kwargs(site, k.shape[2])
            if op_kwargs is None:
                raise RewriterError(f"plan for {path}: {lab} refuses the site: {why}")
            ctx.progress(f"{self.name}: fitting {lab} at {path}")
            learned.setdefault(path, {})[lab] = p.fit(site, q, k, v, km, op_kwargs, lambda m: None)[0]
        return learned

    def _candidates(self) -> tuple[list[tuple[str, dict]] | None, tuple[str, ...]]:
        """(the analysed methods' (name, options), the structural candidates) the config asks for."""
        cfg: AutoAttentionConfig = self.config
        parsed = [parse_label(c) for c in cfg.candidates]
        methods = [(m, o) for m, o in parsed if m not in STRUCTURAL] if cfg.candidates else list(DEFAULT_CANDIDATES)
        if cfg.learned:
            methods += [c for c in LEARNED_CANDIDATES if c not in methods]
        structural = {m for m, _ in parsed if m in STRUCTURAL} | ({PRUNED} if cfg.prune else set()) \
            | ({SHARED} if cfg.share else set())
        return methods, tuple(x for x in STRUCTURAL if x in structural)

    def make_plan(self, ctx, sites: dict) -> tuple[dict[str, list[str]], dict, dict]:
        cfg: AutoAttentionConfig = self.config
        fit, hold, probed = self._split(ctx.calib_inputs)
        n_fit, n_hold = next(iter(fit.values())).shape[0] - probed, next(iter(hold.values())).shape[0]
        candidates, structural = self._candidates()
        ctx.progress(f"{self.name}: analysing {len(sites)} sites on {n_fit} samples"
                     + (f" and {probed} recall probes" if probed else ""))
        t0 = time.perf_counter()
        analysis = analyze(ctx.program, fit, candidates, progress=lambda m: ctx.progress(f"{self.name}: {m}"),
                           output_errors=cfg.errors == "output", structural=structural)
        analysis_seconds = time.perf_counter() - t0
        table, shared = self._options(analysis, sites)
        learned = {path: {candidate_label(r.method, concrete_options(r.method, r.options, r.budget)): r.learned
                          for r in results if r.learned}
                   for path, results in analysis.candidates.items() if path in sites}
        order = list(table)

        def plan_for(lam: float):
            def score(o):
                return o["err"] ** 2 + lam * o["flops"] / o["dense"]

            free = {}
            for path, heads in table.items():
                best = [min(opts, key=score) for opts in heads]
                if all(o["label"] == PRUNED for o in best):   # a site keeps one head: the cheapest to keep
                    kept = [min((o for o in opts if o["label"] != PRUNED), key=score) for opts in heads]
                    h = min(range(len(heads)), key=lambda i: score(kept[i]) - score(best[i]))
                    best[h] = kept[h]
                free[path] = best
            # a layer is free (per-head choices), a donor (all exact, its map kept) or a receiver of the previous
            # layer's map (all shared): a chain over the layers, solved exactly by dynamic programming
            inf = float("inf")
            cost = {"free": 0.0, "donor": inf, "receiver": inf}
            back = []
            for i, path in enumerate(order):
                j_free = sum(score(o) for o in free[path])
                j_donor = lam * len(table[path])
                j_recv = sum(score(o) for o in shared[path]["heads"]) \
                    if path in shared and i > 0 and shared[path]["donor"] == order[i - 1] else inf
                prev = min(cost, key=cost.get)
                new = {"free": cost[prev] + j_free, "donor": cost[prev] + j_donor, "receiver": cost["donor"] + j_recv}
                back.append({"free": prev, "donor": prev, "receiver": "donor"})
                cost = new
            state = min(cost, key=cost.get)
            plan, chosen, flops, dense = {}, {}, 0.0, 0.0
            for i in range(len(order) - 1, -1, -1):
                path = order[i]
                if state == "free":
                    opts = free[path]
                elif state == "donor":
                    opts = [next(o for o in h if o["label"] == EXACT) for h in table[path]]
                else:
                    opts = shared[path]["heads"]
                chosen[path] = opts
                plan[path] = [o["label"] for o in opts]
                flops += sum(o["flops"] for o in opts)
                dense += sum(o["dense"] for o in opts)
                state = back[i][state]
            return {p: plan[p] for p in order}, flops / dense, chosen

        reference_fit = ctx.program.run(**fit)

        def model_metric(plan) -> dict:
            g = ctx.program.module()
            canonicalize(g)
            apply_plan(g, {s.module_path: s for s in attention_sites(g, ctx.program.causal_modules)}, plan, learned)
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
            plan, ratio, chosen = plan_for(hi)
            predicted = model_metric(plan)
        else:
            # error target: the cheapest plan (largest lambda) whose model output still meets it, on a log grid
            best = None
            for lam in [0.0] + [10 ** e for e in torch.linspace(-6, 2, 17).tolist()]:
                plan, ratio, chosen = plan_for(lam)
                ctx.progress(f"{self.name}: lambda={lam:.2g} flops={ratio:.3f}")
                m = model_metric(plan)
                if meets(m):
                    best = (plan, ratio, chosen, m)
                else:
                    break
            if best is None:
                plan = {p: [EXACT] * sites[p].heads for p in sites}
                chosen = {p: [next(o for o in h if o["label"] == EXACT) for h in table[p]] for p in table}
                ratio, predicted = 1.0, model_metric(plan)
            else:
                plan, ratio, chosen, predicted = best
        ctx.progress(f"{self.name}: verifying on {n_hold} held-out samples")
        measured = self._holdout_metric(ctx, plan, hold, learned)
        per_site = {}
        for path, labels in plan.items():
            heads = chosen[path]
            per_site[path] = {"flops_ratio": sum(o["flops"] for o in heads) / sum(o["dense"] for o in heads),
                              "predicted_head_errors": [round(o["err"], 5) for o in heads],
                              "methods": sorted({parse_label(lab)[0] for lab in labels})}
        counts: dict[str, int] = {}
        for labels in plan.values():
            for lab in labels:
                counts[parse_label(lab)[0]] = counts.get(parse_label(lab)[0], 0) + 1
        fits = [{"site": path, "candidate": candidate_label(r.method, concrete_options(r.method, r.options, r.budget)),
                 **r.fit} for path, results in analysis.candidates.items() if path in sites for r in results if r.fit]
        summary = {
            "target": {"density": cfg.density or None, "max_error": cfg.max_error or None,
                       "min_cosine": cfg.min_cosine or None},
            "attention_flops_ratio": ratio, "heads_by_method": counts,
            "predicted": {k: predicted[k] for k in ("relative_error", "cosine", "embedding_cosine") if k in predicted},
            "measured_holdout": {k: measured[k] for k in ("relative_error", "cosine", "embedding_cosine") if k in measured},
            "fit_samples": n_fit, "recall_probes": probed, "holdout_samples": n_hold, "seq_len": analysis.seq_len,
            "errors": cfg.errors, "structural_candidates": list(structural),
            "analysis_seconds": round(analysis_seconds, 1),
            **({"learned_fit_seconds": round(sum(f.get("seconds", 0) for f in fits), 1), "fit": fits} if fits else {}),
            "per_site": per_site,
        }
        self.analysis = analysis
        return plan, summary, learned

    @staticmethod
    def _options(analysis, sites) -> tuple[dict[str, list[list[dict]]], dict[str, dict]]:
        """(site -> head -> candidate dicts (label, err, flops, dense), exact and `pruned` included;
        site -> {"donor": the previous layer's site, "heads": the `shared` candidate per head})."""
        table, shared = {}, {}
        for path, results in analysis.candidates.items():
            if path not in sites:
                continue
            site = sites[path]
            dense = results[0].dense_flops if results else 1.0
            structural = analysis.structural.get(path, {})
            heads = []
            for h in range(site.heads):
                opts = [{"label": EXACT, "err": 0.0, "flops": dense, "dense": dense}]
                for r in results:
                    label = candidate_label(r.method, concrete_options(r.method, r.options, r.budget))
                    opts.append({"label": label, "err": r.errors[h], "flops": r.flops, "dense": r.dense_flops})
                if PRUNED in structural:
                    opts.append({"label": PRUNED, "err": structural[PRUNED][h], "flops": 0.0, "dense": dense})
                heads.append(opts)
            table[path] = heads
            donor = analysis.donors.get(path)
            if SHARED in structural and donor in sites:
                # the receiver computes P v only: the value share of exact attention's two matrix products
                part = site.value_dim / (site.head_dim + site.value_dim)
                shared[path] = {"donor": donor, "heads": [
                    {"label": SHARED, "err": e, "flops": dense * part, "dense": dense} for e in structural[SHARED]]}
        return table, shared

    @staticmethod
    def _holdout_metric(ctx, plan, hold, learned=None) -> dict:
        g = ctx.program.module()
        canonicalize(g)
        apply_plan(g, {s.module_path: s for s in attention_sites(g, ctx.program.causal_modules)}, plan, learned)
        with torch.no_grad():
            out = g(**{k: hold[k] for k in ctx.program.input_names})
        ref = ctx.program.run(**hold)
        return compare_outputs(ref, tuple(out), ctx.program.output_names, hold)
