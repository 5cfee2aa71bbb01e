"""Layer-by-layer optimisation: checkpoints larger than memory (`rewriter optimize SRC --stream`), optionally over
several processes (`torchrun --nproc-per-node N -m rewriter optimize SRC --stream ...`).

The model is built from its config on the meta device; weights are read from the checkpoint's safetensors one
decoder block at a time (rewriter.stream.io). Each block is captured as its own program (the same graph segment the
whole-model capture has: the model's own mask and rotary code, canonical attention, the same module paths and
parameter names) and the passes run on it in order, calibrated on that block's inputs.

To give the whole-model pipeline's results, a run with P passes carries P + 1 activation streams: stream k holds the
calibration activations of the model after passes 1..k. Pass k calibrates block i on stream k-1 (the block as
passes 1..k-1 left it, fed by blocks < i as passes 1..k-1 left them), which is what the whole-model pipeline does when
it runs pass k on the model after pass k-1. After the block, every stream advances through its own version of the
block; at the end the streams' logits give each pass's error against the original (stream 0).

Statistics are sums over tokens (rewriter.distributed): with torchrun each rank holds a contiguous share of the
samples, sums are all-reduced per site, every rank makes the same rewrite, rank 0 writes.

The output (written to a staging folder beside OUT, moved into place when complete; `--resume` continues an
interrupted run from its last finished block) is an HF-style sharded safetensors checkpoint of the rewritten model
(model.safetensors.index.json + one shard per block, one for the embedding, one for norm + head), the rewritten
graph of every block (blocks/block-NNNNN.pt2, weights stripped: they are bound from the shards on load), and
streamed.json, the program description `rewriter.stream.load_streamed` reads back.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import distributed as dist
from ..errors import RewriterError
from ..pipeline import Pass, apply_pass
from ..program import WRAPPER_PREFIX, Program, export
from .io import INDEX, LazyCheckpoint, shard_name, write_shard

STREAM_TYPES = ("llama", "mistral", "qwen2", "qwen3")     # base model: embed_tokens, layers, norm, rotary_emb
DESCRIPTION = "streamed.json"
FORMAT = "rewriter-streamed-1"
VOCAB_CHUNK = 8192


def _strip(name: str) -> str:
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name


def _libc():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory(setup: bool = False) -> None:
    """glibc keeps freed blocks for reuse, so a process that works one block at a time would hold the largest
    block's worth twice over. `setup`: fixed mmap threshold (4 MiB), so large tensors are mapped and unmapped
    (the dynamic threshold would move them onto the heap after the first free); afterwards: trim the heap."""
    import gc
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    if setup:
        libc.mallopt(-3, 4 << 20)     # M_MMAP_THRESHOLD
        return
    gc.collect()
    libc.malloc_trim(0)


def host_bytes() -> int | None:
    """This process's resident set now (Linux), or None."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_host_bytes() -> int:
    """Peak resident set of this process: VmHWM (Linux; its own address space only, where ru_maxrss would carry
    the parent's peak over fork + exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------------------------
# The model without weights
# --------------------------------------------------------------------------------------------------------------

class _Block(nn.Module):
    """inputs_embeds, attention_mask -> the hidden states after one decoder block, through the model's own forward
    (its mask and rotary code), with the block under its own path: model.model.layers.<i>."""

    def __init__(self, hf_base: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.model = hf_base

    def forward(self, inputs_embeds, attention_mask):
        out = self.model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return (out.last_hidden_state,)


class Skeleton:
    """The model of an HF folder on the meta device: blocks are materialised one at a time from a LazyCheckpoint."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        import transformers
        from ..capture import _causal_modules, max_positions
        from ..load import is_hf_folder, read_config
        if not is_hf_folder(folder):
            raise RewriterError(f"{folder} is not an HF model folder (no config.json)",
                                "streaming reads an HF folder with safetensors weights")
        config = read_config(folder)
        model_type = getattr(config, "model_type", "")
        if model_type not in STREAM_TYPES:
            raise RewriterError(f"--stream runs decoder stacks of {', '.join(STREAM_TYPES)}; {folder} is a "
                                f"'{model_type}' model", "drop --stream (the whole model is loaded at once)")
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        self.config, self.folder, self.device, self.dtype = config, folder, device, dtype
        self.model = model.eval()
        self.base = model.model
        self.num_layers = int(config.num_hidden_layers)
        self.hidden = int(config.hidden_size)
        self.max_positions = max_positions(config)
        self.causal_modules = _causal_modules(model)
        self.rotary = type(self.base.rotary_emb)(config=config).to(device)
        self.base.rotary_emb = self.rotary
        self.norm_meta = self.base.norm            # the final norm runs after the blocks, outside their programs
        self.base.embed_tokens = nn.Identity()
        self.base.norm = nn.Identity()
        self.layers = list(self.base.layers)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def head_name(self, ckpt: LazyCheckpoint) -> str:
        return "lm_head.weight" if "lm_head.weight" in ckpt and not self.tied else "model.embed_tokens.weight"

    def layer(self, i: int, ckpt: LazyCheckpoint) -> nn.Module:
        prefix = f"model.layers.{i}."
        weights = ckpt.block(prefix, self.dtype, self.device)
        layer = copy.deepcopy(self.layers[i]).to_empty(device=self.device)
        want = set(layer.state_dict())
        missing, extra = sorted(want - set(weights)), sorted(set(weights) - want)
        if missing or extra:
            raise RewriterError(f"{self.folder}: block {i} does not match its config: "
                                f"{'missing ' + prefix + missing[0] if missing else 'unexpected ' + prefix + extra[0]}")
        layer.load_state_dict(weights, assign=True)
        return layer.eval()

    def capture_block(self, i: int, layer: nn.Module, seed: int = 0) -> Program:
        from ..capture import canonical_program, example_inputs
        block_list = nn.ModuleList()
        block_list._modules = {str(i): layer}    # keeps the model's own path model.layers.<i>
        self.base.layers = block_list
        module = _Block(self.base).eval()
        g = torch.Generator().manual_seed(seed)
        mask = example_inputs(self.config)["attention_mask"]
        ex = {"inputs_embeds": torch.randn(*mask.shape, self.hidden, generator=g).to(self.device, self.dtype),
              "attention_mask": mask.to(self.device)}
        dims = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        prefix = f"model.layers.{i}."
        program = Program(ep=None, input_names=list(ex), output_names=["hidden_states"],  # type: ignore[arg-type]
                          example_inputs=ex,
                          dynamic_dims=dims, dim_bounds={"batch": (1, 256), "seq": (2, self.max_positions)},
                          config=self.config.to_dict(),
                          causal_modules={k: v for k, v in self.causal_modules.items() if k.startswith(prefix)},
                          source=str(self.folder), meta={"model_class": type(self.model).__name__, "block": i})
        try:
            with torch.no_grad():
                program.ep = export(module, ex, program.dynamic_shapes())
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RewriterError(f"torch.export could not capture block {i}: {msg[:300]}") from e
        return canonical_program(program, self.max_positions)

    def norm(self, ckpt: LazyCheckpoint) -> nn.Module:
        norm = copy.deepcopy(self.norm_meta).to_empty(device=self.device)
        norm.load_state_dict(ckpt.block("model.norm.", self.dtype, self.device), assign=True)
        return norm.eval()


