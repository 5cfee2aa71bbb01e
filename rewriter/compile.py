"""AOTInductor packages of a program: ``OUT/model.aoti.pt2``, loadable with ``torch._inductor.aoti_load_package`` in a
process that never imports rewriter.

An AOTInductor package cannot call back into Python, so no ``rewriter::`` op may reach it: before compiling, every
one is decomposed into aten ops (``ExportedProgram.run_decompositions`` with a table op -> traceable function). The
table holds, per op, a body that traces with the program's dynamic batch and sequence:
- exact attention: its own body without the all-real-keys check (a data-dependent branch): SDPA on the dense mask;
- window: the band layout built from the lengths alone (``_band_blocks``, the torch twin of the ONNX ``_support``)
  and a gathered-block softmax, so the package keeps the window's O(L x window) cost; on CUDA the same layout
  feeds the Triton block-sparse kernel through the ``rewriter::window_triton`` triton_op (``wrap_triton``), which
  Inductor compiles into the package (untested here: no GPU; benchmarks/h200_check.sh AOTI_ONLY=1 checks it);
- every other op: its reference (the definition of correct), when that traces (linear attention without a band, binary_linear);
  an op whose reference does not (a layout sized by the data: block top-k, strided, LSH, scatterbrain; performer's
  cached projection) is refused with its name before anything is written.
Inductor then fuses the aten graph (norms, activations, the window's gathers) into C++ (CPU) or Triton (CUDA) code.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import RewriterError

PACKAGE_FILE = "model.aoti.pt2"
TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------------------------
# Traceable bodies of the ops (aten only, no data-dependent Python branch)
# --------------------------------------------------------------------------------------------------------------

def _exact_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                     window: int = 0, alibi: Optional[list[float]] = None, softcap: float = 0.0) -> Tensor:
    """``exact.exact_attention_impl`` with a key mask always applied (the op skips it when every key is real: a
    check on the data that a compiled graph cannot branch on; the masked SDPA gives the same numbers). A softcap
    takes the op's own dense form, which has no such check."""
    from .attention._contract import expand_kv
    from .attention.exact import exact_attention_impl, masked_sdpa
    if key_mask is None or softcap > 0:
        return exact_attention_impl(q, k, v, key_mask, causal, scale, window, alibi, softcap)
    H = q.shape[1]
    return masked_sdpa(q, expand_kv(k, H), expand_kv(v, H), key_mask, causal, scale, window, alibi)


