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

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .injection import (
    _candidate_modules,
    _name_matches,
    _output_head,
    adapter_configs,
    add_adapter,
    delete_adapter,
    find_targets,
    lora_layers,
    set_adapter,
)
from .layers import ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """An adapter checkpoint cannot be loaded into this model; the message says exactly why."""


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
    head = _output_head(model)
    state: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (head is not None and module is head):
            state[f"{PREFIX}{path}.weight"] = module.weight
    return state


# ---------------------------------------------------------------------------------------- saving
def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _config_for_saving(model: nn.Module, config: LoraConfig, name: str) -> LoraConfig:
    """``all-linear`` is resolved to explicit names so that PEFT (which accepts ``all-linear`` only
    on transformers models) rebuilds exactly the same set of adapted modules, and
    ``fan_in_fan_out`` is set when the adapted matrices are stored ``[in, out]`` (GPT-2's Conv1D),
    as PEFT records it."""
    adapted = {p: layer for p, layer in lora_layers(model) if name in layer.lora_A}
    if any(getattr(layer, "fan_in_fan_out", False) for layer in adapted.values()):
        config = config.replace(fan_in_fan_out=True)
    if config.target_modules != ALL_LINEAR:
        return config
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    probe = config.replace(target_modules=leaves, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    chosen = {p for p, _ in _candidate_modules(model) if _name_matches(leaves, p)}
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
    _atomic_write(weights, save(tensors, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write(out / CONFIG_NAME, text.encode())
    return weights


# ---------------------------------------------------------------------------------------- loading
def read_config(directory: str | os.PathLike[str]) -> LoraConfig:
    """The ``LoraConfig`` stored in an adapter directory (PEFT's or ours)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path}: no {CONFIG_NAME} here; is {directory} an adapter directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{path}: not valid JSON ({err})") from None
    try:
        return LoraConfig.from_peft_dict(data)
    except ValueError as err:
        raise AdapterLoadError(f"{path}: {err}") from None


def read_tensors(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory; only safetensors, never a pickle."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickles:
            raise AdapterLoadError(
                f"{directory}: found {', '.join(pickles)} but no {WEIGHTS_NAME}. lorakit never loads pickle "
                "files (unpickling can run arbitrary code); convert the adapter to safetensors first "
                "(e.g. with peft: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterLoadError(f"{directory}: no {WEIGHTS_NAME} here")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        size = path.stat().st_size
        raise AdapterLoadError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupted?): {err}"
        ) from None


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
    from .hub import resolve_adapter

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
