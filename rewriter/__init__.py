"""rewriter: capture a pretrained transformer with torch.export, rewrite its attention and linear sites, verify, export."""
__version__ = "0.1.0"

from . import attention, linear  # noqa: F401,E402  (define the rewriter:: custom ops)
from .attention.triton.registry import register_cuda_kernels  # noqa: E402

register_cuda_kernels()   # the one place kernels register onto the ops; a no-op without CUDA (or with the reference forced)
from .api import inspect, load_program, optimize  # noqa: E402
from .capture import capture  # noqa: E402
from .errors import RewriterError  # noqa: E402
from .load import load  # noqa: E402
from .pipeline import PASSES, Pass, Pipeline, get_pass, make_pass  # noqa: E402
from .program import Program  # noqa: E402
from .recipe import Recipe  # noqa: E402
from . import passes  # noqa: F401,E402
from .hf import register_when_imported  # noqa: E402

register_when_imported()   # transformers runs rewritten attention (attn_implementation 'rewriter_attention')

__all__ = ["capture", "inspect", "load", "load_program", "optimize", "Pass", "Pipeline", "PASSES", "Program",
           "Recipe", "RewriterError", "get_pass", "make_pass"]
