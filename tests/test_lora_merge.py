"""lora-merge against PEFT's own merge_and_unload (the oracle), on tiny BERT / GPT-2 / Llama / ViT and the
real MiniLM; outputs (.pt2 and the HF folder) load back and reproduce PEFT's merged model at new shapes."""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import transformers  # noqa: E402
from rewriter import load_program, make_pass, optimize  # noqa: E402

from conftest import ARCHS, model_inputs, tiny_model  # noqa: E402


def _first(out):
    return out[0] if isinstance(out, tuple) else next(v for v in out.values() if isinstance(v, torch.Tensor))


def _base(folder):
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    return getattr(transformers, cfg.architectures[0]).from_pretrained(str(folder)).eval()


def make_adapter(base_folder, out_dir, seed=0, **lora_kwargs):
    torch.manual_seed(seed)
    model = _base(base_folder)
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    kwargs.update(lora_kwargs)
    pm = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():   # DoRA's magnitude starts at the weight norm; move it so the test sees it
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()
    pm.save_pretrained(str(out_dir))
    return out_dir


def peft_merged(base_folder, adapters, weights=None, combination=None):
    model = _base(base_folder)
    pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, ad in enumerate(adapters[1:], 1):
        pm.load_adapter(str(ad), adapter_name=f"a{i}")
    if len(adapters) > 1:
        pm.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "mix", combination_type=combination)
        pm.set_adapter("mix")
    return pm.merge_and_unload().eval()


def check_against_peft(base_folder, out, merged_ref, arch, seq=23):
    inputs = model_inputs(arch, 3, seq, seed=5)
    with torch.no_grad():
        ref = _first(merged_ref(**inputs))
    program = load_program(out)
    got = program.run(**inputs)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    hf = _base(out / "hf")                      # plain transformers loads the written folder
    with torch.no_grad():
        got_hf = _first(hf(**inputs))
    torch.testing.assert_close(got_hf, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_peft(arch, tiny_folders, tmp_path):
    base = tiny_folders[arch]
    ad = make_adapter(base, tmp_path / "ad")
    out = tmp_path / "out"
    res = optimize(base, [make_pass("lora-merge", {"adapters": [str(ad)]})], out=out, samples=2, seq_len=12)
    assert res.report["passes"][0]["sites_changed"] > 0
    assert res.report["weight_only"]
    check_against_peft(base, out, peft_merged(base, [ad]), arch)


@pytest.mark.parametrize("variant", [
    dict(use_rslora=True),
    dict(use_dora=True),
    dict(lora_bias=True),
    dict(target_modules=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"query": 3}),
    dict(target_modules=["query"], modules_to_save=["pooler"]),
], ids=["rslora", "dora", "lora_bias", "patterns", "modules_to_save"])
def test_variants_match_peft(variant, tiny_folders, tmp_path):
    base = tiny_folders["bert"]
    ad = make_adapter(base, tmp_path / "ad", **variant)
    out = tmp_path / "out"
    optimize(base, [make_pass("lora-merge", {"adapters": [str(ad)]})], out=out, samples=2, seq_len=12)
    check_against_peft(base, out, peft_merged(base, [ad]), "bert")


@pytest.mark.parametrize("combination,peft_name", [("cat", "cat"), ("peft-linear", "linear")])
def test_weighted_adapters_match_peft(combination, peft_name, tiny_folders, tmp_path):
    base = tiny_folders["llama"]
    ad1 = make_adapter(base, tmp_path / "a1", seed=1)
    ad2 = make_adapter(base, tmp_path / "a2", seed=2)
    weights = [0.7, -0.3]
    out = tmp_path / "out"
    optimize(base, [make_pass("lora-merge", {"adapters": [str(ad1), str(ad2)], "weights": weights,
                                             "combination": combination})], out=out, samples=2, seq_len=12)
    check_against_peft(base, out, peft_merged(base, [ad1, ad2], weights, peft_name), "llama")


