"""HF folders of attention rewrites: `optimize` writes OUT/hf/ with attn_implementation 'rewriter_attention' and the
program's per-site plan in config.json; after `import rewriter`, transformers' AutoModel*.from_pretrained runs the
rewritten model, equal to model.pt2 (the oracle: the program read back from disk) at lengths other than the
calibration's. Every attention method on tiny Llama (GQA), one method on each other architecture, MiniLM on real
text with a window and with auto-attention, the folder without rewriter, and generate from the trained decoder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import model_inputs, tiny_model

TOL = 1e-5          # fp32: the HF folder runs the same ops on the same tensors as model.pt2


@pytest.fixture(scope="module")
def tiny_programs():
    """arch -> (the eager model, its captured program), captured once for the module."""
    from rewriter import capture
    cache = {}

    def get(arch):
        if arch not in cache:
            model = tiny_model(arch)
            cache[arch] = (model, capture(model, seq=16))
        return cache[arch]
    return get


def _auto_class(arch: str):
    import transformers
    return transformers.AutoModelForCausalLM if arch in ("gpt2", "llama") else transformers.AutoModel


def _optimize(program, passes, out: Path, **calib):
    from rewriter import make_pass, optimize
    return optimize(program, [make_pass(n, c) for n, c in passes], out=out, **{"samples": 2, "seq_len": 24, **calib})


def _max_diff(got, want: tuple, names: list[str], inputs: dict) -> float:
    """Largest |HF - program| over every output the program names, on real tokens only."""
    mask = inputs.get("attention_mask")
    worst = 0.0
    for name, ref in zip(names, want):
        d = (got[name] - ref).abs()
        if mask is not None and tuple(d.shape[:2]) == tuple(mask.shape):
            d = d[mask.bool()]
        assert torch.isfinite(d).all(), name
        worst = max(worst, float(d.max()))
    return worst


def _roundtrip(out: Path, arch: str, inputs: dict) -> tuple[float, object, dict]:
    """(max |HF folder - model.pt2|, the HF output, the rewriter block) on `inputs`."""
    from rewriter.backends.torch_backend import load_program
    assert (out / "hf" / "config.json").exists(), json.loads((out / "report.json").read_text()).get("notes")
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["attn_implementation"] == "rewriter_attention"
    model = _auto_class(arch).from_pretrained(str(out / "hf"))
    assert model.config._attn_implementation == "rewriter_attention"
    program = load_program(out)
    with torch.no_grad():
        got = model(**inputs)
    want = program.run(**{k: inputs[k] for k in program.input_names})
    return _max_diff(got, want, program.output_names, inputs), got, cfg["rewriter"]


# --- every attention method (the registry) in one auto-attention plan on a tiny Llama with GQA ----------------------

def _method_labels() -> list[str]:
    """Every registered method as a plan label with concrete options: its first analysis candidate, densities
    replaced by explicit knobs and blocks / buckets of 8 tokens, so that it approximates at ~40 tokens."""
    from rewriter.attention import METHODS
    from rewriter.analysis import candidate_label
    explicit = {"window": {"window": 6, "sinks": 1}, "scatterbrain": {"window": 6}}
    labels = []
    for name, m in METHODS.items():
        if m.fit is not None:        # learned per site: its own pass (test_learned_method_round_trip)
            continue
        if name == "exact-attention":
            labels.append("exact")
            continue
        opts = {**(dict(m.candidates[0]) if m.candidates else {}), **explicit.get(name, {})}
        if m.density_knob and m.density_knob in opts:
            opts.pop("density", None)
        opts = {k: (8 if k in ("block", "bucket_size") else v) for k, v in opts.items()}
        labels.append(candidate_label(name, opts))
    return labels


def test_every_method_runs_in_transformers(tmp_path):
    """One site per layer, one head per method (exact heads as auto-attention writes them): each method's op runs
    inside transformers on its head group, GQA kv heads picked per group, equal to model.pt2."""
    import transformers as tf
    from rewriter import capture
    from rewriter.attention import METHODS
    labels = _method_labels()
    heads = 8
    layers = -(-len(labels) // heads)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, head_dim=8,
        intermediate_size=96, vocab_size=120, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
        architectures=["LlamaForCausalLM"])).eval()
    padded = labels + ["exact"] * (layers * heads - len(labels))
    plan = [{"site": f"model.layers.{i}.self_attn", "heads": padded[i * heads:(i + 1) * heads]} for i in range(layers)]
    out = tmp_path / "out"
    _optimize(capture(model, seq=16), [("auto-attention", {"plan": plan})], out)
    inputs = model_inputs("llama", 3, 37, seed=4)     # calibration: 24 tokens; capture: 16
    diff, got, block = _roundtrip(out, "llama", inputs)
    assert diff < TOL, diff
    assert {g["method"] for s in block["sites"] for g in s["groups"]} == {n for n, m in METHODS.items() if m.fit is None}
    with torch.no_grad():   # the approximations really run inside transformers (not its own SDPA)
        plain = model(**inputs).logits
    assert float((got.logits - plain)[inputs["attention_mask"].bool()].abs().max()) > 1e-3


def test_learned_method_round_trip(tiny_programs, tmp_path):
    """hedgehog's fitted feature maps travel in rewriter_attention.safetensors and run inside transformers."""
    out = tmp_path / "out"
    _optimize(tiny_programs("llama")[1], [("hedgehog", {"window": 4, "features": 8, "steps": 5})], out)
    inputs = model_inputs("llama", 2, 29, seed=5)
    diff, _, block = _roundtrip(out, "llama", inputs)
    assert diff < TOL, diff
    assert (out / "hf" / block["parameters"]).exists()
    assert {g["method"] for s in block["sites"] for g in s["groups"]} == {"hedgehog"}
    # a plan naming a parameter file anywhere but beside config.json is refused when the attention loads it
    from rewriter.errors import RewriterError
    cfg_path = out / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rewriter"]["parameters"] = "../elsewhere.safetensors"
    cfg_path.write_text(json.dumps(cfg))
    model = _auto_class("llama").from_pretrained(str(out / "hf"))
    with pytest.raises(RewriterError, match="parameter file"), torch.no_grad():
        model(**inputs)


