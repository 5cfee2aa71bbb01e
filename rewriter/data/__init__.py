"""Data shipped with the package.

DECODER_DIR: a small Llama decoder trained for this repository (RoPE, GQA 4 query / 2 KV heads, SwiGLU; 8 layers,
hidden 256, 7.6M parameters, bf16 safetensors, 8192-token byte-level BPE, context 2048) on the Python standard
library's .py sources, with a synthetic passkey task mixed in. A plain Hugging Face folder:
``AutoModelForCausalLM.from_pretrained(DECODER_DIR)`` and ``AutoTokenizer.from_pretrained(DECODER_DIR)``.
eval.json beside the weights records the numbers the tests check; README "The trained decoder" says how it was made.
"""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DECODER_DIR = DATA_DIR / "decoder"

__all__ = ["DATA_DIR", "DECODER_DIR"]
