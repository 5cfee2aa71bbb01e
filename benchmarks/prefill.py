"""End-to-end prefill of a Llama-shaped 1.1B model (random bf16 weights; hidden 2048, 16 layers, 32 query / 8 KV
heads, intermediate 8192, vocab 32000: 1.104e9 parameters, the issue's anchor shape), original vs rewritten, at 16K and 32K tokens on the GPU.

Variants, all in one run:
- transformers: the HF model itself (SDPA, no mask: causal flash/cuDNN attention): the original as users run it;
- captured: the rewriter program with no pass (what capture alone costs);
- exact: `exact-attention` (attention unchanged; the key-padding mask replaces HF's materialised L x L mask, so
  SDPA runs its causal flash path again);
- window: `window:window=1024,sinks=64` (Triton block-sparse kernel); linear: `linear:feature_map=elu` (Triton
  chunked kernel); scatterbrain: `scatterbrain:window=1024,features=64`;
- on request (--variants): fused: `fuse` alone (RMSNorm and SwiGLU's silu * up as one Triton kernel each);
  window_fused: the window pass, then `fuse`.
Capture and passes run on the CPU through rewriter.api.optimize (verified on seeded random ids, 2 x 256 tokens),
then the programs move to the GPU (Program.to). Each timing is the median of `--reps` synchronised forward passes
after one warm-up, all forms of a length run in turn within each repeat (clock drift over a call slows them alike);
the record gives speedup = transformers_ms / ours_ms and the deployable `form` timed:
- eager: the rewriter program (Program.run);
- hf: the output's HF folder loaded by transformers (`OUT/hf`, attention through the registered
  'rewriter_attention' implementation; the captured variant is the plain model folder);
- aoti: the AOTInductor package (`rewriter.api.compile_output`, OUT/model.aoti.pt2) loaded with
  torch._inductor.aoti_load_package;
- compiled: `torch.compile(rewriter.compile.lower(program).module(), fullgraph=True)`: Inductor just in time on the
  lowered program an AOTI package is compiled from (where aoti_load_package cannot load a package); transformers'
  own model is compiled the same way for a (variant "transformers", form "compiled") record. Each compiled program
  is checked against its eager program on the timed input (`max_abs_diff_vs_eager` in its build record).
The hf and aoti forms write each variant's output folder under --workdir (the 1.1B model: about 2.2 GB per folder).
--compiled-variants / --hf-variants limit those forms to some variants (a device call is at most 10 minutes);
--profile adds one profiled forward per (variant, form) at the last length: kernel time, launches, top kernels.

    python benchmarks/prefill.py --out benchmarks/results/prefill_h200.json
    python benchmarks/prefill.py --tiny --out /tmp/prefill_tiny.json          # CPU smoke test
    python benchmarks/prefill.py --forms eager hf aoti --out benchmarks/results/prefill_h200_forms.json
    python benchmarks/prefill.py --variants window window_fused fused --out benchmarks/results/prefill_h200_fused.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from aoti_cpu import _interleaved_ms  # medians of calls run in turn within each repeat
from kv import build_model  # the same 1.1B Llama-shaped model as the decode benchmark
from rewriter.api import compile_output, load_program, optimize
from rewriter.pipeline import make_pass

WINDOW = ("window", {"window": 1024, "sinks": 64})
FUSE = ("fuse", {})
# variant -> its pipeline: (pass, options) in order
PASSES = {
    "exact": [("exact-attention", {})],
    "window": [WINDOW],
    "linear": [("linear", {"feature_map": "elu"})],
    "scatterbrain": [("scatterbrain", {"window": 1024, "features": 64})],
    "window_fused": [WINDOW, FUSE],
    "fused": [FUSE],
}
# exact-attention is a no-op since capture (the captured variant is that program); the fused variants run on request
DEFAULT_VARIANTS = ["window", "linear", "scatterbrain"]


def feed(program, ids: torch.Tensor) -> dict:
    """The program's inputs for one unpadded row of token ids."""
    return {n: ids if n == "input_ids" else torch.ones_like(ids) for n in program.input_names}


