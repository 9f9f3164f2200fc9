"""Merging adapters into the base weights for zero-latency inference, and back.

``merge``: ``W0 ← W0 + s · B A`` for the active adapter in every LoRA layer, so the forward pass
costs exactly what the base model's costs. ``unmerge`` subtracts the same ``ΔW``.
``merge_and_unload`` merges and then puts the original modules back: the result holds no lorakit
module and its ``state_dict()`` has the original model's keys.
"""

from __future__ import annotations

from torch import nn

from .injection import CONFIGS_ATTR, _set_submodule, active_adapter, adapter_configs, lora_layers
from .layers import LoraLayer, ModulesToSave


def merge(model: nn.Module) -> nn.Module:
    """Add the active adapter's ``ΔW`` into the base weights of every LoRA layer.

    Raises ``RuntimeError`` when it is merged already (adding ΔW twice would be silently wrong).
    """
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model holds no LoRA layers: nothing to merge")
    if active_adapter(model) is None:
        raise ValueError("no adapter is active: call lorakit.set_adapter(model, name) first")
    if any(layer.adapters_disabled for layer in layers):
        raise RuntimeError("adapters are disabled (inside lorakit.disable_adapters): merge outside that block")
    merged = [layer.merged_adapters for layer in layers if layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {merged[0][0]!r} is already merged; merging twice would add ΔW twice")
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged ``ΔW`` from the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def is_merged(model: nn.Module) -> bool:
    """True when some adapter's ``ΔW`` is currently inside the base weights."""
    return any(layer.merged_adapters for _, layer in lora_layers(model))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and return the plain model: every LoRA wrapper is replaced by its
    (merged) base module, every ``modules_to_save`` wrapper by the active adapter's trained copy.

    Changes ``model`` in place and returns it; its ``state_dict()`` keys equal the original's.
    """
    if active_adapter(model) is not None and not is_merged(model):
        merge(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.base_layer.requires_grad_(False)
            _set_submodule(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave):
            _set_submodule(model, path, module.active_module())
    adapter_configs(model).clear()
    model.__dict__.pop(CONFIGS_ATTR, None)
    model.__dict__.pop("_lorakit_wrappers", None)
    return model
