"""KV-cache decode on the GPU: tokens/s, peak memory and cache bytes of a Llama-shaped 1.1B model (random bf16
weights; hidden 2048, 16 layers, 32 query / 8 KV heads, head dim 64, intermediate 8192, vocab 32000: 1.104e9
parameters) at 4K and 32K tokens of context (16K on request), batch 1 (and 8 / 32 with --batches 1 8 32, at the
--batch-contexts for the --batch-variants), original vs each KV pass, with transformers' own generate (dynamic cache;
static cache, which compiles its step) as peers at the same batch in the same run and the HBM roofline computed in
the run: (weight bytes + KV bytes read per step) / measured copy bandwidth.

Each variant's prefill and decode programs are captured once on the CPU (rewriter.api.decoder_from: KV passes
verified on the full-sequence program, calibration on seeded random ids since the model has no tokenizer) and moved
to the GPU. Decoding goes through the runtime (rewriter.decode.runtime): a static session per (batch, cache length),
the cache written in place, the step replayed as one CUDA graph, its attention the split-K Triton decode kernel
(rewriter::decode_attention, rewriter/decode/triton_decode.py). Correctness before timing, per run:
`graph_check` (graph-replayed logits vs the same step run eagerly from the same state) and `kernel_check` (the
decode op on layer 0's cache vs its float64 reference, and the replayed step vs the same step eagerly with the
attention through SDPA, the op's reference). Per (variant, context, batch): prefill ms (the second of two calls,
one prompt of random ids per row), decode ms per step (wall clock around `--new-tokens` replays, no host sync
between them), tokens/s (batch / step time), the fraction of the roofline at the variant's own KV bytes, peak
allocated memory during decode, and the cache bytes held. Tokens are compared with the original decoder's (agreement of greedy continuations: random
weights, so only a sanity signal). transformers' static-cache generate runs its exact timed calls twice as warm-up
and records whether torch.compile built anything during the timed calls (`recompiled_during_timing`).
Records are written to --out as they come (a run cut short still leaves its records).

On the H200, one 10-minute device call each (--budget-s, default 540: what would start later is listed in `skipped`):

    # batch 1 at 4K and 32K: every pass, the SDPA step and the Inductor-fused step beside the kernel's
    python benchmarks/kv.py --out benchmarks/results/kv_h200_v3.json --contexts 4096 32768 \
        --variants original kv-window4+1020 think0.5 mla-decoupled0.5 think-dynamic0.5 --sdpa-variants original \
        --compile-variants original --compile-contexts 4096 --static-peer-contexts 4096 --static-budget-s 300
    # batches 1, 8 and 32 at 4K, transformers' static-cache generate at each batch
    python benchmarks/kv.py --out benchmarks/results/kv_h200_v3_batch.json --contexts 4096 --batches 1 8 32 \
        --variants original --batch-variants original --compile-variants original --static-peer-contexts 4096
    python benchmarks/kv.py --tiny --out /tmp/kv_tiny.json                     # CPU smoke test, tiny model
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from rewriter.api import decoder_from
from rewriter.decode import kv_bytes
from rewriter.pipeline import make_pass

VARIANTS = {       # in the order a default run times them (the targets first)
    "original": [],
    "kv-window4+1020": [("kv-window", {"sinks": 4, "window": 1020})],
    "think0.5": [("think", {"ratio": 0.5})],
    # TransMLA's decoupled RoPE (head_dim key dims keep RoPE): decoded in latent space, nothing rebuilt per step
    "mla-decoupled0.5": [("mla", {"ratio": 0.5, "rope": "decoupled"})],
    "think-dynamic0.5": [("think", {"ratio": 0.5, "mode": "dynamic"})],
    "mla0.5": [("mla", {"ratio": 0.5})],      # rope=exact: keys rebuilt from the latent each step (no absorption)
}


def build_model(tiny: bool, device: str):
    import transformers as tf
    if tiny:
        cfg = tf.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                             intermediate_size=256, vocab_size=1000, max_position_embeddings=4096)
        dtype = torch.float32
    else:
        cfg = tf.LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                             intermediate_size=8192, vocab_size=32000, max_position_embeddings=65536,
                             rope_theta=500000.0)
        dtype = torch.bfloat16
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median of 20 copies of 2 GiB)."""
    src = torch.randn(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def weight_bytes_per_step(model) -> int:
    """Bytes a decode step must read: every weight but the embedding table (one row of it per token)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def _state(session) -> list[torch.Tensor]:
    return [t for t in (session.k, session.v, session.ids, session.next, session.position, session.slot, session.t,
                        session.valid, session.sinks, *session.extra.values()) if t is not None]


def graph_check(session) -> dict:
    """Graph-replayed logits vs the same step run eagerly from the same state (then the state of the eager run)."""
    saved = [t.clone() for t in _state(session)]
    graphed = session.step().clone()
    for t, s in zip(_state(session), saved):
        t.copy_(s)
    eager = session.eager_step()
    sync("cuda" if eager.is_cuda else "cpu")
    diff = float((graphed.float() - eager.float()).abs().max())
    scale = float(eager.float().abs().max())
    return {"graph": session.graph is not None, "graph_error": session.graph_error, "max_abs_diff": diff,
            "max_abs_logit": scale, "ok": diff <= 1e-2 * max(scale, 1.0),
            "same_argmax": bool(torch.equal(graphed.argmax(-1), eager.argmax(-1)))}


def kernel_runs(device: torch.device) -> bool:
    """Whether rewriter::decode_attention runs its Triton kernel here (CUDA, Triton, not forced to the reference)."""
    from rewriter.decode.attention import use_triton
    probe = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    return device.type == "cuda" and use_triton(probe, probe)


def kernel_check(session) -> dict:
    """The decode attention kernel against its reference, both from the session's state after a step:
    - `op`: rewriter::decode_attention on layer 0's cache (and dynamic ThinK's second key region) with random
      queries (MLA in latent space: its own form), the kernel vs the reference in float64, max abs difference over
      max(1, max |reference|);
    - `step`: the graph-replayed step (the kernel) vs the same step run eagerly with the reference attention (SDPA)."""
    from rewriter.decode.attention import decode_attention_reference, reference_attention
    d = session.decoder
    k, v = session.k[0], session.v[0]
    op_diff = None
    if k.shape[-1] > 0:                        # not MLA's rebuild path (its keys are rebuilt inside the step)
        B, Hkv = k.shape[:2]
        G = d.dims["heads"] // Hkv
        g = torch.Generator(device=k.device).manual_seed(0)
        q = torch.randn(B, Hkv, G, k.shape[-1], generator=g, device=k.device).to(k.dtype)
        mask = session.valid[:, None, None, :]
        extra = ()
        if d.meta.get("mla_absorbed"):       # MLA in latent space: the latent is key and value, k_rope the 2nd region
            q = torch.randn(B, Hkv, G, v.shape[-1], generator=g, device=k.device).to(k.dtype)
            extra = (torch.randn(B, Hkv, G, k.shape[-1], generator=g, device=k.device).to(k.dtype), k,
                     torch.zeros(1, dtype=torch.long, device=k.device))
            k = v
        elif "k_pruned" in session.extra:
            kx = session.extra["k_pruned"][0]
            extra = (torch.randn(B, Hkv, G, kx.shape[-1], generator=g, device=k.device).to(k.dtype), kx,
                     session.extra["recent_start"])
        scale = d.dims["head_dim"] ** -0.5
        got = torch.ops.rewriter.decode_attention(q, k, v, mask, scale, *extra)
        wide = [x.double() if x.is_floating_point() else x for x in (q, k, v, *extra)]
        ref = decode_attention_reference(*wide[:3], mask, scale, *wide[3:])
        op_diff = float((got.double() - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    saved = [t.clone() for t in _state(session)]
    graphed = session.step().clone()
    for t, s in zip(_state(session), saved):
        t.copy_(s)
    with reference_attention():
        eager = session.eager_step()
    sync("cuda" if eager.is_cuda else "cpu")
    diff = float((graphed.float() - eager.float()).abs().max())
    scale_logits = float(eager.float().abs().max())
    return {"op_max_rel_diff_vs_float64": op_diff, "op_ok": op_diff is None or op_diff <= 2e-2,
            "step_max_abs_diff_vs_sdpa": diff, "step_ok": diff <= 5e-2 * max(scale_logits, 1.0),
            "step_same_argmax": bool(torch.equal(graphed.argmax(-1), eager.argmax(-1)))}


PROFILE_STEPS = 0        # --profile-steps: steps profiled after each timed run (CUDA)


def profile_step(session, steps: int, prompt: int, top: int = 15) -> dict:
    """The step's kernels, per step, from `steps` profiled steps: as the runtime replays it (its CUDA graph) and run
    eagerly op by op (session.eager_step): kernel time and count per step, the top kernels. Each form decodes from
    the end of the prompt again (t and the valid slots after it reset), so the cache has room for the steps."""
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for form, run in (("graph", session.step), ("eager", session.eager_step)):
        if not session.decoder.policy.evicts:
            session.t.fill_(prompt)
            session.valid[:, prompt:] = False
        sync(session.k.device.type)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                session.ids.copy_(session.next)
                run()
            sync(session.k.device.type)
        wall = (time.perf_counter() - t0) * 1e3 / steps
        kernels = [(e.key, e.self_device_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()
                   if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
        kernels.sort(key=lambda r: -r[1])
        out[form] = {"kernel_ms_per_step": sum(ms for _, ms, _ in kernels),
                     "kernels_per_step": sum(c for *_, c in kernels), "profiled_wall_ms_per_step": wall,
                     "top": [{"kernel": k[:120], "ms": ms, "per_step": c} for k, ms, c in kernels[:top]]}
    return out


def run_decoder(decoder, ids: torch.Tensor, new: int, device: str, sdpa_backend: str | None = None,
                reference_attention: bool = False, compiled: bool = False) -> dict:
    """Prefill + `new` greedy steps through the runtime's static session, timed as one block (synchronised at the
    ends only). sdpa_backend: the step's SDPA kernels (e.g. MATH), default torch's choice. reference_attention: the
    step's attention through SDPA (rewriter::decode_attention's reference) instead of the Triton decode kernel.
    compiled: the step fused by Inductor (runtime.compiled_step; it compiles in the first, untimed step)."""
    import contextlib
    from rewriter.decode import attention
    with attention.reference_attention() if reference_attention else contextlib.nullcontext():
        return _run_decoder(decoder, ids, new, device, sdpa_backend, reference_attention, compiled)


def _run_decoder(decoder, ids: torch.Tensor, new: int, device: str, sdpa_backend: str | None,
                 reference_attention: bool, compiled: bool) -> dict:
    B, T = ids.shape
    session = decoder.session(B, T + new + 2, prompt=T, compiled=compiled)
    if sdpa_backend is not None:
        from torch.nn.attention import SDPBackend
        session.sdpa_backends = [getattr(SDPBackend, sdpa_backend.upper())]
    prefill_ms = []
    for _ in range(2):          # the first call warms up (cuBLAS / Triton / allocator), the second is the record
        sync(device)
        t0 = time.perf_counter()
        session.prefill(ids, torch.zeros(B, dtype=torch.long))
        sync(device)
        prefill_ms.append((time.perf_counter() - t0) * 1e3)
    prefill_first_ms, prefill_ms = prefill_ms
    tokens = [int(session.next[0, 0])]
    session.ids.copy_(session.next)
    t0 = time.perf_counter()
    session.step()                            # first step: eager (compiling the step when `compiled`), then the capture
    sync(device)
    first_step_s = time.perf_counter() - t0
    tokens.append(int(session.next[0, 0]))
    check = kcheck = None
    if device == "cuda":                      # one more step, replayed and eager from the same state
        session.ids.copy_(session.next)
        check = graph_check(session)
        tokens.append(int(session.next[0, 0]))
    if not reference_attention:               # the kernel against its reference (then the state moves on)
        session.ids.copy_(session.next)
        kcheck = kernel_check(session)
        tokens.append(int(session.next[0, 0]))
    reset_peak(device)
    steps = new - len(tokens)
    out = torch.empty(B, steps, dtype=torch.long, device=ids.device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        session.ids.copy_(session.next)
        session.step()
        out[:, i] = session.next[:, 0]
    sync(device)
    step_ms = (time.perf_counter() - t0) * 1e3 / steps
    tokens += out[0].tolist()
    profiled = profile_step(session, min(PROFILE_STEPS, new), T) if PROFILE_STEPS else None
    # dynamic think's full-width keys after the prompt: their pruned channels in k_pruned
    cache = sum(t.numel() * t.element_size() for t in (session.k, session.v, session.extra.get("k_pruned"))
                if t is not None)
    return {"batch": B, "prefill_ms": prefill_ms, "prefill_first_ms": prefill_first_ms,
            "decode_ms_per_token": step_ms, "tokens_per_s": B * 1e3 / step_ms,
            "sdpa_backend": sdpa_backend or "default",
            "attention": "triton_decode" if kernel_runs(ids.device) else "sdpa", "inductor": compiled,
            "first_step_s": first_step_s,
            "graph_check": check, "kernel_check": kcheck, **({"step_profile": profiled} if profiled else {}),
            "decode_peak_allocated_bytes": peak_bytes(device), "cache_tensor_bytes": cache, "tokens": tokens[:new]}


def _compiles() -> int:
    """Graphs torch.compile has built so far in this process (a change during timing means a recompile)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def hf_generate(model, ids: torch.Tensor, new: int, device: str, static: bool = False) -> dict:
    """transformers' generate, dynamic or static cache (the static one compiles its step: the warm-up calls run the
    exact timed calls first, twice, and the record says whether anything compiled during the timed ones);
    prefill time = generate of 1 token; decode = the rest per token."""
    kw = dict(do_sample=False, pad_token_id=0)
    info = {}
    if static:      # the static cache's length is prompt + max_new_tokens: compile both timed shapes first
        kw["cache_implementation"] = "static"
        for _ in range(2):
            for n in (1, new):
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        info["graphs_compiled_before_timing"] = _compiles()
    times = {}
    for n in (1, new):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        times[n] = (time.perf_counter() - t0) * 1e3
    if static:
        info["recompiled_during_timing"] = _compiles() != info["graphs_compiled_before_timing"]
    step_ms = (times[new] - times[1]) / (new - 1)
    return {"batch": ids.shape[0], "prefill_ms": times[1], "decode_ms_per_token": step_ms,
            "tokens_per_s": ids.shape[0] * 1e3 / step_ms, **info, "tokens": out[0, ids.shape[1]:].tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-variants", nargs="*", default=["original"],
                        help="variants also timed at the batches > 1 (with transformers' generate beside them)")
    parser.add_argument("--batch-contexts", type=int, nargs="*", default=[4096],
                        help="contexts timed at the batches > 1")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--static-peer-contexts", type=int, nargs="*", default=None,
                        help="contexts at which transformers' static-cache generate is timed (default: the first; "
                             "it compiles per shape)")
    parser.add_argument("--sdpa-backends", nargs="*", default=[], help="also time the original's step with these "
                        "SDPA kernels forced (math, efficient_attention, flash_attention, cudnn_attention)")
    parser.add_argument("--split-sweep", type=int, nargs="*", default=[],
                        help="also time the original (batch 1) with the decode kernel split for this many programs "
                             "per SM (rewriter.decode.triton_decode.set_split), recorded as original_pps<N>")
    parser.add_argument("--split-sweep-variants", nargs="*", default=[],
                        help="variants also timed (batch 1) with the decode kernel's partial outputs allowed up to "
                             "each --partial-shares of a chunk's cache bytes, recorded as <variant>_share<x>")
    parser.add_argument("--partial-shares", type=float, nargs="*", default=[1.0, 4.0, 16.0])
    parser.add_argument("--tiles-from", default=None,
                        help="benchmarks/decode_attention.py's result: --tile-variants also run (batch 1, CUDA) with "
                             "the decode attention's fastest tiles and split for their cache form (mla for mla "
                             "variants, gqa otherwise) at the nearest context, recorded as <variant>_tuned")
    parser.add_argument("--tile-variants", nargs="*", default=[])
    parser.add_argument("--compile-contexts", type=int, nargs="*", default=None,
                        help="contexts of the --compile-variants runs (default: every context)")
    parser.add_argument("--compile-variants", nargs="*", default=[],
                        help="variants also timed with the step fused by Inductor (runtime.compiled_step), recorded as "
                             "<variant>_inductor (every batch; one compile per shape)")
    parser.add_argument("--sdpa-variants", nargs="*", default=[],
                        help="variants also timed with the step's attention through SDPA (the decode op's reference) "
                             "instead of the Triton decode kernel, recorded as <variant>_sdpa (batch 1)")
    parser.add_argument("--unfused-variants", nargs="*", default=[],
                        help="variants also timed with the step's RMSNorms and SwiGLU products as captured (aten ops) "
                             "instead of the fused ops, recorded as <variant>_unfused (batch 1)")
    parser.add_argument("--cublas-variants", nargs="*", default=[],
                        help="also time these variants' step with the fused ops but its linears on cuBLAS instead of "
                             "rewriter::gemv / swiglu_gemv, recorded as <variant>_cublas (batch 1)")
    parser.add_argument("--gemv-configs", default=None,
                        help="JSON {'<kind> <N> <K> M1': [BLOCK_N, BLOCK_K, warps, stages]} from benchmarks/gemv.py "
                             "--configs-out: the gemv kernels' launches (triton_gemv.GEMV_CONFIGS) for this run")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="skip what would start after this many seconds (default: fit one 10-minute device call)")
    parser.add_argument("--static-budget-s", type=float, default=1e9,
                        help="skip transformers' static-cache generate if it would start after this many seconds")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after each timed run, profile this many steps (replayed graph, then eager): the "
                             "step's kernel time, kernel count and top kernels (`step_profile` in the record)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    args = parser.parse_args()
    global PROFILE_STEPS
    PROFILE_STEPS = args.profile_steps
    if args.gemv_configs:
        from rewriter.decode.triton_gemv import GEMV_CONFIGS
        with open(args.gemv_configs) as f:
            for key, config in json.load(f).items():
                kind, n, k = key.split()[:3]
                GEMV_CONFIGS[(kind, int(n), int(k))] = tuple(config)
        print(f"gemv configs: {GEMV_CONFIGS}", flush=True)
    began = time.perf_counter()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.contexts = [c for c in args.contexts if c <= 256] or [64, 128]
    static_contexts = ([] if args.tiny else args.contexts[:1]) if args.static_peer_contexts is None \
        else args.static_peer_contexts
    # transformers' static cache compiles one step per (batch, cache length): room for all of them, so that no
    # shape falls back to eager after torch.compile's recompile limit
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    # capture on the CPU, run on the GPU (Decoder.to): torch.export's CUDA fake kernels add guards that a dynamic
    # sequence dim cannot satisfy
    model = build_model(args.tiny, "cpu")
    gpu_model = copy.deepcopy(model).to(device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "model": {"params": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype),
                        **{k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "num_key_value_heads")}},
              "new_tokens": args.new_tokens, "records": [], "builds": {}, "skipped": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    def over_budget(what: str) -> bool:
        if time.perf_counter() - began > args.budget_s:
            result["skipped"].append(what)
            print(f"skipped (budget): {what}", flush=True)
            return True
        return False

    def record(rec):
        result["records"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("tokens", "kv")}), flush=True)
        save()
        return rec

    bandwidth = copy_bandwidth() if device == "cuda" else None
    weights = weight_bytes_per_step(model)
    result["copy_bandwidth_bytes_per_s"], result["weight_bytes_per_step"] = bandwidth, weights

    def roofline(kv_bytes_per_row: int, batch: int) -> float | None:
        return None if bandwidth is None else batch * bandwidth / (weights + batch * kv_bytes_per_row)

    def static_peers():
        """transformers' static cache compiles its step (a minute or more per shape): after the original's runs,
        with its own time limit."""
        for b in args.batches:
            for c in static_contexts:
                if (c, b) not in prompts or (b > 1 and c not in args.batch_contexts):
                    continue
                if time.perf_counter() - began > args.static_budget_s:
                    result["skipped"].append(f"transformers_generate_static {c} batch {b}")
                    continue
                try:
                    rec = record({"variant": "transformers_generate_static", "context": c,
                                  **hf_generate(gpu_model, prompts[(c, b)], args.new_tokens, device, static=True)})
                    if (c, b) in originals:
                        originals[(c, b)]["speedup_vs_transformers_generate_static"] = \
                            originals[(c, b)]["tokens_per_s"] / rec["tokens_per_s"]
                        save()
                except Exception as e:
                    result.setdefault("errors", []).append({"variant": "transformers_generate_static", "context": c,
                                                            "batch": b, "error": f"{type(e).__name__}: {e}"[:2000]})
                    print(f"error in transformers_generate_static {c} batch {b}: {type(e).__name__}: {str(e)[:500]}",
                          flush=True)

    max_len = -(-(max(args.contexts) + args.new_tokens + 3) // 64) * 64
    g = torch.Generator().manual_seed(0)
    prompts = {(c, b): torch.randint(0, model.config.vocab_size, (b, c), generator=g).to(device)
               for b in args.batches for c in args.contexts}
    peers = {}
    reference_tokens = {}
    originals = {}          # (context, batch) -> the original's record
    for name in args.variants:
        if over_budget(f"variant {name}"):
            continue
        t0 = time.perf_counter()
        passes = [make_pass(p, o) for p, o in VARIANTS[name]]
        try:
            decoder, _, report = decoder_from(model, passes, max_len=max_len, samples=4, seq_len=128)
            decoder = decoder.to(device)
        except Exception as e:
            result.setdefault("errors", []).append({"variant": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"error building {name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
            continue
        result["builds"][name] = {"build_s": time.perf_counter() - t0,
                                  "verification": None if report is None else report.get("verification")}
        for b in args.batches:
            for c in args.contexts:
                if b > 1 and (name not in args.batch_variants or c not in args.batch_contexts):
                    continue
                if over_budget(f"{name} context {c} batch {b}"):
                    continue
                try:
                    if name == "original" and (c, b) not in peers:    # the peers next to the first variant
                        peers[(c, b)] = record({"variant": "transformers_generate", "context": c,
                                                **hf_generate(gpu_model, prompts[(c, b)], args.new_tokens, device)})
                        if bandwidth is not None:
                            dense = kv_bytes(decoder, c)["before"]["bytes_per_sequence"]
                            record({"variant": "roofline", "context": c, "batch": b, "tokens_per_s": roofline(dense, b),
                                    "kv_bytes_per_row": dense, "weight_bytes": weights})
                    # cache slots a multiple of 64 (aligned rows for the attention kernels' masks)
                    slots = -(-(c + args.new_tokens + 3) // 64) * 64
                    dec = decoder if decoder.policy.evicts else decoder.resized(slots)
                    torch.cuda.empty_cache() if device == "cuda" else None
                    try:
                        rec = {"variant": name, "context": c,
                               **run_decoder(dec, prompts[(c, b)], args.new_tokens, device)}
                    except Exception as e:     # the kernel path failed: say so, and time the SDPA step instead
                        if device != "cuda" or not kernel_runs(torch.device(device)):
                            raise
                        dec._runtime.clear()
                        torch.cuda.synchronize()
                        result.setdefault("errors", []).append({"variant": name, "context": c, "batch": b,
                                                                "error": f"{type(e).__name__}: {e}"[:2000],
                                                                "then": f"timed as {name}_sdpa"})
                        print(f"error in {name} context {c} batch {b} (timing {name}_sdpa instead): "
                              f"{type(e).__name__}: {str(e)[:500]}", flush=True)
                        rec = {"variant": f"{name}_sdpa", "context": c,
                               **run_decoder(dec, prompts[(c, b)], args.new_tokens, device, reference_attention=True)}
                    rec["kv"] = kv_bytes(dec, c + args.new_tokens, prompt=c)
                    dec._runtime.clear()                                    # free the session's cache and graph
                    held = rec["kv"]["after"]["bytes_per_sequence"]
                    rec["roofline_tokens_per_s"] = roofline(held, b)
                    rec["roofline_fraction"] = None if bandwidth is None else rec["tokens_per_s"] / roofline(held, b)
                    if name == "original":             # (its SDPA step when the kernel failed: the label says so)
                        originals[(c, b)] = rec
                        reference_tokens[(c, b)] = rec["tokens"]
                        if (c, b) in peers:
                            rec["agreement_with_transformers"] = _agree(rec["tokens"], peers[(c, b)]["tokens"])
                    elif (c, b) in reference_tokens:
                        rec["agreement_with_original"] = _agree(rec["tokens"], reference_tokens[(c, b)])
                    record(rec)
                    # (label, SDPA backend, attention through the reference, kernel programs per SM, Inductor,
                    #  RMSNorm / SwiGLU as the fused ops, linears as rewriter::gemv)
                    diagnostics = [(f"original_sdpa_{backend}", backend, False, None, False, True, True)
                                   for backend in (args.sdpa_backends if name == "original" and b == 1 else ())]
                    if name in args.compile_variants and (args.compile_contexts is None or c in args.compile_contexts):
                        diagnostics.append((f"{name}_inductor", None, False, None, True, True, True))
                    if name in args.sdpa_variants and b == 1:
                        diagnostics.append((f"{name}_sdpa", None, True, None, False, True, True))
                    if name in args.unfused_variants and b == 1:
                        diagnostics.append((f"{name}_unfused", None, False, None, False, False, False))
                    if name in args.cublas_variants and b == 1:
                        diagnostics.append((f"{name}_cublas", None, False, None, False, True, False))
                    if name == "original" and b == 1 and device == "cuda":
                        diagnostics += [(f"original_pps{n}", None, False, n, False, True, True)
                                        for n in args.split_sweep]
                    if name in args.split_sweep_variants and b == 1 and device == "cuda":
                        diagnostics += [(f"{name}_share{x:g}", None, False, ("share", x), False, True, True)
                                        for x in args.partial_shares]
                    if name in args.tile_variants and b == 1 and device == "cuda" and args.tiles_from:
                        tuned = tuned_attention(args.tiles_from, "mla" if name.startswith("mla") else "gqa", c)
                        if tuned is not None:
                            diagnostics.append((f"{name}_tuned", None, False, ("tuned", tuned), False, True, True))
                    for label, backend, reference, split, compiled, fused, gemv in diagnostics:
                        if over_budget(f"{label} context {c} batch {b}"):
                            continue
                        dec.fused_ops, dec.fused_gemv = fused, gemv
                        try:
                            with split_override(split):
                                rec = {"variant": label, "context": c,
                                       **run_decoder(dec, prompts[(c, b)], args.new_tokens, device, backend,
                                                     reference, compiled)}
                        finally:
                            dec.fused_ops = dec.fused_gemv = True
                        dec._runtime.clear()
                        rec["roofline_fraction"] = rec["tokens_per_s"] / roofline(held, b) if bandwidth else None
                        if (c, b) in reference_tokens:
                            rec["agreement_with_original"] = _agree(rec["tokens"], reference_tokens[(c, b)])
                        record(rec)
                except Exception as e:       # one failing run must not cost the others
                    result.setdefault("errors", []).append({"variant": name, "context": c, "batch": b,
                                                            "error": f"{type(e).__name__}: {e}"[:2000]})
                    print(f"error in {name} context {c} batch {b}: {type(e).__name__}: {str(e)[:500]}", flush=True)
                    save()
        del decoder
        if name == "original":
            static_peers()
    result["elapsed_s"] = time.perf_counter() - began
    save()
    return 0


def split_override(split):
    """None: the planned split; an int: that many decode programs per SM; ("share", x): partial outputs up to x of
    a chunk's cache bytes (triton_decode.split_plan); ("tuned", {"tile": ..., "split": ...}): decode_attention.py's
    fastest tiles and split (tuned_attention)."""
    import contextlib
    if split is None:
        return contextlib.nullcontext()
    from rewriter.decode.triton_decode import set_split, set_tiles
    if isinstance(split, tuple) and split[0] == "tuned":
        stack = contextlib.ExitStack()
        tile, plan = split[1]["tile"], split[1]["split"]
        if tile != "default":
            stack.enter_context(set_tiles(**tile))
        if plan != "default":
            stack.enter_context(set_split(**plan))
        return stack
    if isinstance(split, tuple):
        return set_split(partial_share=split[1])
    return set_split(programs_per_sm=split)


def tuned_attention(path: str, shape: str, context: int) -> dict | None:
    """decode_attention.py's fastest {"tile", "split"} for `shape` at the context nearest `context` (None: none)."""
    with open(path) as f:
        best = json.load(f).get("best", {})
    found = [(abs(int(k.split("@")[1]) - context), v) for k, v in best.items()
             if k.split("@")[0] == shape and "/" not in k]        # "/half": half partials, not applied here
    return min(found, key=lambda kv: kv[0])[1] if found else None


def _agree(a: list[int], b: list[int]) -> dict:
    """Greedy continuations: length of the common prefix and the fraction of equal positions."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"common_prefix": prefix, "equal_fraction": sum(x == y for x, y in zip(a, b)) / max(1, len(a))}


if __name__ == "__main__":
    sys.exit(main())
