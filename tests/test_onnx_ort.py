"""ONNX target "ort": onnxruntime's contrib attention ops (MultiHeadAttention, GroupQueryAttention with a local window)
where they are exact, the standard translation elsewhere; every file checked in onnxruntime against a float64 dense
oracle at lengths and batch sizes other than the export's (GQA heads, padded rows)."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import rewriter  # noqa: E402,F401  (registers the ops)
from rewriter import make_pass, optimize  # noqa: E402
from rewriter.attention import _contract as _common  # noqa: E402
from rewriter.backends.onnx import export_onnx, export_program, validate_onnx  # noqa: E402
from rewriter.errors import RewriterError  # noqa: E402

SCALE = 0.3


class OpModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, key_mask):
        return (self.fn(q, k, v, key_mask),)


def _qkv(L, seed, B=2, H=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[-1, L - L // 3:] = False       # the last row padded at the end
    key_mask[0, :2] = B == 1                # a left-padded row when B > 1 (causal rows with no key: 0)
    return {"q": q, "k": k, "v": v, "key_mask": key_mask}


def dense(q, k, v, key_mask, causal, window=0):
    L = q.shape[2]
    allowed = _common.allowed_mask(L, L, causal, key_mask, "cpu", window=window)
    return _common.masked_softmax_attention(q.double(), k.double(), v.double(), allowed, SCALE).float()


def export_ort(tmp_path, fn, reference):
    """Export OpModule(fn) (dynamic batch and length, traced at 20 tokens) with target "ort"; check at 37 and 70
    tokens against `reference`. Returns (the contrib ops emitted, the max abs differences)."""
    inputs = _qkv(20, 0)
    B, L = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=512)
    dyn = {"q": {0: B, 2: L}, "k": {0: B, 2: L}, "v": {0: B, 2: L}, "key_mask": {0: B, 1: L}}
    ep = torch.export.export(OpModule(fn), (), inputs, dynamic_shapes=dyn, strict=False)
    diffs = []

    def validate(path):
        for i, n in enumerate((37, 70)):
            x = _qkv(n, i + 1, B=3 if i else 1)
            r = validate_onnx(path, lambda **kw: (reference(**kw),), x, atol=1e-5)
            diffs.append(r["outputs"]["out"]["max_abs_diff"])
        return {}

    _, info = export_onnx(ep, tmp_path / "op.onnx", input_names=list(inputs), output_names=["out"], target="ort",
                          validate=validate)
    assert info["target"] == "ort"
    return info["contrib_ops"], diffs


@pytest.mark.parametrize("causal", [False, True])
def test_exact_attention_is_multi_head_attention(causal, tmp_path):
    ops, diffs = export_ort(tmp_path, lambda q, k, v, m: torch.ops.rewriter.exact_attention(q, k, v, m, causal, SCALE),
                            lambda q, k, v, key_mask: dense(q, k, v, key_mask, causal))
    assert ops == {"MultiHeadAttention": 1}
    assert max(diffs) < 1e-5


def test_exact_attention_with_a_model_window_stays_standard(tmp_path):
    ops, diffs = export_ort(tmp_path, lambda q, k, v, m: torch.ops.rewriter.exact_attention(q, k, v, m, True, SCALE, 5),
                            lambda q, k, v, key_mask: dense(q, k, v, key_mask, True, window=5))
    assert ops == {} and max(diffs) < 1e-5


def test_causal_window_without_key_mask_is_group_query_attention(tmp_path):
    ops, diffs = export_ort(tmp_path, lambda q, k, v, m: torch.ops.rewriter.window(q, k, v, None, True, SCALE, 9, 0, 8),
                            lambda q, k, v, key_mask: dense(q, k, v, None, True, window=9))
    assert ops == {"GroupQueryAttention": 1}
    assert max(diffs) < 1e-5


@pytest.mark.parametrize("key_mask,causal,sinks", [(True, True, 0), (False, False, 2)])
def test_window_where_group_query_attention_is_not_exact_stays_standard(key_mask, causal, sinks, tmp_path):
    def fn(q, k, v, m):
        return torch.ops.rewriter.window(q, k, v, m if key_mask else None, causal, SCALE, 9, sinks, 8)

    def reference(q, k, v, key_mask=None, use_mask=key_mask):
        return torch.ops.rewriter.window(q.double(), k.double(), v.double(), key_mask if use_mask else None, causal,
                                         SCALE, 9, sinks, 8).float()
    ops, diffs = export_ort(tmp_path, fn, reference)
    assert ops == {} and max(diffs) < 1e-5


def test_tiny_bert_program_with_ort_target(tiny_folders, tmp_path):
    """Every layer of a tiny BERT after exact-attention runs MultiHeadAttention; validated against the program."""
    res = optimize(tiny_folders["bert"], [make_pass("exact-attention")], samples=2, seq_len=16)
    info = export_program(res.program, tmp_path / "m.onnx", target="ort")
    layers = res.program.config["num_hidden_layers"]
    assert info["contrib_ops"] == {"MultiHeadAttention": layers}
    assert info["passed"] and info["max_abs_diff"] < 1e-4


def test_unknown_target(tiny_folders, tmp_path):
    from rewriter import load_program
    with pytest.raises(RewriterError, match="unknown ONNX target 'trt'"):
        export_program(load_program(tiny_folders["bert"]), tmp_path / "m.onnx", target="trt")
    assert not list(tmp_path.iterdir())


def test_cli_export_with_ort_target(tiny_folders, tmp_path):
    from typer.testing import CliRunner
    from rewriter.cli.main import app
    r = CliRunner().invoke(app, ["export", str(tiny_folders["bert"]), "--onnx", str(tmp_path / "m.onnx"),
                                 "--onnx-target", "ort"])
    assert r.exit_code == 0, r.output
    assert "onnxruntime contrib ops:" in r.output and (tmp_path / "m.onnx").exists()
