"""The Python entry points (and the CLI's only door): load, capture, inspect, optimize, analyze, export, generate."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .calibration import calibration_inputs, read_texts
from .canonical import canonicalize
from .capture import capture
from .decode import (Decoder, KVPolicy, build_decoder, build_latent_decoder, decoder_dims, kv_bytes,
                     policy_from_meta)
from .errors import RewriterError
from .load import is_rewriter_output, load
from .pipeline import Pass, Pipeline
from .program import Program
from .report import PLOTS_SKIPPED, heatmaps, write_json  # noqa: F401  (heatmaps, PLOTS_SKIPPED: for the CLI)
from .sites import attention_sites, linear_sites

# The rest of the CLI's door: the CLI imports this module only.
from .analysis import analyze, candidate_label  # noqa: E402,F401
from .backends.onnx import export_program  # noqa: E402,F401
from .backends.torch_backend import (check_output_dir, load_decoder, staged_output, write_hf_folder,  # noqa: E402
                                     write_program)
from .config import describe_fields  # noqa: E402,F401
from .load import default_checkpoint  # noqa: E402,F401
from .pipeline import PASSES, get_pass, make_pass  # noqa: E402,F401
from .recipe import Recipe, parse_pass_flag  # noqa: E402,F401
from .report import dumps, render  # noqa: E402,F401
from .safety import check_src_out  # noqa: E402,F401


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
        # at capture (program.meta["canonical"]): eager chains and repeat_kv folded, sites made exact_attention,
        # sites kept in the model's SDPA form and why; what is still unmatched is read from the graph now
        "canonicalized": {"eager_attention": canon.eager_attention, "gqa": canon.gqa, "exact_attention": 0,
                          "kept": [], **(program.meta.get("canonical") or {}),
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


# --- generation through the KV-cache decode runtime --------------------------------------------------------------

DECODE_PASSES = ("think", "kv-window", "mla")


@dataclass
class GenerateResult:
    ids: torch.Tensor              # (B, T + new)
    new_ids: torch.Tensor          # (B, new)
    text: list[str] | None         # decoded new text when the folder has a tokenizer
    kv: dict                       # cache bytes per token / per sequence, before and after thinning
    report: dict | None            # the pipeline report of the KV passes (None without passes)


def decoder_from(src, passes: list | None = None, *, max_len: int = 256, calib_texts: list[str] | None = None,
                 samples: int = 8, seq_len: int = 128, seed: int = 0,
                 policy: KVPolicy | None = None) -> tuple[Decoder, Any, dict | None]:
    """Load SRC (HF folder or module), run the KV passes (think, kv-window) verified on the full-sequence program,
    and capture the decode programs with the resulting cache policy. Returns (decoder, loaded, pipeline report).
    A rewriter output folder brings its own weights and policy (written by `rewriter optimize`); so does `policy`."""
    from .load import LoadedModel
    passes = list(passes or [])
    if _is_output_folder(src):
        src, policy = _output_decoder(src, passes)
    loaded = src if isinstance(src, LoadedModel) else load(src) if not isinstance(src, nn.Module) \
        else LoadedModel(module=src, config=getattr(src, "config", None))
    dims = decoder_dims(loaded.config)
    if policy is not None:
        return build_decoder(loaded.module, max_len=max_len, policy=policy, source=loaded.source), loaded, None
    other = [p.name for p in passes if p.name not in DECODE_PASSES]
    if other:
        raise ValueError(f"generate runs only the KV passes {', '.join(DECODE_PASSES)}; got {', '.join(other)}")
    if "mla" in {p.name for p in passes} and len(passes) > 1:
        raise ValueError("mla cannot be combined with other KV passes in one decode cache; use one of them")
    report = None
    meta: dict = {}
    if passes:
        program = capture(loaded, seq=16)
        inputs, desc = calibration_inputs(program, texts=calib_texts, samples=samples, seq_len=seq_len, seed=seed)
        run = Pipeline(passes, seed=seed).run(program, inputs, desc)
        report, meta = run.report, run.program.meta
    policy = policy_from_meta(meta, dims["layers"])
    if meta.get("mla"):     # the cache holds the MLA latent instead of keys and values
        return build_latent_decoder(loaded.module, meta["mla"], max_len=max_len, source=loaded.source), loaded, report
    decoder = build_decoder(loaded.module, max_len=max_len, policy=policy, source=loaded.source)
    return decoder, loaded, report


def _is_output_folder(src) -> bool:
    return isinstance(src, (str, Path)) and is_rewriter_output(Path(src))


def _output_decoder(folder, passes: list):
    """A rewriter output -> (its decoder weights as a LoadedModel, its KV policy)."""
    if passes:
        raise ValueError(f"{folder} is a rewriter output whose KV policy `rewriter optimize` already fixed; --pass "
                         "applies to HF folders only")
    return load_decoder(folder)


def generate(src, *, prompt: str | None = None, prompt_ids: list[int] | None = None, max_new_tokens: int = 20,
             passes: list | None = None, max_len: int | None = None, **calib) -> GenerateResult:
    """Greedy generation through the captured prefill/decode programs, optionally with think / kv-window.
    SRC: an HF decoder folder (with `passes`) or a rewriter output written from one (its KV policy applies)."""
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
    _check_generate_args(prompt_ids, max_new_tokens, max_len)
    from .load import LoadedModel
    policy = None
    if _is_output_folder(src):
        src, policy = _output_decoder(src, passes)
    loaded = src if isinstance(src, LoadedModel) else load(src) if not isinstance(src, nn.Module) \
        else LoadedModel(module=src, config=getattr(src, "config", None))
    tokenizer = None
    if prompt is not None:
        tokenizer = _tokenizer(loaded)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; give at least one token id")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    vocab = loaded.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab}); got {ids.tolist()[0]}")
    total = ids.shape[1] + max_new_tokens
    positions = next((getattr(loaded.config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(loaded.config, k, None), int)), None)
    if positions and max_len is not None and max_len > positions:
        raise ValueError(f"--max-len {max_len} exceeds the {positions} positions the model takes")
    if positions and total > positions and not (policy is not None and policy.evicts) and not any(
            getattr(p, "name", "") == "kv-window" for p in (passes or [])):
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds the {positions} "
                         "positions the model takes")
    decoder, loaded, report = decoder_from(loaded, passes, max_len=max_len or max(total, 2), policy=policy, **calib)
    out = decoder.generate(ids, max_new_tokens, eos_token_id=getattr(loaded.config, "eos_token_id", None)
                           if tokenizer is not None else None)
    new = out[:, ids.shape[1]:]
    text = tokenizer.batch_decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return GenerateResult(ids=out, new_ids=new, text=text, kv=kv_bytes(decoder, total), report=report)


MAX_NEW_TOKENS = 1 << 20


def _check_generate_args(prompt_ids, max_new_tokens, max_len) -> None:
    """Arguments a user types: one-line ValueErrors before anything is loaded."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--max-new-tokens must be an integer in [0, {MAX_NEW_TOKENS}]; got {max_new_tokens!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3):
        raise ValueError(f"--max-len must be an integer >= 3 (cache slots for the prompt and new tokens); "
                         f"got {max_len!r}")
    for t in prompt_ids or []:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**31:
            raise ValueError(f"prompt id {t!r} is not a token id (an integer in [0, 2^31))")


def _tokenizer(loaded):
    from .load import TOKENIZER_FILES
    folder = loaded.folder
    if folder is None or not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise RewriterError(f"{loaded.source} has no tokenizer", "pass token ids with --prompt-ids 1,2,3")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))