# --------------------------------------------------------------------------------------------------------------
# Calibration inputs, embedding, head
# --------------------------------------------------------------------------------------------------------------

def embed(ckpt: LazyCheckpoint, ids: torch.Tensor, dtype, device) -> torch.Tensor:
    """Rows of the embedding for `ids`, read a vocabulary chunk at a time."""
    name = "model.embed_tokens.weight"
    V, H = ckpt.info[name].shape
    out = torch.empty(*ids.shape, H, dtype=dtype, device=device)
    flat_ids, flat_out = ids.reshape(-1).to(device), out.view(-1, H)
    for start in range(0, V, VOCAB_CHUNK):
        hit = (flat_ids >= start) & (flat_ids < start + VOCAB_CHUNK)
        if bool(hit.any()):
            rows = ckpt.rows(name, start, min(V, start + VOCAB_CHUNK), dtype, device)
            flat_out[hit] = rows[flat_ids[hit] - start]
    return out


class _OutputError:
    """compare_outputs' metrics of the logits (real tokens) of a candidate stream against the reference stream,
    accumulated over vocabulary chunks and summed over ranks."""

    def __init__(self, tokens: int, device):
        z = lambda: torch.zeros(tokens, dtype=torch.float64, device=device)   # noqa: E731
        self.dot, self.rr, self.cc = z(), z(), z()
        self.diff2 = torch.zeros((), dtype=torch.float64, device=device)
        self.max_abs = torch.zeros((), dtype=torch.float64, device=device)
        self.non_finite = False

    def add(self, r: torch.Tensor, c: torch.Tensor) -> None:
        r, c = r.double(), c.double()
        self.dot += (r * c).sum(-1)
        self.rr += (r * r).sum(-1)
        self.cc += (c * c).sum(-1)
        d = r - c
        self.diff2 += d.square().sum()
        if d.numel():
            self.max_abs = torch.maximum(self.max_abs, d.abs().max())
        self.non_finite |= not bool(torch.isfinite(c).all())

    def metrics(self, name: str) -> dict:
        eps = 1e-8
        cos = self.dot / (self.rr.sqrt().clamp_min(eps) * self.cc.sqrt().clamp_min(eps))
        n = dist.all_reduce_sum(torch.tensor([float(cos.numel())], dtype=torch.float64, device=cos.device))
        sums = dist.all_reduce_sum(torch.stack([self.diff2, self.rr.sum(), cos.sum()]))
        worst = dist.all_reduce_max(self.max_abs.reshape(1))
        bad = dist.all_reduce_max(torch.tensor([float(self.non_finite)], device=cos.device))
        out = {"output": name, "max_abs_error": float(worst[0]),
               "relative_error": float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30)),
               "cosine": float(sums[2] / n[0].clamp_min(1))}
        if bool(bad[0]):
            out["non_finite"] = True
        return out


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------

