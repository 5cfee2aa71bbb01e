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
from .backends.torch_backend import (check_output_dir, load_decoder, staged_output, write_hf,  # noqa: E402
                                     write_hf_folder, write_program)
from .config import describe_fields  # noqa: E402,F401
from .load import default_checkpoint  # noqa: E402,F401
from .pipeline import PASSES, get_pass, make_pass  # noqa: E402,F401
from .recipe import CALIBRATION_DEFAULTS, Recipe, parse_pass_flag  # noqa: E402,F401
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
        "rewritten": rewritten_sites(gm),
    }


def rewritten_sites(gm) -> list[dict]:
    """Every call of a rewriter:: op in the graph: module path, layer, method (the op's name, `_` -> `-`) and its
    budget (the op's non-tensor arguments, by the schema's names)."""
    from .capture import layer_index
    from .graph import module_path
    found = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or getattr(target, "namespace", None) != "rewriter":
            continue
        schema = target._schema
        values = dict(zip((a.name for a in schema.arguments), node.args))
        values.update(node.kwargs)
        budget = {k: v for k, v in values.items() if isinstance(v, (int, float, bool, str)) and k not in
                  ("causal", "scale")}
        path = module_path(node) or node.name
        found.append({"module_path": path, "layer": layer_index(path), "method": schema.name.split("::")[-1]
                      .replace("_", "-"), "budget": budget})
    return found


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
             progress: Callable[[str], None] | None = None, allow_unused: bool = False,
             max_error_name: str = "max_error", onnx_target: str = "standard",
             aoti_package: bool = False, stream: bool = False, resume: bool = False,
             device: str | None = None, pack: bool = False) -> OptimizeResult:
    """Load + capture `src`, run the passes verified against the original, and (with `out`) write the result (with
    `aoti_package`, also OUT/model.aoti.pt2: `compile_output`). `max_error` bounds the output's relative error after
    each approximation, measured against the original model or, after a pass whose change is intended (lora-merge),
    against the model after it. (`max_error_name`: how errors name the budget; the CLI says `--max-error`.)"""
    progress = progress or (lambda msg: None)
    from .calibration import check_calibration_args
    from .safety import check_number
    check_calibration_args(samples, seq_len, seed)
    if max_error is not None:
        check_number(max_error_name, max_error, minimum=0)
    srcs = input_paths(src, passes, calib_file)
    from .backends.onnx import TARGETS
    if onnx_target not in TARGETS:
        raise RewriterError(f"unknown ONNX target {onnx_target!r}", f"use one of: {', '.join(TARGETS)}")
    if aoti_package and out is None:
        raise RewriterError("--compile writes OUT/model.aoti.pt2 and needs an output folder", "add -o OUT")
    if out is not None:   # refuse a bad output location before spending minutes on the passes
        check_output_dir(Path(out), force, srcs)
    texts = read_texts(calib_file) if calib_file else calib_texts
    from .distributed import launched
    if launched() and not (stream or resume):   # every rank would run the whole model and race on OUT
        raise RewriterError("under torchrun, optimize splits calibration layer by layer only", "add --stream")
    if stream or resume:
        return _optimize_streamed(src, passes, out=out, force=force, resume=resume, texts=texts, samples=samples,
                                  seq_len=seq_len, seed=seed, max_error=max_error, device=device, progress=progress,
                                  max_error_name=max_error_name, calib_file=calib_file, pack=pack,
                                  unsupported={"--export onnx": export_onnx, "--compile": aoti_package,
                                               "--allow-unused-weights": allow_unused})
    check_fits_in_memory(src)
    t0 = time.perf_counter()
    progress("loading and capturing")
    program = load_program(src, allow_unused=allow_unused)
    capture_s = time.perf_counter() - t0
    check_seq_len(program, seq_len)
    progress("building calibration inputs")
    inputs, desc = calibration_inputs(program, texts=texts, samples=samples, seq_len=seq_len, seed=seed, pack=pack)
    device = program.device()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    run = Pipeline(passes, max_error=max_error, seed=seed, progress=progress,
                   max_error_name=max_error_name).run(program, inputs, desc)
    report = run.report
    report["calibration"].update({"samples": samples, "seq_len": seq_len, "seed": seed,
                                  **({"pack": True} if pack else {})})
    report["capture_seconds"] = round(capture_s, 3)
    if out is not None:   # the recipe that replays this run (plans filled in by planning passes) goes beside it
        cal = {"samples": samples, "seq_len": seq_len, "seed": seed,
               **({"file": str(calib_file)} if calib_file else {}), **({"pack": True} if pack else {})}
        recipe = Recipe(list(passes), max_error, cal).to_yaml().encode()
        report["outputs"] = write_outputs(run.program, report, Path(out), force=force, export_onnx=export_onnx,
                                          progress=progress, artifacts={**run.artifacts, "recipe.yaml": recipe},
                                          srcs=srcs, onnx_target=onnx_target)
        if aoti_package:
            report["compile"] = compile_output(out, progress=progress)
            report["outputs"].append(report["compile"]["path"])
    return OptimizeResult(run.program, report, run.artifacts)


