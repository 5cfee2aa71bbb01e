"""Built-in passes; importing this module registers them."""
from . import attention, kv_thin, linear, lora_merge  # noqa: F401
