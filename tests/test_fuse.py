"""The `fuse` pass and its ops: rewriter::rms_norm / rewriter::silu_mul equal transformers' LlamaRMSNorm and SwiGLU
product bit for bit (their references) and their Triton kernels (interpreter) within rounding; the pass finds exactly
the 2 x layers + 1 RMSNorms and one SwiGLU per layer of tiny Llama / Qwen2 (fp32 and bf16) and none in LayerNorm
models, is exact, composes with attention, linear and KV passes in either order, and its programs save, export to
ONNX (onnxruntime), lower to aten for AOTInductor and write the model's own HF folder."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rewriter import capture, make_pass, optimize
from rewriter.errors import RewriterError
from rewriter.pipeline import PassContext
from rewriter.sites import attention_sites, fusion_sites, linear_sites

from conftest import model_inputs, tiny_model

bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64
FUSED_OPS = {"rewriter.rms_norm.default", "rewriter.silu_mul.default"}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def op_counts(program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in program.ep.graph.nodes:
        if n.op == "call_function":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    return counts


def ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| in units of want's last place (in want's dtype)."""
    spacing = torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=want.dtype)) - want.abs()
    return float(((got.double() - want.double()).abs() / spacing.double()).max())


def assert_rounding_close(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """fp32: within 4 ulp; 16-bit: within 1 ulp of its dtype and nearly every element equal (an fp32 intermediate a
    last bit away can round the other way)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if want.dtype == f32:
        assert ulps(got, want) <= 4, what
    else:
        assert ulps(got, want) <= 1 and float((got == want).double().mean()) >= 0.98, what


def max_diff(a: tuple, b: tuple) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def llama():
    """Tiny Llama (fp32, 2 layers, GQA) and its captured program."""
    model = tiny_model("llama")
    return model, capture(model, seq=16)


@pytest.fixture(scope="module")
def fused(llama, tmp_path_factory):
    """fuse with kv-window (a decode-only policy) on the tiny Llama, written as an output folder."""
    _, program = llama
    out = tmp_path_factory.mktemp("fused") / "out"
    return optimize(program, [make_pass("fuse"), make_pass("kv-window", {"window": 8, "sinks": 2})],
                    samples=2, seq_len=16, out=out), out


@pytest.fixture(scope="module")
def fused_window(llama):
    """fuse, then window on the tiny Llama (the program the save / ONNX / AOTI tests use)."""
    _, program = llama
    return optimize(program, [make_pass("fuse"), make_pass("window", {"window": 6, "sinks": 1, "block": 4})],
                    samples=2, seq_len=16)


# --- the ops -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,wdtype", [(bf16, bf16), (f32, f32), (bf16, f32)])
def test_ops_are_the_hf_modules(dtype, wdtype):
    """The ops' CPU bodies are transformers' LlamaRMSNorm and act_fn(gate) * up, bit for bit; the fakes give the
    promoted dtype and shape."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(48, generator=gen(0)))
    norm.to(wdtype)
    x = (3 * torch.randn(2, 5, 48, generator=gen(1))).to(dtype)
    got = torch.ops.rewriter.rms_norm(x, norm.weight, 1e-5)
    want = norm(x)
    assert got.dtype == want.dtype == torch.promote_types(wdtype, dtype) and torch.equal(got, want)
    gate = (4 * torch.randn(3, 7, 40, generator=gen(2))).to(dtype)
    up = torch.randn(3, 7, 40, generator=gen(3)).to(wdtype)
    assert torch.equal(torch.ops.rewriter.silu_mul(gate, up), F.silu(gate) * up)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.rewriter.rms_norm.default, (x, norm.weight, 1e-5), test_utils=checks)
    torch.library.opcheck(torch.ops.rewriter.silu_mul.default, (gate, up), test_utils=checks)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.rewriter.rms_norm(x, norm.weight[:-1], 1e-5)
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.rewriter.silu_mul(gate, up[..., :-1])


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype,wdtype", [(bf16, bf16), (f32, f32), (torch.float16, torch.float16), (bf16, f32)])
def test_kernels_match_the_ops(dtype, wdtype):
    """The Triton kernels (interpreter, odd widths and row counts) round where the references round: 16-bit outputs
    within one ulp of their dtype and almost all bit-equal, fp32 within 4 fp32 ulp (summation order, rsqrt, exp); the
    CUDA registrations run them and take fp64 through the references."""
    from rewriter.attention.triton.registry import CUDA_KERNELS
    from rewriter.linear.triton.fused import rms_norm_triton, silu_mul_triton
    for rows, H in ((1, 8), (7, 48), (33, 96)):
        x = (3 * torch.randn(rows, H, generator=gen(H))).to(dtype)
        w = (1 + 0.2 * torch.randn(H, generator=gen(H + 1))).to(wdtype)
        assert_rounding_close(rms_norm_triton(x, w, 1e-6), torch.ops.rewriter.rms_norm(x, w, 1e-6), (rows, H))
        gate = (4 * torch.randn(rows, 3, H, generator=gen(H + 2))).to(dtype)
        up = torch.randn(rows, 3, H, generator=gen(H + 3)).to(wdtype)
        assert_rounding_close(silu_mul_triton(gate, up), torch.ops.rewriter.silu_mul(gate, up), (rows, H))
    x = torch.randn(4, 3, 40, generator=gen(9), dtype=dtype)[:, 1]          # strided rows
    w = torch.ones(40, dtype=wdtype)
    assert torch.equal(CUDA_KERNELS["rewriter::rms_norm"](x, w, 1e-6), rms_norm_triton(x.contiguous(), w, 1e-6))
    xd = torch.randn(3, 40, generator=gen(10), dtype=f64)
    assert torch.equal(CUDA_KERNELS["rewriter::rms_norm"](xd, w.double(), 1e-6),
                       torch.ops.rewriter.rms_norm(xd, w.double(), 1e-6))
    assert torch.equal(CUDA_KERNELS["rewriter::silu_mul"](xd, xd), torch.ops.rewriter.silu_mul(xd, xd))


