"""Checkpoints larger than memory: layer-by-layer optimisation (run.py), lazy safetensors I/O (io.py), and the
streamed output read back block by block (load.py)."""
from .run import STREAM_TYPES, check_streamable, optimize_streamed  # noqa: F401
from .load import StreamedModel, is_streamed_output, load_streamed  # noqa: F401,E402
