"""Linear-layer approximations as custom ops: low-rank (+ sparse) factors and binary weights, each with a readable
reference; their Triton kernels live in ``linear/triton`` and register from ``rewriter.attention.triton.registry``."""
from . import binary, lowrank  # noqa: F401  (define rewriter::binary_linear and the low-rank ops)