# --- the pass ------------------------------------------------------------------------------------------------------

def test_chained_patterns_in_a_plain_export():
    """Patterns reading each other's outputs (a norm of a norm, silu(norm) * norm), bf16, in torch.export's own graph
    (its dtype checks after each `.to()` kept): every one fused, the result equal to the module's bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = LlamaRMSNorm(32), LlamaRMSNorm(32)

        def forward(self, x):
            h = self.b(self.a(x))
            return F.silu(h) * self.a(h)

    module = Chain().to(bf16)
    with torch.no_grad():
        module.a.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, generator=gen(13)).to(bf16)
    gm = torch.export.export(module, (x,), strict=False).module()
    result = make_pass("fuse").run(gm, PassContext(program=None, calib_inputs={}))
    assert [(c.kind, c.module_path) for c in result.changes] == [("rms_norm", "a"), ("rms_norm", "b"), ("rms_norm", "a"),
                                                                 ("silu_mul", "")]
    assert {str(n.target) for n in gm.graph.nodes if n.op == "call_function"} - \
        {"aten._assert_tensor_metadata.default"} == FUSED_OPS       # (export's check of the input x stays)
    assert torch.equal(gm(x), module(x))


def test_fuse_tiny_llama_is_exact_and_keeps_every_site(llama, fused):
    """fp32, 2 layers: 2 x 2 + 1 RMSNorms and 2 SwiGLU products fused, per site recorded; zero error against the
    original and the HF model; attention and linear sites unchanged, no RMSNorm / silu aten op left."""
    model, program = llama
    res, _ = fused
    entry = res.report["passes"][0]
    assert entry["exact"] and entry["metrics"]["relative_error"] <= 1e-6
    assert entry["summary"]["rms_norm"] == 5 and entry["summary"]["silu_mul"] == 2
    paths = [(s["kind"], s["module_path"]) for s in entry["sites"]]
    per_layer = [("rms_norm", "input_layernorm"), ("rms_norm", "post_attention_layernorm"), ("silu_mul", "mlp")]
    assert paths == [(k, f"model.layers.{i}.{m}") for i in range(2) for k, m in per_layer] + \
        [("rms_norm", "model.norm")]
    norm = entry["sites"][0]
    assert norm["op"] == "rewriter::rms_norm" and norm["eps"] == model.config.rms_norm_eps and norm["width"] == 64
    assert {"pow_1", "mean", "rsqrt"} <= set(norm["replaced"])
    assert 0 < norm["fused_bytes_per_token"] < norm["eager_bytes_per_token"]
    fused = res.program
    counts = op_counts(fused)
    assert counts["rewriter.rms_norm.default"] == 5 and counts["rewriter.silu_mul.default"] == 2
    assert not {"aten.rsqrt.default", "aten.silu.default", "aten.pow.Tensor_Scalar"} & set(counts)
    before, after = program.module(), fused.module()
    assert [s.describe() for s in linear_sites(after)] == [s.describe() for s in linear_sites(before)]
    assert [(s.module_path, s.heads, s.kv_heads) for s in attention_sites(after)] == \
        [(s.module_path, s.heads, s.kv_heads) for s in attention_sites(before)]
    assert fusion_sites(after) == []
    x = model_inputs("llama", 3, 23, seed=4)
    with torch.no_grad():
        want = model(**x).logits
    assert torch.equal(fused.run(**x)[0], want)
    # options: one pattern and a layer filter (the graph rewrite alone, no re-capture); an unknown pattern is an error
    gm = program.module()
    result = make_pass("fuse", {"patterns": "rms_norm", "layers": "1"}).run(gm, PassContext(program, {}))
    assert [(c.kind, c.module_path) for c in result.changes] == \
        [("rms_norm", "model.layers.1.input_layernorm"), ("rms_norm", "model.layers.1.post_attention_layernorm")]
    assert result.summary == {"rms_norm": 2, **{k: result.summary[k] for k in result.summary if "bytes" in k}}
    assert [s.module_path for s in fusion_sites(gm)] == \
        ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.0.mlp",
         "model.layers.1.mlp", "model.norm"]
    with pytest.raises(RewriterError, match="rms_norm, silu_mul"):
        make_pass("fuse", {"patterns": ["gelu"]})


def test_qwen2_bf16_and_layernorm_models():
    """Qwen2 (LlamaRMSNorm's copy, q/k/v biases) in bf16, one layer: 3 RMSNorms and 1 SwiGLU, outputs equal to the
    HF model's bit for bit; BERT (LayerNorm, GELU): no site, a note, no error."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=120, max_position_embeddings=128)
    model = tf.Qwen2ForCausalLM(cfg).to(bf16).eval()
    res = optimize(capture(model, seq=16), [make_pass("fuse")], samples=2, seq_len=16)
    entry = res.report["passes"][0]
    assert entry["summary"]["rms_norm"] == 3 and entry["summary"]["silu_mul"] == 1
    assert entry["metrics"]["relative_error"] == 0.0 and all(s["dtype"] == "bfloat16" for s in entry["sites"])
    assert res.report["max_error"] == 2e-2 and res.report["max_error_default"]    # an exact pass: the bf16 budget
    x = model_inputs("llama", 2, 19, seed=5)
    with torch.no_grad():
        assert torch.equal(res.program.run(**x)[0], model(**x).logits)
    res = optimize(capture(tiny_model("bert"), seq=16), [make_pass("fuse")], samples=2, seq_len=16)
    entry = res.report["passes"][0]
    assert entry["sites_changed"] == 0 and "nothing fused" in entry["notes"][0]


def test_fuse_composes_with_other_passes_in_either_order(llama, fused, fused_window, tmp_path):
    """window after fuse, fuse after window (a second run on the windowed program), lowrank after fuse: the same sites
    rewritten and the same outputs as without fuse (the fused ops compute the model's own numbers). The second run's
    HF folder keeps the window's plan (the program's earlier run was not weight-only) and matched the program in
    transformers before it was written."""
    _, program = llama
    windowed = optimize(program, [make_pass("window", {"window": 6, "sinks": 1, "block": 4})], samples=2, seq_len=16)
    after = optimize(windowed.program, [make_pass("fuse")], samples=2, seq_len=16, out=tmp_path / "out")
    # q_proj reads an RMSNorm's output, down_proj the SwiGLU product: both stay linear sites after fuse
    lowrank_opts = {"ratio": 0.5, "include": ["*q_proj", "*down_proj"]}
    lowrank = optimize(program, [make_pass("lowrank", lowrank_opts)], samples=2, seq_len=16)
    fused_lowrank = optimize(fused[0].program, [make_pass("lowrank", lowrank_opts)], samples=2, seq_len=16)
    first, second = fused_window.report["passes"]
    assert first["sites_changed"] == 7 and second["sites_changed"] == windowed.report["passes"][0]["sites_changed"] == 2
    assert after.report["passes"][0]["sites_changed"] == 7
    assert after.report["passes"][0]["metrics"]["relative_error"] == 0
    assert len(lowrank.report["passes"][0]["sites"]) == 4
    assert fused_lowrank.report["passes"][0]["sites"] == lowrank.report["passes"][0]["sites"]   # ranks, errors
    x = model_inputs("llama", 2, 29, seed=6)
    want = windowed.program.run(**x)
    assert max_diff(fused_window.program.run(**x), want) <= 1e-6 and max_diff(after.program.run(**x), want) <= 1e-6
    assert max_diff(fused_lowrank.program.run(**x), lowrank.program.run(**x)) <= 1e-6
    for res in (fused_window, after, fused_lowrank):
        assert FUSED_OPS <= set(op_counts(res.program))
    assert not after.report["weight_only"]
    cfg = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert [g["method"] for s in cfg["rewriter"]["sites"] for g in s["groups"]] == ["window", "window"]


def test_hf_folder_runs_the_fused_ops(llama, tmp_path):
    """An attention rewrite's HF folder names the fused modules (5 RMSNorms, 2 MLPs); in transformers their forwards
    become the fused ops from the first forward on (counted through the ops), equal to the program; a plan whose
    fusion does not fit the model is refused by name."""
    import transformers
    import rewriter.hf as hf
    out = tmp_path / "out"
    fused_window = optimize(llama[1], [make_pass("fuse"), make_pass("window", {"window": 6, "sinks": 1, "block": 4})],
                            samples=2, seq_len=16, out=out)
    assert hf.NAME == json.loads((out / "hf" / "config.json").read_text())["attn_implementation"]
    cfg = json.loads((out / "hf" / "config.json").read_text())
    fused = cfg["rewriter"]["fused"]
    assert sorted(e["kind"] for e in fused) == ["rms_norm"] * 5 + ["silu_mul"] * 2
    assert {e["path"] for e in fused} >= {"model.norm", "model.layers.1.mlp", "model.layers.0.input_layernorm"}
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = {"rewriter.rms_norm.default": 0, "rewriter.silu_mul.default": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in calls:
                calls[str(func)] += 1
            return func(*args, **(kwargs or {}))

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    x = model_inputs("llama", 2, 23, seed=8)
    with torch.no_grad(), Count():
        got = model(**x).logits
    # the first forward already runs every fused forward
    assert calls == {"rewriter.rms_norm.default": 5, "rewriter.silu_mul.default": 2}
    want = fused_window.program.run(**x)[0]
    valid = x["attention_mask"].bool()
    assert float((got - want)[valid].abs().max()) < 1e-5
    # torch.compile of the loaded model, one graph (the fused forwards are in place after the eager call; the mask
    # function skips its frame walk while compiling)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**x).logits
    assert torch.equal(compiled, got)
    # generate (KV cache, one token per step) through the fused forwards: the tokens of the same folder without
    # the fused list (the ops compute the modules' own arithmetic, bit for bit on the CPU)
    ids = x["input_ids"][:1, :11]
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    plain = json.loads(json.dumps(cfg))
    del plain["rewriter"]["fused"]
    (out / "hf" / "config.json").write_text(json.dumps(plain))
    unfused = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    assert torch.equal(tokens, unfused.generate(ids, max_new_tokens=6, do_sample=False)) and tokens.shape[1] == 17
    assert not any("forward" in m.__dict__ for m in unfused.modules())
    cfg["rewriter"]["fused"][0]["eps"] = 0.5
    (out / "hf" / "config.json").write_text(json.dumps(cfg))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    with pytest.raises(RewriterError, match="epsilon"), torch.no_grad():
        model(**x)


# --- deployment: .pt2, AOTInductor lowering, HF folder (ONNX: tests/test_onnx_backend.py's llama-window-think-fuse) --

def test_fused_program_saves_and_lowers(fused_window, tmp_path):
    """fuse + window: model.pt2 round trip. lower() decomposes the fused ops into the model's aten ops (a small
    program holding both, at other batch and length: the lowering of a whole model re-traces it once per op)."""
    from rewriter.backends.torch_backend import load_program, write_program
    from rewriter.compile import lower
    from rewriter.program import Program, export
    program = fused_window.program
    write_program(program, tmp_path)
    loaded = load_program(tmp_path)
    x = model_inputs("llama", 2, 21, seed=7)
    assert FUSED_OPS <= set(op_counts(loaded)) and max_diff(loaded.run(**x), program.run(**x)) == 0

    class Block(torch.nn.Module):      # RMSNorm -> linear -> SwiGLU product, as the fused ops
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.Parameter(1 + 0.1 * torch.randn(16, generator=gen(11)))
            self.proj = torch.nn.Linear(16, 64)

        def forward(self, x):
            h = self.proj(torch.ops.rewriter.rms_norm(x, self.norm, 1e-5))
            return (torch.ops.rewriter.silu_mul(h[..., :32], h[..., 32:]),)

    x = torch.randn(2, 9, 16, generator=gen(12))
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=1, max=128)}}
    small = Program(ep=export(Block(), {"x": x}, dims), input_names=["x"], output_names=["y"],
                    example_inputs={"x": x}, dynamic_dims={"x": {0: "batch", 1: "seq"}},
                    dim_bounds={"batch": (1, 8), "seq": (1, 128)})
    lowered = lower(small)
    targets = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if t.startswith("rewriter.")]
    assert {"aten.rsqrt.default", "aten.silu.default"} <= targets
    for shape in ((1, 1, 16), (3, 37, 16)):
        x = torch.randn(*shape, generator=gen(shape[1]))
        assert torch.equal(lowered.module()(x=x)[0], small.run(x=x)[0]), shape


