"""hedgehog: learned feature-map attention (Hedgehog maps, LoLCATs' window + linear hybrid). The op against a float64
oracle written from the definition (GQA, padding, causal with Lq < Lk), its exactness limit (a window covering the
sequence is softmax attention), identity maps, the fit on a tiny model (held-out loss falls at every layer), and
the learned maps through .pt2 and ONNX (onnxruntime) at lengths other than the fit's."""
import math

import pytest
import torch

import rewriter  # noqa: F401  (registers the methods)
from rewriter import load_program, make_pass, optimize
from rewriter.attention import METHODS
from rewriter.attention import _contract as _common
from rewriter.attention.hedgehog import HedgehogConfig, fit_maps, hedgehog_weights, identity_maps

from conftest import model_inputs, tiny_model
from rewriter.errors import RewriterError

OP = torch.ops.rewriter.hedgehog.default


def _qkv(B=2, H=4, Hkv=2, Lq=24, Lk=24, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype) for _ in range(2))
    key_mask = torch.ones(B, Lk, dtype=torch.bool)
    key_mask[-1, Lk - Lk // 3:] = False
    return q, k, v, key_mask


def _random_maps(H, Hkv, D, F, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"q_weight": torch.randn(H, F, D, generator=g), "q_bias": torch.randn(H, F, generator=g),
            "k_weight": torch.randn(Hkv, F, D, generator=g), "k_bias": torch.randn(Hkv, F, generator=g),
            "window_gain": torch.randn(H, generator=g)}


def _args(maps, window=0, sinks=0):
    return (maps["q_weight"], maps["q_bias"], maps["k_weight"], maps["k_bias"], maps["window_gain"], window, sinks)


def _oracle(q, k, v, key_mask, causal, scale, maps, window, sinks):
    """float64, one (batch, head, query, key) at a time, from the definition: phi(x) = [softmax(Wx + b),
    softmax(-(Wx + b))]; weight exp(scale q.k - m_i) on the support (band of `window` keys, causal: the last
    `window` up to the query, else window // 2 to the left; plus the first `sinks` keys), exp(g) phi(q).phi(k)
    elsewhere; normalised over the allowed keys."""
    q, k, v = q.double(), k.double(), v.double()
    m = {n: t.double() for n, t in maps.items()}
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]

    def phi(x, W, b):
        z = W @ x + b
        pos, neg = torch.exp(z - z.max()), torch.exp(-z - (-z).max())
        return torch.cat([pos / pos.sum(), neg / neg.sum()])

    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(Lq):
                pos = i + Lk - Lq
                keys = [j for j in range(Lk) if (key_mask is None or key_mask[b, j]) and (not causal or j <= pos)]
                if window or sinks:
                    left = window - 1 if causal else window // 2
                    right = 0 if causal else window - 1 - window // 2
                    support = [j for j in keys if j < sinks or (window and pos - left <= j <= pos + right)]
                else:
                    support = []
                scores = {j: scale * float(q[b, h, i] @ k[b, g, j]) for j in support}
                top = max(scores.values()) if scores else 0.0
                pq = phi(q[b, h, i], m["q_weight"][h], m["q_bias"][h])
                w = {j: math.exp(scores[j] - top) if j in scores else
                     math.exp(float(m["window_gain"][h])) * float(pq @ phi(k[b, g, j], m["k_weight"][g], m["k_bias"][g]))
                     for j in keys}
                total = sum(w.values())
                if total > 0:
                    out[b, h, i] = sum(w[j] * v[b, g, j] for j in keys) / total
    return out


@pytest.mark.parametrize("causal,window,sinks,Lq", [(False, 0, 0, 24), (True, 0, 0, 24), (False, 6, 2, 24),
                                                    (True, 5, 1, 24), (True, 7, 0, 10)])
