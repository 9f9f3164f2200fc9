"""LoRA layers: one file per layer kind, each registered with ``register_kind``.

Importing this package registers the built-in kinds (linear, embedding, conv1d/2d/3d, and their
DoRA forms); a variant is one more file that subclasses the kinds and calls ``register_kind``.
"""

from .attention import LoraMultiheadAttention
from .base import LoraLayer, UnsupportedModuleError, accumulate, adapter_dtype
from .conv import LoraConv, LoraConv1d, LoraConv2d, LoraConv3d
from .dora import DoraConv, DoraConv1d, DoraConv2d, DoraConv3d, DoraEmbedding, DoraLayer, DoraLinear
from .eligibility import plain_weight_problem
from .embedding import LoraEmbedding
from .fast_paths import sync_fast_paths
from .linear import LoraLinear
from .modules_to_save import ModulesToSave
from .parameter import LoraParameter
from .parameter_plan import ParameterPlan, parameter_targets, plan_parameters
from .placement import AdapterPlan, apply_plan, plan_adapter, roll_back
from .registry import LayerKind, layer_class, register_kind, unregister_kind, wrap_module
from .trainable_tokens import TokenRows, TrainableTokens

__all__ = [
    "AdapterPlan",
    "DoraConv",
    "DoraConv1d",
    "DoraConv2d",
    "DoraConv3d",
    "DoraEmbedding",
    "DoraLayer",
    "DoraLinear",
    "LayerKind",
    "LoraConv",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraParameter",
    "ModulesToSave",
    "ParameterPlan",
    "TokenRows",
    "TrainableTokens",
    "UnsupportedModuleError",
    "accumulate",
    "adapter_dtype",
    "apply_plan",
    "layer_class",
    "parameter_targets",
    "plain_weight_problem",
    "plan_adapter",
    "plan_parameters",
    "register_kind",
    "roll_back",
    "sync_fast_paths",
    "unregister_kind",
    "wrap_module",
]
