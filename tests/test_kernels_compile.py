"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU.

The interpreter (the other kernel tests) runs kernels as Python, so it accepts code that the real compiler refuses
(e.g. a variable defined in only one branch of a runtime `if`). triton.compile with an explicit CUDA target runs the
whole front end and back end (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas triton ships) here on the CPU.
"""
from __future__ import annotations

import contextlib
import inspect

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rewriter.attention.triton import block_sparse_attention, favor, linear_attention  # noqa: E402
from rewriter.linear.triton import binary_linear, fused, lowrank_linear  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)

# Each test compiles with TRITON_INTERPRET unset and its own empty triton cache directory (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_compiler")


@contextlib.contextmanager
def compilable(jit_fn):
    """The kernel as a JITFunction, also when the kernel modules were imported under TRITON_INTERPRET=1 (then
    `@triton.jit` made InterpretedFunctions, which triton.compile cannot take): the kernel and the jitted helpers in
    its module are swapped for JITFunctions of the same Python functions while compiling. (The triton_compiler
    fixture already does this for the globals of loaded rewriter modules; this also covers a kernel passed in.)"""
    from triton.runtime.jit import JITFunction
    scope = jit_fn.fn.__globals__
    swapped = {name: obj for name, obj in scope.items() if type(obj).__name__ == "InterpretedFunction"}
    try:
        scope.update({name: JITFunction(obj.fn) for name, obj in swapped.items()})
        yield jit_fn if isinstance(jit_fn, JITFunction) else JITFunction(jit_fn.fn)
    finally:
        scope.update(swapped)


def compile_for_sm90(jit_fn, types: dict[str, str], constexprs: dict, num_warps: int = 4, aligned: bool = False):
    """Arguments not named in `types` or `constexprs` are i32 scalars. aligned: every pointer and integer argument
    carries the 16-divisibility hint that a launch with long, aligned tensors gets (other code paths)."""
    names = list(inspect.signature(jit_fn.fn).parameters)
    unknown = (set(types) | set(constexprs)) - set(names)
    assert not unknown, f"not arguments of {jit_fn.fn.__name__}: {unknown}"
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = None
    if aligned:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if signature[n] != "constexpr" and (signature[n].startswith("*") or signature[n] == "i32")}
    with compilable(jit_fn) as fn:
        src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=SM90, options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), "no machine code produced"
    return compiled


@pytest.mark.parametrize("causal,masked,alibi,softcap,lowrank,scale", [(True, True, True, True, False, "fp32"),
                                                                        (False, False, False, False, True, "fp32"),
                                                                        (True, True, False, True, False, "fp64")])
def test_block_sparse_attention_compiles(causal, masked, alibi, softcap, lowrank, scale):
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "KvIndex": "*i32",
            "KvCount": "*i32", "KeyMask": "*i8", "QPos": "*i64", "KPos": "*i64", "Alibi": "*fp32", "LrNum": "*fp32",
            "LrDen": "*fp32", "LrLog": "*fp32", "qk_scale": scale, "cap_log2": scale}
    compile_for_sm90(block_sparse_attention._block_sparse_fwd, ptrs, dict(
        CAUSAL=causal, HAS_MASK=masked, HAS_POS=False, HAS_ALIBI=alibi, HAS_SOFTCAP=softcap, HAS_LOWRANK=lowrank,
        LOWRANK_GAIN=False,
        WINDOW_LEFT=True,
        WINDOW_RIGHT=not causal, HAS_SINKS=True,
        BLOCK=64, HEAD_D=128, HEAD_DV=128, PAD_D=128, PAD_DV=128, DOT_PRECISION="tf32"))


@pytest.mark.parametrize("mode,normalise", [(0, True), (1, False), (2, False)])
def test_chunked_linear_attention_compiles(mode, normalise):
    compile_for_sm90(linear_attention._chunk_states, {
        "pk_ptr": "*bf16", "v_ptr": "*bf16", "kmask_ptr": "*i8", "s_ptr": "*bf16", "z_ptr": "*fp32",
        "seg_ptr": "*fp32", "segz_ptr": "*fp32"}, dict(
        CHUNK=64, BLOCK_F=64, BLOCK_DV=64, PREFIXES=mode != 1, HAS_KEY_MASK=True, DOT_PRECISION="tf32"),
        aligned=True)
    compile_for_sm90(linear_attention._chunk_output, {
        "pq_ptr": "*bf16", "pk_ptr": "*bf16", "v_ptr": "*bf16", "kmask_ptr": "*i8", "s_ptr": "*bf16", "z_ptr": "*fp32",
        "out_ptr": "*bf16", "num_ptr": "*fp32", "den_ptr": "*fp32"}, dict(
        CHUNK=64, BLOCK_F=128, BLOCK_DV=128, MODE=mode, HAS_KEY_MASK=True, NORMALISE=normalise,
        DOT_PRECISION="tf32"), aligned=True)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_favor_features_compiles(mode):
    compile_for_sm90(favor._favor_features, {
        "x_ptr": "*bf16", "w_ptr": "*fp32", "kmask_ptr": "*i8", "off_ptr": "*fp32", "phi_ptr": "*bf16",
        "rowmax_ptr": "*fp32", "sqrt_scale": "fp32", "norm": "fp32"}, dict(
        BLOCK_L=64, BLOCK_D=128, BLOCK_F=64, MODE=mode, HAS_KEY_MASK=mode > 0, DOT_PRECISION="tf32x3"), aligned=True)


def test_lowrank_linear_compiles():
    ptrs = {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*fp32"}
    compile_for_sm90(lowrank_linear._lowrank_linear_kernel, ptrs, dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=64,
                                                                       BLOCK_N=64))


@pytest.mark.parametrize("name", [n for n in dir(binary_linear) if n.startswith("_binary") and n.endswith("kernel")
                                  and n not in ("_binary_splitk_gemv_kernel", "_binary_lut_gemv_kernel")])
def test_binary_linear_kernels_compile(name):
    kernel = getattr(binary_linear, name)
    names = list(inspect.signature(kernel.fn).parameters)
    types = {n: ("*u8" if "packed" in n else "*bf16") for n in names if n.endswith("_ptr")}
    types.update({n: "*fp32" for n in names if n in ("alpha_ptr", "mu_ptr", "bias_ptr")})
    constexprs = {n: 1 if n.startswith("HAS_") else 16 if n == "BLOCK_M" else 64 for n in names
                  if n.isupper() or n.startswith(("BLOCK_", "HAS_"))}
    compile_for_sm90(kernel, types, constexprs)


@pytest.mark.parametrize("M", sorted(binary_linear.GEMV_DEFAULTS))
def test_binary_splitk_gemv_compiles(M):
    """The split-K GEMV with the per-M defaults the dispatcher launches (int32 word loads, split, bias), aligned."""
    cfg = binary_linear.GEMV_DEFAULTS[M]
    types = {"x_ptr": "*bf16", "w_ptr": "*i32", "alpha_ptr": "*fp32", "mu_ptr": "*fp32", "bias_ptr": "*fp32",
             "y_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
    compile_for_sm90(binary_linear._binary_splitk_gemv_kernel, types, dict(
        HAS_BIAS=True, WORD_LOADS=True, BLOCK_M=M, BLOCK_N=cfg["block_n"], BLOCK_W=cfg["block_w"], SPLIT=True),
        num_warps=cfg["num_warps"], aligned=True)


def test_binary_lut_gemv_compiles():
    """The nibble-table GEMV and its table kernel as launch_binary_lut_gemv launches them (int32 words, split, bias):
    its main loop is SHF, SGXT, LEA, LEA.HI.X, LDG and FADD per 4 weights, 1.68 instructions per weight at block_w
    8 against 2.79 for the split-K GEMV's default (sm_90 SASS, Triton 3.9); untimed on a GPU."""
    types = {"lut_ptr": "*fp32", "w_ptr": "*i32", "alpha_ptr": "*fp32", "mu_ptr": "*fp32", "bias_ptr": "*fp32",
             "y_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
    for block_w in (4, 8):
        compile_for_sm90(binary_linear._binary_lut_gemv_kernel, types,
                         dict(HAS_BIAS=True, BLOCK_N=128, BLOCK_W=block_w, SPLIT=True), aligned=True)
    compile_for_sm90(binary_linear._nibble_lut_kernel, {"x_ptr": "*bf16", "lut_ptr": "*fp32"},
                     dict(BLOCK_G=binary_linear.LUT_GROUPS_PER_PROGRAM), aligned=True)


# scale "fp64": how Inductor launches the kernel inside the window_triton op (torch.compile, AOTI packages); it made
# the accumulator of tl.dot fp64 and the compile failed on the H200 until the kernel cast its scale to fp32
# band False: no band and no sinks, exact attention as the exact_triton op launches it (compiled packages)
@pytest.mark.parametrize("causal,masked,lowrank,heads,scale,band", [(True, False, False, 4, "fp32", True),
                                                                    (False, True, True, 1, "fp32", True),
                                                                    (True, True, False, 4, "fp64", True),
                                                                    (True, True, False, 4, "fp64", False)])
def test_band_attention_compiles(causal, masked, lowrank, heads, scale, band):
    from rewriter.attention.triton import window_attention
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "KeyMask": "*i8",
            "MaskSpan": "*i32", "LrNum": "*fp32", "LrDen": "*fp32", "LrLog": "*fp32", "qk_scale": scale}
    compile_for_sm90(window_attention._band_fwd, ptrs, dict(
        CAUSAL=causal, HAS_MASK=masked, HAS_LOWRANK=lowrank, LOWRANK_GAIN=False, WINDOW_LEFT=band,
        WINDOW_RIGHT=band and not causal, HAS_SINKS=band, BLOCK_M=128, BLOCK_N=64, HEADS=heads,
        HEAD_D=128, HEAD_DV=128, PAD_D=128, PAD_DV=128, DOT_PRECISION="tf32"), num_warps=8, aligned=True)


