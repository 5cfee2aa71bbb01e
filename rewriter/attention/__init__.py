"""Attention methods: each one a ``torch.library.custom_op`` (``rewriter::...``) with a readable PyTorch reference, a
fake, a counted cost, an ONNX translation and (optionally) a Triton kernel, registered as one ``AttentionMethod``
in ``METHODS`` (``_contract.py``: the q/k/v/mask conventions and the registry). The generic attention pass,
analysis, auto-attention, the ONNX exporter and the CUDA registration all read ``METHODS``.

Modules: ``exact.py`` (exact attention on the key-padding mask), ``sparse.py`` (window, block-topk, strided, lsh
over the block-sparse core in ``block_sparse.py``), ``feature_map.py`` (performer, linear, scatterbrain over the
feature-map core); ``_onnx.py`` holds the onnxscript helpers; ``triton/`` the CUDA kernels, which register onto
the ops from ``rewriter/__init__`` (these modules never import them). A new method is one more module here: it is
imported below with the others (see README, "Adding an attention method").
"""

from ._contract import METHODS, AttentionConfig, AttentionMethod, register_method  # noqa: E402,F401
from . import exact  # noqa: E402,F401
from . import sparse  # noqa: E402,F401
from . import feature_map  # noqa: E402,F401


def _import_method_modules() -> None:
    """Every other module of this package registers its method(s) on import (the three above come first: their
    order is the order of analysis' candidates and of `rewriter passes`)."""
    import importlib
    import pkgutil
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "triton":
            importlib.import_module(f"{__name__}.{module.name}")


_import_method_modules()
