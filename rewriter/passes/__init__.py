"""Built-in passes; importing this module registers them."""
from . import attention, auto_attention, fuse, heads, kv_thin, linear, lora_merge, mla  # noqa: F401