def error_text(err: Exception) -> str:
    """A record's error: the exception's type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(PASSES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--forms", nargs="+", default=["eager"], choices=["eager", "hf", "aoti", "compiled"])
    parser.add_argument("--compiled-variants", nargs="+", default=None,
                        help="the variants (captured included) timed in the compiled form (default: all)")
    parser.add_argument("--hf-variants", nargs="+", default=None,
                        help="the variants (captured included) written and timed as HF folders (default: all)")
    parser.add_argument("--no-transformers-compiled", action="store_true",
                        help="with --forms compiled, do not compile transformers' own model as well")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, one profiled forward per form at the last length: the GPU kernels' "
                             "total time and the top kernels (`profiles` in the JSON)")
    parser.add_argument("--trace-dir", default=None,
                        help="with --profile: write each profiled forward's Chrome trace (gzip) here; the profile "
                             "records get the GPU's idle time and the launches it waited for either way")
    parser.add_argument("--workdir", default="/tmp/prefill_outputs", help="output folders for the hf / aoti forms")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:   # the tiny model has 4096 positions
        args.lengths = [n for n in args.lengths if n <= 4096] or [256, 512]
    # capture and rewrite on the CPU, run on the GPU (Program.to): torch.export's CUDA fake kernels add guards that a
    # dynamic sequence dim cannot satisfy
    model = build_model(args.tiny, "cpu")
    gpu_model = copy.deepcopy(model).to(device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "params": sum(p.numel() for p in model.parameters()), "records": [], "builds": {}}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    import shutil
    from pathlib import Path
    workdir = Path(args.workdir)
    runners = {}          # (variant, form) -> callable(ids) running one forward
    checks = {}           # variant -> eager program its compiled form is checked against
    for name in ["captured", *args.variants]:
        t0 = time.perf_counter()
        specs = PASSES.get(name, PASSES["exact"])    # captured: the no-op pass, for an output folder
        forms = [f for f in args.forms if f != "hf" or args.hf_variants is None or name in args.hf_variants]
        out_dir = workdir / name if any(f in ("hf", "aoti") for f in forms) else None
        if out_dir is not None and out_dir.exists():
            shutil.rmtree(out_dir)
        if name == "captured" and out_dir is None:
            program = load_program(model)
            final = {}
        else:
            res = optimize(model, [make_pass(p, o) for p, o in specs], samples=2, seq_len=256, out=out_dir)
            program, final = res.program, res.report.get("final", {})
        program = program.to(device)
        if "compiled" in args.forms and (args.compiled_variants is None or name in args.compiled_variants):
            from rewriter.compile import lower    # the aten program an AOTI package compiles (window: its triton_op)
            compiled = torch.compile(lower(program).module(), fullgraph=True)

            runners[(name, "compiled")] = lambda ids, compiled=compiled, program=program: compiled(**feed(program, ids))
            checks[name] = program
        if "eager" in args.forms:
            runners[(name, "eager")] = lambda ids, program=program: program.run(**feed(program, ids))
        build = {"seconds": time.perf_counter() - t0, "pass": " + ".join(f"{p}:{o}" for p, o in specs),
                 "calibration_metrics": final}
        if "hf" in forms:
            import transformers
            if (out_dir / "hf" / "config.json").exists():
                hf = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir / "hf"), dtype=model.dtype).to(device).eval()
                runners[(name, "hf")] = lambda ids, hf=hf: hf(input_ids=ids, use_cache=False)
            else:
                build["hf"] = "no hf/ folder: " + "; ".join(json.loads((out_dir / "report.json").read_text()).get("notes", []))
        if "aoti" in forms:
            t1 = time.perf_counter()
            try:
                rec = compile_output(out_dir, device=device)
                from torch._inductor import aoti_load_package
                pkg = aoti_load_package(rec["path"])
                runners[(name, "aoti")] = lambda ids, pkg=pkg: pkg(input_ids=ids, attention_mask=torch.ones_like(ids))
                build["aoti_compile_s"] = time.perf_counter() - t1
            except Exception as err:      # a method the package cannot hold is refused by name: record why
                build["aoti"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        result["builds"][name] = build
        print(name, json.dumps(build, default=str)[:400], flush=True)
        save()
    g = torch.Generator().manual_seed(0)
    for L in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=g).to(device)
        # every form is warmed up (the compiled ones compile here), then timed in turn within each repeat, so that
        # clocks drifting over the call (a hot card late in a 10-minute run) slow them alike
        timing = {("transformers", "hf"): lambda ids: gpu_model(input_ids=ids, use_cache=False)}
        if "compiled" in args.forms and not args.no_transformers_compiled:
            hf_compiled = torch.compile(gpu_model, fullgraph=True)
            timing[("transformers", "compiled")] = lambda ids: hf_compiled(input_ids=ids, use_cache=False)
        timing.update(runners)
        failed = {}
        for key, run in list(timing.items()):
            try:
                with torch.no_grad():
                    run(ids)
                if device == "cuda":
                    torch.cuda.synchronize()
            except torch.OutOfMemoryError as err:
                failed[key] = f"out of memory: {str(err).splitlines()[0]}"
            except Exception as err:      # e.g. a compiled form that does not compile: recorded, the rest still timed
                if key[1] != "compiled" or key == ("transformers", "hf"):
                    raise
                import traceback
                traceback.print_exc()     # the whole cause in the log, the record keeps its first line
                failed[key] = error_text(err)
            if key in failed:
                del timing[key]
            if device == "cuda":
                torch.cuda.empty_cache()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.no_grad():     # each call synchronised, so that its time is its forward's
            ms = dict(zip(timing, _interleaved_ms([lambda run=run: (run(ids), sync()) for run in timing.values()],
                                                  args.reps, warm=False)))
        base = ms[("transformers", "hf")]
        for key in [("transformers", "hf"), ("transformers", "compiled"), *runners]:
            if key in ms:
                rec = {"variant": key[0], "L": L, "ms": ms[key], "speedup": base / ms[key], "form": key[1]}
            elif key in failed:
                rec = {"variant": key[0], "L": L, "form": key[1], "error": failed[key]}
            else:
                continue
            result["records"].append(rec)
            print(json.dumps(rec), flush=True)
        save()
        for name, program in checks.items():   # the compiled program against its eager program, this input
            if any(r.get("error") for r in result["records"]
                   if (r["variant"], r["form"], r["L"]) == (name, "compiled", L)):
                continue
            with torch.no_grad():
                want = program.run(**feed(program, ids))[0]
                got = runners[(name, "compiled")](ids)
            got = got[0] if isinstance(got, (tuple, list)) else got
            diff = float((got.float() - want.float()).abs().max())
            result["builds"][name].setdefault("max_abs_diff_vs_eager", {})[str(L)] = diff
            print(name, "compiled vs eager max abs diff", diff, flush=True)
            del want, got
        save()
    if args.profile and device == "cuda":
        profile_forms(result, {("transformers", "hf"): lambda ids: gpu_model(input_ids=ids, use_cache=False),
                               **runners}, ids, trace_dir=args.trace_dir)
        save()
    return 0


def idle_gaps(trace: dict, min_gap_us: float = 20.0, top: int = 12) -> dict:
    """Where the GPU waited for the host in one profiled forward (a Chrome trace from torch.profiler): `lead_ms`
    from the first host op to the first kernel, `idle_ms` that plus every gap between consecutive kernels, and the
    gaps of at least `min_gap_us` grouped by the host ops that launched the kernel after the gap (innermost last),
    with the synchronising runtime calls (stream / device syncs, blocking copies, cudaMalloc / cudaFree) of the
    forward."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launch = {e.get("args", {}).get("correlation"): e for e in runtime}
    out = {"kernels": len(kernels), "lead_ms": 0.0, "idle_ms": 0.0, "gaps": [], "syncs": []}
    if not kernels:
        return out
    if ops:
        out["lead_ms"] = max(0.0, kernels[0]["ts"] - ops[0]["ts"]) / 1e3

    def chain(ts: float, tid) -> str:
        names = [o["name"] for o in ops if o.get("tid") == tid and o["ts"] <= ts <= o["ts"] + o.get("dur", 0)]
        return " > ".join(names[-4:]) or "(no host op)"
    groups, end = {}, kernels[0]["ts"] + kernels[0].get("dur", 0)
    idle = out["lead_ms"] * 1e3
    for k in kernels[1:]:
        gap = k["ts"] - end
        if gap > 0:
            idle += gap
            if gap >= min_gap_us:
                src = launch.get(k.get("args", {}).get("correlation"))
                key = chain(src["ts"], src.get("tid")) if src else "(launch not found)"
                g = groups.setdefault(key, {"launched_by": key, "gaps": 0, "ms": 0.0, "kernel": k["name"][:80]})
                g["gaps"] += 1
                g["ms"] += gap / 1e3
        end = max(end, k["ts"] + k.get("dur", 0))
    out["idle_ms"] = idle / 1e3
    out["gaps"] = sorted(groups.values(), key=lambda g: -g["ms"])[:top]
    blocking = ("Synchronize", "cudaMemcpy", "cudaMalloc", "cudaFree", "cuMemAlloc", "cuMemFree")
    syncs = {}
    for e in runtime:
        name = e["name"]
        if any(b in name for b in blocking) and "Async" not in name:
            key = f"{name} in {chain(e['ts'], e.get('tid'))}"
            s = syncs.setdefault(key, {"call": key, "count": 0, "ms": 0.0})
            s["count"] += 1
            s["ms"] += e.get("dur", 0) / 1e3
    out["syncs"] = sorted(syncs.values(), key=lambda s: -s["ms"])[:top]
    return out


