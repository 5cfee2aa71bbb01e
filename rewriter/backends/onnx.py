"""ONNX backend: dynamo export of a captured program with the onnxscript translations of the `rewriter::*` ops
in standard ONNX ops (opset 18, so onnxruntime's CPU provider runs the file with no custom-op library), and
validation against PyTorch in onnxruntime.

Each attention method's translation lives in its module beside its reference (the registry's `onnx` field,
helpers in ``attention/_onnx.py``); those of the binary linear op and the fused ops (rms_norm, silu_mul) are here.
Translations are traced Python functions: tensor arguments arrive as symbolic ONNX values (static dims are ints,
batch/sequence are symbols) and the op's scalar arguments (causal, scale, window, ...) as Python values, so each call
emits only the branch its arguments select. None of them builds an Lq x Lk tensor:
  * linear / performer attention: phi_q (phi_k^T [v, 1]) bidirectionally; causal by chunks of CHUNK tokens
    (masked CHUNK x CHUNK products inside a chunk, an exclusive CumSum of per-chunk states across chunks);
  * window attention and the exact band of the hybrids (linear with window/sinks, scatterbrain): per block of
    query rows the contiguous run of keys its bands reach and the sinks (``_onnx._run_support``, built in the graph
    from the lengths, so one graph serves every length): scores L x (sinks + min(rows + window, L));
  * block-topk, strided: a block layout chosen in the graph (TopK of pooled block scores; a static function of
    the lengths and head), then the same gathered key blocks, K = the most blocks any query block keeps;
  * LSH: per round, (L/bucket) sorted query chunks x two sorted key chunks.
A translation that cannot avoid L x L registers with quadratic=True and the export report says so.

Targets: "standard" (the default) emits only standard ONNX ops. "ort" emits onnxruntime's contrib attention ops
(domain com.microsoft) where they compute exactly what the op does, and the standard translation elsewhere:
  * exact attention (no model window, no ALiBi, no softcap) -> MultiHeadAttention with the key-padding mask (rows that see
    no key zeroed as the op's contract says);
  * a causal window without sinks on an unpadded self-attention prompt (no key mask) -> GroupQueryAttention with
    local_window_size = window (the op takes padding only as right-aligned sequence lengths, so a site with a
    key mask, a bidirectional window or sinks keeps the standard band form).
Such a file runs in onnxruntime only (the contrib ops ship with every onnxruntime build, CPU included).
"""
from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..attention import METHODS
from ..attention._onnx import (ORT_DOMAIN, _acc, _float, _ints, _op, ort_group_query_attention,
                               ort_multi_head_attention)
from ..errors import RewriterError

EXTERNAL_DATA_BYTES = 1_800_000_000   # below protobuf's 2 GiB limit, with room for the graph itself
PROVIDER = "CPUExecutionProvider"


class OnnxValidationError(RewriterError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class Translation:
    fn: Callable
    quadratic: bool = False    # True when the ONNX form holds an Lq x Lk tensor


TRANSLATIONS: dict[str, Translation] = {m.op_name: Translation(m.onnx, m.onnx_quadratic) for m in METHODS.values()}


def onnx_translation(op_name: str, *, quadratic: bool = False):
    """Register `fn` as the ONNX translation of the custom op `op_name` ("namespace::name")."""
    if "::" not in op_name:
        raise ValueError(f"op_name must be 'namespace::name'; got {op_name!r}")

    def register(fn: Callable) -> Callable:
        TRANSLATIONS[op_name] = Translation(fn, quadratic)
        return fn
    return register


TARGETS = ("standard", "ort")


def _ort_exact_attention(q, k, v, key_mask=None, causal=False, scale=1.0, window=0, alibi=None, softcap=0.0):
    if window > 0 or alibi or softcap:
        return None
    return ort_multi_head_attention(q, k, v, key_mask, causal, scale)


def _ort_window(q, k, v, key_mask=None, causal=False, scale=1.0, window=1, sinks=0, block=64, alibi=None,
                softcap=0.0):
    if alibi or softcap:
        return None
    return ort_group_query_attention(q, k, v, key_mask, causal, scale, window, sinks)


# op -> the onnxruntime contrib form: returns None where it would not be exact (the standard form is emitted then)
ORT_FORMS: dict[str, Callable] = {"rewriter::exact_attention": _ort_exact_attention, "rewriter::window": _ort_window}


def _with_contrib_form(standard: Callable, contrib: Callable) -> Callable:
    @functools.wraps(standard)   # the exporter binds the node's arguments by the standard form's signature
    def translate(*args, **kwargs):
        out = contrib(*args, **kwargs)
        return standard(*args, **kwargs) if out is None else out
    return translate


@onnx_translation("rewriter::binary_linear")
def translate_binary_linear(x, packed, alpha, mu, bias=None, in_features=1):
    """Signs unpacked with BitShift + BitwiseAnd on uint8 (bit j of byte k is column 8k + j)."""
    import onnx_ir as ir
    import numpy as np
    op = _op()
    shifts = op.Constant(value=ir.tensor(np.arange(8, dtype=np.uint8)))
    bits = op.BitwiseAnd(op.BitShift(op.Unsqueeze(packed, _ints([2])), shifts, direction="RIGHT"),
                         op.Constant(value=ir.tensor(np.array(1, dtype=np.uint8))))
    bits = op.Slice(op.Reshape(bits, _ints([0, -1])), _ints([0]), _ints([in_features]), _ints([1]))
    signs = op.Sub(op.Mul(op.Cast(bits, to=1), _float(2.0)), _float(1.0))          # (out, in) +-1
    xa = _acc(x)
    y = op.Add(op.Mul(op.MatMul(xa, op.Transpose(signs, perm=[1, 0])), _acc(alpha)),
               op.Mul(op.ReduceSum(xa, _ints([-1]), keepdims=1), _acc(mu)))
    if bias is not None:
        y = op.Add(y, _acc(bias))
    return op.CastLike(y, x)


_ONNX_FLOAT, _ONNX_DOUBLE = 1, 11
_TORCH_DTYPES = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "DOUBLE": torch.float64}
_ONNX_TYPES = {torch.float32: _ONNX_FLOAT, torch.float16: 10, torch.bfloat16: 16, torch.float64: _ONNX_DOUBLE}


