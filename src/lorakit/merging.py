"""Merging adapters into the base weights for zero-latency inference, and back.

``merge``: ``W0 ← W0 + s · B A`` for the active adapter in every LoRA layer, so the forward pass
costs exactly what the base model's costs. ``unmerge`` subtracts the same ``ΔW``.
``merge_and_unload`` merges and then puts the original modules back: the result holds no lorakit
module and its ``state_dict()`` has the original model's keys.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ArgumentTypeError, short_repr
from .injection import (
    CONFIGS_ATTR,
    active_adapter,
    adapter_configs,
    adapters_changed,
    lora_layers,
    refuse_when_disabled,
    replace_module,
    wrapper_list,
)
from .layers import LoraLayer
from .quantization import dense_linear
from .targeting import is_linear4bit, require_module

logger = logging.getLogger(__name__)


def merge(model: nn.Module) -> nn.Module:
    """Add the active adapter's ``ΔW`` into the base weights of every LoRA layer.

    Raises ``RuntimeError`` when it is merged already (adding ΔW twice would be silently wrong).
    """
    require_module(model, "lorakit.merge")
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model holds no LoRA layers: nothing to merge (trainable tokens and modules_to_save "
                         "keep running as they are; lorakit.merge_and_unload writes them into the model)")  # fmt: skip
    if active_adapter(model) is None:
        raise ValueError("no adapter is active: call lorakit.set_adapter(model, name) first")
    if any(layer.route is not None for layer in layers):
        raise RuntimeError("cannot merge inside lorakit.route (routed rows would add ΔW a second time)")
    refuse_when_disabled(model, "lorakit.merge")
    merged = [layer.merged_adapters for layer in layers if layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {merged[0][0]!r} is already merged; merging twice would add ΔW twice")
    _merge_all(layers)
    return model


def _merge_all(layers: list[LoraLayer]) -> None:
    """Merge every layer, or none: a layer that refuses (a grouped convolution, a lora bias without
    a base bias) leaves the layers merged before it unmerged again."""
    done = []
    try:
        for layer in layers:
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def _dequantize_merge(model: nn.Module, dtype: torch.dtype) -> None:
    """Every ``Linear4bit`` → dense ``nn.Linear`` in ``dtype``. A LoRA layer on one gets a float32
    copy of its weight first, into which every active adapter merges as into any dense base (ΔW,
    lora biases, DoRA), rounded once to ``dtype``; if a merge refuses, the 4-bit bases come back."""
    if is_merged(model):
        raise RuntimeError(
            "an adapter is already merged into 4-bit weights: unmerge before merge_and_unload(dequantize=True)"
        )
    layers = [layer for _, layer in lora_layers(model)]
    swapped = [(layer, layer.base_layer) for layer in layers if is_linear4bit(layer.base_layer)]
    for layer, quantized in swapped:
        layer.base_layer = dense_linear(quantized, torch.float32)
    try:
        if active_adapter(model) is not None:
            _merge_all(layers)
    except BaseException:
        for layer, quantized in swapped:
            layer.base_layer = quantized
        raise
    for layer, _ in swapped:
        layer.base_layer = layer.base_layer.to(dtype)
    for path, module in list(model.named_modules()):
        if is_linear4bit(module) and not path.endswith("base_layer"):
            replace_module(model, module, dense_linear(module, dtype))


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged ``ΔW`` from the base weights again."""
    require_module(model, "lorakit.unmerge")
    refuse_when_disabled(model, "lorakit.unmerge")
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def is_merged(model: nn.Module) -> bool:
    """True when some adapter's ``ΔW`` is currently inside the base weights."""
    require_module(model, "lorakit.is_merged")
    return any(layer.merged_adapters for _, layer in lora_layers(model))


