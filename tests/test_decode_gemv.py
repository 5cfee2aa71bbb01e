"""rewriter::gemv / rewriter::swiglu_gemv (decode/gemv.py): the decode step's matrix-vector products. The Triton
kernels run in the interpreter against the aten references (bit-equal where every sum is exact in fp32, so only the
indexing and the roundings are tested) and against float64 on general data; the ops check their inputs; the kernels
compile for sm_90."""
from __future__ import annotations

import pytest
import torch

from rewriter.decode import gemv as G
from test_decode_attention import _compile_sm90

CONFIG = (16, 32, 4, 1)          # BLOCK_N, BLOCK_K, warps, stages: several row blocks and K steps at these sizes


def _exact(shape, gen, scale=2 ** -3):
    """Small multiples of `scale`: products and sums of a few hundred of them are exact in fp32."""
    return torch.randint(-4, 5, shape, generator=gen).double() * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K", [96, 80])        # K = 80: a partial last K step
def test_gemv_kernel_equals_the_linears(triton_interpreter, dtype, K):
    from rewriter.decode.triton_gemv import gemv_triton
    gen = torch.Generator().manual_seed(K)
    x = _exact((1, 1, K), gen).to(dtype)
    weights = [_exact((n, K), gen).to(dtype) for n in (40, 24, 8)]        # q, k, v: 3, 2 and 1 row blocks
    for ws in (weights, weights[:1]):
        got = gemv_triton(x, ws, CONFIG)
        assert got.shape == (1, 1, sum(w.shape[0] for w in ws)) and got.dtype == dtype
        assert torch.equal(got, G.gemv_reference(x, ws))
    # general data: fp32 accumulation, one rounding, against float64
    x = torch.randn(K, generator=gen, dtype=torch.float64)
    ws = [torch.randn(n, K, generator=gen, dtype=torch.float64) / K ** 0.5 for n in (40, 24, 8)]
    got = gemv_triton(x.to(dtype), [w.to(dtype) for w in ws], CONFIG)
    want = torch.cat([x.to(dtype).double() @ w.to(dtype).double().T for w in ws], -1)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K", [64, 72])
def test_swiglu_gemv_kernel_rounds_as_silu_mul(triton_interpreter, dtype, K):
    from rewriter.decode.triton_gemv import swiglu_gemv_triton
    gen = torch.Generator().manual_seed(K)
    x = _exact((1, K), gen).to(dtype)
    wg, wu = (_exact((56, K), gen, 2 ** -4).to(dtype) for _ in range(2))
    got = swiglu_gemv_triton(x, wg, wu, CONFIG)
    want = G.swiglu_gemv_reference(x, wg, wu)       # gate and up exact: only silu's exp and the roundings differ
    assert got.shape == want.shape and got.dtype == dtype
    diff = (got.double() - want.double()).abs()
    # one unit in the last place (fp32: two, the interpreter's exp against torch's CPU exp shows there unrounded)
    ulp = (2 if dtype == torch.float32 else 1) * torch.finfo(dtype).eps * want.double().abs().clamp(
        min=torch.finfo(dtype).tiny)
    assert bool((diff <= ulp).all()), float((diff / ulp).max())
    if dtype != torch.float32:        # silu rounded to 16 bits hides the exps' last-bit differences almost always
        assert float((got == want).double().mean()) >= 0.98


def test_gemv_kernels_take_one_row(triton_interpreter):
    """Batch-1 decode runs the kernels; x of more rows goes to cuBLAS (the kernels with 4 rows were slower than it on
    every shape, benchmarks/results/gemv_h100.json)."""
    w = torch.randn(8, 16)
    assert G._use_kernel(torch.randn(1, 1, 16), [w])
    assert not G._use_kernel(torch.randn(2, 1, 16), [w]) and not G._use_kernel(torch.randn(0, 1, 16), [w])
    from rewriter.decode.triton_gemv import gemv_triton
    with pytest.raises(ValueError, match="one row"):
        gemv_triton(torch.randn(2, 16), [w])


def test_gemv_ops_check_inputs_and_run_their_references():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 32, generator=gen)
    ws = [torch.randn(n, 32, generator=gen) for n in (16, 8)]
    assert torch.equal(torch.ops.rewriter.gemv(x, ws), torch.cat([x @ w.T for w in ws], -1))
    assert torch.equal(G._gemv_cuda(x, ws), G.gemv_reference(x, ws))           # no kernel for CPU tensors
    wg, wu = torch.randn(2, 24, 32, generator=gen)
    assert torch.equal(torch.ops.rewriter.swiglu_gemv(x, wg, wu),
                       torch.nn.functional.silu(x @ wg.T) * (x @ wu.T))
    with pytest.raises(ValueError, match="weights"):
        torch.ops.rewriter.gemv(x, [torch.randn(16, 31)])
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.rewriter.gemv(x, [ws[0].double()])
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.rewriter.swiglu_gemv(x, wg, wu[:8])
    torch.library.opcheck(torch.ops.rewriter.gemv.default, (x, ws))
    torch.library.opcheck(torch.ops.rewriter.swiglu_gemv.default, (x, wg, wu))


