"""Merging adapters into the base weights for zero-latency inference, and back.

``merge``: ``W0 ← W0 + s · B A`` for the active adapter in every LoRA layer, so the forward pass
costs exactly what the base model's costs. ``unmerge`` subtracts the same ``ΔW``.
``merge_and_unload`` merges and then puts the original modules back: the result holds no lorakit
module and its ``state_dict()`` has the original model's keys.
"""

from __future__ import annotations

import torch
from torch import nn

from .injection import CONFIGS_ATTR, active_adapter, adapter_configs, adapters_changed, lora_layers
from .layers import LoraLayer, ModulesToSave
from .quantization import dense_linear
from .targeting import is_linear4bit, set_submodule


def merge(model: nn.Module) -> nn.Module:
    """Add the active adapter's ``ΔW`` into the base weights of every LoRA layer.

    Raises ``RuntimeError`` when it is merged already (adding ΔW twice would be silently wrong).
    """
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model holds no LoRA layers: nothing to merge")
    if active_adapter(model) is None:
        raise ValueError("no adapter is active: call lorakit.set_adapter(model, name) first")
    if any(layer.route is not None for layer in layers):
        raise RuntimeError("cannot merge inside lorakit.route (routed rows would add ΔW a second time)")
    if any(layer.adapters_disabled for layer in layers):
        raise RuntimeError("adapters are disabled (inside lorakit.disable_adapters): merge outside that block")
    merged = [layer.merged_adapters for layer in layers if layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {merged[0][0]!r} is already merged; merging twice would add ΔW twice")
    for layer in layers:
        layer.merge()
    return model


def _dequantize_merge(model: nn.Module, dtype: torch.dtype) -> None:
    """Every ``Linear4bit`` → dense ``nn.Linear``; a LoRA layer on one gets ``W + ΔW`` (active
    adapter) and is marked merged, so the unload below only unwraps it."""
    if is_merged(model):
        raise RuntimeError(
            "an adapter is already merged into 4-bit weights: unmerge before merge_and_unload(dequantize=True)"
        )
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and is_linear4bit(module.base_layer):
            dense = dense_linear(module.base_layer, dtype)
            name = module.active_adapter
            if name is not None and name in module.lora_A and not module.adapters_disabled:
                with torch.no_grad():
                    dense.weight.add_(module.delta_weight(name).to(dtype))
                module.merged_adapters.append(name)
            module.base_layer = dense
        elif is_linear4bit(module) and not path.endswith("base_layer"):
            set_submodule(model, path, dense_linear(module, dtype))


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged ``ΔW`` from the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def is_merged(model: nn.Module) -> bool:
    """True when some adapter's ``ΔW`` is currently inside the base weights."""
    return any(layer.merged_adapters for _, layer in lora_layers(model))


def merge_and_unload(model: nn.Module, dequantize: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge the active adapter and return the plain model: every LoRA wrapper is replaced by its
    (merged) base module, every ``modules_to_save`` wrapper by the active adapter's trained copy.

    With ``dequantize=True`` every 4-bit layer becomes an ``nn.Linear`` in ``dtype`` holding
    ``dequantize(W4) + ΔW`` exactly (no re-quantization); without it a 4-bit base is merged by
    re-quantizing, with a warning that reports the error.
    Changes ``model`` in place and returns it; its ``state_dict()`` keys equal the original's.
    """
    if dequantize:
        _dequantize_merge(model, dtype)
    if active_adapter(model) is not None:
        for _, layer in lora_layers(model):
            if not layer.merged_adapters and not layer.adapters_disabled:
                layer.merge()
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.base_layer.requires_grad_(False)
            set_submodule(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave):
            set_submodule(model, path, module.active_module())
    adapter_configs(model).clear()
    model.__dict__.pop(CONFIGS_ATTR, None)
    adapters_changed(model)
    return model
