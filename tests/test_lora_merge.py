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


def _module_paths(arch, layers=2):
    if arch == "llama":
        return [f"model.layers.{i}.{m}" for i in range(layers) for m in LLAMA_LINEARS]
    return [f"transformer.h.{i}.{m}" for i in range(layers) for m in GPT2_CONV1DS]


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
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hydra_matches_unmerged_forward(arch, tiny_folders, tmp_path):
    """Parallel + sequential branches; GPT-2's Conv1D layers have biases, folded as b0 + s Bs As b0."""
    base, g = tiny_folders[arch], torch.Generator().manual_seed(3)
    r, r_seq, alpha = 4, 3, 6.0
    s = alpha / r
    tensors, branches = {}, {}
    for path, (out_f, in_f) in layer_dims(base, _module_paths(arch)).items():
        Ap, Bp = _randn(r, in_f, gen=g), _randn(out_f, r, gen=g)
        As, Bs = _randn(r_seq, out_f, gen=g, scale=0.3), _randn(out_f, r_seq, gen=g, scale=0.3)
        tensors.update({f"{path}.lora_A.weight": Ap, f"{path}.lora_B.weight": Bp,
                        f"{path}.lora_seq_A.weight": As, f"{path}.lora_seq_B.weight": Bs})
        branches[path] = (lambda Ap, Bp, As, Bs: lambda x, y0: s * (x @ Ap.double().T @ Bp.double().T
                                                                   + y0 @ As.double().T @ Bs.double().T))(Ap, Bp, As, Bs)
    ad = write_adapter(tmp_path / "hydra", {"peft_type": "HYDRA_LORA", "r": r, "lora_alpha": alpha}, tensors)
    out = tmp_path / "out" if arch == "gpt2" else None
    res = _merge(base, ad, out)
    assert merged_sites(res) == {p: "hydra" for p in branches}
    assert all(bool(site.get("bias")) == (arch == "gpt2") for site in res.report["passes"][0]["sites"])
    oracle = unmerged_model(base, branches)
    check_unmerged(res.program, oracle, base, arch)
    if out is not None:   # the written .pt2 and HF folder reproduce it too
        check_against_peft(base, out, oracle, arch)