WHOLE_MODEL_FACTOR = 2.5   # the whole-model path holds the float32 model, its capture and a rewritten copy


def memory_budget() -> int | None:
    """Bytes the whole-model path may use: REWRITER_MEMORY_BUDGET_GB if set, else MemAvailable (Linux), else None."""
    import os
    env = os.environ.get("REWRITER_MEMORY_BUDGET_GB")
    if env:
        try:
            return int(float(env) * 2**30)
        except ValueError:
            raise RewriterError(f"REWRITER_MEMORY_BUDGET_GB={env!r} is not a number") from None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(src) -> None:
    """Refuse, before loading, an HF folder whose whole-model run would not fit in memory (it would die halfway
    with an out-of-memory kill): say how much it needs and point at --stream."""
    if not isinstance(src, (str, Path)) or not Path(src).is_dir() or is_rewriter_output(Path(src)):
        return
    from .stream.io import LazyCheckpoint
    try:
        ckpt = LazyCheckpoint(src)
    except RewriterError:
        return       # no safetensors: the loader says what is wrong
    fp32 = sum(4 * i.nbytes // max(1, i.dtype.itemsize) for i in ckpt.info.values() if i.dtype.is_floating_point)
    need, budget = int(WHOLE_MODEL_FACTOR * fp32), memory_budget()
    if budget is not None and need > budget:
        raise RewriterError(f"{src} holds {ckpt.nbytes / 2**30:.1f} GiB of weights; the whole-model path needs about "
                            f"{need / 2**30:.1f} GiB of memory and {budget / 2**30:.1f} GiB is available",
                            "add --stream (one decoder block in memory at a time; `rewriter passes` says which passes "
                            "stream)")


def _optimize_streamed(src, passes, *, out, force, resume, texts, samples, seq_len, seed, max_error, device, progress,
                       max_error_name, calib_file, unsupported: dict, pack: bool = False) -> OptimizeResult:
    """`optimize(..., stream=True)`: rewriter.stream.optimize_streamed (one block in memory at a time)."""
    from .stream import optimize_streamed
    given = [flag for flag, on in unsupported.items() if on]
    if given:
        raise RewriterError(f"{given[0]} is not available with --stream",
                            "export or compile the streamed output's blocks separately, or drop --stream")
    if isinstance(src, (nn.Module, Program)):
        raise RewriterError("--stream reads an HF folder (it never holds the whole model)", "pass the folder's path")
    if resume and out is None:
        raise RewriterError("--resume continues an interrupted run into OUT", "add -o OUT")
    cal = {"samples": samples, "seq_len": seq_len, "seed": seed, **({"file": str(calib_file)} if calib_file else {}),
           **({"pack": True} if pack else {})}

    def recipe() -> bytes:    # written when the run ends, so planning passes' plans are in it
        return Recipe(list(passes), max_error, cal).to_yaml().encode()
    run = optimize_streamed(src, passes, out=out, force=force, resume=resume, texts=texts, samples=samples,
                            seq_len=seq_len, seed=seed, max_error=max_error, device=device, recipe_yaml=recipe,
                            progress=progress, max_error_name=max_error_name, pack=pack)
    return OptimizeResult(None, run.report)   # type: ignore[arg-type]


def check_seq_len(program: Program, seq_len: int) -> None:
    """A calibration length over the model's positions is refused, not silently cut."""
    from .program import max_length
    limit = max_length(program.config)
    if limit and seq_len > limit:
        raise RewriterError(f"--seq-len {seq_len} exceeds the {limit} positions the model takes",
                            f"use --seq-len {limit} or less")


def write_outputs(program: Program, report: dict, out: Path, *, force: bool, export_onnx: bool = False,
                  progress: Callable[[str], None] = lambda m: None, artifacts: dict | None = None,
                  srcs: list = (), onnx_target: str = "standard") -> list[str]:
    written = ["model.pt2", "report.json"]
    with staged_output(out, force, srcs) as tmp:
        progress("writing model.pt2")
        write_program(program, tmp)
        if (tmp / "decoder").is_dir():
            written.append("decoder/")       # the decode bundle `rewriter generate OUT` reads
        if program.meta.get("eager_model") is not None:
            progress("writing HF folder")
            why = write_hf(program, tmp / "hf", weight_only=bool(report.get("weight_only")))
            if why is None:
                written.append("hf/")
            else:
                report.setdefault("notes", []).append(f"no hf/ folder: {why}")
        if export_onnx:
            from .backends import onnx as onnx_backend
            progress("exporting ONNX")
            report["onnx"] = onnx_backend.export_program(program, tmp / "model.onnx", target=onnx_target)
            report["onnx"]["path"] = str(out / "model.onnx")    # where it lands, not the staging folder
            written.append("model.onnx")
        for name, data in (artifacts or {}).items():
            (tmp / name).write_bytes(data)
            written.append(name)
        report["outputs"] = [str(out / w) for w in written]
        write_json(report, tmp / "report.json")
    return report["outputs"]


# --- AOTInductor package -------------------------------------------------------------------------------------------

def compile_output(out: str | Path, *, progress: Callable[[str], None] | None = None,
                   device: str | None = None) -> dict:
    """`rewriter compile OUT`: an AOTInductor package of the program in the rewriter output OUT, written as
    OUT/model.aoti.pt2 (staged, renamed when complete) and checked against the program within 1e-4 at the example,
    two other shapes and two whole 64-token blocks (removed if it differs). device: compile for it (default: the
    program's). Returns the record, also written into OUT/report.json under "compile"."""
    from . import compile as aoti
    from .backends.onnx import shape_variants
    progress = progress or (lambda msg: None)
    out = Path(out)
    if not out.exists():
        raise RewriterError(f"no such folder: {out}", "pass the output folder of `rewriter optimize`")
    if not is_rewriter_output(out):
        raise RewriterError(f"{out} is not a rewriter output (needs model.pt2 and rewriter.json)",
                            "run `rewriter optimize ... -o OUT` first")
    progress("loading the program")
    program = load_program(out)
    if device is not None:
        program = program.to(device)
    info = aoti.compile_package(program, out / aoti.PACKAGE_FILE, progress=progress)
    progress("checking the package against the program")
    target = out / aoti.PACKAGE_FILE
    try:
        checks = [dict(program.example_inputs)] + shape_variants(program) + aoti.block_multiple_inputs(program)
        info["max_abs_diff"] = max(aoti.check_package(target, program, x) for x in checks)
        info["checked_shapes"] = [{n: list(x[n].shape) for n in program.input_names} for x in checks]
    except BaseException:
        target.unlink(missing_ok=True)     # a package that does not match is not left behind
        raise
    info["path"] = str(target)
    _record(out, "compile", info)
    return info


def _record(out: Path, key: str, value: dict) -> None:
    """Add `key` to OUT/report.json (written beside, then renamed)."""
    import json
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report[key] = value
    outputs = report.setdefault("outputs", [])
    if value.get("path") and value["path"] not in outputs:
        outputs.append(value["path"])
    tmp = report_path.with_name(".report.json.tmp")
    write_json(report, tmp)
    tmp.replace(report_path)


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
             passes: list | None = None, max_len: int | None = None, stream=None,
             progress: Callable[[str], None] | None = None, fused_step: bool = False, **calib) -> GenerateResult:
    """Greedy generation through the decode runtime (static in-place cache; the step one CUDA graph replay on CUDA),
    optionally with think / kv-window / mla. SRC: an HF decoder folder (with `passes`) or a rewriter output written
    from one (its KV policy applies). `stream(piece: str)` gets the new text (or `id,` without a tokenizer) as each
    token comes; `progress(message)` hears each step. fused_step: the step fused by Inductor before it is
    captured (a compile of seconds up front, faster steps after)."""
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
    _check_generate_args(prompt_ids, max_new_tokens, max_len)
    progress = progress or (lambda msg: None)
    from .load import LoadedModel
    progress("loading")
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
    progress("capturing the prefill and decode programs" + (" and running the KV passes" if passes else ""))
    decoder, loaded, report = decoder_from(loaded, passes, max_len=max_len or max(total, 2), policy=policy, **calib)
    progress(f"generating {max_new_tokens} tokens")
    out = decoder.generate(ids, max_new_tokens, eos_token_id=getattr(loaded.config, "eos_token_id", None)
                           if tokenizer is not None else None, stream=_text_stream(stream, tokenizer),
                           compiled=fused_step)
    new = out[:, ids.shape[1]:]
    text = tokenizer.batch_decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return GenerateResult(ids=out, new_ids=new, text=text, kv=kv_bytes(decoder, total, prompt=ids.shape[1]),
                          report=report)