def _band_blocks(Lq, Lk, block: int, left: int, right: int, sinks: int, device) -> tuple[Tensor, Tensor]:
    """``block_sparse.band_layout`` from the (symbolic) lengths: per query block the sink blocks, then a fixed
    number of band slots; returns (kv_index (nqb, K) long, clamped into range; slot_valid (nqb, K) bool)."""
    nqb, nkb = (Lq + block - 1) // block, (Lk + block - 1) // block
    qb = torch.arange(nqb, device=device)[:, None]
    sink_blocks = (sinks + block - 1) // block
    index, valid = [], []
    if sink_blocks:
        slots = torch.arange(sink_blocks, device=device)[None, :].expand(nqb, sink_blocks)
        index.append(torch.clamp(slots, max=nkb - 1))
        valid.append(slots < nkb)
    # first and last key block of each query block's band; the floor divisions stay on Python (symbolic) ints, as
    # (qb * block + c) // block == qb + c // block (Inductor mis-lowers a tensor floor division of clamped values)
    offset = Lk - Lq
    first = torch.clamp(qb + (offset - left) // block, min=0)
    last = torch.clamp(torch.clamp(qb + (block - 1 + offset + right) // block, max=(Lq - 1 + offset + right) // block),
                       max=(Lk - 1) // block)
    span = (block + left + right - 2) // block + 2
    band = first + torch.arange(span, device=device)[None, :]
    index.append(torch.clamp(band, max=nkb - 1))
    valid.append((band <= last) & (band >= sink_blocks))
    return torch.cat(index, 1), torch.cat(valid, 1)


def traceable_window_layout(Lq, Lk, block: int, window: int, sinks: int, causal: bool, device):
    """The window op's layout in the block-sparse kernel's form, traceable: (window_left, window_right, kv_index
    (1, 1, nqb, K) int32 with the valid slots first in ascending block order, kv_count (1, 1, nqb) int32)."""
    from .attention._contract import window_extents
    left, right = window_extents(window, causal)
    index, valid = _band_blocks(Lq, Lk, block, left, right, sinks, device)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    kv_index = index.gather(-1, order).to(torch.int32)
    return left, right, kv_index[None, None], valid.sum(-1).to(torch.int32)[None, None]


def _window_triton(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                   window: int, sinks: int, block: int = 64, alibi: Optional[list[float]] = None,
                   softcap: float = 0.0) -> Tensor:
    """CUDA: the window op as the Triton triton_op (the kernel goes into the package; the op is defined by
    ``rewriter.attention.triton.registry``, which ``import rewriter`` loads). The triton_op takes no ALiBi or softcap
    yet: such a window takes the aten form."""
    if alibi or softcap:
        return _window_attention(q, k, v, key_mask, causal, scale, window, sinks, block, alibi, softcap)
    return torch.ops.rewriter.window_triton(q, k, v, key_mask, causal, scale, window, sinks, block)


def _window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
                      window: int, sinks: int, block: int = 64, alibi: Optional[list[float]] = None,
                      softcap: float = 0.0) -> Tensor:
    """The window op (``window_extents(window, causal)`` band + `sinks` first keys) on gathered key blocks: the same
    pairs and softmax as the reference (the softcap, then the ALiBi bias, on the scores), written so that it traces
    with dynamic lengths."""
    from .attention._contract import check_qkv, expand_kv, softcapped, window_extents
    B, H, _, Lq, Lk, D = check_qkv(q, k, v, key_mask)
    Dv, dev = v.shape[-1], q.device
    left, right = window_extents(window, causal)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = (Lq + block - 1) // block, (Lk + block - 1) // block
    kv_index, slot_valid = _band_blocks(Lq, Lk, block, left, right, sinks, dev)
    K = kv_index.shape[1]

    def blocks(x: Tensor, n, length) -> Tensor:          # (B, H, L, E) -> (B, H, n, block, E), zero padded
        return F.pad(x, (0, 0, 0, n * block - length)).view(x.shape[0], x.shape[1], n, block, x.shape[-1])

    qb = blocks(q.to(acc), nqb, Lq)
    flat = kv_index.reshape(-1)
    kg = blocks(expand_kv(k.to(acc), H), nkb, Lk).index_select(2, flat).reshape(B, H, nqb, K * block, D)
    vg = blocks(expand_kv(v.to(acc), H), nkb, Lk).index_select(2, flat).reshape(B, H, nqb, K * block, Dv)
    k_pos = (kv_index[..., None] * block + torch.arange(block, device=dev)).reshape(nqb, 1, K * block)
    used = slot_valid[..., None].expand(nqb, K, block).reshape(nqb, 1, K * block)
    q_pos = (torch.arange(nqb * block, device=dev) + (Lk - Lq)).view(nqb, block, 1)
    allowed = (k_pos < sinks) | ((k_pos >= q_pos - left) & (k_pos <= q_pos + right))
    allowed = allowed & used & (k_pos < Lk)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    allowed = allowed[None, None]                                                    # (1, 1, nqb, block, K*block)
    if key_mask is not None:
        real = F.pad(key_mask.to(torch.bool), (0, nkb * block - Lk), value=False).view(B, nkb, block)
        allowed = allowed & real.index_select(1, flat).reshape(B, 1, nqb, 1, K * block)
    s = softcapped(torch.matmul(qb, kg.transpose(-1, -2)) * scale, softcap)
    if alibi:
        slopes = torch.tensor(alibi, dtype=acc, device=dev).view(1, -1, 1, 1, 1)
        s = s + slopes * (k_pos - q_pos).to(acc)[None, None]
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    out = torch.matmul(p, vg) / p.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    return out.reshape(B, H, nqb * block, Dv)[:, :, :Lq].to(q.dtype)


def lowerings(device: str = "cpu") -> dict:
    """op -> the body the package is compiled from (see the module docstring): aten only, except that on CUDA (with
    Triton usable) the window op becomes the ``rewriter::window_triton`` triton_op, which Inductor compiles in."""
    from .attention._contract import METHODS
    from .linear.binary import binary_linear_reference
    table = {m.op: m.reference for m in METHODS.values()}
    table[torch.ops.rewriter.exact_attention.default] = _exact_attention
    table[torch.ops.rewriter.window.default] = _window_attention
    if torch.device(device).type == "cuda":
        from .attention.triton import triton_available, use_reference
        if triton_available() and not use_reference():
            table[torch.ops.rewriter.window.default] = _window_triton
    table[torch.ops.rewriter.binary_linear.default] = binary_linear_reference
    return table


# --------------------------------------------------------------------------------------------------------------
# Lowering, compiling, checking
# --------------------------------------------------------------------------------------------------------------

def _rewriter_ops(ep: torch.export.ExportedProgram) -> dict:
    """{"rewriter::window": OpOverload, ...} of the rewriter ops the graph calls."""
    return {n.target._schema.name: n.target for n in ep.graph.nodes if n.op == "call_function"
            and getattr(n.target, "namespace", None) == "rewriter"}


def _strip_metadata_asserts(ep: torch.export.ExportedProgram) -> None:
    """Remove ``aten._assert_tensor_metadata`` nodes (dtype checks export records at ``.to`` calls; torch.compile of
    a program's module graph-breaks on them, issue 13). They check nothing a compiled graph needs. Whether
    AOTInductor on torch 2.11-2.13 itself needs this was not checked; the removal is cheap and keeps it out."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    ep.graph_module.recompile()


LONG_HINT = 509   # tokens: several blocks of every block size the ops take; odd, so never a whole number of blocks


def _with_long_hints(program) -> torch.export.ExportedProgram:
    """The program exported again with example inputs of batch 2 and LONG_HINT tokens (within its bounds). The
    decompositions trace with the example's sizes as hints, and a size of 1 (one block, one row) is specialised:
    a 16-token capture traced the window's block count as 1 and the lowered graph then asserted (63 + L) // 64 < 2;
    a length that is a whole number of blocks drops the padding and the final slice (a package traced at 128 tokens
    returned 24 rows for 21 tokens). The sequence hint is odd for that reason."""
    from .program import export
    target = {}
    for label, (lo, hi) in program.dim_bounds.items():
        size = min(hi, 2 if label == "batch" else LONG_HINT)
        if label != "batch" and size % 2 == 0 and size - 1 >= lo:
            size -= 1
        target[label] = max(lo, size)
    return export(program.module(), _inputs_at(program, target), program.dynamic_shapes())


def _inputs_at(program, sizes: dict) -> dict:
    """The program's example inputs resized to `sizes` ({"batch": n, "seq": n}), repeating their own entries."""
    from .backends.onnx import _resized
    inputs = {}
    for name in program.input_names:
        x = program.example_inputs[name]
        for axis, label in program.dynamic_dims.get(name, {}).items():
            x = _resized(x, axis, sizes.get(label, x.shape[axis]))
        inputs[name] = x
    return inputs


def block_multiple_inputs(program, block: int = 64) -> list[dict]:
    """Inputs of two whole blocks of `block` tokens (the length a block-padding bug shows at), when the bounds allow."""
    lo, hi = program.dim_bounds.get("seq", (0, 0))
    if not lo <= 2 * block <= hi:
        return []
    return [_inputs_at(program, {"seq": 2 * block})]


def lower(program) -> torch.export.ExportedProgram:
    """The program's ExportedProgram with every rewriter op decomposed into aten ops (RewriterError naming the op
    when one does not trace)."""
    from . import attention, linear  # noqa: F401  (the ops and their registry)
    used = _rewriter_ops(program.ep)
    table = lowerings(program.device().type)
    unknown = sorted(name for name, op in used.items() if op not in table)
    if unknown:
        raise RewriterError(f"no AOTInductor lowering for {', '.join(unknown)}")
    ep = _with_long_hints(program)   # a fresh ExportedProgram: the program itself is never changed
    for name, op in sorted(used.items()):   # one op at a time, so that a failure names its op
        try:
            ep = ep.run_decompositions({op: table[op]})
        except Exception as e:   # torch reports the trace failure from deep inside the tracer
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise RewriterError(f"{name} cannot be compiled into an AOTInductor package: its reference does not "
                                f"trace with dynamic lengths ({first})",
                                "use `rewriter export --onnx` or the eager program for this method") from None
    left = {name for name in _rewriter_ops(ep) if name != "rewriter::window_triton"}   # Inductor compiles that in
    if left:
        raise RewriterError(f"rewriter ops left after lowering: {', '.join(sorted(left))}")
    _strip_metadata_asserts(ep)
    return ep


def compile_package(program, path: str | Path, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Lower and AOT-compile `program` for its device into the package file `path` (written to a temporary name
    beside it and renamed when complete). Returns {"seconds", "device", "bytes"}."""
    from torch._inductor import aoti_compile_and_package
    path = Path(path)
    t0 = time.perf_counter()
    progress("lowering rewriter ops to aten")
    ep = lower(program)
    progress(f"compiling an AOTInductor package for {program.device().type}")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.pt2")   # AOTInductor wants a .pt2 name
    try:
        aoti_compile_and_package(ep, package_path=str(tmp))
        tmp.replace(path)
    except RewriterError:
        raise
    except Exception as e:
        raise RewriterError(f"AOTInductor could not compile the program: {str(e).strip().splitlines()[0][:200]}") \
            from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"seconds": round(time.perf_counter() - t0, 2), "device": program.device().type,
            "bytes": path.stat().st_size}


def check_package(path: str | Path, program, inputs: dict[str, Tensor], tolerance: float = TOLERANCE) -> float:
    """Max abs difference between the package and the program on `inputs` (every output); RewriterError above
    `tolerance`."""
    from torch._inductor import aoti_load_package
    runner = aoti_load_package(str(path))
    feed = {n: inputs[n].to(program.device()) for n in program.input_names}
    with torch.no_grad():
        got = runner(**feed)
    want = program.run(**feed)
    got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    worst = 0.0
    for name, a, b in zip(program.output_names, got, want):
        diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        if not math.isfinite(diff) or diff > tolerance:
            raise RewriterError(f"the AOTInductor package differs from the program on output {name!r}: max abs "
                                f"difference {diff:.3g} > {tolerance:g}")
        worst = max(worst, diff)
    return worst
