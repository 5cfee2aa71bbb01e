"""Custom ops (``torch.library.custom_op`` in the ``rewriter`` namespace) with readable reference implementations.

Attention approximations (conventions in ``_common.py``; every one returns (B, H, Lq, Dv) in q's dtype):

    rewriter::window_attention(q, k, v, key_mask?, causal, scale, window, sinks, block=64)
    rewriter::block_topk_attention(q, k, v, key_mask?, causal, scale, density, block=64, pool="mean",
                                   sink_blocks=1, local_blocks=1)
    rewriter::strided_attention(q, k, v, key_mask?, causal, scale, stride, local_blocks=1, sink_blocks=1, block=64)
    rewriter::lsh_attention(q, k, v, key_mask?, causal, scale, n_hashes, bucket_size=64, seed=0)
    rewriter::performer_attention(q, k, v, key_mask?, causal, scale, features, seed=0)
    rewriter::linear_attention(q, k, v, key_mask?, causal, scale, feature_map, window=0, sinks=0)
    rewriter::scatterbrain_attention(q, k, v, key_mask?, causal, scale, features, window, sinks=0, seed=0)

Exact attention on the key-padding mask (SDPA's causal flash path instead of a dense L x L mask):

    rewriter::exact_attention(q, k, v, key_mask?, causal, scale)

Sparse methods lower to ``block_sparse.block_sparse_attention_reference`` (layout: kv_index/kv_count plus a
token-level predicate); the Triton kernels in ``rewriter.attention.triton`` implement the same layout on CUDA.
"""

from . import feature_map  # noqa: E402,F401
from . import sparse  # noqa: E402,F401
from . import exact  # noqa: E402,F401
