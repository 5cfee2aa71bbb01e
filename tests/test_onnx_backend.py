"""ONNX backend: translations against float64 dense oracles at odd lengths (causal and bidirectional, padded,
GQA), tiny BERT / GPT-2 / Llama / ViT and MiniLM exported and run in onnxruntime at shapes other than the
export shape, every pass's program exported and validated, and bad input failing cleanly with nothing left."""
import math
from typing import Optional

import pytest
import torch
from torch import Tensor

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rewriter import load_program, make_pass, optimize  # noqa: E402
from rewriter.backends import onnx as onnx_backend  # noqa: E402
from rewriter.attention.feature_map import translate_linear_attention  # noqa: E402
from rewriter.attention.sparse import translate_window_attention  # noqa: E402
from rewriter.backends.onnx import (OnnxValidationError, export_onnx, export_program, onnx_translation,  # noqa: E402
                                    validate_onnx)
from rewriter.errors import RewriterError  # noqa: E402
from rewriter.attention import _contract as _common  # noqa: E402
from rewriter.pipeline import PASSES, get_pass  # noqa: E402

from conftest import ARCHS  # noqa: E402

get_pass("window")   # registers the built-in passes


# --- test-local ops with the real ops' signatures, defined by dense float64 formulas ---------------------------

def _window_allowed(Lq, Lk, causal, window, sinks, key_mask):
    left, right = _common.window_extents(window, causal)
    i = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    band = ((j >= i - left) & (j <= i + right)) | (j < sinks)
    return band[None, None] & _common.allowed_mask(Lq, Lk, causal, key_mask, "cpu")


def dense_window(q, k, v, key_mask, causal, scale, window, sinks, block=64):
    allowed = _window_allowed(q.shape[2], k.shape[2], causal, window, sinks, key_mask)
    out = _common.masked_softmax_attention(q.double(), k.double(), v.double(), allowed, scale)
    return out.to(q.dtype)


def _phi(name, x, scale):
    xs = x * math.sqrt(scale)
    return torch.nn.functional.elu(xs) + 1 if name == "elu" else torch.relu(xs)


def dense_linear(q, k, v, key_mask, causal, scale, feature_map, window=0, sinks=0):
    """w_ij = exp(scale q.k) on the band + sinks, phi(q).phi(k) elsewhere; out = w v / sum w (0 if sum <= 0)."""
    H = q.shape[1]
    q, k, v = q.double(), _common.expand_kv(k, H).double(), _common.expand_kv(v, H).double()
    Lq, Lk = q.shape[2], k.shape[2]
    w = _phi(feature_map, q, scale) @ _phi(feature_map, k, scale).transpose(-1, -2)
    if window or sinks:
        support = _window_allowed(Lq, Lk, causal, window, 0, None) if window else torch.zeros(1, 1, Lq, Lk, dtype=torch.bool)
        support = support | (torch.arange(Lk) < sinks)
        w = torch.where(support, torch.exp(scale * q @ k.transpose(-1, -2)), w)
    w = torch.where(_common.allowed_mask(Lq, Lk, causal, key_mask, "cpu"), w, torch.zeros_like(w))
    den = w.sum(-1, keepdim=True)
    out = torch.where(den > 0, (w @ v) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return out.float()


@torch.library.custom_op("rewriter_test::window_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, int window, int sinks, "
    "int block=64) -> Tensor"))
def window_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, window: int,
              sinks: int, block: int = 64) -> Tensor:
    return dense_window(q, k, v, key_mask, causal, scale, window, sinks, block)


@window_op.register_fake
def _(q, k, v, key_mask, causal, scale, window, sinks, block=64):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


@torch.library.custom_op("rewriter_test::linear_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale, str feature_map, int window=0, "
    "int sinks=0) -> Tensor"))
def linear_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float,
              feature_map: str, window: int = 0, sinks: int = 0) -> Tensor:
    return dense_linear(q, k, v, key_mask, causal, scale, feature_map, window, sinks)


@linear_op.register_fake
def _(q, k, v, key_mask, causal, scale, feature_map, window=0, sinks=0):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


onnx_translation("rewriter_test::window_attention")(translate_window_attention)
onnx_translation("rewriter_test::linear_attention")(translate_linear_attention)


class OpModule(torch.nn.Module):
    def __init__(self, op, *args):
        super().__init__()
        self.op, self.args = op, args

    def forward(self, q, k, v, key_mask):
        return (self.op(q, k, v, key_mask, *self.args),)