@pytest.mark.parametrize("gdc", [False, True])      # launched plainly, and with PDL (the first weights before the wait)
def test_gemv_kernels_compile_for_sm90(triton_compiler, gdc):
    from rewriter.decode import triton_gemv
    for even_k in (True, False):
        const = dict(BLOCK_N=2, BLOCK_K=1024, EVEN_K=even_k, USE_GDC=gdc)
        _compile_sm90(triton_gemv._gemv_kernel, {"X": "*bf16", "W0": "*bf16", "W1": "*bf16", "W2": "*bf16",
                                                 "Y": "*bf16"}, const, 4)
        _compile_sm90(triton_gemv._swiglu_gemv_kernel, {"X": "*bf16", "WG": "*bf16", "WU": "*bf16", "Y": "*bf16"},
                      dict(const, LIBDEVICE_EXP=True), 4)


def _projection_graph(tail_rows: int):
    """x -> linear q / k / v (the step's captured form) -> cat(k, v) @ P: the absorbed MLA step's latent."""
    g = torch.Generator().manual_seed(3)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk, self.wv = (torch.nn.Parameter(torch.randn(n, 16, generator=g) / 4) for n in (8, 6, 6))
            self.register_buffer("P", torch.randn(2, tail_rows, 5, generator=g))

        def forward(self, x):
            q = torch.nn.functional.linear(x, self.wq)
            k = torch.nn.functional.linear(x, self.wk)
            v = torch.nn.functional.linear(x, self.wv)
            z = torch.cat([k, v], -1) if tail_rows == 12 else v
            return q * 2, z @ self.P[1]

    m = M()
    x = torch.randn(1, 1, 16, generator=g)
    gm = torch.export.export(m, (x,)).module()
    return m, gm, x


def test_join_and_fold_put_the_latent_projection_into_the_gemv():
    """fuse_gemv + join_slices + fold_gemv_matmul: [k | v] @ P becomes one weight (P^T [Wk; Wv]) in the q / k / v
    gemv, the same numbers (float32), no matmul or cat left; v alone (the trailing rows too) folds the same way; k
    alone (v's rows follow it) is left alone."""
    from rewriter.graph import aten, erase_dead, is_call
    m, gm, x = _projection_graph(12)
    want = m(x)
    assert G.fuse_gemv(gm) == 3 and G.join_slices(gm) == 1 and G.fold_gemv_matmul(gm) == 1
    erase_dead(gm)
    gm.recompile()
    got = gm(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(is_call(n, aten.matmul.default) or is_call(n, aten.cat.default) for n in calls)
    (g,) = [n for n in calls if is_call(n, torch.ops.rewriter.gemv.default)]
    assert [tuple(getattr(gm, w.target).shape) for w in g.args[1]] == [(8, 16), (5, 16)]
    # only v in the matmul: still the gemv's trailing rows, so it folds, and q keeps its slice
    m, gm, x = _projection_graph(6)
    want = m(x)
    assert G.fuse_gemv(gm) == 3 and G.join_slices(gm) == 0 and G.fold_gemv_matmul(gm) == 1
    erase_dead(gm)
    gm.recompile()
    for a, b in zip(gm(x), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # k alone is not the tail (v's rows follow it): left as it is
    m, gm, x = _projection_graph(6)
    node = next(n for n in gm.graph.nodes if is_call(n, aten.matmul.default))
    lin = {n.args[1].target: n for n in gm.graph.nodes if is_call(n, aten.linear.default)}
    node.replace_input_with(node.args[0], lin["wk"])
    gm.recompile()
    want = gm(x)
    assert G.fuse_gemv(gm) == 3 and G.fold_gemv_matmul(gm) == 0
    erase_dead(gm)
    gm.recompile()
    for a, b in zip(gm(x), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pdl_only_on_hopper_cuda_outside_tracing(monkeypatch):
    """Programmatic dependent launch: CUDA devices of capability 9+, not while torch.compile traces (its kernel
    wrapper does not pass the launch option on), off with REWRITER_PDL=0; kernels get USE_GDC exactly when it is on."""
    from rewriter.linear.triton import fused
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fused, "_capability", lambda index: 9)
    assert fused.pdl_launch(cuda) == {"USE_GDC": True, "launch_pdl": True}
    assert fused.pdl_launch(torch.device("cpu")) == {"USE_GDC": False}
    monkeypatch.setenv("REWRITER_PDL", "0")
    assert not fused.pdl(cuda)
    monkeypatch.delenv("REWRITER_PDL")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fused.pdl(cuda)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(fused, "_capability", lambda index: 8)           # Ampere: no griddepcontrol
    assert fused.pdl_launch(cuda) == {"USE_GDC": False}
