"""Triton kernels (CUDA; on CPU tensors only under TRITON_INTERPRET=1) for the ops in ``rewriter.attention``."""
from __future__ import annotations

import importlib.util
import os

from .._contract import use_reference  # noqa: F401  (defined beside the ops: their CPU kernels read it too)


def triton_available() -> bool:
    """Triton is importable and can run: a CUDA device is present, or TRITON_INTERPRET=1 (CPU interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch
    return torch.cuda.is_available()
