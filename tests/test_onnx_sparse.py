"""ONNX translations of the routed sparse attention ops (block-topk, strided, LSH) against the PyTorch ops: exported
with dynamic batch and sequence, run in onnxruntime at two odd lengths other than the export length, causal and
bidirectional, with padding and GQA. Inputs are random normals, so pooled block scores have no ties (TopK and
torch.sort may order tied blocks differently) and LSH hash products are not within rounding of 0 (such a sign
may hash differently in ONNX)."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import rewriter  # noqa: E402,F401  (registers the ops)
from rewriter.backends.onnx import TRANSLATIONS, export_onnx, validate_onnx  # noqa: E402
from rewriter.attention import _contract as _common  # noqa: E402
from rewriter.attention.block_sparse import num_blocks  # noqa: E402
from rewriter.attention.sparse import _lsh_rounds, block_topk_layout, strided_layout  # noqa: E402
from test_onnx_backend import OpModule, _qkv  # noqa: E402  (shared export helpers)


def export_and_check(tmp_path, op, args, export_len, check_lens):
    """Export OpModule(op, *args) at export_len with dynamic batch/length; the max abs differences to the PyTorch
    op at check_lens (batch 1, then 3)."""
    inputs = _qkv(export_len, 0)
    B, L = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=512)
    dyn = {"q": {0: B, 2: L}, "k": {0: B, 2: L}, "v": {0: B, 2: L}, "key_mask": {0: B, 1: L}}
    ep = torch.export.export(OpModule(op, *args), (), inputs, dynamic_shapes=dyn, strict=False)
    diffs = []

    def validate(path):
        for i, n in enumerate(check_lens):
            x = _qkv(n, i + 1, B=3 if i else 1)
            r = validate_onnx(path, lambda **kw: (op(*kw.values(), *args),), x, atol=1e-4)
            diffs.append(r["outputs"]["out"]["max_abs_diff"])
        return {}

    _, info = export_onnx(ep, tmp_path / "op.onnx", input_names=list(inputs), output_names=["out"],
                          dim_names={"q": {0: "batch", 2: "seq"}}, validate=validate)
    assert info["custom_ops"] == [op._schema.name] and not info["quadratic"]
    return diffs


def _layout_oracle(q, k, v, key_mask, causal, scale, kv_index, kv_count, block):
    """float64 dense masked softmax over the pairs of a block layout (chosen blocks x causal x padding)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    nkb = num_blocks(Lk, block)
    used = torch.arange(kv_index.shape[-1]) < kv_count[..., None]
    blocks = torch.zeros(kv_index.shape[:-1] + (nkb + 1,), dtype=torch.bool)
    blocks.scatter_(-1, torch.where(used, kv_index.long(), torch.full_like(kv_index.long(), nkb)), True)
    pairs = blocks[..., :nkb].repeat_interleave(block, -2)[..., :Lq, :].repeat_interleave(block, -1)[..., :Lk]
    allowed = pairs & _common.allowed_mask(Lq, Lk, causal, key_mask, "cpu")
    return _common.masked_softmax_attention(q.double(), k.double(), v.double(), allowed, scale)


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_translation_matches_op(causal, tmp_path):
    op = torch.ops.rewriter.block_topk.default
    # density 0.4 over ~4-6 key blocks of 4 tokens: real choices (neither everything nor only the forced blocks)
    for pool, sink_blocks, local_blocks in (("mean", 1, 1), ("maxmin", 0, 2)):
        args = (causal, 8 ** -0.5, 0.4, 4, pool, sink_blocks, local_blocks)
        (tmp_path / pool).mkdir()
        diffs = export_and_check(tmp_path / pool, op, args, 13, (17, 23))
        assert max(diffs) < 1e-4, (pool, diffs)
        # the op itself against a dense float64 oracle of its layout, and the layout really is sparse
        x = _qkv(23, 2, B=3)
        kv_index, kv_count = block_topk_layout(x["q"], x["k"], x["key_mask"], causal, 8 ** -0.5, 0.4, 4, pool,
                                               sink_blocks, local_blocks)
        ref = _layout_oracle(*x.values(), causal, 8 ** -0.5, kv_index, kv_count, 4)
        assert torch.allclose(op(*x.values(), *args).double(), ref, atol=1e-5)
        assert int(kv_count.min()) < num_blocks(23, 4)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_translation_matches_op(causal, tmp_path):
    op = torch.ops.rewriter.strided.default
    args = (causal, 8 ** -0.5, 3, 1, 1, 4)          # stride 3 blocks, 1 local + 1 sink block, blocks of 4
    diffs = export_and_check(tmp_path, op, args, 13, (19, 29))
    assert max(diffs) < 1e-4, diffs
    # the checked inputs reach the duplicate correction (pairs seen in both rounds) and, causal, the fallback
    # (real queries that no round gave a visible key)
    seen, both, fallback = 0, 0, 0
    for i, n in enumerate((19, 29)):
        x = _qkv(n, i + 1, B=3 if i else 1)
        hits = torch.zeros(x["q"].shape[0], 4, n, n)
        for _, q_chunk, _, k_chunk in _lsh_rounds(x["q"], x["k"], x["key_mask"], 2, 4, 3):
            kch = _common.expand_kv(k_chunk[..., None], 4)[..., 0][:, :, None, :]
            hits += ((kch == q_chunk[..., None]) | (kch == q_chunk[..., None] - 1)).float()
        allowed = _common.allowed_mask(n, n, causal, x["key_mask"], "cpu")
        hits = hits * allowed
        both += int((hits == 2).sum())
        fallback += int(((hits.sum(-1) == 0) & allowed.any(-1)).sum())
    assert both > 0 and (fallback > 0 or not causal), (both, fallback)
    x = _qkv(29, 2, B=3)
    kv_index, kv_count = strided_layout(29, 29, 4, 4, 3, 1, 1, causal)
    ref = _layout_oracle(*x.values(), causal, 8 ** -0.5, kv_index, kv_count, 4)
    assert torch.allclose(op(*x.values(), *args).double(), ref, atol=1e-5)
    assert int(kv_count.min()) < num_blocks(29, 4)


