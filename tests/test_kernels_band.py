"""The band (window) attention kernel (rewriter/attention/triton/window_attention.py) in the Triton interpreter,
against the block-sparse reference on the window op's band layout in float64: every loop of the kernel (sink tiles,
the band's masked edges, the interior without predicate), GQA packs of query heads, padding, rows with no key,
odd lengths and head dims, Lq != Lk, and the low-rank epilogue."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the attention kernels cannot run")

from rewriter.attention.block_sparse import band_layout, block_sparse_attention_reference  # noqa: E402
from rewriter.attention.triton.window_attention import band_attention, heads_per_program  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")
f64 = torch.float64


def qkv(seed, B, H, Hkv, Lq, Lk, D, Dv=None):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    return torch.randn(B, H, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g), \
        torch.randn(B, Hkv, Lk, Dv, generator=g)


def reference(q, k, v, key_mask, causal, left, right, sinks):
    index, count = band_layout(q.shape[2], k.shape[2], 16, left, right, sinks, causal, "cpu")
    return block_sparse_attention_reference(q.to(f64), k.to(f64), v.to(f64), index, count, 16, key_mask, causal,
                                            q.shape[-1] ** -0.5, left, right, sinks)


def dense_lowrank_oracle(q, k, v, causal, left, right, sinks, num, den, log):
    """float64: (sum over the band of e^s v + e^r num) / (sum of e^s + e^r den), r = log per row, or for a (H,)
    gain the row's largest band score + gain; GQA by repeating kv heads."""
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    k, v = (x.to(f64).repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    s = q.to(f64) @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = torch.arange(Lq)[:, None] + Lk - Lq, torch.arange(Lk)[None, :]
    band = torch.ones(Lq, Lk, dtype=torch.bool)
    if left >= 0:
        band &= j >= i - left
    if right >= 0:
        band &= j <= i + right
    allowed = (band | (j < sinks)) & ((j <= i) if causal else True)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1)
    r = (torch.where(torch.isinf(m), 0.0, m) + log.to(f64)[None, :, None]) if log.dim() == 1 else log.to(f64)
    top = torch.maximum(m, r)
    w = torch.exp(s - top[..., None])
    lo = torch.exp(r - top)
    numer = w @ v + lo[..., None] * num.to(f64)
    denom = w.sum(-1) + lo * den.to(f64)
    return numer / denom[..., None], top + torch.log(denom)


def check(out, lse, ref, ref_lse, atol=3e-5):
    torch.testing.assert_close(out.to(f64), ref, atol=atol, rtol=0)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert out[empty].eq(0).all()
    torch.testing.assert_close(lse[~empty].to(f64), ref_lse[~empty].to(f64), atol=atol, rtol=0)


CASES = [  # causal, left, right, sinks, Lq, Lk
    (True, 20, 0, 3, 70, 70),        # band edges + interior + sink tile
    (True, 20, 0, 0, 45, 83),        # Lq < Lk (decode-like suffix queries), no sinks
    (False, 12, 7, 5, 61, 61),       # bidirectional band
    (False, -1, -1, 0, 33, 50),      # no band: every key (interior tiles only, Lk tail masked)
    (True, -1, 0, 0, 50, 50),        # plain causal
    (True, 2, 0, 40, 64, 64),        # sinks wider than a tile, narrow band
    (True, 50, 0, 3, 130, 130),      # a window wider than a program's rows: interior tiles inside the band
    (False, 40, 30, 2, 100, 100),
]


@pytest.mark.parametrize("causal,left,right,sinks,Lq,Lk", CASES)
@pytest.mark.parametrize("config,heads", [((16, 16, 4, 1), 1), ((32, 16, 4, 1), 2), ((64, 32, 4, 1), 4)])
def test_band_matches_block_sparse_reference(causal, left, right, sinks, Lq, Lk, config, heads):
    B, H, Hkv, D = 2, 4, 1, 24                       # D padded to 32; heads per program 1, 2, 4 of a group of 4
    q, k, v = qkv(0, B, H, Hkv, Lq, Lk, D, Dv=20)
    out, lse = band_attention(q, k, v, None, causal, D ** -0.5, left, right, sinks, config=config, heads=heads)
    check(out, lse, *reference(q, k, v, None, causal, left, right, sinks))


@pytest.mark.parametrize("causal", [True, False])
def test_band_with_padding_and_rows_without_keys(causal):
    B, H, Hkv, L, D = 3, 2, 2, 57, 16
    q, k, v = qkv(1, B, H, Hkv, L, L, D)
    key_mask = torch.rand(B, L, generator=torch.Generator().manual_seed(2)) > 0.3
    key_mask[1] = False                               # batch 1 sees no key at all
    left, right = (9, 0) if causal else (4, 4)
    out, lse = band_attention(q, k, v, key_mask, causal, D ** -0.5, left, right, 2, config=(32, 16, 4, 1))
    ref, ref_lse = reference(q, k, v, key_mask, causal, left, right, 2)
    assert torch.isinf(ref_lse[1]).all()
    check(out, lse, ref, ref_lse)


