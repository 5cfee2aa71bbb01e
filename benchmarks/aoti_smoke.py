"""Smallest AOTInductor round trip on this machine's torch (no rewriter): an aten-only MLP with a dynamic batch,
compiled for `--device` and loaded back; prints the max abs difference. Tells a torch/toolchain problem with
AOTInductor itself apart from one in rewriter's lowering (benchmarks/h200_check.sh runs it first).

    python benchmarks/aoti_smoke.py --device cuda                    # compile, load, run in this process
    python benchmarks/aoti_smoke.py --device cuda --package m.pt2 --compile-only
    python -X faulthandler benchmarks/aoti_smoke.py --device cuda --package m.pt2 --load-only
The split modes locate a crash (compile, load or run) and keep the package for `unzip` / `ldd`."""
import argparse
import os
import tempfile

import torch

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--package", default=None, help="package path to write (--compile-only) or read (--load-only)")
p.add_argument("--compile-only", action="store_true")
p.add_argument("--load-only", action="store_true")
p.add_argument("--single-threaded", action="store_true", help="aoti_load_package(run_single_threaded=True)")
p.add_argument("--import-codecache", action="store_true",
               help="import torch._inductor.codecache before loading (pytorch/pytorch#173706: a fresh process's load "
                    "fails without it on torch 2.10)")
p.add_argument("--hang-report-s", type=float, default=45,
               help="print every thread's Python stack if loading and running take longer (where a hang sits)")
args = p.parse_args()
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(args.device).eval()
x = torch.randn(4, 32, device=args.device)
with tempfile.TemporaryDirectory() as d:
    path = args.package or os.path.join(d, "m.pt2")
    if not args.load_only:
        ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=path)
        print("compiled", path, os.path.getsize(path), "bytes", flush=True)
    if not args.compile_only:
        kw = {"run_single_threaded": True} if args.single_threaded else {}
        if args.import_codecache:
            import torch._inductor.codecache  # noqa: F401
        import faulthandler
        faulthandler.dump_traceback_later(args.hang_report_s, exit=False)
        runner = torch._inductor.aoti_load_package(path, **kw)
        print("loaded", flush=True)
        with torch.no_grad():
            y = runner(x)
        print("ran", flush=True)
        faulthandler.cancel_dump_traceback_later()
        print("max abs diff", float((y - m(x)).abs().max()), flush=True)
