"""One exception type for bad input: a one-line cause and, where there is one, the fix."""
from __future__ import annotations


class RewriterError(Exception):
    """Bad input or an impossible request. `str(e)` is one line: the cause, then the fix."""

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(cause if not fix else f"{cause}; {fix}")