def test_op_matches_float64_oracle(causal, window, sinks, Lq):
    """GQA (4 query heads on 2 kv heads), a padded sample, random (non-identity) maps; Lq < Lk for causal
    attention over cached keys."""
    q, k, v, km = _qkv(Lq=Lq, Lk=24)
    maps = _random_maps(4, 2, 8, 5)
    got = OP(q, k, v, km, causal, 8 ** -0.5, *_args(maps, window, sinks))
    want = _oracle(q, k, v, km, causal, 8 ** -0.5, maps, window, sinks)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # the dense definition the fit trains is the same function
    dense = hedgehog_weights(q.double(), k.double(), km, causal, 8 ** -0.5, **{n: t.double() for n, t in maps.items()},
                             window=window, sinks=sinks)
    torch.testing.assert_close(dense @ _common.expand_kv(v.double(), 4), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_the_sequence_is_exact_attention(causal):
    q, k, v, km = _qkv()
    maps = _random_maps(4, 2, 8, 5)
    got = OP(q, k, v, km, causal, 0.3, *_args(maps, window=2 * 24 + 1))
    allowed = _common.allowed_mask(24, 24, causal, km, "cpu")
    want = _common.masked_softmax_attention(q.double(), k.double(), v.double(), allowed, 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_identity_maps_give_finite_normalised_weights():
    """Identity maps (the fit's start), on activations up to 1e3 in size: every weight finite and >= 0, each row
    that sees a key sums to 1, a row that sees none (every key padding) is 0, and the op stays finite."""
    q, k, v, km = _qkv(Lq=24)
    q, k = q * 1e3, k * 1e3
    km[0] = False
    maps = identity_maps(4, 2, 8, 8)
    w = hedgehog_weights(q, k, km, False, 8 ** -0.5, **maps)
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w[1].sum(-1), torch.ones(4, 24))
    assert (w[0] == 0).all()
    assert torch.equal(maps["q_weight"][0], torch.eye(8)) and maps["k_weight"].shape == (2, 8, 8)
    for window in (0, 4):
        out = OP(q, k, v, km, False, 8 ** -0.5, *_args(maps, window))
        assert torch.isfinite(out).all() and (out[0] == 0).all()


def test_bad_maps_are_refused_by_name():
    q, k, v, km = _qkv()
    maps = identity_maps(4, 4, 8, 8)     # key maps for 4 kv heads, the model has 2
    with pytest.raises(ValueError, match=r"k_weight must be \(2, 8, 8\)"):
        OP(q, k, v, km, False, 0.3, *_args(maps))
    with pytest.raises(ValueError, match="loss must be one of"):
        HedgehogConfig(loss="l1").validate()


@pytest.mark.parametrize("loss,window,ratio", [("xent", 0, 0.9), ("xent", 4, 0.9), ("mse", 4, 0.97)])
def test_fit_reduces_held_out_loss(loss, window, ratio):
    """The fit hook alone (8 samples, 2 held out; GQA): on the held-out samples the trained loss falls (KL for
    xent, the attention-output error for mse) and the output error falls."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(8, 2, 32, 8, generator=g)
    k, v = (torch.randn(8, 1, 32, 8, generator=g) for _ in range(2))
    cfg = HedgehogConfig(loss=loss, steps=25, rows=32, lr=0.05)
    lines = []
    maps, info = fit_maps(cfg, q, k, v, None, False, 8 ** -0.5, {"window": window, "sinks": 0}, lines.append)
    assert info["held_out_samples"] == 2 and info["train_samples"] == 6
    trained = "held_out_kl" if loss == "xent" else "held_out_attention_rel_error"
    assert info[trained] < ratio * info[trained + "_before"], info
    assert info["held_out_attention_rel_error"] < info["held_out_attention_rel_error_before"], info
    assert maps["k_weight"].shape == (1, 8, 8) and not maps["q_weight"].requires_grad
    assert any("fitted" in line for line in lines)


def test_fit_on_every_layer_of_a_gqa_model(tiny_folders, tmp_path):
    """Tiny Llama (4 query heads on 2 kv heads, causal): every layer's held-out loss falls, the per-layer fit
    statistics are in the pass summary, the key maps are per kv head, and the written .pt2 runs the learned maps
    at another length with the same outputs."""
    out = tmp_path / "out"
    res = optimize(tiny_folders["llama"], [make_pass("hedgehog", {"window": 4, "features": 4, "steps": 30,
                                                                  "lr": 0.05})],
                   out=out, samples=4, seq_len=24)
    fits = res.report["passes"][0]["summary"]["fit"]
    assert [f["layer"] for f in fits] == [0, 1]
    for f in fits:
        assert f["held_out_kl"] < f["held_out_kl_before"], f
        assert f["train_samples"] == 3 and f["held_out_samples"] == 1 and f["features"] == 8
    program = load_program(out)
    maps = {name: t for name, t in program.ep.state_dict.items() if "hedgehog" in name}
    maps.update({name: t for name, t in program.ep.constants.items() if "hedgehog" in name})
    k_maps = [t for name, t in maps.items() if name.endswith("k_weight")]
    assert len(k_maps) == 2 and all(t.shape == (2, 4, 16) for t in k_maps)
    assert not any(torch.equal(t, identity_maps(4, 2, 16, 4)["k_weight"]) for t in k_maps)
    inputs = model_inputs("llama", 3, 37, seed=9)
    torch.testing.assert_close(program.run(**inputs)[0], res.program.run(**inputs)[0], atol=1e-5, rtol=1e-5)


def test_onnx_translation_with_learned_maps(tmp_path):
    """The op with fitted-size random maps exported with dynamic batch and length, run in onnxruntime at two other
    lengths against the PyTorch op: pure and hybrid, causal and bidirectional, GQA and padding."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_onnx_backend import OpModule, _qkv as onnx_qkv
    from rewriter.backends.onnx import export_onnx, validate_onnx
    maps = _random_maps(4, 2, 8, 5)
    for causal, window, sinks in ((False, 0, 0), (True, 6, 1), (False, 5, 0)):
        args = (causal, 8 ** -0.5, *_args(maps, window, sinks))
        inputs = onnx_qkv(20, 0)
        Bd, Ld = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=512)
        dyn = {"q": {0: Bd, 2: Ld}, "k": {0: Bd, 2: Ld}, "v": {0: Bd, 2: Ld}, "key_mask": {0: Bd, 1: Ld}}
        ep = torch.export.export(OpModule(OP, *args), (), inputs, dynamic_shapes=dyn, strict=False)
        diffs = []

        def validate(path):
            for i, n in enumerate((37, 70)):
                x = onnx_qkv(n, i + 1, B=3 if i else 1)
                r = validate_onnx(path, lambda **kw: (OP(*kw.values(), *args),), x, atol=1e-4)
                diffs.append(r["outputs"]["out"]["max_abs_diff"])
            return {}

        _, info = export_onnx(ep, tmp_path / f"op{window}{causal}.onnx", input_names=list(inputs),
                              output_names=["out"], dim_names={"q": {0: "batch", 2: "seq"}}, validate=validate)
        assert info["custom_ops"] == ["rewriter::hedgehog"] and not info["quadratic"]
        assert len(diffs) == 2 and max(diffs) < 1e-4, (causal, window, diffs)


