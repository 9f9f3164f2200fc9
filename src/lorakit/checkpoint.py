"""Adapter checkpoints in Hugging Face PEFT's format, written atomically, read safely.

A directory holds ``adapter_config.json`` (``LoraConfig.to_peft_dict``) and
``adapter_model.safetensors`` with only the adapter's tensors, keyed as PEFT keys them:

* ``base_model.model.<path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``
  (Conv2d: ``[r, in, kh, kw]`` and ``[out, r, 1, 1]``),
* embeddings: ``base_model.model.<path>.lora_embedding_A`` ``[r, num]`` / ``lora_embedding_B`` ``[dim, r]``,
* ``modules_to_save``: ``base_model.model.<path>.<param>`` (the module's own names),
* trained biases: ``base_model.model.<path>.base_layer.bias`` for adapted layers, else ``<path>.bias``.

Only safetensors files are read (never a pickle); the config's ranks are checked against the
stored shapes, and every key against the model, before anything is allocated or copied; a failed
load leaves the model as it was. A save replaces both files together (``files.write_folder``) and
records ``base_model_name_or_path`` and PEFT's ``task_type`` so that ``AutoPeftModel*`` loads it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import write_folder
from .config import ALL_LINEAR, PREFIX, LoraConfig
from .errors import InputError
from .files import (
    CONFIG_NAME,
    IN_OUT_KEY,
    WEIGHTS_NAME,
    AdapterLoadError,
    adapter_files,
    check_folder_kind,
    read_adapter,
    read_config,
    read_tensors,
    resolve_adapter,
)
from .injection import (
    CONFIGS_ATTR,
    adapter_configs,
    add_adapter,
    delete_adapter,
    find_targets,
    lora_layers,
    require_adapter,
    set_adapter,
)
from .layers import LoraLayer, LoraLinear, ModulesToSave, UnsupportedModuleError, plan_parameters, wrap_module
from .layers.attention import warn_peft_out_proj
from .layers.loftq import check_rebuilt, recorded_bases
from .layers.principal import convert_state
from .targeting import (
    candidate_modules,
    is_suffix,
    name_matches,
    output_head,
    require_adapter_name,
    require_module,
    set_submodule,
)

#: transformers' auto-model tables → PEFT's task type, most specific first
_TASKS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "AdapterLoadError",
    "adapter_state",
    "adapter_state_files",
    "embedding_state",
    "load_adapter",
    "load_adapter_tensors",
    "read_config",
    "read_tensors",
    "resolve_adapter",
    "save_adapter",
]


# ---------------------------------------------------------------------------------------- key map
def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT-format key → the model's live tensor, for every tensor adapter ``name`` owns."""
    config = require_adapter(model, name, "lorakit.save_adapter")
    state: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            for key, p in layer.adapter_params(name).items():
                state[f"{PREFIX}{path}.{key}"] = p
            if config.bias == "lora_only" and isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter):
                state[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for pname, p in module.saved_state(name).items():
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
    heads = {id(head), id(getattr(head, "base_layer", None))} if head is not None else set()
    state: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():  # an adapted one: its base layer, ``<path>.base_layer``
        if (isinstance(module, nn.Embedding) or id(module) in heads) and not isinstance(module, LoraLayer):
            state[f"{PREFIX}{path}.weight"] = module.weight
    return state


# ---------------------------------------------------------------------------------------- saving
def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class (``LlamaForCausalLM`` → ``CAUSAL_LM``, a bare
    ``LlamaModel`` → ``FEATURE_EXTRACTION``); None for other models."""
    if not type(model).__module__.startswith("transformers."):
        return None
    from transformers.models.auto import modeling_auto

    for table, task in _TASKS:
        names = getattr(modeling_auto, table, {}).values()
        if any(type(model).__name__ in ((n,) if isinstance(n, str) else n) for n in names):
            return task
    return None


def _config_for_saving(model: nn.Module, config: LoraConfig, name: str, base_model: str | None) -> LoraConfig:
    """``all-linear`` is resolved to explicit names so that PEFT (which accepts ``all-linear`` only
    on transformers models) rebuilds exactly the same set of adapted modules, and
    ``fan_in_fan_out`` is set when the adapted matrices are stored ``[in, out]`` (GPT-2's Conv1D),
    as PEFT records it. ``base_model_name_or_path`` (``base_model``, else the config's, else the
    transformers model's ``name_or_path``) and ``task_type`` are filled in when known."""
    adapted = {p: layer for p, layer in lora_layers(model) if name in layer.lora_A}
    if any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out for layer in adapted.values()):
        config = config.replace(fan_in_fan_out=True)
    origin = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    origin = base_model or config.base_model_name_or_path or (origin if isinstance(origin, str) else None) or None
    config = config.replace(base_model_name_or_path=origin, task_type=config.task_type or _task_type(model))
    if config.target_modules != ALL_LINEAR:
        return config
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    probe = config.replace(target_modules=leaves, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    chosen = {p for p, _ in candidate_modules(model) if name_matches(leaves, p)}
    if chosen == set(adapted):
        return probe
    return probe.replace(target_modules="|".join(re.escape(p) for p in adapted))


def adapter_state_files(
    model: nn.Module, name: str = "default", base_model: str | None = None, convert_to_lora: bool = False
) -> dict[str, bytes]:
    """The bytes of ``adapter_config.json`` and ``adapter_model.safetensors`` for adapter ``name``
    (the weights record the config's SHA-256 and, under ``IN_OUT_KEY``, the adapted matrices stored
    ``[in, out]``: ``fan_in_fan_out`` is one flag for the whole config, which PEFT corrects per
    layer type but a merge without the model cannot), for ``files.write_folder``."""
    state = adapter_state(model, name)
    config = _config_for_saving(model, adapter_configs(model)[name], name, base_model)
    if convert_to_lora:
        config = convert_state(lora_layers(model), name, config, state)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    in_out = sorted(p for p, layer in lora_layers(model) if name in layer.lora_A and _stored_in_out(layer))
    metadata = {IN_OUT_KEY: json.dumps(in_out), **recorded_bases(lora_layers(model), name)}
    return adapter_files(config.to_peft_dict(), tensors, metadata)


def _stored_in_out(layer: LoraLayer) -> bool:
    return isinstance(layer, LoraLinear) and bool(layer.fan_in_fan_out)


def save_adapter(
    model: nn.Module, directory: str | os.PathLike[str], name: str = "default", *, convert_to_lora: bool = False
) -> Path:
    """Write adapter ``name`` to ``directory`` in PEFT's format; returns the weights file path.

    A PiSSA / OLoRA adapter is saved as it is (it loads into the original model, which re-runs the
    init to rebuild the residual base); ``convert_to_lora=True`` saves it instead as a plain LoRA
    adapter of rank 2r that applies to the original weights anywhere (PEFT's conversion).

    Only the adapter's own tensors are written (for the seed MLP at r=4: 6,248 numbers). Both
    files are replaced together (a kill at any moment leaves the old pair or the new one); other
    files in ``directory`` stay. A full disk raises ``OSError`` "no space left on device" naming
    the folder, whose previous adapter is then unchanged.
    """
    require_module(model, "lorakit.save_adapter")
    check_folder_kind(directory, "LoRA")
    if not isinstance(convert_to_lora, bool):
        raise InputError(f"lorakit.save_adapter: convert_to_lora = {convert_to_lora!r}; allowed: True or False")
    write_folder(directory, adapter_state_files(model, name, convert_to_lora=convert_to_lora))
    warn_peft_out_proj(model, name)
    config = adapter_configs(model)[name]
    if config.target_modules == [] and not config.target_parameters:
        warnings.warn(f"adapter {name!r} targets no module (trainable tokens only): PEFT 0.21 refuses to load such "
                      "a config (it needs target_modules or target_parameters)", stacklevel=2)  # fmt: skip
    return Path(directory) / WEIGHTS_NAME


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
    adapters it adds one more. Both files are checked before anything is allocated (ranks against
    the stored shapes, dtypes, finite values, factor keys against the modules the config adapts in
    this model); then every tensor's shape: missing keys, unexpected keys and shape mismatches
    raise one ``AdapterLoadError`` listing each of them. On any error the model is left as it was.
    Full embedding / output-head weights saved beside the adapter (PEFT's ``save_embedding_layers``)
    are copied into the model's base layers, as PEFT does.
    """
    require_module(model, "lorakit.load_adapter")
    require_adapter_name(name, "lorakit.load_adapter")
    if not isinstance(activate, bool):
        raise InputError(f"activate = {activate!r}; allowed: True or False")
    directory = resolve_adapter(directory, revision=revision, subfolder=subfolder)
    metadata: dict[str, str] = {}
    config, tensors = read_adapter(directory, metadata=metadata)
    if name in model.__dict__.get(CONFIGS_ATTR, {}):
        raise AdapterLoadError(
            f"the model already holds an adapter named {name!r}; pick another name or delete it first"
        )
    try:
        targets = find_targets(model, config)
    except ValueError as err:
        raise AdapterLoadError(f"{directory}: the adapter does not fit this model: {err}") from None
    _check_before_allocating(model, config, targets, tensors, directory)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    originals = {path: model.get_submodule(path) for path in targets}  # LoftQ replaces base layers
    try:
        add_adapter(model, config, name)
        check_rebuilt(lora_layers(model), name, metadata)
        _copy_tensors(model, name, tensors, directory)
    except BaseException as err:
        if name in adapter_configs(model):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the LoftQ base is put back just below)
                delete_adapter(model, name)  # leave the model exactly as it was
            for path, module in originals.items():
                if model.get_submodule(path) is not module:
                    set_submodule(model, path, module)
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        if isinstance(err, (ValueError, TypeError)) and not isinstance(err, AdapterLoadError):
            raise AdapterLoadError(f"{directory}: the adapter does not fit this model: {err}") from None
        raise
    if activate:
        set_adapter(model, name)
    warn_peft_out_proj(model, name)
    return model


def _check_before_allocating(
    model: nn.Module, config: LoraConfig, targets: list[str], tensors: dict[str, torch.Tensor], directory: Path
) -> None:
    """Everything ``add_adapter`` would allocate, checked on shapes first (a 3 KB config saying
    r=1e6 must not allocate gigabytes): weights on the meta device (which would load as a silent
    no-op), ``modules_to_save`` names, and every factor key and shape against the modules the config
    adapts in this model. One ``AdapterLoadError`` lists every problem."""
    head = f"{directory}: adapter tensors do not match the model:"
    saved = [p for name in config.modules_to_save or [] for p, _ in candidate_modules(model) if is_suffix(name, p)]
    meta = [
        f"{path}.{n}"
        for path in (*targets, *saved)
        for n, t in (*model.get_submodule(path).named_parameters(), *model.get_submodule(path).named_buffers())
        if t.is_meta
    ]
    if meta:
        raise AdapterLoadError(
            f"{head} the adapted modules' weights are on the meta device ({', '.join(sorted(meta)[:3])}, ...): the "
            "model is not materialized (e.g. built under init_empty_weights); load its weights first"
        )
    lines = [
        f"  modules_to_save: {name!r} matches no module of the model"
        for name in config.modules_to_save or []
        if not any(is_suffix(name, p) for p, _ in candidate_modules(model))
    ]
    expected: dict[str, tuple[tuple[int, ...], int]] = {}
    explained: list[str] = []  # modules whose keys a line below already accounts for
    for path in targets:
        module = model.get_submodule(path)
        layer, reason = (module, None) if isinstance(module, LoraLayer) else _wrapper_or_none(module, path, config)
        if isinstance(layer, LoraLayer) and layer.variant != config.variant:
            reason = (f"it holds {layer.variant} adapters {sorted(layer.lora_A)} and this file is a {config.variant} "
                      "adapter; lorakit keeps one variant per layer: load it into a model without them")  # fmt: skip
        if layer is not None and reason is None:
            r = config.rank_for(path)
            try:
                shapes = layer.param_shapes(r, config.lora_bias)
            except ValueError as err:  # e.g. a rank the convolution's groups do not divide
                reason = str(err)
            else:
                expected.update({f"{PREFIX}{path}.{key}": (tuple(shape), r) for key, shape in shapes.items()})
        if reason is not None:
            lines.append(f"  module {path!r}: {reason}")
            explained.append(f"{PREFIX}{path}.")
    if config.target_parameters:
        try:
            layers = plan_parameters(model, config, targets).layers
        except ValueError as err:
            layers = {}
            lines.append(f"  {err}")
        for path, (layer, key) in layers.items():
            shapes = layer.param_shapes(config.rank_for(key))
            expected.update({f"{PREFIX}{path}.{k}": (tuple(v), config.rank_for(key)) for k, v in shapes.items()})
    stored = {k for k in tensors if ".lora_" in k and not k.startswith(tuple(explained))}
    lines += [f"  missing key {k} (expected shape {expected[k][0]})" for k in sorted(set(expected) - stored)]
    lines += [
        f"  unexpected key {k} (shape {tuple(tensors[k].shape)}): no module of this model that the config adapts"
        for k in sorted(stored - set(expected))
    ]
    for k in sorted(set(expected) & stored):
        (shape, r), got = expected[k], tuple(tensors[k].shape)
        if shape != got:
            lines.append(f"  shape mismatch for {k}: model expects {shape}, file has {got} (the config gives r={r})")
    if lines:
        raise AdapterLoadError("\n".join([head, *lines]))


def _wrapper_or_none(module: nn.Module, path: str, config: LoraConfig) -> tuple[LoraLayer | None, str | None]:
    """A throwaway wrapper of ``module``, to ask it the factor shapes (wrapping freezes the base
    layer: its flags are put back), or why there is none."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        return wrap_module(module, path, config.variant), None
    except UnsupportedModuleError as err:
        return None, err.reason or str(err)
    except TypeError:
        return None, None  # add_adapter names the unsupported type
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], directory: object) -> None:
    expected = adapter_state(model, name)
    missing = sorted(set(expected) - set(tensors))
    optional = {k: v for k, v in embedding_state(model).items() if k in tensors and k not in expected}
    expected.update(optional)
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    meta = sorted(k for k in set(expected) & set(tensors) if expected[k].is_meta)
    if missing or unexpected or mismatched or meta:
        lines = [f"{directory}: adapter tensors do not match the model:"]
        lines += [f"  missing key {k} (expected shape {tuple(expected[k].shape)})" for k in missing]
        lines += [f"  unexpected key {k} (shape {tuple(tensors[k].shape)})" for k in unexpected]
        lines += [
            f"  shape mismatch for {k}: model expects {tuple(expected[k].shape)}, file has {tuple(tensors[k].shape)}"
            for k in mismatched
        ]
        lines += [f"  {k}: the model's tensor is on the meta device (not materialized)" for k in meta]
        raise AdapterLoadError("\n".join(lines))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])


def load_adapter_tensors(model: nn.Module, directory: str | os.PathLike[str], name: str = "default") -> int:
    """Copy the tensors saved in ``directory`` into the model's existing adapter ``name`` (same
    checks as ``load_adapter``); returns how many tensors were loaded. Used to resume training."""
    if name not in adapter_configs(model):
        raise AdapterLoadError(f"the model holds no adapter named {name!r} to load into")
    merged = [p for p, layer in lora_layers(model) if name in layer.merged_adapters]
    if merged:  # unmerging later would subtract the new ΔW from a base that holds the old one
        raise AdapterLoadError(f"adapter {name!r} is merged into the base weights ({merged[0]!r}, ...); call "
                               "lorakit.unmerge(model) before loading new values into it")  # fmt: skip
    paired = (Path(directory) / CONFIG_NAME).exists()  # then the config must be the one saved with the weights
    tensors = read_adapter(directory)[1] if paired else read_tensors(directory)
    _copy_tensors(model, name, tensors, directory)
    return len(tensors)
