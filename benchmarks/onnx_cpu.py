"""onnxruntime (CPU) vs PyTorch eager latency for MiniLM: original, window-hybrid linear and performer attention,
batch 1 at sequence 128 and 512. Writes benchmarks/results/onnx_cpu.json.

    python benchmarks/onnx_cpu.py [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rewriter import load_program, make_pass, optimize
from rewriter.backends.onnx import export_program
from rewriter.load import default_checkpoint

VARIANTS = {"original": None, "performer": ("performer", {"features": 64}),
            "linear-window": ("linear", {"feature_map": "elu", "window": 64, "sinks": 4})}


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    import onnxruntime as ort
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    base = load_program(default_checkpoint())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in VARIANTS.items():
            program = base if spec is None else optimize(base, [make_pass(*spec)], samples=2, seq_len=128).program
            path = Path(tmp) / f"{name}.onnx"
            info = export_program(program, path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            runner = program.ep.module()
            for seq in (128, 512):
                inputs = {"input_ids": torch.randint(1000, 2000, (1, seq)),
                          "attention_mask": torch.ones(1, seq, dtype=torch.long)}
                inputs = {n: inputs.get(n, torch.zeros(1, seq, dtype=torch.long)) for n in program.input_names}
                feed = {n: t.numpy() for n, t in inputs.items()}
                with torch.no_grad():
                    eager = _median_ms(lambda: runner(**inputs), args.repeats)
                onnx_ms = _median_ms(lambda: session.run(None, feed), args.repeats)
                rows.append({"variant": name, "seq": seq, "batch": 1, "torch_eager_ms": round(eager, 3),
                             "onnxruntime_ms": round(onnx_ms, 3), "export_max_abs_diff": info["max_abs_diff"]})
                print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "onnx_cpu.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "onnxruntime": ort.__version__, "repeats": args.repeats, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