def _text_stream(stream, tokenizer):
    """A runtime token callback ((B,) ids per step) that hands `stream` the new text of row 0."""
    if stream is None:
        return None
    new: list[int] = []
    shown = [""]

    def on_tokens(tokens: torch.Tensor) -> None:
        new.append(int(tokens[0]))
        if tokenizer is None:
            stream(f"{new[-1]},")
            return
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):          # wait for the rest of a multi-byte character
            stream(text[len(shown[0]):])
            shown[0] = text
    return on_tokens


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


# --- evaluation: perplexity, passkey retrieval, embedding cosine ----------------------------------------------------

def evaluate(src=None, baseline=None, *, task: str = "perplexity", text: str | Path | None = None,
             lengths: list[int] | None = None, trials: int = 10, max_tokens: int | None = None, seed: int = 1234,
             out: str | Path | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """SRC (and BASELINE, side by side) on one task: perplexity with sliding windows of each length (default text:
    the shipped decoder's held-out files), passkey retrieval accuracy at each distance, or the cosine between SRC's
    and BASELINE's mean-pooled embeddings (encoders). SRC / BASELINE: an HF folder or a rewriter output (whose
    baseline defaults to the folder it was made from); SRC defaults to the shipped decoder (MiniLM for embedding).
    With `out` (a .json path) writes the result there and the plot beside it (.png)."""
    from .evaluate import plot_eval, read_eval_text, run_eval
    from .safety import check_src_out
    progress = progress or (lambda m: None)
    if src is None:
        if task == "embedding":
            src = default_checkpoint()
        else:
            from .data import DECODER_DIR
            src = DECODER_DIR
    out = Path(out) if out is not None else None
    if out is not None:
        if out.is_dir():
            raise RewriterError(f"--out {out} is a folder; give a .json file path")
        if out.suffix != ".json":
            raise RewriterError(f"--out {out}: give a .json file path (the plot goes beside it as .png)")
        if not out.parent.is_dir():
            raise RewriterError(f"--out {out}: folder {out.parent} does not exist")
        check_src_out([p for p in (src, baseline, text) if p is not None], out)
    texts = read_eval_text(text) if text is not None else None
    res = run_eval(src, baseline, task=task, texts=texts, text_desc=str(text) if text is not None else None,
                   lengths=lengths, trials=trials, max_tokens=max_tokens, seed=seed, progress=progress)
    if out is not None:
        png = out.with_suffix(".png")
        res["plot"] = plot_eval(res, png)
        if res["plot"] is None:
            res["plot_note"] = "matplotlib is not installed: no plot written"
        write_json(res, out)
    return res
