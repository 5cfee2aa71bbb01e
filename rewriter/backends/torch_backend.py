"""Outputs in PyTorch formats: model.pt2 (always), an HF folder (weight-only passes; attention rewrites too, run by
transformers through rewriter's registered attention implementation, rewriter.hf), the
metadata that lets `load_program` rebuild a Program, and for decoder LMs with KV passes (think, kv-window) what
`rewriter generate` needs: the weights as an HF folder `decoder/` and the decode-cache policy in rewriter.json.
Everything is written to a temporary folder beside the target and moved into place only when complete."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import RewriterError
from ..load import TOKENIZER_FILES
from ..program import WRAPPER_PREFIX, Program

META_FILE = "rewriter.json"
PROGRAM_FILE = "model.pt2"
INPUTS_FILE = "example_inputs.safetensors"
DECODER_DIR = "decoder"
KV_META_KEYS = ("think_key_channels", "think_dynamic", "kv_window")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(out: Path, force: bool, srcs: Iterable = ()) -> None:
    """Refuse a bad OUT before any work: equal to / nested with an input, not a folder, not empty without --force,
    not a previous rewriter output with --force, or not writable. Creates nothing."""
    from ..safety import check_force, check_src_out, resolve
    check_src_out(srcs, out)
    real = resolve(out)
    check_force(real, force)
    anchor = _existing_ancestor(real.parent)
    if not anchor.is_dir():
        raise RewriterError(f"cannot create {out}: {anchor} is not a folder")
    try:   # a probe folder, removed at once: permissions, read-only mounts, /proc
        Path(tempfile.mkdtemp(prefix=".rewriter-write-test-", dir=anchor)).rmdir()
    except OSError as e:
        raise RewriterError(f"cannot write to {anchor}: {e.strerror}", "choose an output folder you can write to") \
            from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def move_into_place(tmp: Path, out: Path, force: bool, srcs: Iterable = ()) -> None:
    """A complete staging folder becomes `out` (symlinks resolved): renamed in, a previous output (checked again:
    still empty or a rewriter output) moved aside first and removed after; on failure the previous output returns."""
    from ..safety import resolve
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700; the output gets the user's normal mode
    real = resolve(out)
    real.parent.mkdir(parents=True, exist_ok=True)
    if real.exists():
        check_output_dir(real, force, srcs)
        old = real.with_name(f".{real.name}.old-{os.getpid()}-{tmp.name[-8:]}")
        real.rename(old)
        try:
            tmp.rename(real)
        except BaseException:
            old.rename(real)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(real)


@contextmanager
def staged_output(out: Path, force: bool, srcs: Iterable = ()) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `out` (symlinks resolved), on any error or signal it is removed.
    The temp folder lives in the nearest existing ancestor of `out`, so a failed run creates no parent folders."""
    check_output_dir(Path(out), force, srcs)
    from ..safety import resolve
    real = resolve(out)
    anchor = _existing_ancestor(real.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=anchor))
    except OSError as e:
        raise RewriterError(f"cannot write to {anchor}: {e.strerror}") from None
    try:
        yield tmp
        move_into_place(tmp, out, force, srcs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))


def write_program(program: Program, folder: Path) -> None:
    from safetensors.torch import save_file
    torch.export.save(program.ep, str(folder / PROGRAM_FILE))
    save_file({k: v.contiguous() for k, v in program.example_inputs.items()}, str(folder / INPUTS_FILE))
    meta = {
        "format": 1,
        "input_names": program.input_names,
        "output_names": program.output_names,
        "dynamic_dims": {k: {str(d): v for d, v in dims.items()} for k, dims in program.dynamic_dims.items()},
        "dim_bounds": program.dim_bounds,
        "config": _jsonable(program.config),
        "causal_modules": program.causal_modules,
        "source": program.source,
        "meta": {k: _jsonable(v) for k, v in program.meta.items() if k != "eager_model"},
    }
    if any(k in program.meta for k in KV_META_KEYS):
        meta["decode"] = write_decoder(program, folder)
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    src = program.meta.get("hf_folder")
    if src:   # tokenizer travels with the program so calibration and generate keep working
        for name in TOKENIZER_FILES:
            if (Path(src) / name).exists():
                shutil.copy2(Path(src) / name, folder / name)


