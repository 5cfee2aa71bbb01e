"""Static profile of every Triton kernel at its default launch, compiled for sm_90 (H100 / H200) on the CPU: registers
per thread, local-memory spills, shared memory per program, the occupancy those allow (programs and warps per SM),
and what the SASS uses (wgmma = HGMMA, cp.async = LDGSTS, TMA = UTMALDG). The occupancy half of issue 19's "profile"
column, next to the measured bandwidth / FLOP fractions of the H200 runs.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources_sm90.json

Occupancy model (sm_90): 65536 registers per SM allocated per warp in units of 256, 228 KiB of shared memory per SM
(1 KiB reserved per program), at most 64 warps and 32 programs per SM.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rewriter.attention.triton import block_sparse_attention, favor, linear_attention, window_attention  # noqa: E402
from rewriter.decode import triton_decode  # noqa: E402
from rewriter.linear.triton import binary_linear  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
REGS_PER_SM, SMEM_PER_SM, MAX_WARPS, MAX_PROGRAMS = 65536, 228 * 1024, 64, 32
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int):
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n] != "constexpr" and (signature[n].startswith("*") or signature[n] == "i32")}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})


def loop_sizes(sass: str) -> list[int]:
    """Instructions in each loop of the SASS (a backward branch's body), in code order."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4,})\*/", ln).group(1), 16) for ln in lines]
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bBRA\b[^;]*?(0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i]:
            loops.append((int(m.group(1), 16), sum(int(m.group(1), 16) <= a <= addr[i] for a in addr)))
    return [n for _, n in sorted(loops)]


def profile(name: str, fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, launch: str,
            weights_per_iteration: int | None = None) -> dict:
    """weights_per_iteration: packed weights the main loop consumes per iteration of a thread (GEMVs), for
    `main_loop_instructions_per_weight` (per weight and row of x)."""
    compiled = compile_sm90(fn, types, constexprs, num_warps, num_stages)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    shared = compiled.metadata.shared
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM // (shared + 1024)
    programs = min(by_regs, by_smem, MAX_WARPS // num_warps, MAX_PROGRAMS)
    limiter = min((("registers", by_regs), ("shared memory", by_smem), ("warps", MAX_WARPS // num_warps)),
                  key=lambda x: x[1])[0]
    rec = {"kernel": name, "launch": launch, "num_warps": num_warps, "num_stages": num_stages,
           "registers_per_thread": regs, "spill_bytes_per_thread": local, "shared_bytes": shared,
           "programs_per_sm": programs, "warps_per_sm": programs * num_warps,
           "occupancy": programs * num_warps / MAX_WARPS, "limited_by": limiter,
           "sass": {op: sass.count(op) for op in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "STG")},
           "loop_instructions": loop_sizes(sass)}
    # the main loop: the first of more than 64 instructions in code order (the split-K GEMV's unmasked K loop comes
    # before its masked tail loop)
    rec["main_loop_instructions"] = next((n for n in rec["loop_instructions"] if n > 64), 0)
    if weights_per_iteration:
        rec["main_loop_instructions_per_weight"] = round(rec["main_loop_instructions"] / weights_per_iteration, 3)
    print(json.dumps(rec), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    records = []
    band_cfg = window_attention.CONFIGS[128]
    band_types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "KeyMask": "*i8",
                  "LrNum": "*fp32", "LrDen": "*fp32", "LrLog": "*fp32", "qk_scale": "fp32"}
    for heads, lowrank in ((1, False), (4, False), (1, True)):
        records.append(profile("band (window)", window_attention._band_fwd, band_types, dict(
            CAUSAL=True, HAS_MASK=False, HAS_LOWRANK=lowrank, LOWRANK_GAIN=False, WINDOW_LEFT=True,
            WINDOW_RIGHT=False, HAS_SINKS=True, BLOCK_M=band_cfg[0], BLOCK_N=band_cfg[1], HEADS=heads, HEAD_D=128,
            HEAD_DV=128, PAD_D=128, PAD_DV=128, DOT_PRECISION="tf32"), band_cfg[2], band_cfg[3],
            f"D=128 causal, {heads} query head(s) per program" + (", low-rank epilogue (Scatterbrain)" if lowrank
                                                                   else "")))
    records.append(profile("block-sparse", block_sparse_attention._block_sparse_fwd, {
        "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "KvIndex": "*i32",
        "KvCount": "*i32", "KeyMask": "*i8", "QPos": "*i64", "KPos": "*i64", "Alibi": "*fp32", "LrNum": "*fp32",
        "LrDen": "*fp32", "LrLog": "*fp32", "qk_scale": "fp32", "cap_log2": "fp32"}, dict(
        CAUSAL=True, HAS_MASK=False, HAS_POS=False, HAS_ALIBI=False, HAS_SOFTCAP=False, HAS_LOWRANK=False,
        LOWRANK_GAIN=False, WINDOW_LEFT=True, WINDOW_RIGHT=False, HAS_SINKS=True, BLOCK=64, HEAD_D=128,
        HEAD_DV=128, PAD_D=128, PAD_DV=128, DOT_PRECISION="tf32"), 4, 2, "block 64, D=128 causal"))
    records.append(profile("linear: prefix states", linear_attention._chunk_states, {
        "pk_ptr": "*bf16", "v_ptr": "*bf16", "kmask_ptr": "*i8", "s_ptr": "*bf16", "z_ptr": "*fp32",
        "seg_ptr": "*fp32", "segz_ptr": "*fp32"}, dict(
        CHUNK=64, BLOCK_F=64, BLOCK_DV=64, PREFIXES=True, HAS_KEY_MASK=False, DOT_PRECISION="tf32"), 4, 3,
        "chunk 64, 64 x 64 state tile"))
    records.append(profile("linear: chunk outputs", linear_attention._chunk_output, {
        "pq_ptr": "*bf16", "pk_ptr": "*bf16", "v_ptr": "*bf16", "kmask_ptr": "*i8", "s_ptr": "*bf16", "z_ptr": "*fp32",
        "out_ptr": "*bf16", "num_ptr": "*fp32", "den_ptr": "*fp32"}, dict(
        CHUNK=64, BLOCK_F=128, BLOCK_DV=128, MODE=0, HAS_KEY_MASK=False, NORMALISE=True, DOT_PRECISION="tf32"),
        4, 3, "chunk 64, F = Dv = 128, causal, normalised"))
    records.append(profile("FAVOR+ features", favor._favor_features, {
        "x_ptr": "*bf16", "w_ptr": "*fp32", "kmask_ptr": "*i8", "off_ptr": "*fp32", "phi_ptr": "*bf16",
        "rowmax_ptr": "*fp32", "sqrt_scale": "fp32", "norm": "fp32"}, dict(
        BLOCK_L=64, BLOCK_D=128, BLOCK_F=64, MODE=1, HAS_KEY_MASK=False, DOT_PRECISION="tf32"), 4, 3,
        "D=128, 64 features"))
    gemv_types = {"x_ptr": "*bf16", "w_ptr": "*i32", "alpha_ptr": "*fp32", "mu_ptr": "*fp32", "bias_ptr": "*fp32",
                  "y_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
    for M, cfg in binary_linear.GEMV_DEFAULTS.items():
        records.append(profile("binary split-K GEMV", binary_linear._binary_splitk_gemv_kernel, gemv_types, dict(
            HAS_BIAS=True, WORD_LOADS=True, BLOCK_M=M, BLOCK_N=cfg["block_n"], BLOCK_W=cfg["block_w"], SPLIT=True),
            cfg["num_warps"], cfg["num_stages"], f"M <= {M}",
            M * cfg["block_n"] * cfg["block_w"] * 32 // (32 * cfg["num_warps"])))
    for block_w in (4, 8):          # the nibble-table GEMV (M = 1, launch_binary_lut_gemv; not a default, untimed)
        records.append(profile("binary nibble-table GEMV", binary_linear._binary_lut_gemv_kernel, {
            **gemv_types, "lut_ptr": "*fp32"}, dict(HAS_BIAS=True, BLOCK_N=128, BLOCK_W=block_w, SPLIT=True), 4, 3,
            f"M = 1, 128 rows x {block_w} words", 128 * block_w * 32 // 128))
    tile_types = {"x_ptr": "*bf16", "packed_ptr": "*u8", "alpha_ptr": "*fp32", "mu_ptr": "*fp32",
                  "bias_ptr": "*fp32", "y_ptr": "*bf16"}
    for tiling in ("decode", "prefill"):
        kernel, bm, bn, bkb, warps, stages = binary_linear._TILINGS[tiling]
        records.append(profile(f"binary {kernel} ({tiling})", binary_linear._KERNELS[kernel], tile_types, dict(
            HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KB=bkb), warps, stages, f"{bm} x {bn} x {bkb * 8}"))
    dec_types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Mask": "*i8", "QX": "*bf16", "KX": "*bf16",
                 "XStart": "*i64", "Part": "*fp32", "PartLse": "*fp32", "qk_scale": "fp32"}
    for label, d, dx, shared, G in (("D=64, 4 query heads per KV head (1.1B Llama)", 64, 16, False, 4),
                                    ("MLA latent 448 + RoPE'd 64, 32 query heads", 448, 64, True, 32)):
        pad = triton_decode._pad(d)
        cfg = triton_decode.tiles(G, pad, pad)      # the launch decode_attention_triton uses for this shape
        records.append(profile("decode split-K", triton_decode._decode_split, dec_types, dict(
            HAS_EXTRA=dx > 16, SHARED_KV=shared, BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"], HEAD_D=d,
            HEAD_DV=d, HEAD_DX=dx, PAD_D=pad, PAD_DV=pad, PAD_DX=dx, DOT_PRECISION="tf32",
            TRANSPOSED=cfg["transposed"], USE_GDC=True),
            cfg["num_warps"], cfg["num_stages"], label + (" (transposed tile)" if cfg["transposed"] else "")))
    result = {"target": "sm_90", "triton": triton.__version__, "model": __doc__.split("Occupancy model")[1].strip(),
              "records": records}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