# --- the attention passes on each architecture; sites left exact stay exact -----------------------------------------

def _mistral():
    import transformers as tf
    torch.manual_seed(0)
    return tf.MistralForCausalLM(tf.MistralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=120, max_position_embeddings=256, sliding_window=12)).eval()


@pytest.mark.parametrize("arch,layers", [("llama", None), ("gpt2", "1"), ("vit", "0"), ("mistral", None)])
def test_architectures_round_trip(tiny_programs, tmp_path, arch, layers):
    """The window pass (one group of every head per site). GPT-2 and ViT rewrite one layer: the other runs
    transformers' SDPA. ViT's modules have no layer_idx: its sites are found by module path. Mistral's own sliding
    window (12) is kept by the pass (window 6 inside it) and by the folder, checked past 12 tokens."""
    from rewriter import capture
    model, program = (_mistral(), None) if arch == "mistral" else tiny_programs(arch)
    program = program or capture(model, seq=16)
    out = tmp_path / "out"
    cfg = {"window": 6, "sinks": 0 if arch == "mistral" else 1, **({"layers": layers} if layers else {})}
    _optimize(program, [("window", cfg)], out)
    inputs = model_inputs("llama" if arch == "mistral" else arch, 3, 37, seed=4)
    diff, got, block = _roundtrip(out, "llama" if arch == "mistral" else arch, inputs)
    assert diff < TOL, diff
    assert len(block["sites"]) == (1 if layers else 2)
    assert len(block["exact_sites"]) == 2 - len(block["sites"])
    assert all(g["method"] == "window" and g["heads"] is None for s in block["sites"] for g in s["groups"])
    if layers:
        assert [s["layer"] for s in block["sites"]] == [int(layers)]


def test_padding_mask_reduced_once_per_forward(tiny_programs, tmp_path, monkeypatch):
    """transformers gives every layer the same (B, 1, L, L) mask of a padded batch: the folder's attention reduces
    it to the key mask once per forward (not once per layer: an L x L read each, and each new key-mask tensor a
    device sync in the kernels' all-real check), and a second forward with a new mask gets its own key mask."""
    import transformers
    import rewriter.graph as graph
    _, program = tiny_programs("llama")
    out = tmp_path / "out"
    _optimize(program, [("window", {"window": 6, "sinks": 1})], out)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    calls = []
    real = graph.key_mask_value
    monkeypatch.setattr(graph, "key_mask_value", lambda mask, batch: calls.append(mask.shape) or real(mask, batch))
    first, second = model_inputs("llama", 3, 37, seed=4), model_inputs("llama", 3, 37, seed=5)
    second["attention_mask"][0, :5] = 0           # another padding: a stale key mask would give other logits
    with torch.no_grad():
        got = [model(**first).logits, model(**second).logits]
    assert len(calls) == 2 and all(len(s) == 4 for s in calls), calls     # 2 layers, 2 forwards
    from rewriter.backends.torch_backend import load_program
    prog = load_program(out)
    for inputs, logits in zip((first, second), got):
        want = prog.run(**{k: inputs[k] for k in prog.input_names})[0]
        assert _max_diff({"logits": logits}, (want,), ["logits"], inputs) < TOL


# --- MiniLM on real text: a window pass and auto-attention in one pipeline ------------------------------------------

