"""Copy a training run's weights (benchmarks/train_decoder.py --out DIR: DIR/final or DIR/best) into the shipped HF
folder rewriter/data/decoder: bf16 safetensors via save_pretrained (lm_head tied to the embeddings), a greedy
generation_config, rope_theta also at the config's top level (for transformers 4.x readers), and the tokenizer
class named PreTrainedTokenizerFast so that AutoTokenizer loads it on transformers 4.x and 5.x.

    python benchmarks/decoder_ship.py out/decoder/final
    python benchmarks/decoder_eval.py --write-fixture      # then re-record eval.json and the results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from decoder_common import DECODER_DIR


def main(src: str):
    import transformers as tf
    model = tf.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.generation_config = tf.GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False)
    model.save_pretrained(DECODER_DIR)
    cfg_path = DECODER_DIR / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tc_path = DECODER_DIR / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    size = (DECODER_DIR / "model.safetensors").stat().st_size
    print(f"wrote {DECODER_DIR}: {sum(p.numel() for p in model.parameters())} parameters, {size} bytes of weights")
    assert size <= 16_000_000


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/decoder/final")