def test_registered_without_quadratic():
    for name in ("rewriter::block_topk", "rewriter::strided", "rewriter::lsh"):
        assert name in TRANSLATIONS and not TRANSLATIONS[name].quadratic


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_translation_matches_op(causal, tmp_path):
    op = torch.ops.rewriter.lsh.default
    # buckets of 4: 5-8 chunks (3 bits) at 17-29 tokens, 2 rounds (the duplicate correction and the merge run)
    args = (causal, 8 ** -0.5, 2, 4, 3)
    diffs = export_and_check(tmp_path, op, args, 13, (19, 29))
    assert max(diffs) < 1e-4, diffs
    # the checked inputs reach the duplicate correction (pairs seen in both rounds) and, causal, the fallback
    # (real queries that no round gave a visible key)
    seen, both, fallback = 0, 0, 0
    for i, n in enumerate((19, 29)):
        x = _qkv(n, i + 1, B=3 if i else 1)
        hits = torch.zeros(x["q"].shape[0], 4, n, n)
        for _, q_chunk, _, k_chunk in _lsh_rounds(x["q"], x["k"], x["key_mask"], 2, 4, 3):
            kch = _common.expand_kv(k_chunk[..., None], 4)[..., 0][:, :, None, :]
            hits += ((kch == q_chunk[..., None]) | (kch == q_chunk[..., None] - 1)).float()
        allowed = _common.allowed_mask(n, n, causal, x["key_mask"], "cpu")
        hits = hits * allowed
        both += int((hits == 2).sum())
        fallback += int(((hits.sum(-1) == 0) & allowed.any(-1)).sum())
    assert both > 0 and (fallback > 0 or not causal), (both, fallback)