@dataclass
class StreamedRun:
    report: dict
    out: Path | None


def check_streamable(passes: list[Pass]) -> None:
    """Refuse, before any work and in one line, a pass that cannot run layer by layer (or across processes)."""
    for p in passes:
        why = p.stream_refusal()
        if why:
            raise RewriterError(f"pass '{p.name}' cannot run layer by layer (--stream): {why}",
                                "drop --stream to load the whole model, or run that pass on a model that fits")
        if dist.world_size() > 1 and p.distributed:
            raise RewriterError(f"pass '{p.name}' cannot split its calibration across processes: {p.distributed}",
                                "run it in one process")


def _fingerprint(src: Path, passes: list[Pass], cal: dict, dtype, world: int) -> str:
    ckpt = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in src.glob("*.safetensors"))
    raw = json.dumps({"src": str(src.resolve()), "files": ckpt, "passes": [p.recipe_entry() for p in passes],
                      "cal": cal, "dtype": str(dtype), "world": world}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def staging_dir(out: Path) -> Path:
    from ..safety import resolve
    real = resolve(out)
    return real.with_name(f".{real.name}.rewriter-partial")


def _merge_meta(into: dict, meta: dict) -> None:
    """A block's program meta into the run's: per-layer tables (think's channels) gather every block's layers, a
    policy's `layers` list (think dynamic) becomes the union; anything else is the same for every block."""
    for k, v in meta.items():
        old = into.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            merged = dict(old)
            for kk, vv in v.items():
                if kk == "layers" and isinstance(vv, list) and isinstance(merged.get(kk), list):
                    merged[kk] = sorted(set(merged[kk]) | set(vv))
                else:
                    merged[kk] = vv
            into[k] = merged
        else:
            into[k] = v


def _summarise(summaries: list[dict]) -> dict:
    """A pass's summary over blocks: counts and sizes add up, their ratios are recomputed; the rest from the last."""
    if not summaries:
        return {}
    out = dict(summaries[-1])
    for key in summaries[-1]:
        vals = [s.get(key) for s in summaries]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            out[key] = sum(vals)
    for num, den, ratio in (("params_after", "params_before", "param_ratio"),
                            ("bytes_after", "bytes_before", "bytes_ratio")):
        if num in out and den in out and out[den]:
            out[ratio] = out[num] / out[den]
    sites = [s.get("sites", 0) for s in summaries]
    for key in ("key_channels_kept_fraction", "attention_flops_ratio", "attention_flops_ratio_at_max_length"):
        if key in out and sum(sites):
            out[key] = sum(s.get(key, 0) * n for s, n in zip(summaries, sites)) / sum(sites)
    return out


def _stored_dtype(ckpt: LazyCheckpoint, i: int) -> torch.dtype:
    floats = [ckpt.info[n].dtype for n in ckpt.names(f"model.layers.{i}.") if ckpt.info[n].dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def optimize_streamed(src: str | Path, passes: list[Pass], *, out: str | Path | None, force: bool = False,
                      resume: bool = False, texts: list[str] | None = None, samples: int = 8, seq_len: int = 128,
                      seed: int = 0, max_error: float | None = None, device: str | None = None,
                      dtype: torch.dtype = torch.float32, recipe_yaml: Callable[[], bytes] | None = None,
                      progress: Callable[[str], None] | None = None, max_error_name: str = "max_error",
                      block_progress: Callable[[dict], None] | None = None, pack: bool = False) -> StreamedRun:
    """Run `passes` block by block over the HF folder `src` and write the rewritten checkpoint to `out` (see the
    module docstring). `device`: where blocks are materialised and calibrated (default: cuda:LOCAL_RANK when CUDA is
    available, else cpu); `dtype`: the compute dtype (float32, as the whole-model path); tensors are stored in the
    checkpoint's own dtype."""
    from ..calibration import calibration_inputs, check_calibration_args
    progress = progress or (lambda msg: None)
    block_progress = block_progress or (lambda info: None)
    check_calibration_args(samples, seq_len, seed)
    src = Path(src)
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    dist.init(device)
    rank, world = dist.rank(), dist.world_size()
    dev = torch.device(device)
    check_streamable(passes)
    return_freed_memory(setup=True)
    t_start = time.perf_counter()
    ckpt = LazyCheckpoint(src)
    sk = Skeleton(src, dev, dtype)
    from ..config import check_bounds
    for p in passes:
        check_bounds(p.config, p.name, sk.config.to_dict())
    from ..program import max_length
    limit = max_length(sk.config.to_dict())
    if limit and seq_len > limit:
        raise RewriterError(f"--seq-len {seq_len} exceeds the {limit} positions the model takes",
                            f"use --seq-len {limit} or less")
    out_path = Path(out) if out is not None else None
    stage: Path | None = None
    cal = {"samples": samples, "seq_len": seq_len, "seed": seed, "pack": pack}
    fingerprint = _fingerprint(src, passes, cal, dtype, world)
    done, entries_by_block, state = 0, [], None
    if out_path is not None:
        from ..backends.torch_backend import check_output_dir
        check_output_dir(out_path, force, [src])
        stage = staging_dir(out_path)
        progress_file = stage / "progress.json"
        if resume and progress_file.exists():
            saved = json.loads(progress_file.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise RewriterError(f"{stage} holds an interrupted run with other settings (checkpoint, passes, "
                                    "calibration, dtype or process count)", "run again without --resume")
            done, entries_by_block = saved["blocks_done"], saved["blocks"]
            from safetensors.torch import load_file
            state = load_file(str(stage / f"state-rank{rank}.safetensors"), device=str(dev))
            progress(f"resuming after block {done - 1} of {sk.num_layers} ({stage})")
        else:
            dist.barrier()
            if rank == 0:
                if stage.exists():
                    progress(f"removing the interrupted run in {stage} (use --resume to continue one)")
                    shutil.rmtree(stage)
                (stage / "blocks").mkdir(parents=True)
            dist.barrier()

    # --- calibration inputs: the same texts and tokenizer as the whole-model path; this rank's share ----------
    progress("building calibration inputs")
    stand_in = Program(ep=None, input_names=["input_ids", "attention_mask"],  # type: ignore[arg-type]
                       output_names=["logits"],
                       example_inputs={}, dynamic_dims={}, dim_bounds={"seq": (2, sk.max_positions)},
                       config=sk.config.to_dict(), source=str(src), meta={"hf_folder": str(src)})
    inputs, desc = calibration_inputs(stand_in, texts=texts, samples=samples, seq_len=seq_len, seed=seed, pack=pack)
    mine = dist.share(samples, rank, world)
    ids = inputs["input_ids"][mine.start:mine.stop].to(dev)
    mask = inputs["attention_mask"][mine.start:mine.stop].to(dev)
    P = len(passes)
    if state is not None:
        streams = [state[f"stream{state['alias'][k].item()}"] for k in range(P + 1)]
    else:
        x0 = embed(ckpt, ids, dtype, dev)
        streams = [x0] * (P + 1)

    pass_entries = [{"pass": p.name, "config": p.config.to_dict(), "seconds": 0.0, "sites_changed": 0, "sites": [],
                     "notes": [], "summaries": [], "parameters": 0, "bytes": 0} for p in passes]
    meta: dict = {}
    for block in entries_by_block:                      # a resumed run's finished blocks
        for entry, got in zip(pass_entries, block["passes"]):
            _add_block(entry, got)
        _merge_meta(meta, block.get("meta", {}))
    weight_map: dict[str, str] = dict(entries_by_block[-1]["weight_map"]) if entries_by_block else {}
    n_shards = sk.num_layers + 2
    before_params = after_params = 0
    before_bytes = after_bytes = 0
    for block in entries_by_block:
        before_params += block["params_before"]; after_params += block["params_after"]       # noqa: E702
        before_bytes += block["bytes_before"]; after_bytes += block["bytes_after"]            # noqa: E702
    blocks_info = list(entries_by_block)
    planned: dict[int, dict] = {}       # planning passes (auto-attention): pass index -> its plan over blocks
    for block in entries_by_block:
        for k, plan in block.get("plans", {}).items():
            planned.setdefault(int(k), {"pass": passes[int(k)], "plan": []})["plan"] += plan
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for i in range(done, sk.num_layers):
                t0 = time.perf_counter()
                progress(f"block {i + 1}/{sk.num_layers}: loading")
                layer = sk.layer(i, ckpt)
                programs = [sk.capture_block(i, layer, seed)]
                results = []
                for k, p in enumerate(passes, 1):
                    calib = {"inputs_embeds": streams[k - 1], "attention_mask": mask}
                    planning = p.plans and not getattr(p.config, "plan", None)
                    if planning or k - 1 in planned:    # a plan found for one block must not replay on the next
                        p = planned.setdefault(k - 1, {"pass": p, "plan": []})["pass"]
                        p = copy.deepcopy(p)
                        p.config.plan = []
                    elif p.plans and getattr(p.config, "plan", None):    # a given plan: this block's entries
                        p = copy.deepcopy(p)
                        p.config.plan = [e for e in p.config.plan if str(e["site"]).startswith(f"model.layers.{i}.")]
                        if not p.config.plan:
                            p = _Unchanged(p)
                    torch.manual_seed(seed * 1_000_003 + i)
                    prog, result, seconds = apply_pass(p, programs[-1], calib,
                                                       lambda m, i=i: progress(f"block {i + 1}/{sk.num_layers}: {m}"))
                    programs.append(prog)
                    if k - 1 in planned:
                        planned[k - 1]["plan"] += list(p.config.plan)
                    results.append({"seconds": round(seconds, 3), "sites_changed": len(result.changes),
                                    "parameters": prog.num_parameters(), "bytes": prog.parameter_bytes(),
                                    "sites": [{"module_path": c.module_path, "kind": c.kind, **c.details}
                                              for c in result.changes],
                                    "notes": result.notes, "summary": result.summary,
                                    "meta": _jsonable(result.meta)})
                    _merge_meta(meta, _jsonable(result.meta))
                # advance every stream through its own version of the block (shared where nothing differs)
                new_streams: list[torch.Tensor] = []
                for k in range(P + 1):
                    if k and streams[k] is streams[k - 1] and programs[k].ep is programs[k - 1].ep:
                        new_streams.append(new_streams[k - 1])
                    else:
                        new_streams.append(programs[k].run(inputs_embeds=streams[k], attention_mask=mask)[0])
                streams = new_streams
                final = programs[-1]
                block_stats = {"params_before": programs[0].num_parameters(), "params_after": final.num_parameters(),
                               "bytes_before": programs[0].parameter_bytes(), "bytes_after": final.parameter_bytes()}
                # the block's own error: hidden states after it, fully rewritten vs original (real tokens, all ranks)
                keep = mask.bool()
                d = (streams[-1] - streams[0])[keep].double()
                sums = dist.all_reduce_sum(torch.stack([d.square().sum(), streams[0][keep].double().square().sum()]))
                block_err = float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30))
                if stage is not None:
                    names = _write_block(stage, i, final, _stored_dtype(ckpt, i), n_shards, rank)
                    weight_map.update({n: shard_name(i + 1, n_shards) for n in names})
                del programs, layer, prog, result, final
                self_host = host_bytes()
                return_freed_memory()
                info = {"block": i, "passes": results,
                        "plans": {k: [e for e in v["plan"] if e["site"].startswith(f"model.layers.{i}.")]
                                  for k, v in planned.items()}, "meta": _jsonable({k: v for k, v in meta.items()}),
                        "hidden_relative_error": block_err, "seconds": round(time.perf_counter() - t0, 3),
                        "peak_host_bytes": peak_host_bytes(), "host_bytes_before_free": self_host,
                        "host_bytes_after": host_bytes(), **block_stats,
                        **({"peak_device_bytes": torch.cuda.max_memory_allocated(dev)} if dev.type == "cuda" else {}),
                        "weight_map": dict(weight_map)}
                for entry, got in zip(pass_entries, results):
                    _add_block(entry, got)
                before_params += block_stats["params_before"]
                after_params += block_stats["params_after"]
                before_bytes += block_stats["bytes_before"]
                after_bytes += block_stats["bytes_after"]
                blocks_info.append(info)
                if stage is not None:
                    _save_state(stage, streams, rank)
                    dist.barrier()
                    if rank == 0:
                        _atomic_json(stage / "progress.json", {"fingerprint": fingerprint, "blocks_done": i + 1,
                                                              "blocks": blocks_info})
                block_progress({k: v for k, v in info.items() if k not in ("passes", "meta", "weight_map", "plans")})
                progress(f"block {i + 1}/{sk.num_layers}: {info['seconds']:.1f} s, hidden-state error {block_err:.3g}, "
                         f"peak host {info['peak_host_bytes'] / 2**30:.2f} GiB")
    except BaseException:
        if stage is not None and rank == 0 and (stage / "progress.json").exists():
            kept = json.loads((stage / "progress.json").read_text())["blocks_done"]
            progress(f"stopped: the {kept} finished block(s) stay in {stage}; the same command with --resume "
                     "continues from there")
        raise
    with torch.no_grad():
        # --- head: each pass's error on the logits against the original (stream 0) -----------------------
        progress("final norm and head: measuring every pass against the original")
        norm = sk.norm(ckpt)
        hidden = [norm(s) for s in streams]
        keep = mask.bool()
        flat = [h[keep] for h in hidden]
        errors = [_OutputError(int(keep.sum()), dev) for _ in passes]
        head = sk.head_name(ckpt)
        V = ckpt.info[head].shape[0]
        for start in range(0, V, VOCAB_CHUNK):
            W = ckpt.rows(head, start, min(V, start + VOCAB_CHUNK), dtype, dev)
            ref = flat[0] @ W.T
            for k, err in enumerate(errors, 1):
                err.add(ref, ref if flat[k] is flat[0] else flat[k] @ W.T)
    for k, got in planned.items():          # the recipe replays the plans of every block
        passes[k].config.plan = got["plan"]
    output = "logits"
    max_error_default = None
    if max_error is None and passes and all(p.is_exact() for p in passes):
        from ..pipeline import dtype_tolerance
        max_error = dtype_tolerance({dtype})
        max_error_default = "every pass is documented as exact, so the run stops if the output moves"
    outside = _outside_params(ckpt, sk)     # embedding, final norm, head: unchanged by every pass
    report: dict = {"source": str(src), "model_class": type(sk.model).__name__, "streamed": True,
                    "calibration": {"description": desc, "samples": samples, "seq_len": seq_len, "seed": seed,
                                    "shapes": {k: list(v.shape) for k, v in inputs.items()},
                                    "world_size": world,
                                    "rank_samples": [len(dist.share(samples, r, world)) for r in range(world)]},
                    "max_error": max_error, **({"max_error_default": max_error_default} if max_error_default else {}),
                    "before": {"parameters": before_params + outside[0], "bytes": before_bytes + outside[1]},
                    "passes": []}
    for p, entry, err in zip(passes, pass_entries, errors):
        summaries = entry.pop("summaries")
        entry["summary"] = _summarise(summaries)
        entry["metrics"] = err.metrics(output)
        entry["reference"] = "original"
        entry["seconds"] = round(entry["seconds"], 3)
        entry["parameters"] += outside[0]
        entry["bytes"] += outside[1]
        if p.is_exact():
            entry["exact"] = True
        if p.decode_only:
            entry["decode_only"] = True
        entry["notes"] = list(dict.fromkeys(entry["notes"]))
        report["passes"].append(entry)
    report["after"] = {"parameters": after_params + outside[0], "bytes": after_bytes + outside[1]}
    report["final"] = report["passes"][-1]["metrics"] if passes else \
        {"output": output, "max_abs_error": 0.0, "relative_error": 0.0, "cosine": 1.0}
    report["final_reference"] = "original"
    report["weight_only"] = all(p.keeps_hf_model for p in passes)
    report["blocks"] = [{k: v for k, v in b.items() if k not in ("passes", "meta", "weight_map", "plans")}
                        for b in blocks_info]
    report["peak_host_bytes"] = int(dist.all_reduce_max(torch.tensor([peak_host_bytes()]))[0])
    if dev.type == "cuda":
        report["peak_device_bytes"] = int(dist.all_reduce_max(
            torch.tensor([torch.cuda.max_memory_allocated(dev)], device=dev))[0])
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    if dist.active():
        import torch.distributed as tdist
        report["calibration"]["backend"] = tdist.get_backend()
    for entry in report["passes"]:
        m = entry["metrics"]
        if m.get("non_finite"):
            _discard(stage, rank)
            raise RewriterError(f"after pass '{entry['pass']}' the output 'logits' holds NaN/Inf; nothing was written",
                                "restrict the pass with include/exclude/layers or change its settings")
        if max_error is not None and m["relative_error"] > max_error:
            _discard(stage, rank)
            from ..pipeline import ErrorBudgetExceeded
            raise ErrorBudgetExceeded(
                f"after pass '{entry['pass']}' the relative error of 'logits' is {m['relative_error']:.3g} > "
                f"{max_error_name} {max_error:g}; nothing was written",
                f"raise {max_error_name}, or lower the pass's saving, or restrict it with include/exclude/layers")
    if stage is None:
        return StreamedRun(report, None)
    if rank == 0:
        _finish(stage, out_path, sk, ckpt, report, meta, weight_map, n_shards, recipe_yaml, force, src, passes)
    dist.barrier()
    return StreamedRun(report, out_path)


class _Unchanged(Pass):
    """A planning pass whose replayed plan has no entry for this block: the block stays as it is."""

    def __init__(self, p: Pass):
        self.name, self.config, self.weight_only = p.name, p.config, True

    def run(self, gm, ctx):
        from ..pipeline import PassResult
        return PassResult(notes=["the plan has no entry for this block"])


def _add_block(entry: dict, got: dict) -> None:
    entry["seconds"] += got["seconds"]
    entry["parameters"] += got["parameters"]
    entry["bytes"] += got["bytes"]
    entry["sites_changed"] += got["sites_changed"]
    entry["sites"] += got["sites"]
    entry["notes"] += got["notes"]
    if got["summary"]:
        entry["summaries"].append(got["summary"])


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o)))