def test_hf_folder_is_the_models_own(llama, fused):
    """fuse changes no weight and no attention: with kv-window, the HF folder is the plain model (no rewriter block,
    the original weights) and the decode bundle is written."""
    from safetensors.torch import load_file
    model, _ = llama
    res, out = fused
    assert res.report["weight_only"] and (out / "decoder").is_dir()
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert "rewriter" not in cfg and cfg.get("attn_implementation") != "rewriter_attention"
    weights = load_file(str(out / "hf" / "model.safetensors"))
    own = model.state_dict()
    assert set(weights) <= set(own) and all(torch.equal(t, own[k]) for k, t in weights.items())


def test_trained_decoder_window_fuse_hf_folder(tmp_path):
    """The shipped decoder (real weights, Llama with GQA): window + fuse, its HF folder in transformers on real text
    at a length other than the calibration's runs the fused ops in every norm and MLP and equals the program."""
    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode
    from rewriter.data import DECODER_DIR
    out = tmp_path / "out"
    res = optimize(str(DECODER_DIR), [make_pass("window", {"window": 64, "sinks": 4}), make_pass("fuse")],
                   samples=2, seq_len=128, out=out)
    cfg = json.loads((out / "hf" / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    assert len(cfg["rewriter"]["fused"]) == 3 * layers + 1 and len(cfg["rewriter"]["sites"]) == layers
    tok = transformers.AutoTokenizer.from_pretrained(str(DECODER_DIR))
    import pydoc_data.topics
    ids = tok(pydoc_data.topics.topics["with"], return_tensors="pt")["input_ids"][:, :300]
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ran = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in FUSED_OPS:
                ran.append(str(func))
            return func(*args, **(kwargs or {}))

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    with torch.no_grad(), Seen():
        got = model(**x).logits
    assert ids.shape[1] == 300 and len(ran) == 3 * layers + 1
    want = res.program.run(**x)[0]
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype,wdtype", [(bf16, bf16), (f32, f32), (torch.float16, torch.float16), (bf16, f32)])
def test_add_rms_norm_kernel_matches_the_add_and_the_norm(dtype, wdtype):
    """rewriter::add_rms_norm (the decode step's residual add + the RMSNorm that reads it; rewriter/decode/norm.py):
    the kernel's sum equals torch's add bit for bit, its norm rounds as rms_norm's kernel (interpreter); the op's CPU
    body is the two ops; input checks and opcheck."""
    from rewriter.decode.norm import add_rms_norm_reference
    from rewriter.linear.triton.fused import add_rms_norm_triton
    for rows, H in ((1, 8), (7, 48), (33, 96)):
        x = (3 * torch.randn(rows, 1, H, generator=gen(H))).to(dtype)
        r = (3 * torch.randn(rows, 1, H, generator=gen(H + 5))).to(dtype)
        w = (1 + 0.2 * torch.randn(H, generator=gen(H + 1))).to(wdtype)
        total, normed = add_rms_norm_triton(x, r, w, 1e-6)
        assert torch.equal(total, x + r)
        assert_rounding_close(normed, torch.ops.rewriter.rms_norm(x + r, w, 1e-6), (rows, H))
        got = torch.ops.rewriter.add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(got[0], x + r) and torch.equal(got[1], torch.ops.rewriter.rms_norm(x + r, w, 1e-6))
        assert all(torch.equal(a, b) for a, b in zip(add_rms_norm_reference(x, r, w, 1e-6), got))
    with pytest.raises(ValueError, match="one shape and dtype"):
        torch.ops.rewriter.add_rms_norm(x, r[..., :-1], w, 1e-6)
    torch.library.opcheck(torch.ops.rewriter.add_rms_norm.default, (x, r, w, 1e-6))