def _qkv(L, seed, B=2, H=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[-1, L - L // 3:] = False
    return {"q": q, "k": k, "v": v, "key_mask": key_mask}


def export_op(tmp_path, op, args, export_len, check_lens, reference, atol=1e-4):
    """Export OpModule(op, *args) with dynamic batch/length at export_len; validate at check_lens against
    `reference` (the dense oracle); returns the max abs differences."""
    inputs = _qkv(export_len, 0)
    B, L = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=512)
    dyn = {"q": {0: B, 2: L}, "k": {0: B, 2: L}, "v": {0: B, 2: L}, "key_mask": {0: B, 1: L}}
    ep = torch.export.export(OpModule(op, *args), (), inputs, dynamic_shapes=dyn, strict=False)
    diffs = []

    def validate(path):
        for i, n in enumerate(check_lens):
            x = _qkv(n, i + 1, B=3 if i else 1)
            r = validate_onnx(path, lambda **kw: (reference(*kw.values(), *args),), x, atol=atol)
            diffs.append(r["outputs"]["out"]["max_abs_diff"])
        return {}

    path, info = export_onnx(ep, tmp_path / "op.onnx", input_names=list(inputs), output_names=["out"],
                             dim_names={"q": {0: "batch", 2: "seq"}}, validate=validate)
    assert path.exists() and info["custom_ops"] == [op._schema.name]
    return diffs, info


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window, sinks", [(5, 2), (100, 70)])
def test_window_translation_matches_dense(causal, window, sinks, tmp_path):
    """The key-run layout (64-row query blocks against the keys their bands reach, sinks in front): inputs shorter
    than a run, several blocks (150, 301 tokens), sinks reaching into the band and past a short input."""
    args = (causal, 8 ** -0.5, window, sinks, 4)
    diffs, info = export_op(tmp_path, torch.ops.rewriter_test.window_attention.default, args, 13, (11, 19, 150, 301),
                            dense_window)
    assert max(diffs) < 1e-5 and not info["quadratic"]


@pytest.mark.parametrize("causal,feature_map,window,sinks", [(False, "elu", 0, 0), (True, "relu", 0, 0),
                                                             (True, "elu", 6, 1), (False, "elu", 6, 1)])
def test_linear_translation_matches_dense(causal, feature_map, window, sinks, tmp_path):
    # lengths past one causal chunk (64) so the cross-chunk CumSum path runs
    args = (causal, 8 ** -0.5, feature_map, window, sinks)
    diffs, _ = export_op(tmp_path, torch.ops.rewriter_test.linear_attention.default, args, 13, (67, 133), dense_linear)
    assert max(diffs) < 1e-5


def test_real_lowrank_ops_match_at_long_odd_lengths(tmp_path):
    """The real ops (fp32 references) against their translations past one chunk, causal, GQA, padded."""
    import rewriter  # noqa: F401  (registers the ops)
    cases = [(torch.ops.rewriter.performer.default, (True, 8 ** -0.5, 16, 3)),
             (torch.ops.rewriter.scatterbrain.default, (False, 8 ** -0.5, 16, 7, 2, 1)),
             (torch.ops.rewriter.linear.default, (True, 8 ** -0.5, "elu", 9, 1))]
    for i, (op, args) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        diffs, _ = export_op(tmp_path / str(i), op, args, 13, (67, 133), lambda *a: op(*a))
        assert max(diffs) < 1e-4, (op, diffs)


# --- whole models -------------------------------------------------------------------------------------------------

def _exported(program, path, atol=1e-4):
    info = export_program(program, path, atol=atol)
    assert info["passed"] and path.exists() and info["max_abs_diff"] <= atol
    shapes = [c["input_shapes"][program.input_names[0]] for c in info["checks"]]
    assert len(set(map(tuple, shapes))) == 3, shapes    # the example shape and two others
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    first = model.graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_param == "batch"
    if "seq" in program.dynamic_dims.get(program.input_names[0], {}).values():
        assert first[1].dim_param == "seq"
    return info


@pytest.mark.parametrize("arch", ARCHS)
def test_original_tiny_models(arch, tiny_folders, tmp_path):
    info = _exported(load_program(tiny_folders[arch]), tmp_path / "m.onnx")
    # the captured program's attention is the canonical exact_attention (quadratic like the model's own attention)
    assert info["custom_ops"] == ["rewriter::exact_attention"] and info["quadratic_ops"] == ["rewriter::exact_attention"]


def test_original_minilm(minilm_program, tmp_path):
    _exported(minilm_program, tmp_path / "minilm.onnx")


# Every pass in a program that is exported and validated. Passes share a program where they can (attention
# methods split by layer), to keep the file fast: GQA + causal on Llama, causal on GPT-2, padded bidirectional
# on BERT. "ADAPTER" is replaced by an adapter made in the test.
EXPORT_CASES = {
    "llama-lowrank-attention": ("llama", [("performer", {"features": 16, "layers": "0"}),
                                          ("linear", {"feature_map": "relu", "layers": "1"}),
                                          ("sparse-lowrank", {"ratio": 0.3, "sparsity": 0.9})]),
    "gpt2-hybrids": ("gpt2", [("linear", {"feature_map": "elu", "window": 4, "sinks": 1, "layers": "0"}),
                              ("scatterbrain", {"features": 16, "window": 6, "sinks": 1, "layers": "1"}),
                              ("lowrank", {"ratio": 0.5})]),
    "bert-merged-binarized": ("bert", [("lora-merge", {"adapters": "ADAPTER"}),
                                       ("scatterbrain", {"features": 8, "window": 5}),
                                       ("binarize", {"residual_rank": 4})]),
    "llama-window-think-fuse": ("llama", [("window", {"window": 8, "sinks": 2, "block": 8, "layers": "0"}),
                                          ("think", {"ratio": 0.5, "layers": "1"}), ("fuse", {})]),
    "bert-block-topk-lsh": ("bert", [("block-topk", {"density": 0.5, "block": 8, "layers": "0"}),
                                     ("lsh", {"n_hashes": 2, "bucket_size": 8, "layers": "1"})]),
    "gpt2-strided-exact": ("gpt2", [("strided", {"stride": 2, "block": 8, "layers": "0"}),
                                    ("exact-attention", {"layers": "1"})]),
    "llama-hedgehog": ("llama", [("hedgehog", {"window": 4, "features": 4, "steps": 5, "layers": "0"}),
                                 ("hedgehog", {"features": 4, "steps": 5, "layers": "1"})]),
    "llama-mla-exact-decoupled": ("llama", [("mla", {"rank": 24, "layers": "0"}),
                                            ("mla", {"rope": "decoupled", "rank": 16, "layers": "1"})]),
    "llama-head-prune": ("llama", [("head-prune", {"count": 1})]),
    "llama-share-attention": ("llama", [("share-attention", {"count": 1})]),
    "bert-auto-attention-plan": ("bert", [("auto-attention", {"plan": [
        {"site": "encoder.layer.0.attention.self",
         "heads": ["exact", "window(window=6,sinks=1,block=8)", "performer(features=8)", "exact"]},
        {"site": "encoder.layer.1.attention.self",
         "heads": ["scatterbrain(window=4,features=8)", "scatterbrain(window=4,features=8)",
                   "linear(feature_map=elu)", "exact"]}]})]),
}
# an attention method no case above names exports on its own, every layer, with its per-method matrix options
from test_attention_registry import MATRIX  # noqa: E402
EXPORT_CASES.update({f"llama-{name}": ("llama", [(name, dict(opts))]) for name, (opts, _) in MATRIX.items()
                     if not any(name == n for _, specs in EXPORT_CASES.values() for n, _ in specs)})
# cases with attention sites no attention method replaces: those stay the canonical rewriter::exact_attention
KEEP_EXACT = {"llama-window-think-fuse", "gpt2-strided-exact", "llama-mla-exact-decoupled", "llama-head-prune"}
AUTO_OPS = {"rewriter::window", "rewriter::performer", "rewriter::scatterbrain",
            "rewriter::linear", "rewriter::exact_attention"}


def test_every_pass_has_an_exporting_test():
    covered = {name for _, passes in EXPORT_CASES.values() for name, _ in passes}
    programs = {name for name, cls in PASSES.items() if not cls.decode_only}   # kv-window acts on the decode cache
    assert programs <= covered, sorted(programs - covered)


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_passes_export(case, tiny_folders, tmp_path):
    import rewriter  # noqa: F401  (registers the ops)
    arch, specs = EXPORT_CASES[case]
    expected_ops = set()
    for name, _ in specs:
        op_name = getattr(PASSES[name], "op_name", "") if name in PASSES else ""
        if name not in PASSES or (op_name and not hasattr(torch.ops.rewriter, op_name)):
            pytest.skip(f"pass {name} or its op is not on this branch yet")
        expected_ops |= {f"rewriter::{op_name}"} if op_name else set()
    passes = []
    for name, options in specs:
        if options.get("adapters") == "ADAPTER":
            from test_lora_merge import make_adapter
            options = {"adapters": [str(make_adapter(tiny_folders[arch], tmp_path / "adapter"))]}
        passes.append(make_pass(name, options))
    res = optimize(tiny_folders[arch], passes, samples=2, seq_len=16)
    assert all(p["sites_changed"] > 0 for p in res.report["passes"] if p["pass"] != "exact-attention"), \
        [p["sites_changed"] for p in res.report["passes"]]   # exact-attention: a no-op since capture
    info = _exported(res.program, tmp_path / "p.onnx")
    if any(name == "binarize" for name, _ in specs):
        expected_ops.add("rewriter::binary_linear")
    if any(name == "fuse" for name, _ in specs):
        expected_ops |= {"rewriter::rms_norm", "rewriter::silu_mul"}
    if any(name == "auto-attention" for name, _ in specs):
        expected_ops |= AUTO_OPS
    if case in KEEP_EXACT:
        expected_ops.add("rewriter::exact_attention")
    assert set(info["custom_ops"]) == expected_ops


# --- bad input ----------------------------------------------------------------------------------------------------

class Affine(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x)


def _tiny_ep():
    lin = Affine(4, 3)
    x = {"x": torch.randn(2, 4)}
    return torch.export.export(lin, (), x, dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}}), lin, x


