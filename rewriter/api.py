"""The Python entry points: load, capture, inspect, optimize."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from .calibration import calibration_inputs, read_texts
from .canonical import canonicalize
from .capture import capture
from .errors import RewriterError
from .load import is_rewriter_output, load
from .pipeline import Pass, Pipeline
from .program import Program
from .report import write_json
from .sites import attention_sites, linear_sites


def load_program(src: str | Path | nn.Module | Program, *, attn_implementation: str | None = None,
                 seq: int = 16, allow_unused: bool = False) -> Program:
    """Anything -> Program: an HF folder or module is loaded and captured; a rewriter output is read back."""
    if isinstance(src, Program):
        return src
    if not isinstance(src, nn.Module) and is_rewriter_output(Path(src)):
        from .backends.torch_backend import load_program as _load
        return _load(src)
    return capture(load(src, attn_implementation, allow_unused=allow_unused), seq=seq)


def inspect(src: str | Path | nn.Module | Program) -> dict:
    program = load_program(src)
    gm = program.module()
    canon = canonicalize(gm)
    att = attention_sites(gm, program.causal_modules)
    lin = linear_sites(gm)
    return {
        "source": program.source,
        "model_class": program.meta.get("model_class"),
        "inputs": program.input_names, "outputs": program.output_names,
        "parameters": program.num_parameters(),
        "canonicalized": {"eager_attention": canon.eager_attention, "gqa": canon.gqa,
                          "unmatched_softmax": canon.unmatched_softmax or [],
                          "unmatched_attention": canon.unmatched_attention or []},
        "attention": [s.describe() for s in att],
        "linear": [s.describe() for s in lin],
    }


def input_paths(src, passes: list[Pass] = (), calib_file=None) -> list:
    """Every path a run reads (SRC, adapters, calibration file): OUT may be none of them, nor nested with one."""
    paths = [src] if isinstance(src, (str, Path)) else []
    for p in passes:
        paths += [a for a in (getattr(p.config, "adapters", None) or []) if isinstance(a, (str, Path))]
    if calib_file is not None:
        paths.append(calib_file)
    return paths


@dataclass
class OptimizeResult:
    program: Program
    report: dict
    artifacts: dict = field(default_factory=dict)


def optimize(src, passes: list[Pass], *, out: str | Path | None = None, force: bool = False,
             calib_file: str | Path | None = None, calib_texts: list[str] | None = None, samples: int = 8,
             seq_len: int = 128, seed: int = 0, max_error: float | None = None, export_onnx: bool = False,
             progress: Callable[[str], None] | None = None, allow_unused: bool = False) -> OptimizeResult:
    """Load + capture `src`, run the passes verified against the original, and (with `out`) write the result."""
    progress = progress or (lambda msg: None)
    from .calibration import check_calibration_args
    from .safety import check_number
    check_calibration_args(samples, seq_len, seed)
    if max_error is not None:
        check_number("--max-error", max_error, minimum=0)
    srcs = input_paths(src, passes, calib_file)
    if out is not None:   # refuse a bad output location before spending minutes on the passes
        from .backends.torch_backend import check_output_dir
        check_output_dir(Path(out), force, srcs)
    texts = read_texts(calib_file) if calib_file else calib_texts
    t0 = time.perf_counter()
    progress("loading and capturing")
    program = load_program(src, allow_unused=allow_unused)
    capture_s = time.perf_counter() - t0
    progress("building calibration inputs")
    inputs, desc = calibration_inputs(program, texts=texts, samples=samples, seq_len=seq_len, seed=seed)
    device = program.device()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    run = Pipeline(passes, max_error=max_error, seed=seed, progress=progress).run(program, inputs, desc)
    report = run.report
    report["capture_seconds"] = round(capture_s, 3)
    if out is not None:
        report["outputs"] = write_outputs(run.program, report, Path(out), force=force, export_onnx=export_onnx,
                                          progress=progress, artifacts=run.artifacts, srcs=srcs)
    return OptimizeResult(run.program, report, run.artifacts)


def write_outputs(program: Program, report: dict, out: Path, *, force: bool, export_onnx: bool = False,
                  progress: Callable[[str], None] = lambda m: None, artifacts: dict | None = None,
                  srcs: list = ()) -> list[str]:
    from .backends.torch_backend import staged_output, write_hf_folder, write_program
    written = ["model.pt2", "report.json"]
    with staged_output(out, force, srcs) as tmp:
        progress("writing model.pt2")
        write_program(program, tmp)
        if report.get("weight_only") and program.meta.get("eager_model") is not None:
            progress("writing HF folder")
            write_hf_folder(program, tmp / "hf")
            written.append("hf/")
        if export_onnx:
            from .backends import onnx as onnx_backend
            progress("exporting ONNX")
            report["onnx"] = onnx_backend.export_program(program, tmp / "model.onnx")
            written.append("model.onnx")
        for name, data in (artifacts or {}).items():
            (tmp / name).write_bytes(data)
            written.append(name)
        report["outputs"] = [str(out / w) for w in written]
        write_json(report, tmp / "report.json")
    return report["outputs"]