def test_minilm_merge_matches_peft(minilm_dir, tmp_path):
    ad = make_adapter(minilm_dir, tmp_path / "ad", target_modules=["query", "key", "value", "dense"])
    out = tmp_path / "out"
    res = optimize(minilm_dir, [make_pass("lora-merge", {"adapters": [str(ad)]})], out=out, samples=4, seq_len=64)
    assert res.report["passes"][0]["sites_changed"] == 6 * 6 + 1   # q, k, v, 3 dense per layer + pooler
    merged = peft_merged(minilm_dir, [ad])
    from transformers import AutoTokenizer
    from pydoc_data.topics import topics
    tok = AutoTokenizer.from_pretrained(str(out / "hf"))    # tokenizer travels with the output
    enc = tok([topics["for"], topics["try"]], truncation=True, max_length=77, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ref = merged(**inputs).last_hidden_state
    torch.testing.assert_close(load_program(out).run(**inputs)[0], ref, atol=1e-5, rtol=1e-5)
    hf = transformers.AutoModel.from_pretrained(str(out / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    assert (out / "hf" / "modules.json").exists()   # still a sentence-transformers folder


def test_input_is_never_modified(tiny_folders, tmp_path):
    base = tiny_folders["bert"]
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    ad = make_adapter(base, tmp_path / "ad")
    optimize(base, [make_pass("lora-merge", {"adapters": [str(ad)]})], out=tmp_path / "o", samples=2, seq_len=8)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_randlora_matches_peft(arch, tiny_folders, tmp_path):
    from peft import RandLoraConfig
    base = tiny_folders[arch]
    torch.manual_seed(0)
    targets = ["query", "intermediate.dense"] if arch == "bert" else ["c_attn", "mlp.c_fc"]
    pm = get_peft_model(_base(base), RandLoraConfig(r=8, target_modules=targets, fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "randlora_gamma" in name:
                p.normal_()
    pm.save_pretrained(str(tmp_path / "ad"))
    out = tmp_path / "out"
    res = optimize(base, [make_pass("lora-merge", {"adapters": [str(tmp_path / "ad")]})], out=out, samples=2, seq_len=12)
    assert res.report["passes"][0]["sites_changed"] == 4
    merged = PeftModel.from_pretrained(_base(base), str(tmp_path / "ad")).merge_and_unload().eval()
    check_against_peft(base, out, merged, arch)


# ---- variants PEFT lacks (Hydra, Block-LoRA, MoLE, SoRA): checked against the unmerged forward -------------------
# The oracle wraps each adapted layer of the base HF model so that it computes the variant's own forward in float64,
# x W0^T + b0 + (the variant's branch on x and on the base output), never the merged weight.

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GPT2_CONV1DS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _module_paths(arch):
    if arch == "llama":
        return [f"model.layers.{i}.{m}" for i in range(2) for m in LLAMA_LINEARS]
    return [f"transformer.h.{i}.{m}" for i in range(2) for m in GPT2_CONV1DS]


def _base_weight(layer):
    """(W0 as (out, in), b0) in float64 for nn.Linear and GPT-2's Conv1D (weight stored (in, out))."""
    W = layer.weight.detach().double()
    W = W if isinstance(layer, torch.nn.Linear) else W.t()
    return W, (layer.bias.detach().double() if layer.bias is not None else None)


class _Unmerged(torch.nn.Module):
    def __init__(self, layer, branch):
        super().__init__()
        self.layer, self.branch = layer, branch

    def forward(self, x):
        W0, b0 = _base_weight(self.layer)
        xd = x.double()
        y0 = xd @ W0.T + (b0 if b0 is not None else 0)
        return (y0 + self.branch(xd, y0)).to(x.dtype)


def unmerged_model(base_folder, branches):
    """The base model with `branches[path](x, base_output)` added to each named layer's output (float64)."""
    model = _base(base_folder)
    for path, branch in branches.items():
        parent, name = path.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, name, _Unmerged(getattr(owner, name), branch))
    return model


def layer_dims(base_folder, paths):
    """{path: (out, in)} of the base model's layers."""
    model = _base(base_folder)
    return {p: tuple(_base_weight(model.get_submodule(p))[0].shape) for p in paths}


def write_adapter(folder, config, tensors):
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"base_model.model.{k}": v.clone() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def check_unmerged(program, oracle, base_folder, arch, seq=19):
    """The merged program against the unmerged oracle; the adapter must move the output (else the test is blind)."""
    inputs = model_inputs(arch, 2, seq, seed=7)
    with torch.no_grad():
        ref = _first(oracle(**inputs))
        base = _first(_base(base_folder)(**inputs))
    assert (ref - base).abs().max() > 1e-2
    torch.testing.assert_close(program.run(**inputs)[0], ref, atol=1e-5, rtol=1e-5)


def merged_sites(res):
    """{module path: variant} of the sites the report lists."""
    return {s["module_path"]: "+".join(s["variants"]) for s in res.report["passes"][0]["sites"]}


def _merge(base, adapter, out=None):
    return optimize(base, [make_pass("lora-merge", {"adapters": [str(adapter)]})], out=out, samples=2, seq_len=8)


def _randn(*shape, gen, scale=0.1):
    return scale * torch.randn(*shape, generator=gen)


# each variant's own branch, (x, base output) -> added output, in float64
def _lora_branch(A, B, s):
    return lambda x, y0: s * (x @ A.double().T @ B.double().T)


def _hydra_branch(Ap, Bp, As, Bs, s):
    return lambda x, y0: s * (x @ Ap.double().T @ Bp.double().T + y0 @ As.double().T @ Bs.double().T)


def _sora_branch(A, B, gate, s):
    return lambda x, y0: s * ((x @ A.double().T) * gate.double()) @ B.double().T


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hydra_matches_unmerged_forward(arch, tiny_folders, tmp_path):
    """Parallel + sequential branches; GPT-2's Conv1D layers have biases, folded as b0 + s Bs As b0."""
    base, g = tiny_folders[arch], torch.Generator().manual_seed(3)
    r, r_seq, alpha = 4, 3, 6.0
    tensors, branches = {}, {}
    for path, (out_f, in_f) in layer_dims(base, _module_paths(arch)).items():
        Ap, Bp = _randn(r, in_f, gen=g), _randn(out_f, r, gen=g)
        As, Bs = _randn(r_seq, out_f, gen=g, scale=0.3), _randn(out_f, r_seq, gen=g, scale=0.3)
        tensors.update({f"{path}.lora_A.weight": Ap, f"{path}.lora_B.weight": Bp,
                        f"{path}.lora_seq_A.weight": As, f"{path}.lora_seq_B.weight": Bs})
        branches[path] = _hydra_branch(Ap, Bp, As, Bs, alpha / r)
    ad = write_adapter(tmp_path / "hydra", {"peft_type": "HYDRA_LORA", "r": r, "lora_alpha": alpha}, tensors)
    out = tmp_path / "out" if arch == "gpt2" else None
    res = _merge(base, ad, out)
    assert merged_sites(res) == {p: "hydra" for p in branches}
    assert all(bool(site.get("bias")) == (arch == "gpt2") for site in res.report["passes"][0]["sites"])
    oracle = unmerged_model(base, branches)
    check_unmerged(res.program, oracle, base, arch)
    if out is not None:   # the written .pt2 and HF folder reproduce it too
        check_against_peft(base, out, oracle, arch)


def test_block_lora_matches_unmerged_forward(tiny_folders, tmp_path):
    """q/k/v of a layer share one down-projection, gate/up another; o_proj and down_proj keep their own A;
    alpha_pattern gives k_proj its own scaling."""
    base, g = tiny_folders["llama"], torch.Generator().manual_seed(4)
    r, alpha, k_alpha = 4, 8.0, 2.0
    dims = layer_dims(base, _module_paths("llama"))
    tensors, branches, groups = {}, {}, {}
    for i in range(2):
        for group, members in ((f"model.layers.{i}.self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj",
                                                                    "self_attn.v_proj")),
                               (f"model.layers.{i}.mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj"))):
            A = _randn(r, 64, gen=g, scale=0.3)
            tensors[f"{group}.lora_A.weight"] = A
            groups[group] = [f"model.layers.{i}.{m}" for m in members]
            for path in groups[group]:
                B = _randn(dims[path][0], r, gen=g, scale=0.3)
                tensors[f"{path}.lora_B.weight"] = B
                branches[path] = _lora_branch(A, B, (k_alpha if path.endswith("k_proj") else alpha) / r)
        for path in (f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"):
            A, B = _randn(r, dims[path][1], gen=g, scale=0.3), _randn(dims[path][0], r, gen=g, scale=0.3)
            tensors.update({f"{path}.lora_A.weight": A, f"{path}.lora_B.weight": B})
            branches[path] = _lora_branch(A, B, alpha / r)
    ad = write_adapter(tmp_path / "block", {"peft_type": "BLOCK_LORA", "r": r, "lora_alpha": alpha,
                                            "alpha_pattern": {"k_proj": k_alpha}, "shared_a": groups}, tensors)
    res = _merge(base, ad)
    assert merged_sites(res) == {p: "block-lora" for p in branches}
    shared = {s["module_path"]: s.get("shared_a") for s in res.report["passes"][0]["sites"]}
    assert shared["model.layers.1.self_attn.k_proj"] == ["model.layers.1.self_attn.qkv"]
    assert shared["model.layers.1.mlp.down_proj"] is None
    check_unmerged(res.program, unmerged_model(base, branches), base, "llama")


def test_mole_matches_unmerged_forward(tiny_folders, tmp_path):
    """Two LoRA experts (different ranks and targets) under frozen gates: a module gate, a layer-wise gate vector
    for layer 1, and the global gate elsewhere; W' = W0 + sum_i g_i s_i B_i A_i."""
    base, g = tiny_folders["llama"], torch.Generator().manual_seed(5)
    dims = layer_dims(base, _module_paths("llama"))
    experts = [(4, 8.0, ("q_proj", "v_proj", "down_proj")), (2, 3.0, ("q_proj", "k_proj", "o_proj", "down_proj"))]
    gates = {"global": [0.7, 0.3], "layer 1": [0.2, 0.9], "model.layers.0.self_attn.q_proj": [1.5, -0.4]}
    updates: dict[str, list] = {}
    for e, (r, alpha, targets) in enumerate(experts):
        tensors = {}
        for path in (p for p in dims if p.endswith(targets)):
            A, B = _randn(r, dims[path][1], gen=g, scale=0.3), _randn(dims[path][0], r, gen=g, scale=0.3)
            tensors.update({f"{path}.lora_A.weight": A, f"{path}.lora_B.weight": B})
            updates.setdefault(path, []).append((e, A, B, alpha / r))
        write_adapter(tmp_path / "mole" / f"expert{e}", {"peft_type": "LORA", "r": r, "lora_alpha": alpha}, tensors)

    def gate(path, e):   # the oracle's own reading of the gate precedence
        key = path if path in gates else "layer 1" if path.startswith("model.layers.1.") else "global"
        return gates[key][e]

    def mixture(path):
        terms = [(gate(path, e), A, B, s) for e, A, B, s in updates[path]]
        return lambda x, y0: sum(gv * s * (x @ A.double().T @ B.double().T) for gv, A, B, s in terms)

    branches = {path: mixture(path) for path in updates}
    (tmp_path / "mole" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "MOLE", "adapters": ["expert0", "expert1"], "gates": gates["global"],
        "layer_gates": {"1": gates["layer 1"]}, "module_gates": {"layers.0.self_attn.q_proj": gates[
            "model.layers.0.self_attn.q_proj"]}}))
    res = _merge(base, tmp_path / "mole")
    assert merged_sites(res) == {p: "mole" for p in branches}
    reported = {s["module_path"]: s["gates"][0] for s in res.report["passes"][0]["sites"]}
    assert reported["model.layers.0.self_attn.q_proj"] == [1.5, -0.4]
    assert reported["model.layers.1.self_attn.k_proj"] == [0.9]          # expert 1 only, layer-1 gate
    assert reported["model.layers.0.mlp.down_proj"] == [0.7, 0.3]
    check_unmerged(res.program, unmerged_model(base, branches), base, "llama")


def test_sora_drops_zero_gated_ranks(tiny_folders, tmp_path):
    """GPT-2 (Conv1D): W' = W0 + s B diag(g) A; zero gates drop their ranks (one module loses all of them)."""
    base, g = tiny_folders["gpt2"], torch.Generator().manual_seed(6)
    r, alpha = 4, 8.0
    dims = layer_dims(base, _module_paths("gpt2"))
    zeros = {"transformer.h.0.attn.c_attn": [1], "transformer.h.1.mlp.c_fc": [0, 3],
             "transformer.h.1.attn.c_proj": [0, 1, 2, 3]}
    tensors, branches = {}, {}
    for path, (out_f, in_f) in dims.items():
        A, B = _randn(r, in_f, gen=g, scale=0.3), _randn(out_f, r, gen=g, scale=0.3)
        gate = torch.randn(r, generator=g)
        gate[zeros.get(path, [])] = 0.0
        tensors.update({f"{path}.lora_A.weight": A, f"{path}.lora_B.weight": B, f"{path}.lora_gate": gate})
        branches[path] = _sora_branch(A, B, gate, alpha / r)
    ad = write_adapter(tmp_path / "sora", {"peft_type": "SORA", "r": r, "lora_alpha": alpha}, tensors)
    res = _merge(base, ad)
    entry = res.report["passes"][0]
    assert merged_sites(res) == {p: "sora" for p in branches}
    assert {s["module_path"]: s["ranks_dropped"][0] for s in entry["sites"]} == {p: len(zeros.get(p, [])) for p in dims}
    assert entry["summary"]["sora_ranks_dropped"] == 7 and "dropped 7 zero-gated rank(s) in 3 of 8 gated module(s)" in entry["notes"][0]
    check_unmerged(res.program, unmerged_model(base, branches), base, "gpt2")


@pytest.fixture(scope="module")
def llama_program(tiny_folders):
    return load_program(tiny_folders["llama"])


@pytest.mark.parametrize("case", ["missing", "shape", "rank", "gates", "peft_type", "shared_a"])
def test_variant_errors_are_one_line(case, llama_program, tmp_path):
    from rewriter.errors import RewriterError
    q = "model.layers.0.self_attn.q_proj"
    A, B = torch.ones(4, 64), torch.ones(64, 4)
    if case == "missing":
        ad = write_adapter(tmp_path / "a", {"peft_type": "HYDRA_LORA", "r": 4},
                           {f"{q}.lora_A.weight": A, f"{q}.lora_B.weight": B, f"{q}.lora_seq_A.weight": A})
        expect = f"module {q} lacks lora_seq_B"
    elif case == "shape":
        ad = write_adapter(tmp_path / "a", {"peft_type": "SORA", "r": 4},
                           {f"{q}.lora_A.weight": torch.ones(4, 48), f"{q}.lora_B.weight": B, f"{q}.lora_gate": torch.ones(4)})
        expect = "does not fit .*q_proj: LoRA is 64x48, the layer is 64x64"
    elif case == "rank":
        ad = write_adapter(tmp_path / "a", {"peft_type": "SORA", "r": 4},
                           {f"{q}.lora_A.weight": A, f"{q}.lora_B.weight": B, f"{q}.lora_gate": torch.ones(3)})
        expect = "has 3 gates for rank 4"
    elif case == "gates":
        write_adapter(tmp_path / "a" / "e0", {"peft_type": "LORA", "r": 4}, {f"{q}.lora_A.weight": A, f"{q}.lora_B.weight": B})
        write_adapter(tmp_path / "a" / "e1", {"peft_type": "LORA", "r": 4}, {f"{q}.lora_A.weight": A, f"{q}.lora_B.weight": B})
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "MOLE", "adapters": ["e0", "e1"], "gates": [0.5, 0.5], "layer_gates": {"0": [1.0, 0.2, 0.1]}}))
        ad = tmp_path / "a"
        expect = r"MOLE layer_gates\['0'\] is \[1.0, 0.2, 0.1\] for 2 adapters; give a list of 2 numbers"
    elif case == "peft_type":
        ad = write_adapter(tmp_path / "a", {"peft_type": "VERA", "r": 4}, {f"{q}.lora_A.weight": A})
        expect = "is a VERA adapter; lora-merge reads peft_type LORA, RANDLORA, HYDRA_LORA, BLOCK_LORA, MOLE, SORA"
    else:
        ad = write_adapter(tmp_path / "a", {"peft_type": "BLOCK_LORA", "r": 4, "shared_a": {"model.layers.0.qk": [q]}},
                           {f"{q}.lora_B.weight": B})
        expect = r"shared down-projection base_model.model.model.layers.0.qk.lora_A.weight is missing"
    with pytest.raises(RewriterError, match=expect) as err:
        optimize(llama_program, [make_pass("lora-merge", {"adapters": [str(ad)]})], samples=1, seq_len=8)
    assert "\n" not in str(err.value)