def write_decoder(program: Program, folder: Path) -> dict:
    """The decode bundle of a decoder LM: its weights (HF folder) and KV policy; or why there is none."""
    from ..decode import DECODER_TYPES, decoder_dims, policy_from_meta
    model_type = program.config.get("model_type", "")
    if model_type not in DECODER_TYPES:
        return {"unavailable": f"model_type '{model_type}' is not a decoder LM ({', '.join(DECODER_TYPES)})"}
    from ..linear.fused import MODEL_OPS
    own = {"rewriter::exact_attention", *MODEL_OPS}   # the model's own attention, RMSNorm and SwiGLU product
    custom = sorted({str(n.target) for n in program.ep.graph.nodes
                     if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "rewriter"
                     and n.target.name() not in own})
    if custom:   # the decode programs re-capture the HF model, which knows nothing of these rewrites
        return {"unavailable": f"the program holds rewrites the decode path does not reproduce ({', '.join(custom)})"}
    eager = program.meta.get("eager_model")
    if eager is None:
        return {"unavailable": "no eager model (the program was loaded from .pt2)"}
    try:
        policy = policy_from_meta(program.meta, decoder_dims(eager.config)["layers"])
        write_hf_folder(program, folder / DECODER_DIR)
    except (RewriterError, ValueError) as e:
        shutil.rmtree(folder / DECODER_DIR, ignore_errors=True)
        return {"unavailable": str(e).splitlines()[0]}
    return {"weights": DECODER_DIR, "kv_policy": policy.to_json()}


