"""Synthetic checkpoints of a given shape (random weights, HF layout, several shards), written one tensor at a time:
what the scale tests and benchmarks optimise when no real checkpoint of that size is at hand."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .io import INDEX, shard_name, write_shard

LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def write_llama(folder: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
                **config) -> dict:
    """A LlamaForCausalLM folder with N(0, 0.02) weights (norms 1): config.json, one shard for the embedding, one
    per decoder block, one for the final norm and the head, and the index. Returns {"bytes", "shards"}."""
    import transformers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=0, **config)
    cfg.save_pretrained(str(folder))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)

    def make(name):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype).cpu()

    groups = [["model.embed_tokens.weight"]]
    groups += [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(cfg.num_hidden_layers)]
    groups.append([n for n in shapes if n == "model.norm.weight" or n.startswith("lm_head.")])
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = shard_name(i, len(groups))
        total += write_shard(folder / file, {n: make(n) for n in names}, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "shards": len(groups)}