def _real_text(folder: Path, n: int, length: int) -> dict:
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    texts = [topics[k] for k in sorted(topics)[10:10 + n]]
    enc = tok(texts, return_tensors="pt", padding="longest", truncation=True, max_length=length)
    enc["attention_mask"][-1, length // 2:] = 0     # one padded row
    return dict(enc)


def test_minilm_on_real_text(minilm_program, tmp_path):
    """Layers 0-2 windowed (density 0.25 of MiniLM's 512 positions), layers 3-5 planned per head by auto-attention;
    checked on pydoc text at 96 tokens (calibration 48, capture 16)."""
    out = tmp_path / "out"
    result = _optimize(minilm_program, [
        ("window", {"density": 0.25, "sinks": 4, "layers": "0-2"}),
        ("auto-attention", {"density": 0.5, "layers": "3-5",
                            "candidates": ["window(window=8,sinks=2,block=16)", "performer(features=16)"]})],
        out, samples=4, seq_len=48)
    assert str(out / "hf") in result.report["outputs"] and "notes" not in result.report
    inputs = _real_text(out / "hf", 3, 96)
    assert inputs["input_ids"].shape[1] == 96
    diff, got, block = _roundtrip(out, "bert", inputs)
    assert diff < TOL, diff
    by_layer = {s["layer"]: {g["method"] for g in s["groups"]} for s in block["sites"]}
    assert all(by_layer[i] == {"window"} for i in range(3))
    auto = set().union(*(by_layer.get(i, set()) for i in range(3, 6)))
    assert auto and auto - {"exact-attention"}, by_layer   # the plan rewrote some heads


# --- without rewriter, with rewriter in a fresh process -------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_window_out(tiny_programs, tmp_path_factory):
    model, program = tiny_programs("llama")
    out = tmp_path_factory.mktemp("hf") / "out"
    _optimize(program, [("window", {"window": 6, "sinks": 1})], out)
    return out


def _python(code: str, cwd: Path, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_folder_without_rewriter_names_it(llama_window_out, tmp_path):
    """rewriter not importable (blocked in sys.modules: the venv may have it installed): transformers refuses the
    folder with an error that names rewriter."""
    r = _python(f"""
        import sys
        sys.modules["rewriter"] = None
        import transformers
        try:
            transformers.AutoModelForCausalLM.from_pretrained({str(llama_window_out / 'hf')!r})
        except Exception as e:
            print("REFUSED", type(e).__name__, str(e).splitlines()[0])
        else:
            print("LOADED")
        print("rewriter imported:", any(m.startswith("rewriter.") for m in sys.modules))
    """, tmp_path, None)
    assert "REFUSED" in r.stdout and "rewriter" in r.stdout.split("REFUSED", 1)[1], r.stdout + r.stderr
    assert "rewriter imported: False" in r.stdout


def test_import_rewriter_then_from_pretrained(llama_window_out, tmp_path):
    """A fresh process: `import rewriter` before transformers' models are imported registers the implementation as
    transformers loads them (no transformers import at `import rewriter`)."""
    inputs = model_inputs("llama", 2, 29, seed=6)
    torch.save(inputs, tmp_path / "inputs.pt")
    r = _python(f"""
        import sys, torch
        import rewriter
        assert "transformers.modeling_utils" not in sys.modules
        import transformers
        m = transformers.AutoModelForCausalLM.from_pretrained({str(llama_window_out / 'hf')!r})
        with torch.no_grad():
            torch.save(m(**torch.load({str(tmp_path / 'inputs.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
    """, tmp_path, str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    from rewriter.backends.torch_backend import load_program
    program = load_program(llama_window_out)
    assert _max_diff({"logits": torch.load(tmp_path / "logits.pt")}, program.run(**inputs), ["logits"], inputs) < TOL


# --- what the folder cannot hold ------------------------------------------------------------------------------------

def test_no_folder_where_transformers_cannot_run_the_plan(tmp_path):
    """Bloom's attention does not go through transformers' attention interface: a window pass (which keeps its
    ALiBi in model.pt2) gets no hf/ folder, and report.json says why. (Capture alone, every site exact, gets the
    plain model folder: test_exact_sites_are_left_to_transformers.)"""
    import transformers as tf
    from rewriter import capture
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=120)).eval()
    out = tmp_path / "out"
    result = _optimize(capture(model, seq=16), [("window", {"window": 6, "sinks": 0})], out)
    assert not (out / "hf").exists()
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any(n.startswith("no hf/ folder: transformers does not run the rewrite") for n in notes), notes
    assert not any(o.endswith("hf") or o.endswith("hf/") for o in result.report["outputs"])


def test_exact_sites_are_left_to_transformers(tmp_path):
    """Capture's canonical exact attention (Bloom's ALiBi kept as op arguments) is what transformers computes on
    its own: exact-attention (a no-op) writes the plain model folder, which loads without rewriter's plan and
    equals the program."""
    import transformers as tf
    from rewriter import capture
    from rewriter.backends.torch_backend import load_program
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=120)).eval()
    out = tmp_path / "out"
    _optimize(capture(model, seq=16), [("exact-attention", {})], out)
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert "rewriter" not in cfg and cfg.get("attn_implementation") != "rewriter_attention"
    inputs = model_inputs("gpt2", 2, 29, seed=6)
    hf = tf.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert _max_diff(hf(**inputs), load_program(out).run(**inputs), ["logits"], inputs) < TOL


