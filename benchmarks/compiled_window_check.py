"""The window op's CUDA lowering (rewriter::window_triton, the band Triton kernel as a triton_op) inside Inductor:
a tiny random bf16 Llama with window 32 + 4 sinks, lowered (rewriter.compile.lower) and compiled with torch.compile
on CUDA, against the eager program at lengths 1..1000 with and without padding. The H200 run that found the kernel's
fp64 qk_scale under Inductor (prefill_h200_compiled_v2.json) checks the fix here in a minute.

    python benchmarks/compiled_window_check.py --out out/compiled_window_check.json
"""
import argparse
import json
import time

import torch
import transformers as tf

from rewriter import make_pass, optimize
from rewriter.compile import lower

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--device", default="cuda")
args = ap.parse_args()
cfg = tf.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=1000, max_position_embeddings=4096)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
model = tf.LlamaForCausalLM(cfg).eval()
program = optimize(model, [make_pass("window", {"window": 32, "sinks": 4})], samples=2, seq_len=128).program
program = program.to(args.device)
rec = {"torch": torch.__version__, "checks": []}
t0 = time.perf_counter()
lowered = lower(program)
ops = sorted({str(n.target) for n in lowered.graph.nodes if "rewriter" in str(n.target)})
rec["lowered_rewriter_ops"] = ops
compiled = torch.compile(lowered.module(), fullgraph=True)
g = torch.Generator().manual_seed(1)
for batch, length, pad in ((1, 200, 0), (2, 1000, 300), (1, 1, 0), (3, 77, 20)):
    ids = torch.randint(0, 1000, (batch, length), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, :pad] = 0
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask)[0]
    want = program.run(input_ids=ids, attention_mask=mask)[0]
    rows = mask.bool()
    diff = float((got.float() - want.float())[rows].abs().max())
    rec["checks"].append({"batch": batch, "L": length, "pad": pad, "max_abs_diff_real_rows": diff})
    print(rec["checks"][-1], flush=True)
rec["seconds"] = time.perf_counter() - t0
json.dump(rec, open(args.out, "w"), indent=1)
print(json.dumps(rec))
