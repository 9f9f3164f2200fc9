"""Injecting adapters into any ``nn.Module``, switching between them, and counting parameters.

The model stays the user's own module: matching submodules are replaced in place by LoRA
wrappers (``layers.py``) that keep the original as ``base_layer``. The configs of the adapters
a model holds are kept in the plain attribute ``model.lorakit_configs`` (name → LoraConfig).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import ArgumentTypeError, InputError, short_repr
from .layers import LoraLayer, LoraLinear, ModulesToSave, apply_plan, plan_adapter, roll_back, sync_fast_paths
from .targeting import (
    candidate_modules,
    is_conv1d,
    is_linear4bit,
    is_suffix,
    layer_index,
    module_paths,
    name_matches,
    no_match_message,
    output_head,
    require_adapter_name,
    require_module,
    set_submodule,
)

CONFIGS_ATTR = "lorakit_configs"
#: the adapters set_adapter made active, in its order (the wrappers hold the first and the rest per layer)
ACTIVE_ATTR = "lorakit_active"


class UnknownAdapterError(InputError, KeyError):
    """A name that is no adapter of the model: an ``InputError`` whose message lists the adapters
    the model holds, and a ``KeyError`` for code that catches that."""

    def __str__(self) -> str:  # KeyError's own __str__ would print the message quoted
        return str(self.args[0]) if self.args else ""


def require_adapter(model: nn.Module, name: object, where: str, argument: str = "name") -> LoraConfig:
    """The config of adapter ``name``; ``UnknownAdapterError`` listing the model's adapters when
    it holds none of that name (``ArgumentTypeError`` when ``name`` is not a string)."""
    configs = adapter_configs(model)
    if not isinstance(name, str):
        raise ArgumentTypeError(f"{where}: {argument} = {short_repr(name)}; allowed: an adapter name (a string) among "
                                f"{sorted(configs)}")  # fmt: skip
    if name not in configs:
        raise UnknownAdapterError(f"{where}: {argument} = {name!r} is no adapter of this model; allowed: "
                                  f"{sorted(configs) or 'none (the model holds no adapters)'}")  # fmt: skip
    return configs[name]


def require_config(config: object, where: str) -> LoraConfig:
    """``config`` when it is a ``LoraConfig``, else ``ArgumentTypeError`` saying how to make one."""
    if isinstance(config, LoraConfig):
        return config
    hint = " (for a dict d: lorakit.LoraConfig(**d))" if isinstance(config, dict) else ""
    raise ArgumentTypeError(f"{where}: config = {short_repr(config)}; allowed: a lorakit.LoraConfig{hint}")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLinear)) or is_conv1d(module) or is_linear4bit(module)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The paths of the modules ``config`` adapts, in model order.

    Raises ``ValueError`` when a listed name (or the regex, or ``all-linear``) matches nothing,
    naming the closest existing module names.
    """
    require_module(model, "lorakit.find_targets")
    require_config(config, "lorakit.find_targets")
    candidates = candidate_modules(model)
    saved = config.modules_to_save or []
    if config.target_modules == ALL_LINEAR:
        head = output_head(model)
        # An nn.MultiheadAttention never calls its out_proj's forward: an adapter there would never run.
        inside_mha = {f"{p}.out_proj" for p, m in candidates if isinstance(m, nn.MultiheadAttention)}
        matched = [p for p, m in candidates if _is_linear(m) and m is not head and p not in inside_mha]
        if isinstance(head, LoraLayer):
            matched = [p for p in matched if getattr(model.get_submodule(p), "base_layer", None) is not head]
    else:
        matched = [p for p, _ in candidates if name_matches(config.target_modules, p)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)  # type: ignore[arg-type]
        matched = [p for p in matched if layer_index(p, config.layers_pattern) in wanted]
    if config.exclude_modules:
        matched = [p for p in matched if not name_matches(config.exclude_modules, p)]
    # Never put an adapter on a module that is trained in full: the two would fight.
    before = matched
    matched = [p for p in matched if not any(re.match(rf"(^|.*\.){re.escape(s)}($|\..*)", p) for s in saved)]

    all_paths = [p for p, _ in candidates]
    if isinstance(config.target_modules, list):
        unmatched = [n for n in config.target_modules if not any(is_suffix(n, p) for p in matched)]
        inside = [n for n in unmatched if any(is_suffix(n, p) for p in before)]
        if inside:
            raise ValueError(f"target_modules {inside} match only modules inside modules_to_save {saved} (trained in "
                             "full, so they take no adapter); drop one of the two")  # fmt: skip
        if unmatched:
            raise ValueError(_no_match_message(unmatched, all_paths, config))
    elif not matched:
        raise ValueError(_no_match_message([str(config.target_modules)], all_paths, config))
    return matched


def _no_match_message(names: list[str], paths: list[str], config: LoraConfig) -> str:
    after = []
    if config.layers_to_transform is not None:
        after.append(f"layers_to_transform={config.layers_to_transform}")
    if config.exclude_modules:
        after.append(f"exclude_modules={config.exclude_modules}")
    return no_match_message(names, paths, after)


