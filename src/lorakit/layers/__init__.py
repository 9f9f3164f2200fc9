"""LoRA layers: one file per layer kind, each registered with ``register_kind``.

Importing this package registers the built-in kinds (linear, embedding, conv2d); a variant is one
more file that subclasses a kind and calls ``register_kind`` with its variant name.
"""

from .base import (
    LayerKind,
    LoraLayer,
    accumulate,
    adapter_dtype,
    layer_class,
    register_kind,
    unregister_kind,
    wrap_module,
)
from .conv import LoraConv2d
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .modules_to_save import ModulesToSave

__all__ = [
    "LayerKind",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSave",
    "accumulate",
    "adapter_dtype",
    "layer_class",
    "register_kind",
    "unregister_kind",
    "wrap_module",
]
