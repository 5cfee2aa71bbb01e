"""onnxruntime (CPU) vs PyTorch eager latency for MiniLM: original, window-hybrid linear and performer attention,
batch 1 at sequence 128 and 512. Writes benchmarks/results/onnx_cpu.json.

    python benchmarks/onnx_cpu.py [--repeats N]

With --targets: the two ONNX targets side by side (`standard`: ONNX ops only; `ort`: onnxruntime's contrib attention
ops where exact) for the plain export (exact attention on the key-padding mask, the form capture gives every site)
and the window-128 export, on --threads intra-op threads, all four files run in turn within each repeat
(`vs_plain_same_target`: the plain export's time over this one's, same target). Writes
benchmarks/results/onnx_cpu_targets.json.

    python benchmarks/onnx_cpu.py --targets [--repeats N] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aoti_cpu import _interleaved_ms  # benchmarks/aoti_cpu.py: medians of calls run in turn
from rewriter import load_program, make_pass, optimize
from rewriter.backends.onnx import export_program
from rewriter.load import default_checkpoint

TARGET_VARIANTS = {"plain": ("exact-attention", {}), "window128": ("window", {"window": 128})}
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


def _inputs(program, seq: int) -> dict:
    inputs = {"input_ids": torch.randint(1000, 2000, (1, seq)), "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    return {n: inputs.get(n, torch.zeros(1, seq, dtype=torch.long)) for n in program.input_names}


def targets(args) -> None:
    import onnxruntime as ort
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    base = load_program(default_checkpoint())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions, infos, programs = {}, {}, {}
        for name, spec in TARGET_VARIANTS.items():
            programs[name] = optimize(base, [make_pass(*spec)], samples=2, seq_len=128).program
            for target in ("standard", "ort"):
                path = Path(tmp) / f"{name}-{target}.onnx"
                infos[name, target] = export_program(programs[name], path, target=target)
                sessions[name, target] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for seq in (128, 512):
            feeds = {key: {n: t.numpy() for n, t in _inputs(programs[key[0]], seq).items()} for key in sessions}
            # every variant and target in turn within each repeat, so that a busy machine slows them alike
            ms = dict(zip(sessions, _interleaved_ms([lambda s=s, f=feeds[key]: s.run(None, f)
                                                     for key, s in sessions.items()], args.repeats)))
            for (name, target), t in ms.items():
                rows.append({"variant": name, "target": target, "seq": seq, "batch": 1, "onnxruntime_ms": round(t, 3),
                             "vs_plain_same_target": round(ms["plain", target] / t, 3),
                             "contrib_ops": infos[name, target]["contrib_ops"],
                             "export_max_abs_diff": infos[name, target]["max_abs_diff"]})
                print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "onnx_cpu_targets.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "load_average_1m": os.getloadavg()[0],
                               "torch": torch.__version__, "onnxruntime": ort.__version__, "repeats": args.repeats,
                               "results": rows}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    import onnxruntime as ort
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--targets", action="store_true", help="standard vs ort targets (onnx_cpu_targets.json)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for --targets")
    args = ap.parse_args()
    if args.targets:
        return targets(args)
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
                inputs = _inputs(program, seq)
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