def test_cost_counts_features_and_band():
    m = METHODS["hedgehog"]
    maps = identity_maps(12, 12, 32, 16)
    pure = m.cost(1, 12, 12, 512, 512, 32, 32, False, **maps, window=0, sinks=0)
    hybrid = m.cost(1, 12, 12, 512, 512, 32, 32, False, **maps, window=64, sinks=0)
    assert pure.score_entries == 0 and pure.flops < hybrid.flops < 0.30 * hybrid.dense_flops
    assert hybrid.score_entries == 12 * sum(min(511, i + 31) - max(0, i - 32) + 1 for i in range(512))


@pytest.mark.usefixtures("triton_interpreter")
def test_cuda_registration_matches_the_op():
    """The CUDA implementation (learned features in PyTorch, the chunked linear-attention Triton kernel; run by
    Triton's interpreter here) against the op's reference: pure map causal and bidirectional with GQA and padding;
    the hybrid goes through the reference."""
    from rewriter.attention.triton.hedgehog import hedgehog_attention_cuda
    q, k, v, km = _qkv(Lq=40, Lk=40)
    maps = _random_maps(4, 2, 8, 5)
    for causal, window in ((False, 0), (True, 0), (True, 6)):
        args = (causal, 8 ** -0.5, *_args(maps, window))
        torch.testing.assert_close(hedgehog_attention_cuda(q, k, v, km, *args), OP(q, k, v, km, *args),
                                   atol=1e-5, rtol=1e-4)