def load_decoder(folder: str | Path):
    """A rewriter output -> (LoadedModel of its decoder weights, KVPolicy) for rewriter.decode."""
    from ..decode import DECODER_TYPES, KVPolicy
    from ..load import load_hf
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RewriterError(f"cannot read {folder / META_FILE}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict) \
            or not isinstance(meta.get("decode") or {}, dict):
        raise RewriterError(f"{folder / META_FILE} is not a rewriter output's metadata")
    model_type = meta.get("config", {}).get("model_type", "")
    if model_type not in DECODER_TYPES:
        raise RewriterError(f"{folder} holds a '{model_type}' program, not a decoder LM",
                            f"generate runs {', '.join(DECODER_TYPES)} models")
    why = ("the mla latent cache is not written to outputs" if "mla" in meta.get("meta", {})
           else "it was written without a think or kv-window pass")
    decode = meta.get("decode") or {"unavailable": why}
    if "unavailable" in decode:
        raise RewriterError(f"{folder} has no decode weights and KV policy: {decode['unavailable']}",
                            "generate from the HF folder with --pass think:... / kv-window:... / mla:...")
    weights = decode.get("weights")
    if not isinstance(weights, str) or weights in ("", ".", "..") or "/" in weights or "\\" in weights:
        raise RewriterError(f"{folder / META_FILE}: decode weights {weights!r} is not a folder inside {folder}")
    try:
        policy = KVPolicy.from_json(decode["kv_policy"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RewriterError(f"{folder / META_FILE}: malformed kv_policy ({type(e).__name__}: {e})"[:300],
                            "re-create the output with `rewriter optimize`") from None
    return load_hf(folder / weights), policy


def write_hf_folder(program: Program, folder: Path) -> None:
    """The eager model with the program's weights, saved by transformers itself (weight-only rewrites, and the
    weights under an attention rewrite, whose plan rewriter.hf adds)."""
    eager = program.meta.get("eager_model")
    if eager is None:
        raise RewriterError("no eager model to write an HF folder from (the program was loaded from .pt2)")
    model = copy.deepcopy(eager)
    own = model.state_dict()
    new = {}
    for name, tensor in program.ep.state_dict.items():
        key = name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name
        if key in own:
            if own[key].shape != tensor.shape:
                raise RewriterError(f"weight {key} changed shape {tuple(own[key].shape)} -> {tuple(tensor.shape)}; "
                                    "an HF folder needs weight-only passes")
            new[key] = tensor.detach().to(own[key].dtype)
    model.load_state_dict(new, strict=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    src = program.meta.get("hf_folder")
    if src:
        src = Path(src)
        for name in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, folder / name)
        for sub in src.iterdir():   # sentence-transformers module folders (1_Pooling, 2_Normalize, ...)
            if sub.is_dir() and sub.name[:1].isdigit() and "_" in sub.name:
                shutil.copytree(sub, folder / sub.name, dirs_exist_ok=True)


# fp32/fp64: largest difference relative to the output's largest magnitude. 16-bit: the norm of the difference
# relative to the output's norm, within 2e-2 or, beyond that, within HF_NOISE_FACTOR times the folder's own rounding
# (its 16-bit outputs against the same folder run in fp32): two correct 16-bit computations of a deep model differ
# by their rounding, which grows with depth (1.1B Llama, 22 layers, H200: 2.4e-2 max-relative between transformers'
# SDPA and the exact program), while a folder computing another function differs by far more than its rounding.
HF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HF_NOISE_FACTOR = 3.0


def _relative(a: torch.Tensor, b: torch.Tensor, max_relative: bool) -> float:
    if not b.numel():
        return 0.0
    if max_relative:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def write_hf(program: Program, folder: Path, weight_only: bool) -> str | None:
    """The HF folder of a program: weight-only rewrites as the model itself; attention rewrites as the model with
    attn_implementation 'rewriter_attention' and the program's per-site plan in config.json, loaded back and checked
    against the program before it counts. Returns None when written, else why there is none (nothing left behind)."""
    if program.meta.get("eager_model") is None:
        return "no eager model to write an HF folder from (the program was loaded from .pt2)"
    try:
        if weight_only:
            write_hf_folder(program, folder)
            return None
        if "think_key_channels" in program.meta or "mla" in program.meta:
            return "the think / mla KV rewrites run in `rewriter generate` (decoder/), not in transformers"
        if program.meta.get("head_prune"):
            return "head-prune leaves layers with different head counts; a transformers config has one " \
                   "num_attention_heads for every layer (model.pt2 and ONNX hold the pruned model)"
        if program.meta.get("share_attention"):
            return "share-attention makes a layer read the previous layer's attention map, which transformers' " \
                   "attention modules cannot express (model.pt2 and ONNX hold the shared model)"
        from ..hf import attention_plan, write_attention_config
        plan, tensors = attention_plan(program)
        why = _structure_change(program)
        if why:
            return why
        write_hf_folder(program, folder)
        if plan["sites"]:   # none: every site was left exact, the folder is the model itself (checked all the same)
            write_attention_config(folder, plan, tensors)
        check_hf_folder(program, folder)
    except RewriterError as e:
        shutil.rmtree(folder, ignore_errors=True)
        return str(e).splitlines()[0]
    return None


def _structure_change(program: Program) -> str | None:
    """Why the model's own modules cannot hold the program's weights (a pass replaced or added weights, e.g. a
    low-rank factorisation), or None. Integer buffers (auto-attention's head indices) belong to the plan."""
    def strip(k: str) -> str:
        return k[len(WRAPPER_PREFIX):] if k.startswith(WRAPPER_PREFIX) else k

    own = set(program.meta["eager_model"].state_dict())
    theirs = {strip(k): t for k, t in program.ep.state_dict.items()}
    # tensors a rewriter attention op takes as arguments (learned feature maps) travel in the plan's parameter file
    gm = program.module()
    plan = {strip(a.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("rewriter.")
            for a in n.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"}
    added = sorted(k for k, t in theirs.items() if k not in own and k not in plan and t.is_floating_point())
    if added:
        return (f"the program has {len(added)} weight(s) the model lacks (first: {added[0]}); a pass changed the "
                "model's structure beyond its attention, which transformers' classes cannot hold")
    return None


def check_hf_folder(program: Program, folder: Path) -> float:
    """Load `folder` with transformers and run it on the program's example inputs: every output the program names
    must match on the real tokens (relative to the output's scale). Returns the largest relative difference; raises
    RewriterError when the HF model is not the program."""
    from ..hf import NAME
    from ..load import load_hf
    inputs = {k: v for k, v in program.example_inputs.items() if k in program.input_names}
    dtype = next((t.dtype for t in program.ep.state_dict.values() if t.is_floating_point()), torch.float32)
    device = program.device()
    try:
        model = load_hf(folder, dtype=dtype).module.to(device)
    except RewriterError as e:   # e.g. Falcon picks its attention class from a fixed table of names
        raise RewriterError(f"this architecture does not take attention implementations registered in transformers' "
                            f"AttentionInterface such as '{NAME}' ({str(e).splitlines()[0][-120:]})") from None
    inputs = {k: v.to(device) for k, v in inputs.items()}
    tol = HF_CHECK_TOLERANCE.get(dtype, 2e-2)
    exact_dtype = dtype in HF_CHECK_TOLERANCE
    with torch.no_grad():
        got = model(**inputs)
    want = program.run(**inputs)
    valid = inputs.get("attention_mask")
    pairs = []
    for name, ref in zip(program.output_names, want):
        out = got.get(name) if hasattr(got, "get") else None
        if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
            continue
        if out.shape != ref.shape:
            raise RewriterError(f"the HF folder's {name} has shape {tuple(out.shape)}, model.pt2's {tuple(ref.shape)}")
        a, b = out.double(), ref.double()
        if valid is not None and a.dim() >= 2 and tuple(a.shape[:2]) == tuple(valid.shape):
            a, b = a[valid.bool()], b[valid.bool()]   # padded positions carry nothing
        if not torch.isfinite(a).all():
            raise RewriterError(f"the HF folder gives non-finite {name}")
        pairs.append((name, a, b, _relative(a, b, exact_dtype)))
    if not pairs:
        raise RewriterError(f"the HF model returns none of the program's outputs ({', '.join(program.output_names)})"
                            " to check it against")
    worst = max(rel for *_, rel in pairs)
    if worst <= tol:
        return worst
    noise = None
    if not exact_dtype:
        # beyond 2e-2 in 16 bits: compare with the folder's own rounding (the same folder in fp32)
        with torch.no_grad():
            got32 = model.float()(**inputs)
        noise = 0.0
        for name, a, _b, _rel in pairs:
            a32 = got32[name].double()
            if valid is not None and a32.dim() >= 2 and tuple(a32.shape[:2]) == tuple(valid.shape):
                a32 = a32[valid.bool()]
            noise = max(noise, _relative(a, a32, False))
        if worst <= HF_NOISE_FACTOR * noise:
            return worst
    name, *_ , rel = max(pairs, key=lambda p: p[3])
    limit = f"limit {tol:g}" if noise is None else \
        f"limit {tol:g}, or {HF_NOISE_FACTOR:g}x the folder's own {str(dtype).split('.')[-1]} rounding {noise:.2e}"
    raise RewriterError(f"transformers does not run the rewrite as model.pt2 does: {name} differs by "
                        f"{rel:.2e} (relative; {limit}): the architecture's attention does not go through "
                        "transformers' attention interface everywhere, or a pass changed more than attention")


def load_program(folder: str | Path) -> Program:
    """Rebuild a Program from a rewriter output folder (importing rewriter registers its custom ops)."""
    from safetensors.torch import load_file
    from .. import attention, linear  # noqa: F401  (custom ops must exist before the .pt2 is deserialised)
    folder = Path(folder)
    if not (folder / PROGRAM_FILE).exists() or not (folder / META_FILE).exists():
        raise RewriterError(f"{folder} is not a rewriter output (needs {PROGRAM_FILE} and {META_FILE})")
    from ..safety import load_pt2
    try:
        meta = json.loads((folder / META_FILE).read_text())
        ep = load_pt2(folder / PROGRAM_FILE)
    except RewriterError:
        raise
    except Exception as e:
        raise RewriterError(f"cannot load {folder / PROGRAM_FILE}: {str(e).splitlines()[0][:200]}") from None
    try:
        inputs = load_file(str(folder / INPUTS_FILE)) if (folder / INPUTS_FILE).exists() else {}
        program = Program(
            ep=ep, input_names=meta["input_names"], output_names=meta["output_names"],
            example_inputs={n: inputs[n] for n in meta["input_names"] if n in inputs},
            dynamic_dims={k: {int(d): v for d, v in dims.items()} for k, dims in meta["dynamic_dims"].items()},
            dim_bounds={k: tuple(v) for k, v in meta["dim_bounds"].items()},
            config=meta.get("config", {}), causal_modules=meta.get("causal_modules", {}),
            source=str(folder), meta=meta.get("meta", {}))
    except Exception as e:
        raise RewriterError(f"{folder / META_FILE} does not describe {PROGRAM_FILE}: {type(e).__name__} {e}"[:300],
                            "re-create the output with `rewriter optimize`") from None
    if any((folder / f).exists() for f in TOKENIZER_FILES):
        program.meta["hf_folder"] = str(folder)
    return program
