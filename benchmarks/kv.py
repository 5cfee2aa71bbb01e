"""KV-cache decode on the GPU: tokens/s, peak memory and cache bytes of a Llama-shaped 1.1B model (random bf16
weights; hidden 2048, 16 layers, 32 query / 8 KV heads, head dim 64, intermediate 8192, vocab 32000: 1.104e9
parameters) at 4K, 16K and 32K tokens of context,
original vs each KV pass, with transformers' own generate (DynamicCache, SDPA) as the peer in the same run.

Each variant's prefill and decode programs are captured once (rewriter.api.decoder_from: KV passes verified on
the full-sequence program, calibration on seeded random ids since the model has no tokenizer); the decode step's
cache-slot dim is dynamic, so one step program serves every context (cache of context + new tokens slots; the
StreamingLLM cache always has sinks + window slots). Per (variant, context): prefill ms (one prompt of random ids),
decode ms per token (median of the per-token times over `--new-tokens` greedy steps, each step synchronised),
tokens/s, peak allocated memory during decode, and the cache bytes held. Tokens are compared with the original
decoder's (agreement of greedy continuations: random weights, so only a sanity signal).

    python benchmarks/kv.py --out benchmarks/results/kv_h200.json            # on the H200
    python benchmarks/kv.py --tiny --out /tmp/kv_tiny.json                   # CPU smoke test, tiny model
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

VARIANTS = {
    "original": [],
    "think0.5": [("think", {"ratio": 0.5})],
    "think-dynamic0.5": [("think", {"ratio": 0.5, "mode": "dynamic"})],
    "kv-window4+1020": [("kv-window", {"sinks": 4, "window": 1020})],
    "mla0.5": [("mla", {"ratio": 0.5})],
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


def run_decoder(decoder, ids: torch.Tensor, new: int, device: str) -> dict:
    """Prefill + `new` greedy steps, each timed (synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    logits, k, v, length, extra = decoder._prefill(ids)   # extra: dynamic ThinK's per-prompt channel index
    sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    reset_peak(device)
    steps, tokens = [], []
    for _ in range(new):
        nxt = logits[:, -1].argmax(-1)
        tokens.append(int(nxt[0]))
        t0 = time.perf_counter()
        if decoder.policy.evicts:
            k, v, length = decoder._evict(k, v, length, decoder.max_len - 1)
        logits, k, v = decoder.step.run(input_ids=nxt[:, None], cache_position=decoder._position(length),
                                        k_cache=k, v_cache=v, **extra)
        sync(device)
        steps.append((time.perf_counter() - t0) * 1e3)
        length += 1
    step_ms = statistics.median(steps[2:] if len(steps) > 4 else steps)   # first steps warm up allocators
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": step_ms, "tokens_per_s": 1e3 / step_ms,
            "decode_peak_allocated_bytes": peak_bytes(device),
            "cache_tensor_bytes": k.numel() * k.element_size() + v.numel() * v.element_size(), "tokens": tokens}


def hf_generate(model, ids: torch.Tensor, new: int, device: str) -> dict:
    """transformers' generate (DynamicCache): prefill time = generate of 1 token; decode = the rest per token."""
    kw = dict(do_sample=False, pad_token_id=0)
    times = {}
    for n in (1, new):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        times[n] = (time.perf_counter() - t0) * 1e3
    step_ms = (times[new] - times[1]) / (new - 1)
    return {"prefill_ms": times[1], "decode_ms_per_token": step_ms, "tokens_per_s": 1e3 / step_ms,
            "tokens": out[0, ids.shape[1]:].tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.contexts = [c for c in args.contexts if c <= 256] or [64, 128]
    # capture on the CPU, run on the GPU (Decoder.to): torch.export's CUDA fake kernels add guards that a dynamic
    # sequence dim cannot satisfy
    model = build_model(args.tiny, "cpu")
    gpu_model = copy.deepcopy(model).to(device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "model": {"params": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype),
                        **{k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "num_key_value_heads")}},
              "new_tokens": args.new_tokens, "records": [], "builds": {}}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    max_len = max(args.contexts) + args.new_tokens + 1
    g = torch.Generator().manual_seed(0)
    prompts = {c: torch.randint(0, model.config.vocab_size, (1, c), generator=g).to(device) for c in args.contexts}
    for c in args.contexts:
        rec = {"variant": "transformers_generate", "context": c, **hf_generate(gpu_model, prompts[c], args.new_tokens, device)}
        result["records"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "tokens"}), flush=True)
        save()
    reference_tokens = {}
    for name in args.variants:
        t0 = time.perf_counter()
        passes = [make_pass(p, o) for p, o in VARIANTS[name]]
        decoder, _, report = decoder_from(model, passes, max_len=max_len, samples=4, seq_len=128)
        decoder = decoder.to(device)
        result["builds"][name] = {"build_s": time.perf_counter() - t0,
                                  "verification": None if report is None else report.get("verification")}
        for c in args.contexts:
            dec = decoder if decoder.policy.evicts else decoder.resized(c + args.new_tokens + 1)
            torch.cuda.empty_cache() if device == "cuda" else None
            rec = {"variant": name, "context": c, **run_decoder(dec, prompts[c], args.new_tokens, device),
                   "kv": kv_bytes(dec, c + args.new_tokens)}
            if name == "original":
                reference_tokens[c] = rec["tokens"]
                hf = next(r for r in result["records"] if r["variant"] == "transformers_generate" and r["context"] == c)
                rec["agreement_with_transformers"] = _agree(rec["tokens"], hf["tokens"])
            elif c in reference_tokens:
                rec["agreement_with_original"] = _agree(rec["tokens"], reference_tokens[c])
            result["records"].append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "tokens"}), flush=True)
            save()
        del decoder
    save()
    return 0


def _agree(a: list[int], b: list[int]) -> dict:
    """Greedy continuations: length of the common prefix and the fraction of equal positions."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"common_prefix": prefix, "equal_fraction": sum(x == y for x, y in zip(a, b)) / max(1, len(a))}


if __name__ == "__main__":
    sys.exit(main())