# ---------------------------------------------------------------------------------------- registry
def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """name → config of every adapter ``model`` holds (empty before ``inject``)."""
    require_module(model, "lorakit.adapter_configs")
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(path, layer) for every LoRA wrapper in ``model``."""
    require_module(model, "lorakit.lora_layers")  # checked at the call, not at the first next()
    return ((path, module) for path, module in model.named_modules() if isinstance(module, LoraLayer))


def _wrappers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


#: called with the model each time it gains or loses adapters (``register_adapter_hook``)
ADAPTER_HOOKS: list[Callable[[nn.Module], None]] = []


def register_adapter_hook(hook: Callable[[nn.Module], None]) -> None:
    """Call ``hook(model)`` whenever a model gains or loses adapters (inject, add, delete, unload);
    how modules above this one (e.g. ``pretrained``) keep per-model state in step."""
    if hook not in ADAPTER_HOOKS:
        ADAPTER_HOOKS.append(hook)


def adapters_changed(model: nn.Module) -> None:
    """Adapters were added or removed (or wrappers unloaded): cached wrapper lists are stale."""
    model.__dict__["_lorakit_generation"] = model.__dict__.get("_lorakit_generation", 0) + 1
    sync_fast_paths(model)
    for hook in list(ADAPTER_HOOKS):
        hook(model)


def in_disabled_block(model: nn.Module) -> bool:
    """True inside ``with lorakit.disable_adapters(model):``."""
    return any(w.adapters_disabled for w in _wrappers(model))


def refuse_when_disabled(model: nn.Module, what: str) -> None:
    """``RuntimeError`` when ``what`` is called inside ``disable_adapters``: the block undoes
    merges on exit and keeps new wrappers running, so changing adapters there would be wrong."""
    if in_disabled_block(model):
        raise RuntimeError(
            f"{what} inside lorakit.disable_adapters(model) is not supported (the block puts the adapters "
            "back as they were on exit); call it outside the block"
        )


def wrapper_list(model: nn.Module) -> list[LoraLayer | ModulesToSave]:
    """Every lorakit wrapper in ``model``, cached until adapters are added or deleted (walking
    a large model's module tree costs milliseconds, too much for a per-batch call)."""
    key = model.__dict__.get("_lorakit_generation", 0)
    cached = model.__dict__.get("_lorakit_wrappers")
    if cached is None or cached[0] != key:
        cached = (key, list(_wrappers(model)))
        model.__dict__["_lorakit_wrappers"] = cached
    return cached[1]


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that currently runs (None when none does)."""
    require_module(model, "lorakit.active_adapter")
    for module in _wrappers(model):
        return module.active_adapter
    return None


# ---------------------------------------------------------------------------------------- public API
def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Wrap every module ``config`` targets with a LoRA layer, freeze the base, activate ``name``.

    Returns ``model`` itself (changed in place). After it, only the adapter's factors (plus
    ``modules_to_save`` copies and the biases ``config.bias`` names) require gradients.
    """
    require_module(model, "lorakit.inject")
    require_config(config, "lorakit.inject")
    require_adapter_name(name, "lorakit.inject")
    _refuse_switch_while_merged(model, [name])
    add_adapter(model, config, name)
    set_adapter(model, name)
    return model


def add_adapter(model: nn.Module, config: LoraConfig, name: str) -> nn.Module:
    """Add adapter ``name`` beside the ones ``model`` already holds (the active one stays active;
    the first adapter of a model becomes active).

    Everything is checked before the model changes (targets, module types, ranks,
    ``modules_to_save``), and any failure after that is rolled back: a failed call leaves the
    model as it was (modules, parameters, ``requires_grad`` flags)."""
    require_module(model, "lorakit.add_adapter")
    require_config(config, "lorakit.add_adapter")
    require_adapter_name(name, "lorakit.add_adapter")
    configs = adapter_configs(model)
    if name in configs:
        raise InputError(
            f"the model already holds an adapter named {name!r}; adapters: {sorted(configs)}. Pick another name "
            "or delete that adapter first"
        )
    refuse_when_disabled(model, f"adding adapter {name!r}")
    targets = find_targets(model, config)
    plan = plan_adapter(model, config, targets)  # raises before anything changes
    flags = [(p, p.requires_grad) for p in model.parameters()]
    first, undo = not configs, []
    try:
        apply_plan(model, config, name, plan, active_adapter(model), first, undo)
    except BaseException:
        roll_back(model, name, undo, flags)
        raise
    configs[name] = config
    adapters_changed(model)
    if first:
        set_adapter(model, name)
    return model


def _refuse_switch_while_merged(model: nn.Module, names: list[str]) -> None:
    """Only the one adapter that is merged may stay active while merged (never several)."""
    target = names[0] if len(names) == 1 else names
    for module in _wrappers(model):
        merged = module.merged_adapters if isinstance(module, LoraLayer) else []
        if merged and (len(names) > 1 or merged != names):
            raise RuntimeError(
                f"adapter {module.merged_adapters[0]!r} is merged into the base weights; "
                f"call lorakit.unmerge(model) before switching to {target!r}"
            )


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make ``name`` the adapter that runs and trains; every other adapter is frozen.

    A list of names (PEFT's ``set_adapter([a, b])``) makes all of them run and train at once, their
    outputs summed (``y = base(x) + Σ_k s_k B_k A_k x``); not for DoRA adapters (each rescales the
    whole weight) or adapters with ``modules_to_save``. For one adapter per row use ``lorakit.route``.
    An unknown name raises ``UnknownAdapterError`` (an ``InputError`` and a ``KeyError``).
    """
    require_module(model, "lorakit.set_adapter")
    names = [name] if isinstance(name, str) else list(name) if isinstance(name, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ArgumentTypeError(f"lorakit.set_adapter: name = {short_repr(name)}; allowed: an adapter name or a "
                                "non-empty list of distinct names")  # fmt: skip
    for n in names:
        require_adapter(model, n, "lorakit.set_adapter")
    refuse_when_disabled(model, f"lorakit.set_adapter(model, {name!r})")
    configs = adapter_configs(model)
    special = [n for n in names if configs[n].use_dora or configs[n].modules_to_save
               or configs[n].trainable_token_indices] if len(names) > 1 else []  # fmt: skip
    if special:
        raise InputError(f"lorakit.set_adapter: {special} use DoRA, modules_to_save or trainable tokens, which "
                         "cannot run together with other adapters; activate them alone")  # fmt: skip
    _refuse_switch_while_merged(model, names)
    model.__dict__[ACTIVE_ATTR] = tuple(names)
    for module in _wrappers(model):
        module.active_adapter = names[0]
        if isinstance(module, LoraLayer):
            module.also_active = tuple(n for n in names[1:] if n in module.lora_A)
            for other in module.lora_A:
                for p in module.adapter_params(other).values():
                    p.requires_grad_(other in names)
        else:
            for other, copy in module.modules_to_save.items():
                copy.requires_grad_(other in names)


def active_adapters(model: nn.Module) -> list[str]:
    """Every adapter that currently runs, in ``set_adapter``'s order (empty when none)."""
    first, configs = active_adapter(model), adapter_configs(model)
    stored = model.__dict__.get(ACTIVE_ATTR, ())
    if first is None or first not in configs:
        return []
    return [n for n in stored if n in configs] if stored[:1] == (first,) else [first]


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; wrappers left with no adapter go back to plain modules.
    An unknown name raises ``UnknownAdapterError`` (an ``InputError`` and a ``KeyError``)."""
    require_module(model, "lorakit.delete_adapter")
    require_adapter(model, name, "lorakit.delete_adapter")
    configs = adapter_configs(model)
    if any(isinstance(m, LoraLayer) and m.route is not None for m in _wrappers(model)):
        raise RuntimeError(f"cannot delete adapter {name!r} inside lorakit.route; leave the route first")
    refuse_when_disabled(model, f"deleting adapter {name!r}")
    merged = [p for p, layer in lora_layers(model) if name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged into the base weights ({merged[0]!r}, ...); call "
                           "lorakit.unmerge(model) before deleting it")  # fmt: skip
    was_active = active_adapters(model)
    for module in list(_wrappers(model)):
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.delete_adapter(name)
            if not module.lora_A:
                replace_module(model, module, module.base_layer)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            module.delete_adapter(name)
            if not module.modules_to_save:
                replace_module(model, module, module.original_module)
    del configs[name]
    adapters_changed(model)
    remaining = [n for n in was_active if n != name]
    if name in was_active and (remaining or configs):  # the others keep running; else the next adapter runs
        set_adapter(model, remaining or next(iter(configs)))


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every path where ``old`` sits (a shared module sits at several)."""
    for path in module_paths(model).get(id(old), []):
        set_submodule(model, path, new)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly as the base model.

    A merged adapter is unmerged for the block and merged back after it. Changing the adapters
    inside the block (merge, unmerge, merge_and_unload, add, delete, set_adapter) raises
    ``RuntimeError``: the block restores the state it found on exit.
    """
    require_module(model, "lorakit.disable_adapters")
    wrappers = list(_wrappers(model))
    previous = [w.adapters_disabled for w in wrappers]
    # A merged adapter is taken out of the weights for the block (what lorakit.unmerge does per layer).
    merged = [w for w in wrappers if isinstance(w, LoraLayer) and w.merged_adapters]
    for layer in merged:
        layer.unmerge()
    for w in wrappers:
        w.adapters_disabled = True
    try:
        yield model
    finally:
        for w, flag in zip(wrappers, previous, strict=True):
            w.adapters_disabled = flag
        for layer in merged:
            layer.merge()
