"""The `rewriter` command."""
from .main import app, main  # noqa: F401
