"""Triton attention kernels, run by the Triton interpreter on CPU tensors (small shapes).

Every test runs under the triton_interpreter fixture (tests/conftest.py): the interpreter is switched on per test,
never at import, so it cannot leak into the real compiles of tests/test_kernels_compile.py."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the attention kernels cannot run")

from rewriter.attention.triton import triton_available, use_reference  # noqa: E402
from rewriter.attention.block_sparse import band_layout  # noqa: E402
from rewriter.attention.triton.block_sparse_attention import block_sparse_attention  # noqa: E402
from rewriter.attention.triton.linear_attention import chunked_linear_attention  # noqa: E402
from rewriter.attention.triton.registry import (CUDA_KERNELS, linear_attention_cuda, performer_attention_cuda,  # noqa: E402
                                       register_cuda_kernels, scatterbrain_attention_cuda, sparse_attention_core)
from rewriter.attention._contract import window_extents  # noqa: E402
from rewriter.attention.block_sparse import block_sparse_attention_reference, num_blocks  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")

f64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def qkv(seed, B, H, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32):
    g = gen(seed)
    Dv = Dv or D
    return (torch.randn(B, H, Lq, D, generator=g).to(dtype), torch.randn(B, Hkv, Lk, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype))


def random_layout(seed, Bl, Hl, nqb, nkb, K):
    """Ascending distinct key blocks per query block, counts in 0..K (0 = a query block that sees nothing);
    unused slots hold garbage that the kernel must ignore."""
    g = gen(seed)
    index = torch.full((Bl, Hl, nqb, K), 10**6, dtype=torch.int32)
    count = torch.randint(0, K + 1, (Bl, Hl, nqb), generator=g, dtype=torch.int32)
    count[..., 0] = 0
    for b in range(Bl):
        for h in range(Hl):
            for i in range(nqb):
                c = int(count[b, h, i])
                index[b, h, i, :c] = torch.randperm(nkb, generator=g)[:c].sort().values.to(torch.int32)
    return index, count


def assert_matches_reference(q, k, v, index, count, block, atol, **kw):
    out, lse = block_sparse_attention(q, k, v, index, count, block, **kw)
    ref, ref_lse = block_sparse_attention_reference(q.to(f64), k.to(f64), v.to(f64), index, count, block, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.to(f64), ref, atol=atol, rtol=0)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert lse[empty].eq(float("-inf")).all() and out[empty].eq(0).all()
    torch.testing.assert_close(lse[~empty].to(f64), ref_lse[~empty].to(f64), atol=atol, rtol=0)
    return ref, ref_lse


@pytest.mark.parametrize("causal", [True, False])
def test_window_sinks_gqa_padding_odd_lengths(causal):
    B, H, Hkv, Lq, Lk, D, block = 2, 4, 2, 37, 53, 40, 16   # D padded to 64, tails masked, Lq < Lk
    q, k, v = qkv(0, B, H, Hkv, Lq, Lk, D)
    key_mask = torch.rand(B, Lk, generator=gen(1)) > 0.25
    key_mask[1, :] = False                                   # batch 1 sees no key at all
    left, right = window_extents(9, causal)
    index, count = band_layout(Lq, Lk, block, left, right, 3, causal, "cpu")
    ref, ref_lse = assert_matches_reference(q, k, v, index, count, block, 2e-5, key_mask=key_mask, causal=causal,
                                            window_left=left, window_right=right, sinks=3)
    assert torch.isinf(ref_lse[1]).all() and torch.isfinite(ref_lse[0]).any()


def test_window_layout_lists_every_block_the_band_touches():
    """The layout must hold every key the dense band + sinks allow (an oracle built token by token)."""
    Lq, Lk, block, left, right, sinks = 45, 70, 16, 11, 4, 5
    index, count = band_layout(Lq, Lk, block, left, right, sinks, device="cpu")
    for i in range(Lq):
        p = i + Lk - Lq
        needed = {j // block for j in range(Lk) if (p - left <= j <= p + right) or j < sinks}
        listed = set(index[0, 0, i // block, :count[0, 0, i // block]].tolist())
        assert needed <= listed
    for qb in range(index.shape[2]):
        assert (index[0, 0, qb, :count[0, 0, qb]].diff() > 0).all()      # ascending, no block twice


@pytest.mark.parametrize("Bl,Hl", [(1, 1), (2, 1), (1, 4), (2, 4)])
def test_random_layouts_with_broadcast_dims(Bl, Hl):
    B, H, Hkv, Lq, Lk, D, block = 2, 4, 1, 50, 67, 32, 16
    q, k, v = qkv(2, B, H, Hkv, Lq, Lk, D, Dv=24)
    index, count = random_layout(3, Bl, Hl, num_blocks(Lq, block), num_blocks(Lk, block), 3)
    key_mask = torch.rand(B, Lk, generator=gen(4)) > 0.2
    assert_matches_reference(q, k, v, index, count, block, 2e-5, key_mask=key_mask, scale=0.3)


def test_permuted_positions_causal_window():
    """LSH-style: tokens sorted by bucket, the predicate reads their original positions."""
    B, H, Hkv, L, D, block = 1, 2, 2, 48, 32, 16
    q, k, v = qkv(5, B, H, Hkv, L, L, D)
    g = gen(6)
    q_pos = torch.stack([torch.randperm(L, generator=g) for _ in range(B * H)]).view(B, H, L)
    k_pos = torch.stack([torch.randperm(L, generator=g) for _ in range(B * H)]).view(B, H, L)
    nb = num_blocks(L, block)
    index = torch.arange(nb, dtype=torch.int32).expand(1, 1, nb, nb)
    count = torch.full((1, 1, nb), nb, dtype=torch.int32)
    assert_matches_reference(q, k, v, index, count, block, 2e-5, causal=True, window_left=10, window_right=-1,
                             sinks=2, q_pos=q_pos, k_pos=k_pos)


def _window_or_permuted(kw: dict, permuted: bool, B: int, H: int, L: int, block: int, seed: int):
    """The band layout of a 12-token causal window with 2 sinks; or (permuted) every block visited with random
    query / key positions added to kw, so the window is applied from the positions alone."""
    if not permuted:
        return band_layout(L, L, block, 12, 0, 2, True, "cpu")
    g = gen(seed)
    kw["q_pos"] = torch.stack([torch.randperm(L, generator=g) for _ in range(B * H)]).view(B, H, L)
    kw["k_pos"] = torch.stack([torch.randperm(L, generator=g) for _ in range(B * H)]).view(B, H, L)
    nb = num_blocks(L, block)
    return (torch.arange(nb, dtype=torch.int32).expand(1, 1, nb, nb),
            torch.full((1, 1, nb), nb, dtype=torch.int32))


@pytest.mark.parametrize("permuted", [False, True])
def test_alibi_bias_matches_reference(permuted):
    """ALiBi slopes (one per query head) add slope_h * (k_pos - q_pos) in the kernel's block loop, by original
    positions when the sequence is permuted; the reference's oracle is checked against float64 in test_semantics."""
    B, H, Hkv, L, D, block = 2, 4, 2, 45, 32, 16
    q, k, v = qkv(8, B, H, Hkv, L, L, D)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :7] = False
    kw = dict(key_mask=key_mask, causal=True, window_left=12, window_right=0, sinks=2, alibi=slopes)
    index, count = _window_or_permuted(kw, permuted, B, H, L, block, seed=9)
    assert_matches_reference(q, k, v, index, count, block, 2e-5, **kw)
    without = block_sparse_attention(q, k, v, index, count, block, **{**kw, "alibi": None})[0]
    assert (without - block_sparse_attention(q, k, v, index, count, block, **kw)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("permuted", [False, True])
def test_softcap_matches_reference(permuted):
    """A logit softcap (cap * tanh(s / cap) of the scaled score, then the ALiBi bias) in the kernel's block loop;
    a cap small enough to change the result. The reference's oracle is checked against float64 in test_semantics."""
    B, H, Hkv, L, D, block = 2, 4, 2, 45, 32, 16
    q, k, v = qkv(11, B, H, Hkv, L, L, D)
    q = q * 3                                                # scores well past the cap
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :7] = False
    kw = dict(key_mask=key_mask, causal=True, window_left=12, window_right=0, sinks=2, softcap=2.5,
              alibi=torch.tensor([0.5, 0.25, 0.125, 0.0625]) if permuted else None)
    index, count = _window_or_permuted(kw, permuted, B, H, L, block, seed=12)
    assert_matches_reference(q, k, v, index, count, block, 2e-5, **kw)
    without = block_sparse_attention(q, k, v, index, count, block, **{**kw, "softcap": 0.0})[0]
    assert (without - block_sparse_attention(q, k, v, index, count, block, **kw)[0]).abs().max() > 1e-2