def _torch_dtype(value) -> torch.dtype:
    name = getattr(value.dtype, "name", str(value.dtype)).upper()
    if name not in _TORCH_DTYPES:
        raise RewriterError(f"the fused ops' ONNX translations take fp16 / bf16 / fp32 / fp64 tensors; got {name}")
    return _TORCH_DTYPES[name]


def _promoted_mul(a, b, a_dtype: torch.dtype, b_dtype: torch.dtype):
    """a * b in torch's promoted dtype of (a_dtype, b_dtype): computed in fp32 (fp64 for a double result) and rounded
    to the result's type, which for 16-bit operands is torch's own product (exact in fp32, rounded once)."""
    op = _op()
    out = torch.promote_types(a_dtype, b_dtype)
    acc = _ONNX_DOUBLE if out == torch.float64 else _ONNX_FLOAT
    y = op.Mul(op.Cast(a, to=acc), op.Cast(b, to=acc))
    return y if _ONNX_TYPES[out] == acc else op.Cast(y, to=_ONNX_TYPES[out])


@onnx_translation("rewriter::rms_norm")
def translate_rms_norm(x, weight, eps=1e-6):
    """weight * (x_f * Reciprocal(Sqrt(ReduceMean(x_f * x_f) + eps))).to(x.dtype), x_f = x in fp32, as the
    reference."""
    op = _op()
    xf = _acc(x)
    variance = op.ReduceMean(op.Mul(xf, xf), _ints([-1]), keepdims=1)
    normed = op.CastLike(op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(variance, _float(eps))))), x)
    return _promoted_mul(weight, normed, _torch_dtype(weight), _torch_dtype(x))


@onnx_translation("rewriter::silu_mul")
def translate_silu_mul(gate, up):
    """silu(gate) = g * Sigmoid(g) in fp32, rounded to gate's type, times up in the promoted type."""
    op = _op()
    gf = _acc(gate)
    silu = op.CastLike(op.Mul(gf, op.Sigmoid(gf)), gate)
    return _promoted_mul(silu, up, _torch_dtype(gate), _torch_dtype(up))


def translation_table(ep: torch.export.ExportedProgram, target: str = "standard") -> tuple[dict, list[str]]:
    """The custom_translation_table for `ep` and the custom ops it uses; a custom op without a translation is
    an error that names it. target "ort": onnxruntime's contrib forms where exact (module docstring)."""
    if target not in TARGETS:
        raise RewriterError(f"unknown ONNX target {target!r}", f"use one of: {', '.join(TARGETS)}")
    table, used, missing = {}, [], []
    for node in ep.graph.nodes:
        overload = node.target
        if node.op != "call_function" or not isinstance(overload, torch._ops.OpOverload):
            continue
        namespace = overload.namespace
        if namespace in ("aten", "prims", "_assert", "higher_order"):
            continue
        name = f"{namespace}::{overload._opname}"
        if name in TRANSLATIONS:
            fn = TRANSLATIONS[name].fn
            table[overload] = _with_contrib_form(fn, ORT_FORMS[name]) if target == "ort" and name in ORT_FORMS else fn
            if name not in used:
                used.append(name)
        elif name.split("::")[0] in {n.split("::")[0] for n in TRANSLATIONS} and name not in missing:
            missing.append(name)
    if missing:
        raise RewriterError(f"no ONNX translation for {', '.join(missing)}",
                            f"ops with one: {', '.join(sorted(TRANSLATIONS))}")
    return table, used