def run_masks(L):
    """Key masks of 5 batch rows: all real, left padding, right padding, a hole, none real."""
    m = torch.ones(5, L, dtype=torch.bool)
    m[1, :23] = False
    m[2, L - 19:] = False
    m[3, 30:33] = False
    m[4] = False
    return m


def test_mask_span():
    from rewriter.attention.triton.window_attention import mask_span
    L = 90
    assert mask_span(run_masks(L)).tolist() == [[0, 89, 1], [23, 89, 1], [0, 70, 1], [0, 89, 0], [90, -1, 0]]
    assert mask_span(torch.ones(2, 0, dtype=torch.bool)).tolist() == [[0, -1, 1]] * 2   # no key: no tile


@pytest.mark.parametrize("causal,left,right,sinks", [(True, -1, 0, 0), (False, -1, -1, 0), (True, 30, 0, 3),
                                                     (False, 20, 20, 0)])
def test_band_with_runs_of_real_keys(causal, left, right, sinks):
    """Masks whose real keys are one run keep the interior tiles inside the run (the exact_triton op of compiled
    programs always passes a mask): left and right padding, all real, beside a hole and a row with none."""
    L = 90
    q, k, v = qkv(5, 5, 4, 2, L, L, 16)
    mask = run_masks(L)
    out, lse = band_attention(q, k, v, mask, causal, 16 ** -0.5, left, right, sinks, config=(32, 16, 4, 1), heads=2)
    check(out, lse, *reference(q, k, v, mask, causal, left, right, sinks))


@pytest.mark.parametrize("gain", [False, True])
def test_band_lowrank_epilogue(gain):
    B, H, Hkv, L, D = 1, 4, 2, 40, 16
    q, k, v = qkv(3, B, H, Hkv, L, L, D)
    g = torch.Generator().manual_seed(4)
    num, den = torch.randn(B, H, L, D, generator=g), torch.rand(B, H, L, generator=g) + 0.5
    log = torch.randn(H, generator=g) if gain else torch.randn(B, H, L, generator=g)
    out, lse = band_attention(q, k, v, None, True, D ** -0.5, 7, 0, 2, lowrank=(num, den, log),
                              config=(32, 16, 4, 1), heads=2)
    ref, ref_lse = dense_lowrank_oracle(q, k, v, True, 7, 0, 2, num, den, log)
    check(out, lse, ref, ref_lse)


def test_heads_per_program():
    assert heads_per_program(1, 128) == 1 and heads_per_program(4, 128) == 4 and heads_per_program(8, 128) == 4
    assert heads_per_program(6, 128) == 2 and heads_per_program(4, 32) == 2   # >= 16 positions per program
    with pytest.raises(ValueError, match="divide the GQA group"):
        band_attention(*qkv(0, 1, 4, 2, 8, 8, 16), None, True, 0.25, 3, 0, 0, heads=4)


@pytest.mark.parametrize("causal,window,Lq", [(True, 0, 70), (False, 0, 70), (True, 9, 70), (True, 0, 33)])
def test_eager_exact_attention_takes_the_band_kernel_where_sdpa_has_no_flash_path(monkeypatch, causal, window, Lq):
    """The exact op's CUDA body in half precision (fp16 here: the interpreter garbles bf16 tiles; the H100 sweep ran
    bf16): a padded batch, the model's own window, or a causal Lq != Lk runs the band kernel with no band (SDPA would
    need its masked kernels on an L x L mask), equal to the op's SDPA body in float64; an unpadded batch keeps SDPA's
    flash path (no kernel launch)."""
    from rewriter.attention import exact as exact_module
    from rewriter.attention.triton import window_attention
    from rewriter.attention.triton.registry import CUDA_KERNELS
    calls = []
    real = window_attention.band_attention
    monkeypatch.setattr(window_attention, "band_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    body = CUDA_KERNELS["rewriter::exact_attention"]
    q, k, v = (x.to(torch.float16) for x in qkv(5, 3, 4, 2, Lq, 70, 16))
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1, :20] = False                                   # left padding
    mask[2, 50:] = False                                   # right padding
    got = body(q, k, v, mask, causal, 0.25, window)
    want = exact_module.exact_attention_impl(q.to(f64), k.to(f64), v.to(f64), mask, causal, 0.25, window)
    assert len(calls) == 1 and (calls[0]["config"] is None) == (window > 0)
    assert (got.to(f64) - want).abs().max() < 4e-3
    calls.clear()
    full = torch.ones(3, 70, dtype=torch.bool)
    got = body(q, k, v, full, causal, 0.25, window)
    assert len(calls) == (0 if window == 0 and (not causal or Lq == 70) else 1)
    want = exact_module.exact_attention_impl(q.to(f64), k.to(f64), v.to(f64), full, causal, 0.25, window)
    assert (got.to(f64) - want).abs().max() < 4e-3