def test_exact_attention_cuda_softcap_matches_the_op():
    """exact_attention's CUDA implementation: a softcap site runs the block-sparse kernel over every visible block
    (the model's causal window or all keys), against the op (its dense reference on CPU tensors); GQA, padding,
    a length that is no whole number of blocks; without a softcap it is the op's own SDPA body."""
    B, H, Hkv, L, D = 2, 4, 2, 75, 16
    q, k, v = qkv(13, B, H, Hkv, L, L, D)
    q = q * 3
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :9] = False
    fn = CUDA_KERNELS["rewriter::exact_attention"]
    for causal, window, alibi in [(True, 0, None), (True, 20, None), (False, 0, [0.5, 0.25, 0.125, 0.0625])]:
        args = (q, k, v, key_mask, causal, D ** -0.5, window, alibi)
        ref = torch.ops.rewriter.exact_attention(*args, 3.0)
        torch.testing.assert_close(fn(*args, 3.0), ref, atol=2e-5, rtol=0)
        assert (ref - torch.ops.rewriter.exact_attention(*args)).abs().max() > 1e-2     # the cap matters here
        torch.testing.assert_close(fn(*args), torch.ops.rewriter.exact_attention(*args), atol=0, rtol=0)


def test_fp16_block32_matches_reference():
    # fp16, not bf16: the CPU interpreter's bf16 tl.dot returns garbage (triton 3.8); bf16 is checked on the GPU
    # by benchmarks/attention.py
    B, H, Hkv, L, D, block = 1, 2, 1, 70, 64, 32
    q, k, v = qkv(7, B, H, Hkv, L, L, D, dtype=torch.float16)
    left, right = window_extents(20, True)
    index, count = band_layout(L, L, block, left, right, 4, True, "cpu")
    assert_matches_reference(q, k, v, index, count, block, 2e-2, causal=True, window_left=left, window_right=right,
                             sinks=4)


