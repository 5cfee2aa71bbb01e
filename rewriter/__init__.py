"""rewriter: capture a pretrained transformer with torch.export, rewrite its attention and linear sites, verify, export."""
__version__ = "0.1.0"

from . import ops  # noqa: F401,E402  (registers the rewriter:: custom ops)
from .api import inspect, load_program, optimize  # noqa: E402
from .capture import capture  # noqa: E402
from .errors import RewriterError  # noqa: E402
from .load import load  # noqa: E402
from .pipeline import PASSES, Pass, Pipeline, get_pass, make_pass  # noqa: E402
from .program import Program  # noqa: E402
from .recipe import Recipe  # noqa: E402
from . import passes  # noqa: F401,E402

__all__ = ["capture", "inspect", "load", "load_program", "optimize", "Pass", "Pipeline", "PASSES", "Program",
           "Recipe", "RewriterError", "get_pass", "make_pass"]
