"""The trained decoder shipped in rewriter/data/decoder: loads with plain transformers, reproduces its recorded
held-out perplexity and short-distance passkey (rewriter/data/decoder/eval.json, written on CPU by
benchmarks/decoder_eval.py --write-fixture), and stays within its size limits."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rewriter.data import DECODER_DIR

EVAL = json.loads((DECODER_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(DECODER_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(DECODER_DIR)


def test_folder_and_sizes():
    names = {p.name for p in DECODER_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "eval.json"} <= names
    assert (DECODER_DIR / "model.safetensors").stat().st_size <= 16_000_000
    from safetensors import safe_open
    with safe_open(str(DECODER_DIR / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert dtypes == {"BF16"}
    assert n <= 8_000_000


def test_architecture(model):
    cfg = model.config
    assert cfg.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads          # GQA
    assert cfg.hidden_act == "silu" and cfg.intermediate_size > cfg.hidden_size   # SwiGLU MLP
    assert cfg.max_position_embeddings >= 2048
    n = sum(p.numel() for p in model.parameters())
    assert n == EVAL["params"] and n <= 8_000_000


def test_tokenizer(tokenizer, model):
    assert len(tokenizer) == model.config.vocab_size == 8192
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == model.config.eos_token_id
    ids = tokenizer("x = 2048", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "x = 2048"
    assert len([i for i in ids if tokenizer.decode([i]).isdigit()]) == 4      # digits one token each
    prompt = tokenizer.decode(EVAL["passkey"]["prompt_ids"])
    assert prompt.endswith("\n# recall passkey = ")
    assert "\n# passkey = %s\n" % EVAL["passkey"]["passkey"] in prompt


def test_held_out_slice_perplexity(model):
    s = EVAL["slice"]
    x = torch.tensor([s["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item()
    assert math.exp(nll) < 10                                          # far below the vocabulary size
    assert abs(nll - s["nll"]) < 2e-3, (nll, s["nll"])


def test_passkey_short_distance(model, tokenizer):
    p = EVAL["passkey"]
    prompt = torch.tensor([p["prompt_ids"]])
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, prompt.shape[1]:].tolist()
    assert new == p["greedy_ids"] == p["answer_ids"]
    assert tokenizer.decode(new) == p["passkey"]


def test_package_data_declared():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())
    assert "data/decoder/*" in data["tool"]["setuptools"]["package-data"]["rewriter"]