def _outside_params(ckpt: LazyCheckpoint, sk: Skeleton) -> tuple[int, int]:
    """Parameters and bytes outside the blocks (embedding, final norm, head), as the whole-model program counts them
    in its compute dtype."""
    names = [n for n in ckpt.info if not n.startswith("model.layers.")]
    numel = sum(int(torch.Size(ckpt.info[n].shape).numel()) for n in names)
    return numel, numel * torch.empty((), dtype=sk.dtype).element_size()


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _save_state(stage: Path, streams: list[torch.Tensor], rank: int) -> None:
    """This rank's activation streams after the last finished block (identical streams stored once)."""
    from safetensors.torch import save_file
    unique, alias = [], []
    for s in streams:
        j = next((u for u, t in enumerate(unique) if t is s), None)
        if j is None:
            unique.append(s)
            j = len(unique) - 1
        alias.append(j)
    tensors = {f"stream{j}": t.contiguous() for j, t in enumerate(unique)}
    tensors["alias"] = torch.tensor(alias)
    tmp = stage / f".state-rank{rank}.tmp"
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(stage / f"state-rank{rank}.safetensors")


def stored_name(i: int, key: str) -> str:
    """The checkpoint name of block i's program tensor `key`: the model's own name, or for a tensor a pass added at
    the graph's root (think's channel indices) a name under the block's prefix, so blocks never collide."""
    name, prefix = _strip(key), f"model.layers.{i}."
    return name if name.startswith(prefix) else f"{prefix}rewriter.{name}"


