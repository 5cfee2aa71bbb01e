"""The KV-cache decode runtime: prefill and one-token step programs over an explicit cache (decoder.py), the cache
and its hooks into HF decoders (cache.py), the cache policy read from what the KV passes recorded (policy.py), the
MLA latent cache (latent.py; in latent space with the up-projections absorbed: absorbed.py), the step's attention op
rewriter::decode_attention (attention.py; its split-K Triton kernel: triton_decode.py), and the runtime that decodes
with them (runtime.py: a static cache written in place, the step replayed as one CUDA graph, optionally fused by
Inductor, left-padded batches). It imports no pass; `rewriter.api.generate` composes passes and runtime."""
from .decoder import DECODER_TYPES, Decoder, build_decoder, decoder_dims, kv_bytes, step_shapes  # noqa: F401
from .latent import AbsorbedLatentDecoder, LatentDecoder, build_latent_decoder  # noqa: F401
from .policy import KVPolicy, ThinkDynamic, policy_from_meta  # noqa: F401
