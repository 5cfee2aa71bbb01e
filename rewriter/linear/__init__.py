"""Linear-layer approximations as custom ops: low-rank (+ sparse) factors and binary weights, each with a readable
reference, and the exact fused ops around a block's linears (RMSNorm, SwiGLU's silu * up); their Triton kernels live in
``linear/triton`` and register from ``rewriter.attention.triton.registry``."""
from . import binary, fused, lowrank  # noqa: F401  (define rewriter::binary_linear, the fused and the low-rank ops)