def _write_block(stage: Path, i: int, program: Program, stored: torch.dtype, n_shards: int, rank: int) -> list[str]:
    """Rank 0 writes block i's tensors (shard i + 1) and its graph with the weights stripped; returns the names."""
    tensors = {}
    for key, t in program.ep.state_dict.items():
        t = t.detach()
        tensors[stored_name(i, key)] = t.to(stored) if t.is_floating_point() else t
    if rank == 0:
        write_shard(stage / shard_name(i + 1, n_shards), tensors, metadata={"format": "pt"})
        ep = copy.copy(program.ep)
        stripped = {}
        for key, t in program.ep.state_dict.items():
            meta_t = torch.empty(t.shape, dtype=t.dtype, device="meta")
            stripped[key] = nn.Parameter(meta_t, requires_grad=False) if isinstance(t, nn.Parameter) else meta_t
        ep._state_dict = stripped
        tmp = stage / "blocks" / f".block-{i:05d}.tmp.pt2"
        torch.export.save(ep, str(tmp))
        tmp.replace(stage / "blocks" / f"block-{i:05d}.pt2")
    return sorted(tensors)


def _discard(stage: Path | None, rank: int) -> None:
    dist.barrier()
    if stage is not None and rank == 0:
        shutil.rmtree(stage, ignore_errors=True)