def merge_and_unload(model: nn.Module, dequantize: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge the active adapter and return the plain model: every LoRA wrapper is replaced by its
    (merged) base module, every ``modules_to_save`` wrapper by the active adapter's trained copy.

    With ``dequantize=True`` every 4-bit layer becomes an ``nn.Linear`` in ``dtype`` holding
    ``dequantize(W4) + ΔW`` exactly (no re-quantization), and a transformers model loses its
    quantization config, so ``save_pretrained`` writes (and ``from_pretrained`` reads) the dense
    model; without it a 4-bit base is merged by re-quantizing, with a warning that reports the
    error. A merged layer whose weight was tied to another module keeps its own copy (the other
    keeps ``W0``), and a transformers config that says ``tie_word_embeddings`` is corrected.
    Changes ``model`` in place and returns it; its ``state_dict()`` keys equal the original's.
    Refused inside ``lorakit.route`` and ``lorakit.disable_adapters`` (the adapter would be lost).
    """
    require_module(model, "lorakit.merge_and_unload")
    if not isinstance(dequantize, bool):
        raise ArgumentTypeError(
            f"lorakit.merge_and_unload: dequantize = {short_repr(dequantize)}; allowed: True or False"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentTypeError(f"lorakit.merge_and_unload: dtype = {short_repr(dtype)}; allowed: a floating-point "
                                "torch.dtype such as torch.float32 or torch.bfloat16")  # fmt: skip
    wrappers = wrapper_list(model)
    if any(isinstance(w, LoraLayer) and w.route is not None for w in wrappers):
        raise RuntimeError("cannot merge_and_unload inside lorakit.route: leave the route first")
    refuse_when_disabled(model, "lorakit.merge_and_unload")
    if dequantize:
        _dequantize_merge(model, dtype)
    if active_adapter(model) is not None:
        _merge_all([layer for _, layer in lora_layers(model) if not layer.merged_adapters])
    for module in wrappers:
        if isinstance(module, LoraLayer):
            module.base_layer.requires_grad_(False)
            replace_module(model, module, module.base_layer)
        else:
            replace_module(model, module, module.unload())
    adapter_configs(model).clear()
    model.__dict__.pop(CONFIGS_ATTR, None)
    adapters_changed(model)
    if dequantize and not any(is_linear4bit(m) for m in model.modules()):
        _drop_quantization_config(model)
    _untie_config_if_untied(model)
    return model


def _drop_quantization_config(model: nn.Module) -> None:
    """A dense model must not say it is quantized: transformers would save it with the 4-bit
    config, and ``from_pretrained`` would then quantize the dense weights again."""
    quantizer = getattr(model, "hf_quantizer", None)
    removed = quantizer is not None
    if quantizer is not None and callable(getattr(quantizer, "remove_quantization_config", None)):
        quantizer.remove_quantization_config(model)  # config.quantization_config, hf_quantizer, ...
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
            removed = True
        config.__dict__.pop("_is_quantized", None)  # transformers' in-memory mark (never saved)
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False) is True:
            setattr(model, flag, False)
    if removed:
        logger.info("merge_and_unload(dequantize=True): the model is dense; its quantization config was removed")


def _untie_config_if_untied(model: nn.Module) -> None:
    """After a merge gave a tied output head (or input embedding) its own weight, a transformers
    config must stop saying ``tie_word_embeddings``: saving would drop one of the two weights and
    loading would tie them again, silently undoing the merge."""
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if not (callable(get_input) and callable(get_output)) or config is None:
        return
    try:
        embedding, head = get_input(), get_output()
    except (AttributeError, NotImplementedError):
        return
    if embedding is None or head is None or getattr(embedding, "weight", None) is getattr(head, "weight", None):
        return
    get_text = getattr(config, "get_text_config", None)
    for cfg in {id(c): c for c in (config, get_text() if callable(get_text) else config)}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
            logger.warning(
                "merge_and_unload: the output head and the input embedding no longer share their weight (the "
                "adapter was merged into one of them); set config.tie_word_embeddings=False so that saving and "
                "loading keep both"
            )
