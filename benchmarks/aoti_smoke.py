"""Smallest AOTInductor round trip on this machine's torch (no rewriter): an aten-only MLP with a dynamic batch,
compiled for `--device` and loaded back in this process; prints the max abs difference. Tells a torch/toolchain
problem with AOTInductor itself apart from one in rewriter's lowering (benchmarks/h200_check.sh runs it first)."""
import argparse
import tempfile

import torch

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
args = p.parse_args()
m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(args.device).eval()
x = torch.randn(4, 32, device=args.device)
ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
with tempfile.TemporaryDirectory() as d:
    path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{d}/m.pt2")
    print("compiled", flush=True)
    runner = torch._inductor.aoti_load_package(path)
    print("loaded", flush=True)
    with torch.no_grad():
        print("max abs diff", float((runner(x) - m(x)).abs().max()), flush=True)