# --- LoLCATs' low-rank correction of the projections -----------------------------------------------------------------

def test_lora_rank_zero_is_no_correction_and_a_correction_is_stored_everywhere(tmp_path):
    """Rank 0 gives the program without a correction, bit for bit. Rank 2 changes only the q/k/v/o weights of the
    corrected layer (shapes kept), lowers the site-output error on its training samples, and travels in model.pt2,
    the HF folder (checked against the program by the writer) and ONNX (onnxruntime)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from rewriter.capture import capture
    from rewriter.load import LoadedModel
    from rewriter.pipeline import Pipeline
    model = tiny_model("bert")
    program = capture(LoadedModel(model, model.config))
    calib = model_inputs("bert", 8, 24)
    base = {"features": 4, "window": 4, "steps": 20, "lr": 0.05, "layers": "1"}
    plain = Pipeline([make_pass("hedgehog", base)]).run(program, calib)
    zero = Pipeline([make_pass("hedgehog", {**base, "lora_rank": 0})]).run(program, calib)
    inputs = model_inputs("bert", 3, 29, seed=5)
    assert torch.equal(zero.program.run(**inputs)[0], plain.program.run(**inputs)[0])
    assert "lora" not in zero.report["passes"][0]["summary"]["fit"][0]
    res = optimize(program, [make_pass("hedgehog", {**base, "lora_rank": 2, "lora_steps": 40})], out=tmp_path / "o",
                   samples=8, seq_len=24, export_onnx=True)
    lora = res.report["passes"][0]["summary"]["fit"][0]["lora"]
    assert lora["train_site_rel_error"] < lora["train_site_rel_error_uncorrected"], lora
    before, after = program.ep.state_dict, res.program.ep.state_dict
    changed = sorted(n for n in before if n in after and not torch.equal(before[n], after[n]))
    assert changed and all(".layer.1.attention." in n and n.endswith("weight") for n in changed), changed
    assert {n.split("attention.")[1] for n in changed} == {"self.query.weight", "self.key.weight", "self.value.weight",
                                                           "output.dense.weight"}
    assert res.report["onnx"]["passed"]
    assert (tmp_path / "o" / "hf" / "config.json").exists(), res.report.get("notes")
    back = load_program(tmp_path / "o")
    torch.testing.assert_close(back.run(**inputs)[0], res.program.run(**inputs)[0], atol=1e-6, rtol=1e-6)


def test_lora_correction_lowers_held_out_site_error_on_minilm(minilm_program):
    """On real text (pydoc pages, 12 x 128 tokens to fit, 4 held out) the correction lowers the site-output error
    of held-out samples against the uncorrected learned attention in both corrected layers."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from transformers import AutoTokenizer
    from minilm_quality import long_texts
    from rewriter.calibration import calibration_inputs
    from rewriter.load import default_checkpoint
    from rewriter.pipeline import Pipeline
    texts = long_texts(AutoTokenizer.from_pretrained(str(default_checkpoint())))
    calib, _ = calibration_inputs(minilm_program, texts=texts, samples=16, seq_len=128, seed=0)
    run = Pipeline([make_pass("hedgehog", {"features": 8, "window": 16, "steps": 30, "lr": 0.05, "lora_rank": 8,
                                           "lora_steps": 0, "layers": "0-1"})]).run(minilm_program, calib)
    for f in run.report["passes"][0]["summary"]["fit"]:
        lora = f["lora"]
        assert lora["held_out_samples"] == 4
        assert lora["held_out_site_rel_error"] < lora["held_out_site_rel_error_uncorrected"], lora


def test_lora_refuses_rope_sites():
    from rewriter.capture import capture
    from rewriter.load import LoadedModel
    from rewriter.pipeline import Pipeline
    model = tiny_model("llama")
    program = capture(LoadedModel(model, model.config))
    with pytest.raises(RewriterError, match="head reshape"):
        Pipeline([make_pass("hedgehog", {"features": 4, "steps": 2, "lora_rank": 2})]).run(
            program, model_inputs("llama", 4, 16))
