"""Adapter checkpoints in Hugging Face PEFT's format, written atomically, read safely.

A directory holds ``adapter_config.json`` (``LoraConfig.to_peft_dict``) and
``adapter_model.safetensors`` with only the adapter's tensors, keyed as PEFT keys them:

* ``base_model.model.<path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``
  (Conv2d: ``[r, in, kh, kw]`` and ``[out, r, 1, 1]``),
* embeddings: ``base_model.model.<path>.lora_embedding_A`` ``[r, num]`` / ``lora_embedding_B`` ``[dim, r]``,
* ``modules_to_save``: ``base_model.model.<path>.<param>`` (the module's own names),
* trained biases: ``base_model.model.<path>.base_layer.bias`` for adapted layers, else ``<path>.bias``.

Only safetensors files are read (never a pickle), every tensor is checked against the model
before anything is copied, and writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    AdapterLoadError,
    atomic_write,
    read_config,
    read_tensors,
    resolve_adapter,
)
from .injection import adapter_configs, add_adapter, delete_adapter, find_targets, lora_layers, set_adapter
from .layers import LoraLinear, ModulesToSave
from .targeting import candidate_modules, name_matches, output_head

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "AdapterLoadError",
    "adapter_state",
    "embedding_state",
    "load_adapter",
    "load_adapter_tensors",
    "read_config",
    "read_tensors",
    "save_adapter",
]


# ---------------------------------------------------------------------------------------- key map
def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT-format key → the model's live tensor, for every tensor adapter ``name`` owns."""
    configs = adapter_configs(model)
    if name not in configs:
        raise KeyError(f"no adapter named {name!r}; the model holds {sorted(configs) or 'no adapters'}")
    config = configs[name]
    state: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            key_a, key_b = layer.peft_keys
            state[f"{PREFIX}{path}.{key_a}"] = layer.lora_A[name]
            state[f"{PREFIX}{path}.{key_b}"] = layer.lora_B[name]
            if config.bias == "lora_only" and isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter):
                state[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for pname, p in module.modules_to_save[name].named_parameters():
                state[f"{PREFIX}{path}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora_" not in pname and ".modules_to_save." not in pname:
                if ".original_module." in pname:
                    continue
                state[PREFIX + pname] = p
    return state


def embedding_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-format key → weight of every embedding and of the output head.

    PEFT saves these full weights beside the adapter when an embedding is adapted
    (``save_embedding_layers``, for resized vocabularies); loading them reproduces PEFT's model.
    """
    head = output_head(model)
    state: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (head is not None and module is head):
            state[f"{PREFIX}{path}.weight"] = module.weight
    return state


# ---------------------------------------------------------------------------------------- saving
def _config_for_saving(model: nn.Module, config: LoraConfig, name: str) -> LoraConfig:
    """``all-linear`` is resolved to explicit names so that PEFT (which accepts ``all-linear`` only
    on transformers models) rebuilds exactly the same set of adapted modules, and
    ``fan_in_fan_out`` is set when the adapted matrices are stored ``[in, out]`` (GPT-2's Conv1D),
    as PEFT records it."""
    adapted = {p: layer for p, layer in lora_layers(model) if name in layer.lora_A}
    if any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out for layer in adapted.values()):
        config = config.replace(fan_in_fan_out=True)
    if config.target_modules != ALL_LINEAR:
        return config
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    probe = config.replace(target_modules=leaves, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    chosen = {p for p, _ in candidate_modules(model) if name_matches(leaves, p)}
    if chosen == set(adapted):
        return probe
    return probe.replace(target_modules="|".join(re.escape(p) for p in adapted))


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str = "default") -> Path:
    """Write adapter ``name`` to ``directory`` in PEFT's format; returns the weights file path.

    Only the adapter's own tensors are written (for the seed MLP at r=4: 6,248 numbers).
    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    state = adapter_state(model, name)
    config = _config_for_saving(model, adapter_configs(model)[name], name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    weights = out / WEIGHTS_NAME
    atomic_write(weights, save(tensors, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(out / CONFIG_NAME, text.encode())
    return weights


# ---------------------------------------------------------------------------------------- loading
def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    name: str = "default",
    *,
    activate: bool = True,
    revision: str | None = None,
    subfolder: str | None = None,
) -> nn.Module:
    """Load an adapter saved by lorakit or by ``peft`` into ``model`` under ``name``.

    ``directory`` is a local folder or a Hugging Face Hub id (``owner/name``, resolved through
    ``huggingface_hub``'s cache; ``revision`` and ``subfolder`` pick the commit and folder).

    On a plain model this injects from the stored config; on a model that already holds
    adapters it adds one more. Every tensor is checked first; missing keys, unexpected keys and
    shape mismatches raise one ``AdapterLoadError`` listing each of them, and the model is then
    left as it was.
    """
    directory = resolve_adapter(directory, revision=revision, subfolder=subfolder)
    config = read_config(directory)
    tensors = read_tensors(directory)
    if name in adapter_configs(model):
        raise AdapterLoadError(
            f"the model already holds an adapter named {name!r}; pick another name or delete it first"
        )
    try:
        find_targets(model, config)
    except ValueError as err:
        raise AdapterLoadError(f"{directory}: the adapter does not fit this model: {err}") from None
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    add_adapter(model, config, name)
    try:
        _copy_tensors(model, name, tensors, directory)
    except AdapterLoadError:
        delete_adapter(model, name)  # leave the model exactly as it was
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        raise
    if activate:
        set_adapter(model, name)
    return model


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], directory: object) -> None:
    expected = adapter_state(model, name)
    missing = sorted(set(expected) - set(tensors))
    optional = {k: v for k, v in embedding_state(model).items() if k in tensors and k not in expected}
    expected.update(optional)
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or mismatched:
        lines = [f"{directory}: adapter tensors do not match the model:"]
        lines += [f"  missing key {k} (expected shape {tuple(expected[k].shape)})" for k in missing]
        lines += [f"  unexpected key {k} (shape {tuple(tensors[k].shape)})" for k in unexpected]
        lines += [
            f"  shape mismatch for {k}: model expects {tuple(expected[k].shape)}, file has {tuple(tensors[k].shape)}"
            for k in mismatched
        ]
        raise AdapterLoadError("\n".join(lines))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])


def load_adapter_tensors(model: nn.Module, directory: str | os.PathLike[str], name: str = "default") -> int:
    """Copy the tensors saved in ``directory`` into the model's existing adapter ``name`` (same
    checks as ``load_adapter``); returns how many tensors were loaded. Used to resume training."""
    if name not in adapter_configs(model):
        raise AdapterLoadError(f"the model holds no adapter named {name!r} to load into")
    tensors = read_tensors(directory)
    _copy_tensors(model, name, tensors, directory)
    return len(tensors)