def test_block_sparse_rejects_bad_block():
    q, k, v = qkv(0, 1, 1, 1, 8, 8, 32)
    index, count = band_layout(8, 8, 16, 3, 0, 0, device="cpu")
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, v, index, count, 24)


def dense_linear_oracle(phi_q, phi_k, v, causal, key_mask):
    """float64 definition: num_i = sum_{allowed j} (phi_q_i . phi_k_j) v_j; den_i the same without v_j."""
    H, Hkv, Lq, Lk = phi_q.shape[1], phi_k.shape[1], phi_q.shape[2], phi_k.shape[2]
    pk = phi_k.to(f64).repeat_interleave(H // Hkv, dim=1)
    vv = v.to(f64).repeat_interleave(H // Hkv, dim=1)
    w = phi_q.to(f64) @ pk.transpose(-1, -2)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    w = w * allowed
    return w @ vv, w.sum(-1)


@pytest.mark.parametrize("causal,Lq,Lk,F,Dv,chunk,masked", [
    (True, 45, 45, 24, 20, 16, True),     # F fits one block: programs store directly
    (True, 37, 70, 160, 20, 16, False),   # Lk > Lq: earlier keys seed the state; F split in two blocks (atomics)
    (False, 30, 53, 40, 40, 32, True),    # Dv split over two programs
])
def test_chunked_linear_matches_dense_oracle(causal, Lq, Lk, F, Dv, chunk, masked):
    B, H, Hkv = 2, 4, 2
    g = gen(8)
    phi_q, phi_k = torch.rand(B, H, Lq, F, generator=g), torch.rand(B, Hkv, Lk, F, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    key_mask = (torch.rand(B, Lk, generator=g) > 0.3) if masked else None
    num, den = chunked_linear_attention(phi_q, phi_k, v, causal, key_mask, chunk=chunk, segments=2)
    ref_num, ref_den = dense_linear_oracle(phi_q, phi_k, v, causal, key_mask)
    assert num.dtype == den.dtype == torch.float32
    torch.testing.assert_close(num.to(f64), ref_num, atol=1e-4 * ref_num.abs().max().item(), rtol=0)
    torch.testing.assert_close(den.to(f64), ref_den, atol=1e-5 * ref_den.abs().max().item(), rtol=0)


@pytest.mark.parametrize("causal,Lq,Lk", [(True, 50, 50), (True, 20, 83), (False, 33, 47)])
def test_chunked_linear_normalised_output(causal, Lq, Lk):
    """normalise=True divides in the kernel (0 where a row saw no key: batch row 1 has every key masked) and
    stores the features' dtype; grouped heads (4 query heads on 2 kv heads) read their kv head's states."""
    B, H, Hkv, F, Dv = 2, 4, 2, 24, 40
    g = gen(11)
    phi_q, phi_k = torch.rand(B, H, Lq, F, generator=g), torch.rand(B, Hkv, Lk, F, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    key_mask = torch.rand(B, Lk, generator=g) > 0.3
    key_mask[1] = False
    out = chunked_linear_attention(phi_q, phi_k, v, causal, key_mask, chunk=16, normalise=True)
    ref_num, ref_den = dense_linear_oracle(phi_q, phi_k, v, causal, key_mask)
    ref = torch.where(ref_den[..., None] > 0, ref_num / ref_den.clamp_min(1e-300)[..., None], 0.0)
    assert out.dtype == torch.float32 and out.shape == (B, H, Lq, Dv)
    assert (out[1] == 0).all()
    torch.testing.assert_close(out.to(f64), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("causal,Lq,Lk,left,right,sinks", [
    (True, 70, 70, 20, 0, 5),       # lag 21 is not a multiple of the chunk: thresholds straddle two key chunks
    (True, 29, 90, 16, 0, 0),       # Lk > Lq, no sinks
    (False, 61, 61, 10, 13, 4),     # bidirectional: left and right of the band, minus the sinks
    (False, 40, 75, 3, 40, 0),      # Lq != Lk, a right extent longer than a chunk
])
def test_chunked_linear_outside_window_support(causal, Lq, Lk, left, right, sinks):
    """outside=(left, right, sinks) sums only keys off the window support (Scatterbrain's low-rank part): the
    dense oracle with the band (key-aligned positions) and the sinks removed from the allowed pairs."""
    B, H, Hkv, F, Dv = 2, 4, 2, 24, 20
    g = gen(14)
    phi_q, phi_k = torch.rand(B, H, Lq, F, generator=g), torch.rand(B, Hkv, Lk, F, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    key_mask = torch.rand(B, Lk, generator=g) > 0.2
    # 3 segments: the state walk restarts per segment, its carry comes from the segments' running sum
    num, den = chunked_linear_attention(phi_q, phi_k, v, causal, key_mask, chunk=16, outside=(left, right, sinks),
                                        segments=3)
    p = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    off_band = ((j < p - left) | (j > p + right)) & (j >= sinks)
    w = (phi_q.to(f64) @ phi_k.to(f64).repeat_interleave(H // Hkv, 1).transpose(-1, -2))
    allowed = off_band[None, None] & key_mask[:, None, None, :]
    if causal:
        allowed = allowed & (j <= p)[None, None]
    w = w * allowed
    ref_num, ref_den = w @ v.to(f64).repeat_interleave(H // Hkv, 1), w.sum(-1)
    torch.testing.assert_close(num.to(f64), ref_num, atol=1e-4 * ref_num.abs().max().item(), rtol=0)
    torch.testing.assert_close(den.to(f64), ref_den, atol=1e-5 * ref_den.abs().max().item(), rtol=0)


@pytest.mark.parametrize("causal,normalise", [(True, True), (False, False)])
def test_chunked_linear_wider_than_the_kernel_runs_in_feature_slices(causal, normalise):
    """More features than one kernel call holds (taylor2 has 1 + D + D^2): slices of MAX_FEATURES, summed."""
    from rewriter.attention.triton.linear_attention import MAX_FEATURES
    B, H, Hkv, Lq, Lk, F, Dv = 1, 2, 1, 20, 20, MAX_FEATURES + 40, 8
    g = gen(16)
    phi_q, phi_k = torch.rand(B, H, Lq, F, generator=g), torch.rand(B, Hkv, Lk, F, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    key_mask = torch.rand(B, Lk, generator=g) > 0.2
    got = chunked_linear_attention(phi_q, phi_k, v, causal, key_mask, chunk=16, normalise=normalise)
    ref_num, ref_den = dense_linear_oracle(phi_q, phi_k, v, causal, key_mask)
    if normalise:
        ref = torch.where(ref_den[..., None] > 0, ref_num / ref_den.clamp_min(1e-300)[..., None], 0.0)
        torch.testing.assert_close(got.to(f64), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    else:
        torch.testing.assert_close(got[0].to(f64), ref_num, atol=1e-4 * ref_num.abs().max().item(), rtol=0)
        torch.testing.assert_close(got[1].to(f64), ref_den, atol=1e-5 * ref_den.abs().max().item(), rtol=0)


def test_chunked_linear_rejects_bad_chunk():
    x = torch.rand(1, 1, 8, 4)
    with pytest.raises(ValueError, match="chunk"):
        chunked_linear_attention(x, x, x, True, chunk=24)


def test_registered_functions_match_reference_ops():
    B, H, Hkv, L, D = 1, 4, 2, 40, 32
    q, k, v = qkv(9, B, H, Hkv, L, L, D)
    key_mask = torch.rand(B, L, generator=gen(10)) > 0.2
    # On CPU tensors the ops dispatch to their references; the CUDA functions run the kernels.
    ref = torch.ops.rewriter.performer(q, k, v, key_mask, True, D ** -0.5, 48, 3)
    torch.testing.assert_close(performer_attention_cuda(q, k, v, key_mask, True, D ** -0.5, 48, 3), ref,
                               atol=1e-5, rtol=1e-4)
    for causal, window, sinks in [(False, 0, 0), (False, 8, 2), (True, 8, 2), (True, 0, 3)]:
        ref = torch.ops.rewriter.linear(q, k, v, key_mask, causal, D ** -0.5, "elu", window, sinks)
        got = linear_attention_cuda(q, k, v, key_mask, causal, D ** -0.5, "elu", window, sinks)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # learned maps (hedgehog), pure and LoLCATs' hybrid with its per-head gain
    from rewriter.attention.triton.hedgehog import hedgehog_attention_cuda
    g = gen(15)
    maps = [torch.randn(H, 8, D, generator=g) * 0.3, torch.randn(H, 8, generator=g) * 0.1,
            torch.randn(Hkv, 8, D, generator=g) * 0.3, torch.randn(Hkv, 8, generator=g) * 0.1,
            torch.randn(H, generator=g)]
    for causal, window, sinks in [(True, 0, 0), (True, 8, 2), (False, 9, 0)]:
        ref = torch.ops.rewriter.hedgehog(q, k, v, key_mask, causal, D ** -0.5, *maps, window, sinks)
        got = hedgehog_attention_cuda(q, k, v, key_mask, causal, D ** -0.5, *maps, window, sinks)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    ref = torch.ops.rewriter.scatterbrain(q, k, v, key_mask, True, D ** -0.5, 32, 10, 2, 1)
    got = scatterbrain_attention_cuda(q, k, v, key_mask, True, D ** -0.5, 32, 10, 2, 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    left, right = window_extents(12, True)
    index, count = band_layout(L, L, 16, left, right, 2, True, "cpu")
    ref = block_sparse_attention_reference(q, k, v, index, count, 16, key_mask, True, None, left, right, 2)[0]
    got = sparse_attention_core(q, k, v, index, count, 16, key_mask, True, None, left, right, 2)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # the sparse ops' CUDA registrations: the op's own layout with the Triton core, against the op (reference)
    s = D ** -0.5
    for name, args in [("window", (12, 2, 16)), ("block_topk", (0.5, 16)), ("strided", (2, 1, 1, 16))]:
        ref = getattr(torch.ops.rewriter, name)(q, k, v, key_mask, True, s, *args)
        got = CUDA_KERNELS[f"rewriter::{name}"](q, k, v, key_mask, True, s, *args)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_binary_linear_cuda_impl_takes_float64_through_the_reference():
    """Triton's dots have no float64: the CUDA implementation computes an fp64 input with the reference (the GPU
    benchmark's oracle crashed in the Triton kernel before); fp32 goes through the kernel, same numbers."""
    from rewriter.linear.binary import binarize_weight, binary_linear_reference
    W = torch.randn(24, 40, generator=gen(31))
    b = binarize_weight(W)
    x = torch.randn(3, 40, generator=gen(32), dtype=f64)
    args = (b["packed"], b["alpha"], b["mu"], None, 40)
    got = CUDA_KERNELS["rewriter::binary_linear"](x, *args)
    assert got.dtype == f64
    torch.testing.assert_close(got, binary_linear_reference(x, *args), rtol=0, atol=0)
    torch.testing.assert_close(CUDA_KERNELS["rewriter::binary_linear"](x.float(), *args), got.float(),
                               atol=1e-4, rtol=1e-4)


def test_full_mask_check_is_remembered_per_tensor(monkeypatch):
    """_drop_full_mask drops an all-real mask, keeps a padded one, and checks a given tensor once (until it is
    written to): counted through Tensor.all."""
    from rewriter.attention.triton import registry
    calls = []
    real_all = torch.Tensor.all
    monkeypatch.setattr(torch.Tensor, "all", lambda self, *a, **k: calls.append(1) or real_all(self, *a, **k))
    mask = torch.ones(2, 9, dtype=torch.bool)
    assert registry._drop_full_mask(mask) is None and registry._drop_full_mask(mask) is None
    assert len(calls) == 1
    mask[1, 3] = False                                 # in-place write: new version, checked again
    assert registry._drop_full_mask(mask) is mask and len(calls) == 2
    other = torch.ones(2, 9, dtype=torch.bool)
    assert registry._drop_full_mask(other) is None and len(calls) == 3
    assert registry._drop_full_mask(None) is None


def test_band_layout_is_cached_per_shape_and_is_the_window_layout():
    """One band layout: computed once per shape (CPU, no device sync), equal to a fresh computation, and the window
    op's layout is it at window_extents."""
    from rewriter.attention import block_sparse as bs
    from rewriter.attention import sparse as sa
    a = sa.window_layout(70, 70, 16, 20, 3, True)
    assert all(x is y for x, y in zip(a, sa.window_layout(70, 70, 16, 20, 3, True)))
    assert all(x is y for x, y in zip(a, bs.band_layout(70, 70, 16, *window_extents(20, True), 3, True)))
    for x, y in zip(a, bs._band_layout_cpu(70, 70, 16, *window_extents(20, True), 3, True)):
        assert torch.equal(x, y)
    b = bs.band_layout(50, 70, 16, 20, 0, 3, device="cpu")
    assert all(x is y for x, y in zip(b, bs.band_layout(50, 70, 16, 20, 0, 3, False, torch.device("cpu"))))
    assert sa.window_layout(71, 71, 16, 20, 3, True)[0] is not a[0]


def test_registration_switches(monkeypatch):
    assert triton_available()
    monkeypatch.setenv("REWRITER_ATTENTION_REFERENCE", "1")
    assert use_reference() and register_cuda_kernels() == []
    monkeypatch.delenv("REWRITER_ATTENTION_REFERENCE")
    assert not use_reference()
    names = ["rewriter::performer", "rewriter::linear", "rewriter::scatterbrain", "rewriter::hedgehog",
             "rewriter::window", "rewriter::block_topk", "rewriter::strided", "rewriter::exact_attention",
             "rewriter::binary_linear", "rewriter::rms_norm", "rewriter::silu_mul"]
    first = register_cuda_kernels()
    assert sorted(first) == sorted(names)
    assert register_cuda_kernels() == first          # idempotent


@pytest.mark.parametrize("causal,Lq,Lk,window,sinks,masked", [(True, 45, 60, 9, 3, True),
                                                              (False, 40, 40, 12, 0, False),
                                                              # windows wide enough for interior blocks
                                                              (True, 100, 100, 40, 4, False),
                                                              (False, 97, 97, 50, 16, False)])
def test_scatterbrain_matches_dense_oracle(causal, Lq, Lk, window, sinks, masked):
    """w_ij = exp(scale q.k) on the band + sinks, true performer features phi.phi elsewhere; float64, dense."""
    from rewriter.attention.triton.scatterbrain import scatterbrain_attention_triton
    from rewriter.attention.feature_map import _performer_features
    B, H, Hkv, D = 2, 4, 2, 32
    scale = D ** -0.5
    q, k, v = qkv(11, B, H, Hkv, Lq, Lk, D)
    key_mask = (torch.rand(B, Lk, generator=gen(12)) > 0.25) if masked else None
    phi_q, phi_k, log_q, log_k = _performer_features(q, k, key_mask, scale, 24, 5)
    out = scatterbrain_attention_triton(q, k, v, key_mask, causal, scale, phi_q, phi_k, window, sinks,
                                        log_phi_q=log_q, log_phi_k=log_k, block=16)

    group = H // Hkv
    kk, vv = k.to(f64).repeat_interleave(group, 1), v.to(f64).repeat_interleave(group, 1)
    true_q = phi_q.to(f64) * log_q.to(f64).exp()[..., None]
    true_k = (phi_k.to(f64) * log_k.to(f64).exp()[:, :, None, None]).repeat_interleave(group, 1)
    i = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    left, right = window_extents(window, causal)
    support = ((j >= i - left) & (j <= i + right)) | (j < sinks)
    allowed = (j <= i) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    allowed = allowed[None, None] & (key_mask[:, None, None, :] if masked else True)
    w = torch.where(support, (q.to(f64) @ kk.transpose(-1, -2) * scale).exp(), true_q @ true_k.transpose(-1, -2))
    w = w * allowed
    ref = (w @ vv) / w.sum(-1, keepdim=True)
    torch.testing.assert_close(out.to(f64), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("F,masked", [(48, True), (20, False)])
def test_favor_feature_kernel_matches_feature_map(F, masked):
    """The FAVOR+ feature kernel against feature_map("performer") in float64: phi_q / phi_k in the true scale
    (phi * exp(offset)), the query offsets row maxima, the key offset one per head over real keys, padding keys 0."""
    from rewriter.attention.feature_map import feature_map, performer_projection
    from rewriter.attention.triton.favor import favor_features
    B, H, Hkv, Lq, Lk, D = 2, 4, 2, 37, 70, 24
    q, k, _ = qkv(12, B, H, Hkv, Lq, Lk, D)
    key_mask = (torch.rand(B, Lk, generator=gen(13)) > 0.3) if masked else None
    w = performer_projection(F, D, 5)
    phi_q, phi_k, log_q, log_k = favor_features(q, k, key_mask, D ** -0.5, w, torch.float32, block_l=16)
    ref_q, ref_log_q = feature_map("performer", q.to(f64), D ** -0.5, role="query", projection=w)
    ref_k, ref_log_k = feature_map("performer", k.to(f64), D ** -0.5, role="key", projection=w, key_mask=key_mask)
    torch.testing.assert_close(log_q.to(f64), ref_log_q, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(log_k.to(f64), ref_log_k, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(phi_q.to(f64), ref_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(phi_k.to(f64), ref_k, atol=1e-5, rtol=1e-4)
    if masked:
        assert (phi_k.permute(0, 2, 1, 3)[~key_mask] == 0).all()