def _finish(stage: Path, out: Path, sk: Skeleton, ckpt: LazyCheckpoint, report: dict, meta: dict,
            weight_map: dict, n_shards: int, recipe_yaml: Callable[[], bytes] | None, force: bool, src: Path,
            passes) -> None:
    """Embedding and head shards (byte copies), index, description, report; then the staging folder becomes OUT."""
    from ..backends.torch_backend import META_FILE
    from ..load import TOKENIZER_FILES
    from ..report import write_json
    outside = [n for n in ckpt.info if not n.startswith("model.layers.")]
    first = [n for n in outside if n.startswith("model.embed_tokens.")]
    last = [n for n in outside if n not in first]
    write_shard(stage / shard_name(0, n_shards), {}, {n: ckpt.info[n] for n in first}, {"format": "pt"})
    write_shard(stage / shard_name(n_shards - 1, n_shards), {}, {n: ckpt.info[n] for n in last}, {"format": "pt"})
    weight_map.update({n: shard_name(0, n_shards) for n in first})
    weight_map.update({n: shard_name(n_shards - 1, n_shards) for n in last})
    total = sum((stage / f).stat().st_size for f in set(weight_map.values()))
    _atomic_json(stage / INDEX, {"metadata": {"total_size": total, "format": FORMAT},
                                 "weight_map": dict(sorted(weight_map.items()))})
    description = {"format": FORMAT, "model_type": sk.config.model_type, "num_layers": sk.num_layers,
                   "blocks": [f"blocks/block-{i:05d}.pt2" for i in range(sk.num_layers)],
                   "embedding": "model.embed_tokens.weight", "norm": "model.norm.", "head": sk.head_name(ckpt),
                   "input_names": ["input_ids", "attention_mask"], "output_names": ["logits"], "meta": meta}
    _atomic_json(stage / DESCRIPTION, description)
    (stage / META_FILE).write_text(json.dumps({"format": 1, "input_names": ["input_ids", "attention_mask"],
                                               "streamed": DESCRIPTION}, indent=1))
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (src / name).exists():
            shutil.copy2(src / name, stage / name)
    if recipe_yaml is not None:
        (stage / "recipe.yaml").write_bytes(recipe_yaml())
    for f in ("progress.json",):
        (stage / f).unlink(missing_ok=True)
    for f in stage.glob("state-rank*.safetensors"):
        f.unlink()
    written = sorted(p.name for p in stage.iterdir()) + ["report.json"]
    report["outputs"] = [str(out / w) for w in written]
    write_json(report, stage / "report.json")
    from ..backends.torch_backend import move_into_place
    move_into_place(stage, out, force, [src])
