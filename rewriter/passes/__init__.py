"""Built-in passes; importing this module registers them."""
from . import attention, lora_merge  # noqa: F401