def profile_forms(result: dict, runners: dict, ids: torch.Tensor, top: int = 25, trace_dir: str | None = None) -> None:
    """One profiled forward per (variant, form): GPU kernel time in all, the kernel count, the top kernels, and
    where the GPU idled (idle_gaps)."""
    import gzip
    import os
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    profiles = result.setdefault("profiles", {})
    for (name, form), run in runners.items():
        if any(r.get("error") for r in result["records"] if (r["variant"], r["form"]) == (name, form)):
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.no_grad():
                run(ids)
            torch.cuda.synchronize()
        # kernels only: the aten op that launched a kernel carries the same device time (the first records,
        # prefill_h100_issue13_v5.json, summed both and give about twice the kernel time)
        kernels = [(e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
                   if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
        kernels.sort(key=lambda r: -r[1])
        profiles[f"{name}/{form}"] = {
            "L": int(ids.shape[1]), "gpu_ms": sum(ms for _, ms, _ in kernels),
            "launches": sum(c for *_, c in kernels),
            "top": [{"kernel": k[:160], "ms": ms, "count": c} for k, ms, c in kernels[:top]]}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                text = f.read()
        profiles[f"{name}/{form}"]["idle"] = idle_gaps(json.loads(text))
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            with gzip.open(os.path.join(trace_dir, f"{name}_{form}.json.gz"), "wt") as f:
                f.write(text)
        p = profiles[f"{name}/{form}"]
        print(f"profile {name}/{form}: {p['gpu_ms']:.1f} ms GPU, {p['launches']} launches, idle "
              f"{p['idle']['idle_ms']:.1f} ms (lead {p['idle']['lead_ms']:.1f})", flush=True)
        for g in p["idle"]["gaps"][:4]:
            print(f"  gap {g['ms']:.2f} ms x{g['gaps']} before {g['kernel'][:40]} launched by {g['launched_by']}")
        for s_ in p["idle"]["syncs"][:4]:
            print(f"  sync {s_['ms']:.2f} ms x{s_['count']} {s_['call'][:120]}")


if __name__ == "__main__":
    sys.exit(main())