def test_failed_validation_leaves_nothing(tmp_path):
    ep, lin, x = _tiny_ep()
    wrong = lambda **kw: (lin(**kw) + 1e-3,)   # noqa: E731
    with pytest.raises(OnnxValidationError) as e:
        export_onnx(ep, tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                    validate=lambda p: validate_onnx(p, wrong, x, atol=1e-4))
    msg = str(e.value)
    assert "output y" in msg and "max abs diff 0.001" in msg and "atol 0.0001" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []
    # the same inputs with the right reference pass, and the record names what it compared
    path, info = export_onnx(ep, tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                             validate=lambda p: validate_onnx(p, lambda **kw: (lin(**kw),), x))
    assert info["passed"] and info["outputs"]["y"]["max_abs_diff"] < 1e-6 and info["provider"] == "CPUExecutionProvider"


def test_unwritable_output(tmp_path):
    ep, _, _ = _tiny_ep()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RewriterError, match="does not exist"):
        export_onnx(ep, blocker / "m.onnx", input_names=["x"], output_names=["y"])
    with pytest.raises(RewriterError, match="must end in .onnx"):
        export_onnx(ep, tmp_path / "m.txt", input_names=["x"], output_names=["y"])


def test_op_without_translation_is_named(tmp_path, monkeypatch):
    import rewriter  # noqa: F401  (registers the ops)
    monkeypatch.delitem(onnx_backend.TRANSLATIONS, "rewriter::performer")
    inputs = _qkv(9, 0)
    ep = torch.export.export(OpModule(torch.ops.rewriter.performer.default, False, 0.3, 8), (), inputs,
                             strict=False)
    with pytest.raises(RewriterError, match="no ONNX translation for rewriter::performer"):
        export_onnx(ep, tmp_path / "m.onnx", input_names=list(inputs), output_names=["out"])
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tiny_folders, tmp_path):
    from typer.testing import CliRunner
    from rewriter.cli import app
    runner = CliRunner()
    bad = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--onnx", str(tmp_path / "m.onnx")])
    assert bad.exit_code != 0 and "no such file or folder" in bad.output and "Traceback" not in bad.output
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(app, ["export", str(tmp_path / "empty"), "--onnx", str(tmp_path / "m.onnx")])
    assert bad.exit_code != 0 and "Traceback" not in bad.output, bad.output
    assert not (tmp_path / "m.onnx").exists()
    ok = runner.invoke(app, ["export", str(tiny_folders["vit"]), "--onnx", str(tmp_path / "m.onnx")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m.onnx").exists() and "matches PyTorch" in " ".join(ok.output.split())
