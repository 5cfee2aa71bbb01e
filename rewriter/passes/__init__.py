"""Built-in passes; importing this module registers them."""
from . import lora_merge  # noqa: F401
