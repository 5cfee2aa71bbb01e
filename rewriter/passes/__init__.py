"""Built-in passes; importing this module registers them."""
from . import attention, auto_attention, linear, lora_merge  # noqa: F401