# --------------------------------------------------------------------------------------------------------------
# Export, validation
# --------------------------------------------------------------------------------------------------------------

def _state_bytes(ep: torch.export.ExportedProgram) -> int:
    tensors = list(ep.state_dict.values()) + [t for t in ep.constants.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _rename_dims(model, input_names: list[str], dim_names: dict[str, dict[int, str]]) -> None:
    """Give the symbolic dims the Program's names (batch, seq) everywhere in the graph."""
    import onnx_ir as ir
    inputs = {v.name: v for v in model.graph.inputs}
    rename = {}
    for name, dims in dim_names.items():
        value = inputs.get(name)
        if value is None or value.shape is None:
            continue
        for axis, label in dims.items():
            sym = value.shape[axis]
            if isinstance(sym, ir.SymbolicDim) and sym.value is not None:
                rename[sym.value] = label
    if not rename:
        return
    values = list(model.graph.inputs) + [o for node in model.graph.all_nodes() for o in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(rename.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d
                for d in value.shape]
        value.shape = ir.Shape(dims)


def _check_target(path: Path) -> Path:
    path = Path(path)
    if path.suffix != ".onnx":
        raise RewriterError(f"ONNX output {path} must end in .onnx")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RewriterError(f"cannot write {path}: folder {parent} does not exist", "create it first")
    if path.exists() and path.is_dir():
        raise RewriterError(f"cannot write {path}: it is a folder")
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.probe-")
        probe.close()
    except OSError as e:
        raise RewriterError(f"cannot write to {parent}: {e.strerror}", "choose a writable folder") from None
    return path


def export_onnx(ep: torch.export.ExportedProgram, path: str | Path, *, input_names: list[str],
                output_names: list[str], dim_names: dict[str, dict[int, str]] | None = None, opset: int = 18,
                external_data: bool | None = None, target: str = "standard",
                validate: Callable[[Path], dict] | None = None) -> tuple[Path, dict]:
    """Export `ep` (dynamic dims stay symbolic, named by `dim_names`: input -> {axis: name}) to `path`.

    Weights go to `<name>.data` beside the file when `external_data` is True, or when None and they exceed
    ~1.8 GB. The file is written into a temp folder beside `path` and moved into place only after
    `validate(temp_path)` returned (its dict is returned with the path); on any failure nothing is left.
    target: "standard" or "ort" (module docstring).
    """
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (BitwiseAnd, Pad axes); got {opset}")
    path = _check_target(path)
    table, used = translation_table(ep, target)
    if external_data is None:
        external_data = _state_bytes(ep) > EXTERNAL_DATA_BYTES
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        try:
            program = torch.onnx.export(ep, (), dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), opset_version=opset,
                                        custom_translation_table=table, optimize=True, verbose=False)
        except torch.onnx.errors.OnnxExporterError as e:
            cause = next((ln for ln in str(e).splitlines() if "Error" in ln and "<class" in ln), str(e).splitlines()[0])
            raise RewriterError(f"torch.onnx could not convert the program: {cause.strip()}") from e
        if dim_names:
            _rename_dims(program.model, list(input_names), dim_names)
        contrib: dict[str, int] = {}
        for node in program.model.graph.all_nodes():
            if node.domain == ORT_DOMAIN:
                contrib[node.op_type] = contrib.get(node.op_type, 0) + 1
        staged = tmp / path.name
        program.save(str(staged), external_data=external_data)
        info = dict(validate(staged)) if validate is not None else {}
        info.update({"opset": opset, "external_data": bool(external_data), "custom_ops": used, "target": target,
                     "contrib_ops": contrib,
                     "quadratic_ops": [n for n in used if TRANSLATIONS[n].quadratic]})
        info["quadratic"] = bool(info["quadratic_ops"])
        data = tmp / f"{path.name}.data"
        if data.exists():
            data.replace(path.parent / data.name)
        staged.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, info


def validate_onnx(path: str | Path, reference_fn: Callable[..., tuple[Tensor, ...]], inputs: dict[str, Tensor], *,
                  atol: float = 1e-4, rtol: float = 0.0, token_mask: Tensor | None = None) -> dict:
    """Run `path` in onnxruntime (CPU) on `inputs` and compare each output with `reference_fn(**inputs)`.

    token_mask (B, L) bool, optional: outputs whose leading dims are (B, L) are compared only at True
    positions (padding tokens: a query that sees no key is 0 in ONNX and undefined in eager SDPA).
    Raises OnnxValidationError naming the first output beyond atol + rtol * |reference|.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=[PROVIDER])
    feed_names = [i.name for i in session.get_inputs()]
    missing = [n for n in feed_names if n not in inputs]
    if missing:
        raise ValueError(f"inputs lack {missing}; the ONNX file takes {feed_names}")
    got = session.run(None, {n: inputs[n].detach().cpu().numpy() for n in feed_names})
    with torch.no_grad():
        ref = reference_fn(**inputs)
    ref = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
    names = [o.name for o in session.get_outputs()]
    if len(ref) != len(got):
        raise OnnxValidationError(f"ONNX gives {len(got)} outputs, PyTorch {len(ref)}")
    result = {"provider": PROVIDER, "atol": atol, "rtol": rtol,
              "input_shapes": {n: list(inputs[n].shape) for n in feed_names}, "outputs": {}}
    failure = None
    for name, g, r in zip(names, got, ref):
        g = torch.from_numpy(g).to(torch.float64)
        r = r.detach().cpu().to(torch.float64)
        if tuple(g.shape) != tuple(r.shape):
            raise OnnxValidationError(f"output {name}: ONNX shape {tuple(g.shape)} != PyTorch {tuple(r.shape)}")
        diff, bound = (g - r).abs(), atol + rtol * r.abs()
        if token_mask is not None and r.dim() >= 2 and tuple(r.shape[:2]) == tuple(token_mask.shape):
            keep = token_mask.to(torch.bool)
            diff, bound = diff[keep], bound.expand_as(r)[keep]
        worst = float(diff.max()) if diff.numel() else 0.0
        finite = bool(torch.isfinite(diff).all())
        result["outputs"][name] = {"shape": list(r.shape), "max_abs_diff": worst}
        if failure is None and (not finite or bool((diff > bound).any())):
            failure = f"output {name}: max abs diff {worst:.3g} exceeds atol {atol:g}" + (f" + rtol {rtol:g}" if rtol else "")
    result["passed"] = failure is None
    if failure:
        raise OnnxValidationError(f"ONNX validation failed at input shapes {result['input_shapes']}: {failure}")
    return result


def _resized(x: Tensor, axis: int, size: int) -> Tensor:
    """x with `size` entries along `axis`, repeating its own entries (keeps dtype and value ranges)."""
    index = torch.arange(size, device=x.device) % x.shape[axis]   # on x's device (a CUDA program: issue 13)
    return x.index_select(axis, index)


def shape_variants(program) -> list[dict[str, Tensor]]:
    """Inputs at two shapes other than the example's: one more batch row and a longer sequence, then batch 1
    and a shorter one (sequence lengths odd; bounds respected; vision inputs change batch only)."""
    example = program.example_inputs
    sizes = {}
    for name, dims in program.dynamic_dims.items():
        for axis, label in dims.items():
            sizes[label] = example[name].shape[axis]
    variants, seen = [], [sizes]
    for db, ds in ((1, 5), (None, -5)):
        target = {}
        if "batch" in sizes:
            lo, hi = program.dim_bounds["batch"]
            target["batch"] = min(hi, sizes["batch"] + db) if db else max(lo, 1)
        if "seq" in sizes:
            lo, hi = program.dim_bounds["seq"]
            target["seq"] = min(hi, max(lo, sizes["seq"] + ds))
        if target in seen:
            continue
        seen.append(target)
        inputs = {}
        for name in program.input_names:
            x = example[name]
            for axis, label in program.dynamic_dims.get(name, {}).items():
                x = _resized(x, axis, target[label])
            inputs[name] = x
        variants.append(inputs)
    return variants


def export_program(program, path: str | Path, *, atol: float = 1e-4, opset: int = 18,
                   external_data: bool | None = None, target: str = "standard") -> dict:
    """Export a Program to ONNX, validated in onnxruntime on its example inputs and two other shapes.
    target "ort": onnxruntime's contrib attention ops where exact (module docstring)."""
    if target not in TARGETS:
        raise RewriterError(f"unknown ONNX target {target!r}", f"use one of: {', '.join(TARGETS)}")
    checks = [dict(program.example_inputs)] + shape_variants(program)

    def validate(staged: Path) -> dict:
        runs = []
        for inputs in checks:
            mask = inputs.get("attention_mask")
            runs.append(validate_onnx(staged, program.run, inputs, atol=atol,
                                      token_mask=None if mask is None else mask != 0))
        return {"provider": PROVIDER, "atol": atol, "rtol": 0.0, "passed": True,
                "max_abs_diff": max(o["max_abs_diff"] for r in runs for o in r["outputs"].values()),
                "checks": runs, "compared": "real tokens only (attention_mask != 0)"
                if "attention_mask" in program.input_names else "every element"}

    path, info = export_onnx(program.ep, path, input_names=program.input_names, output_names=program.output_names,
                             dim_names=program.dynamic_dims, opset=opset, external_data=external_data,
                             target=target, validate=validate)
    info["path"] = str(path)
    return info
