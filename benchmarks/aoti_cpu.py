"""Eager program vs its AOTInductor package (`rewriter compile`): MiniLM captured (no pass) and with window 128,
batch 1 at 128 and 512 tokens, median of --repeats runs (every variant's eager program and package in turn within each
repeat; `vs_captured_aoti`: the captured program's package time over this one's); every package checked against its
program (1e-4).
Writes benchmarks/results/aoti_cpu.json (or --out).

    python benchmarks/aoti_cpu.py [--repeats N] [--threads N] [--device cpu|cuda] [--out FILE]
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

from rewriter import load_program, make_pass, optimize
from rewriter.compile import check_package, compile_package
from rewriter.load import default_checkpoint

VARIANTS = {"captured": None, "window128": ("window", {"window": 128}),
            "scatterbrain128": ("scatterbrain", {"window": 128, "features": 32}),
            # on request (--variants): the other methods a package holds (lsh is refused by name)
            "linear": ("linear", {"feature_map": "elu"}), "performer32": ("performer", {"features": 32}),
            "blocktopk": ("block-topk", {"density": 0.25}), "strided": ("strided", {"density": 0.25})}
DEFAULT_VARIANTS = ["captured", "window128", "scatterbrain128"]


def _interleaved_ms(fns: list, repeats: int, warm: bool = True) -> list[float]:
    """Median ms of each fn, run in turn within every repeat, so that a busy machine slows them alike (after one
    warm-up call each, unless the caller warmed them)."""
    for fn in fns if warm else ():
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> None:
    from torch._inductor import aoti_load_package
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                    help="captured (no pass) is always timed first: the other packages are compared with its")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aoti_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_program(default_checkpoint())
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for name in dict.fromkeys(["captured", *args.variants]):
            spec = VARIANTS[name]
            program = base if spec is None else optimize(base, [make_pass(*spec)], samples=2, seq_len=128).program
            program = program.to(args.device)
            path = Path(tmp) / f"{name}.aoti.pt2"
            info = compile_package(program, path)
            built[name] = (program, path, info, aoti_load_package(str(path)), program.ep.module())
        for seq in (128, 512):
            inputs = {"input_ids": torch.randint(1000, 2000, (1, seq)),
                      "attention_mask": torch.ones(1, seq, dtype=torch.long)}
            fns, diffs = [], {}
            for name, (program, path, info, package, runner) in built.items():
                feed = {n: inputs.get(n, torch.zeros(1, seq, dtype=torch.long)).to(args.device)
                        for n in program.input_names}
                diffs[name] = check_package(path, program, feed)
                fns += [lambda r=runner, f=feed: (r(**f), sync()), lambda p=package, f=feed: (p(**f), sync())]
            with torch.no_grad():     # every variant's eager program and package in turn, within each repeat
                times = _interleaved_ms(fns, args.repeats)
            base_aoti = times[1]      # the captured program's package (no pass): what a plain compile gives
            for n, name in enumerate(built):
                eager, aoti = times[2 * n], times[2 * n + 1]
                rows.append({"variant": name, "seq": seq, "batch": 1, "eager_ms": round(eager, 3),
                             "aoti_ms": round(aoti, 3), "speedup": round(eager / aoti, 3),
                             "vs_captured_aoti": round(base_aoti / aoti, 3), "compile_s": built[name][2]["seconds"],
                             "max_abs_diff": diffs[name]})
                print(rows[-1], flush=True)
    out = args.out
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                               "load_average_1m": os.getloadavg()[0],
                               "torch": torch.__version__, "repeats": args.repeats, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
