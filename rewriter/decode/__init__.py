"""The KV-cache decode runtime (prefill + one-token step programs over an explicit cache); see decoder.py."""
from .decoder import (DECODE_PASSES, DECODER_TYPES, Decoder, GenerateResult, KVPolicy, ThinkDynamic,  # noqa: F401
                      build_decoder, decoder_dims, decoder_from, generate, kv_bytes, policy_from_meta, step_shapes)
