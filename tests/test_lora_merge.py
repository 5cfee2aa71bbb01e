"""lora-merge against PEFT's own merge_and_unload (the oracle), on tiny BERT / GPT-2 / Llama / ViT and the
real MiniLM; outputs (.pt2 and the HF folder) load back and reproduce PEFT's merged model at new shapes."""
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