@pytest.mark.parametrize("x,w", [("bf16", "bf16"), ("fp32", "fp32")])
def test_fused_kernels_compile(x, w):
    """rms_norm at the 1.1B Llama's row width (2048: two rows of a block, 8 warps) and silu_mul, as launched; bf16
    takes the bit-level rounding branch of _rounded."""
    for res in (False, True):     # with the residual add (the decode step's add_rms_norm)
        compile_for_sm90(fused._rms_norm_kernel, {"x_ptr": f"*{x}", "w_ptr": f"*{w}", "y_ptr": f"*{x}", "eps": "fp32",
                                                  "res_ptr": f"*{x}", "sum_ptr": f"*{x}"},
                         dict(BLOCK_M=2, BLOCK_H=2048, HAS_RES=res, USE_GDC=res), num_warps=8, aligned=True)
    compile_for_sm90(fused._silu_mul_kernel, {"gate_ptr": f"*{x}", "up_ptr": f"*{w}", "y_ptr": f"*{x}"},
                     dict(BLOCK=2048, LIBDEVICE_EXP=True), num_warps=8, aligned=True)


def test_kernel_resources_profile_reads_the_cubin():
    """benchmarks/kernel_resources.py: registers and spills parsed from cuobjdump, occupancy from its sm_90 model
    (the decode kernel at the 1.1B Llama shape: register-limited, no spills, mma.sync and cp.async in its SASS)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import kernel_resources as kr
    from rewriter.decode import triton_decode
    rec = kr.profile("decode split-K", triton_decode._decode_split, {
        "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Mask": "*i8", "QX": "*bf16", "KX": "*bf16", "XStart": "*i64",
        "Part": "*fp32", "PartLse": "*fp32", "qk_scale": "fp32"}, dict(
        HAS_EXTRA=False, SHARED_KV=False, BLOCK_H=16, BLOCK_N=64, HEAD_D=64, HEAD_DV=64, HEAD_DX=16, PAD_D=64,
        PAD_DV=64, PAD_DX=16, DOT_PRECISION="tf32", TRANSPOSED=False, USE_GDC=True), 4, 2, "test")
    assert 32 <= rec["registers_per_thread"] <= 255 and rec["spill_bytes_per_thread"] == 0
    by_regs = 65536 // (-(-rec["registers_per_thread"] * 32 // 256) * 256) // 4
    by_smem = 228 * 1024 // (rec["shared_bytes"] + 1024)
    assert rec["programs_per_sm"] == min(by_regs, by_smem, 16) and rec["warps_per_sm"] == 4 * rec["programs_per_sm"]
    assert rec["sass"]["HMMA"] > 0 and rec["sass"]["LDGSTS"] > 0 and rec["sass"]["HGMMA"] == 0
    # its slot loop: the one loop of more than 64 instructions
    assert rec["main_loop_instructions"] > 64 and rec["main_loop_instructions"] in rec["loop_instructions"]
    sass = "\n".join(f"        /*{a:04x}*/    {op} ;" for a, op in [
        (0x00, "MOV R1, c[0x0][0x28]"), (0x10, "IADD3 R2, R2, 0x1, RZ"), (0x20, "FADD R3, R3, R4"),
        (0x30, "ISETP.GE.AND P0, PT, R2, 0x8, PT"), (0x40, "@!P0 BRA 0x10"), (0x50, "BRA 0x60"), (0x60, "EXIT")])
    assert kr.loop_sizes(sass) == [4]      # 0x10..0x40; the forward branch is no loop
