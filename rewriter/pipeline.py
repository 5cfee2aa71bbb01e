"""Passes, the registry, and the verified pipeline: canonicalise, rewrite, lint, re-capture, compare."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import fx

from .canonical import canonicalize
from .calibration import compare_outputs
from .config import PassConfig, config_from_dict
from .errors import RewriterError
from .program import Program
from .sites import AttentionSite, LinearSite, attention_sites, linear_sites


@dataclass
class SiteChange:
    """What a pass did at one site: free-form numbers (parameters, bytes, density, error...)."""
    module_path: str
    kind: str
    details: dict = field(default_factory=dict)


@dataclass
class PassResult:
    changes: list[SiteChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)   # files written beside report.json (plots)
    meta: dict = field(default_factory=dict)    # set on the resulting program (e.g. decode-cache settings)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass
class PassContext:
    """What a pass may read: the program before it, calibration inputs, and the sites of its graph."""
    program: Program
    calib_inputs: dict[str, torch.Tensor]
    progress: Callable[[str], None] = lambda msg: None

    def attention_sites(self, gm: fx.GraphModule) -> list[AttentionSite]:
        return attention_sites(gm, self.program.causal_modules)

    def linear_sites(self, gm: fx.GraphModule) -> list[LinearSite]:
        return linear_sites(gm)


class Pass:
    """A rewrite. Subclasses set `name`, `config_class`, `weight_only`, and implement run()."""
    name: ClassVar[str] = ""
    config_class: ClassVar[type[PassConfig]] = PassConfig
    weight_only: ClassVar[bool] = False     # True: only weight values change, shapes and graph stay
    decode_only: ClassVar[bool] = False     # True: acts on the decode-time KV cache only (the program is unchanged)
    plans: ClassVar[bool] = False           # True: a --dry-run runs it, so the printed recipe holds its plan
    same_model: ClassVar[bool] = False      # True: the graph is re-expressed with the model's own weights and
                                             # arithmetic (fuse): written outputs (the HF folder, the decode bundle,
                                             # the report's weight_only) treat the pass as absent
    intended_change: ClassVar[bool] = False  # True: changing the outputs is the point (lora-merge): later passes'
                                             # errors are measured against the model after it (re-baselined)
    summary: ClassVar[str] = ""
    # "" when the pass runs layer by layer (`optimize --stream`, torchrun): what it decides at a block depends on that
    # block's calibration activations only, and its statistics are sums over samples (rewriter.distributed).
    # Otherwise the one-line reason it cannot, said before any work.
    streaming: ClassVar[str] = "it has not been written for layer-by-layer runs"
    # "" when a streamed run may split its samples across processes (torchrun); else why not
    distributed: ClassVar[str] = ""

    @property
    def keeps_hf_model(self) -> bool:
        """The HF folder after this pass is the model's own architecture with (maybe new) weights: weight-only and
        same-model passes."""
        return self.weight_only or self.same_model

    def stream_refusal(self) -> str:
        """Why this pass, as configured, cannot run layer by layer ("" when it can)."""
        return self.streaming

    def is_exact(self) -> bool:
        """True when the pass, as configured, is documented to keep the model's outputs (up to rounding): a
        pipeline of such passes gets a default error budget, so an exact pass that is not exact stops the run."""
        return False

    def __init__(self, config: PassConfig | None = None, **kwargs):
        if config is None:
            config = config_from_dict(self.config_class, kwargs, self.name)
        elif kwargs:
            raise TypeError("give either a config object or keyword arguments")
        self.config = config

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def recipe_entry(self) -> dict:
        """Every config field, defaults included: a recipe replays the run even if a later version moves a default."""
        return {"pass": self.name, **self.config.to_dict()}


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    if name not in PASSES:
        raise RewriterError(f"unknown pass '{name}'", f"known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def make_pass(name: str, options: dict | None = None) -> Pass:
    cls = get_pass(name)
    return cls(config_from_dict(cls.config_class, options or {}, name))


MAX_PASSES = 64   # passes per pipeline; each re-captures and verifies the program


class ErrorBudgetExceeded(RewriterError):
    pass


@dataclass
class PipelineRun:
    program: Program
    report: dict
    artifacts: dict[str, bytes] = field(default_factory=dict)


def exact_tolerance(program: Program) -> float:
    """Relative output error an exact rewrite may show from rounding alone: 1e-4 in fp32, 2e-2 in fp16 / bf16."""
    return dtype_tolerance({t.dtype for t in program.ep.state_dict.values() if t.is_floating_point()})


def dtype_tolerance(dtypes: set[torch.dtype]) -> float:
    """exact_tolerance for a program computing in `dtypes`."""
    return 2e-2 if dtypes & {torch.float16, torch.bfloat16} else 1e-4


def apply_pass(p: Pass, program: Program, calib_inputs: dict[str, torch.Tensor],
               progress: Callable[[str], None] = lambda msg: None) -> tuple[Program, PassResult, float]:
    """One pass on a program (a whole model, or one block when streaming): canonicalise, rewrite, lint, re-capture
    when it changed anything, merge the meta it records. Returns (program after, result, seconds); the caller's
    program is never changed."""
    progress(f"{p.name}: rewriting")
    t0 = time.perf_counter()
    current = program
    gm = current.module()
    canonicalize(gm)
    ctx = PassContext(program=current, calib_inputs=calib_inputs, progress=progress)
    result = p.run(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    if result.changed:
        progress(f"{p.name}: re-capturing")
        try:
            current = current.recapture(gm)
        except Exception as e:
            raise RewriterError(f"the program rewritten by '{p.name}' no longer exports: "
                                f"{str(e).strip().splitlines()[0][:300]}") from e
        if not p.keeps_hf_model:
            current.meta["weight_only"] = False
    if result.meta:
        current = copy.copy(current)          # never touch the caller's program
        current.meta = {**current.meta, **result.meta}
    return current, result, time.perf_counter() - t0


class Pipeline:
    """An ordered list of passes, verified after each one against the original model's outputs (or, after a pass
    whose change is intended, such as lora-merge, against the model after that pass)."""

    def __init__(self, passes: list[Pass], *, max_error: float | None = None, seed: int = 0,
                 progress: Callable[[str], None] | None = None, max_error_name: str = "max_error"):
        if len(passes) > MAX_PASSES:
            raise RewriterError(f"{len(passes)} passes given; at most {MAX_PASSES} per pipeline")
        if max_error is not None:
            from .safety import check_number
            check_number(max_error_name, max_error, minimum=0)
        self.passes = passes
        self.max_error = max_error
        self.max_error_name = max_error_name   # how the caller spells the budget: `--max-error` on the CLI
        self.seed = seed
        self.progress = progress or (lambda msg: None)

    def run(self, program: Program, calib_inputs: dict[str, torch.Tensor], calib_desc: str = "") -> PipelineRun:
        with torch.no_grad():
            return self._run(program, calib_inputs, calib_desc)

    def _run(self, program: Program, calib_inputs: dict[str, torch.Tensor], calib_desc: str) -> PipelineRun:
        from .config import check_bounds
        for p in self.passes:   # before any work: size-like values bounded by the model
            check_bounds(p.config, p.name, program.config)
        max_error, defaulted = self.max_error, False
        if max_error is None and self.passes and all(p.is_exact() for p in self.passes):
            max_error, defaulted = exact_tolerance(program), True
        torch.manual_seed(self.seed)
        original = program.run(**calib_inputs)
        bad = [n for n, t in zip(program.output_names, original)
               if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise RewriterError(f"the original model's output '{bad[0]}' holds NaN/Inf on the calibration inputs; "
                                "nothing was written", "check the checkpoint and the calibration inputs")
        report: dict[str, Any] = {
            "source": program.source,
            "model_class": program.meta.get("model_class"),
            "calibration": {"description": calib_desc,
                            "shapes": {k: list(v.shape) for k, v in calib_inputs.items()}},
            "max_error": max_error,
            **({"max_error_default": "every pass is documented as exact, so the run stops if the output moves"}
               if defaulted else {}),
            "before": {"parameters": program.num_parameters(), "bytes": program.parameter_bytes()},
            "passes": [],
        }
        # Errors are measured against `reference`: the original model, or the model after the last pass whose change
        # is the point (lora-merge), so the budget measures the approximations and not the adapter.
        reference, reference_name = original, "original"
        current = program
        artifacts: dict[str, bytes] = {}
        for p in self.passes:
            current, result, seconds = apply_pass(p, current, calib_inputs, self.progress)
            self.progress(f"{p.name}: verifying against the {reference_name} model")
            out = current.run(**calib_inputs)
            metrics = compare_outputs(reference, out, current.output_names, calib_inputs)
            entry = {"pass": p.name, "config": p.config.to_dict(), "seconds": round(seconds, 3),
                     "sites_changed": len(result.changes), "reference": reference_name, "metrics": metrics,
                     **({"metrics_vs_original": compare_outputs(original, out, current.output_names, calib_inputs)}
                        if reference is not original else {}),
                     **({"intended_change": True} if p.intended_change else {}),
                     **({"exact": True} if p.is_exact() else {}), **({"decode_only": True} if p.decode_only else {}),
                     "parameters": current.num_parameters(), "bytes": current.parameter_bytes(),
                     "sites": [{"module_path": c.module_path, "kind": c.kind, **c.details} for c in result.changes],
                     "notes": result.notes, **({"summary": result.summary} if result.summary else {})}
            if result.artifacts:
                entry["artifacts"] = sorted(result.artifacts)
                artifacts.update(result.artifacts)
            report["passes"].append(entry)
            if metrics.get("non_finite") or not all(
                    math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
                raise RewriterError(f"after pass '{p.name}' the output '{metrics['output']}' holds NaN/Inf; "
                                    "nothing was written",
                                    "restrict the pass with include/exclude/layers or change its settings")
            if p.intended_change:
                if result.changed:
                    reference, reference_name = out, f"after {p.name}"
                    entry["notes"].append(f"its change is intended: {self.max_error_name} does not bound it; later "
                                          f"passes are measured against the model after {p.name}")
                continue
            if max_error is not None and metrics["relative_error"] > max_error:
                against = "" if reference is original else f" against the model {reference_name}"
                raise ErrorBudgetExceeded(
                    f"after pass '{p.name}' the relative error of '{metrics['output']}'{against} is "
                    f"{metrics['relative_error']:.3g} > {self.max_error_name} {max_error:g}"
                    f"{' (the default for exact passes)' if defaulted else ''}; nothing was written",
                    "report it: this pass should be exact here" if defaulted else
                    f"raise {self.max_error_name}, or lower the pass's saving (a larger window / density / features / "
                    "rank), or restrict it with include/exclude/layers")
        report["after"] = {"parameters": current.num_parameters(), "bytes": current.parameter_bytes()}
        if report["passes"]:
            last = report["passes"][-1]
            report["final"] = last["metrics"]
            report["final_reference"] = last["reference"]
            if "metrics_vs_original" in last:
                report["final_vs_original"] = last["metrics_vs_original"]
        else:
            report["final"] = compare_outputs(original, original, program.output_names, calib_inputs)
            report["final_reference"] = "original"
        # the HF folder is the model with new weights only when this run and the runs before it (a program optimized
        # again keeps meta["weight_only"] = False) changed weights only
        report["weight_only"] = program.meta.get("weight_only", True) is not False and \
            all(p.keeps_hf_model for p in self.passes)
        return PipelineRun(program=current, report=report, artifacts=artifacts)