def test_no_folder_for_linear_rewrites(tiny_programs, tmp_path):
    """A window plus a low-rank linear pass (two factor weights per linear): transformers' Llama cannot hold them,
    so no hf/ folder, and report.json says which weight."""
    model, program = tiny_programs("llama")
    out = tmp_path / "out"
    _optimize(program, [("window", {"window": 6, "sinks": 1}), ("lowrank", {"ratio": 0.5})], out)
    assert not (out / "hf").exists() and (out / "model.pt2").exists()
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any(n.startswith("no hf/ folder: the program has ") and "weight(s) the model lacks" in n
               for n in notes), notes


# --- generate from the folder: the trained decoder after a window pass ----------------------------------------------

def test_generate_from_the_folder_matches_the_program(tmp_path):
    import transformers
    import rewriter
    src = Path(rewriter.__file__).parent / "data" / "decoder"
    out = tmp_path / "out"
    _optimize(src, [("window", {"window": 8, "sinks": 2, "layers": "5-7"})], out, samples=2, seq_len=32)
    from rewriter.backends.torch_backend import load_program
    program = load_program(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "hf"))
    from pydoc_data.topics import topics
    ids = tok(topics["assert"], return_tensors="pt")["input_ids"][:, :14]   # past the 8-token window
    new = 4
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                            pad_token_id=0)
    seq = ids
    for _ in range(new):   # the program's greedy tokens: full-sequence forwards
        logits = program.run(input_ids=seq, attention_mask=torch.ones_like(seq))[0]
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    assert hf.shape[1] > ids.shape[1]                # (shorter than `new` only at an end-of-text token)
    assert hf[0].tolist() == seq[0, :hf.shape[1]].tolist()


def test_softcapped_window_round_trip(tmp_path):
    """Gemma2 (softcap as an op argument): a window pass's hf/ folder runs in transformers, which hands the model's
    softcap to the rewritten attention; the folder accepts it because the op keeps that cap, and equals the program."""
    import transformers as tf
    from rewriter import capture
    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=120, max_position_embeddings=256, sliding_window=24,
        attn_logit_softcapping=2.0, initializer_range=0.2)).eval()
    model.set_attn_implementation("eager")
    out = tmp_path / "out"
    _optimize(capture(model, seq=16), [("window", {"window": 8, "sinks": 0})], out, max_error=10.0)
    diff, _, block = _roundtrip(out, "llama", model_inputs("llama", 2, 37, seed=4))
    assert diff < TOL, diff
    assert all(g["args"]["softcap"] == 2.0 for s in block["sites"] for g in s["groups"])


def test_half_precision_check_weighs_the_folders_own_rounding(tmp_path, monkeypatch):
    """16-bit folders: beyond 2e-2, the difference to model.pt2 is weighed against the folder's own rounding (the
    same folder run in fp32). A 5e-2 change of the program's logits is refused with that rounding in the message
    (a tiny model rounds far less); the same difference passes when it is within the factor of the rounding."""
    import transformers as tf
    from rewriter import capture
    from rewriter.backends import torch_backend
    from rewriter.errors import RewriterError
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                               max_position_embeddings=64)).eval().to(torch.bfloat16)
    program = capture(model, seq=16)
    folder = tmp_path / "hf"
    assert torch_backend.write_hf(program, folder, weight_only=False) is None
    assert torch_backend.check_hf_folder(program, folder) <= 2e-2        # the same ops: within bf16 at once
    run = program.run

    def shifted(**inputs):
        out = run(**inputs)
        noise = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1)).to(out[0].dtype)
        return (out[0] + 0.05 * noise * out[0].float().norm() / noise.float().norm(), *out[1:])
    monkeypatch.setattr(program, "run", shifted)
    with pytest.raises(RewriterError, match=r"differs by [45]\.\d+e-02 .*the folder's own bfloat16 rounding"):
        torch_backend.check_hf_folder(program, folder)
    monkeypatch.setattr(torch_backend, "HF_NOISE_FACTOR", 1e6)
    assert 4e-2 < torch_backend.check_hf_folder(program, folder) < 6e-2
