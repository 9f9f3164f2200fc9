"""The bottom of lorakit: which modules a name matches, what kind of module a module is,
putting a new module in place of an old one, and the argument checks every public function
shares (``require_module``, ``require_adapter_name``).

Nothing here knows about adapters: wrappers mark themselves with the class attribute
``lorakit_wrapper = True`` and 4-bit layers with ``lorakit_4bit = True``, so the helpers below
recognise them without importing the modules that define them.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from .errors import ArgumentTypeError, InputError, short_repr

#: attribute names of the output head that ``"all-linear"`` leaves out when the model cannot tell
OUTPUT_HEAD_NAMES = ("lm_head",)


# ---------------------------------------------------------------------------------------- arguments
def require_module(model: object, where: str, argument: str = "model") -> nn.Module:
    """``model`` itself when it is an ``nn.Module`` instance, else ``ArgumentTypeError`` naming
    ``where`` (the public function, e.g. ``"lorakit.inject"``), the argument and the value."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, type) and issubclass(model, nn.Module):
        hint = f" (got the class {model.__name__} itself: pass an instance, e.g. {model.__name__}(...))"
    else:
        hint = ""
    raise ArgumentTypeError(f"{where}: {argument} = {short_repr(model)}; allowed: a torch.nn.Module instance{hint}")


def require_adapter_name(name: object, where: str, argument: str = "name") -> str:
    """``name`` when it can name an adapter (a non-empty string without '.'), else an ``InputError``
    (``ArgumentTypeError`` for a non-string) naming ``where``, the argument and the value."""
    allowed = "a non-empty string without '.' (an adapter name such as 'default')"
    if not isinstance(name, str):
        raise ArgumentTypeError(f"{where}: {argument} = {short_repr(name)}; allowed: {allowed}")
    if not name or "." in name:
        raise InputError(f"{where}: {argument} = {name!r}; allowed: {allowed}")
    if any(hasattr(table, name) for table in (nn.ModuleDict(), nn.ParameterDict())):  # adapters are their keys
        raise InputError(f"{where}: {argument} = {name!r} is the name of a method of torch's ModuleDict / "
                         "ParameterDict, which hold the adapters; pick another name")  # fmt: skip
    return name


# ---------------------------------------------------------------------------------------- names
def is_suffix(name: str, path: str) -> bool:
    """``name`` is the whole path or a whole dotted suffix of it (``fc1`` matches ``enc.fc1``, not ``xfc1``)."""
    return path == name or path.endswith("." + name)


def name_matches(names: list[str] | str, path: str) -> bool:
    """PEFT's rule: a regex string must match the full path; a list entry must be a whole
    dotted suffix of it."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(is_suffix(n, path) for n in names)


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the numbered layer list the module sits in (``model.layers.3.mlp`` → 3)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if m:
                break
    return int(m.group("idx")) if m else None


def no_match_message(names: list[str], paths: list[str], after: list[str] | None = None) -> str:
    """An error text for target names that matched nothing: the nearest existing names for each,
    what else narrowed the search (``after``), and the module names the model has."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    lines = [f"target_modules: {len(names)} name(s) matched no module of the model:"]
    for name in names:
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.4)
        close_paths = difflib.get_close_matches(name, paths, n=3, cutoff=0.5)
        hint = ", ".join(dict.fromkeys(close + close_paths)) or "none close"
        lines.append(f"  {name!r}: nearest existing names: {hint}")
    if after:
        lines.append("  (after applying " + ", ".join(after) + ")")
    shown = ", ".join(leaves[:40]) + (" ..." if len(leaves) > 40 else "")
    lines.append(f"module names in this model: {shown}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- kinds
def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's fused projections).

    Detected by class name and module, so transformers need not be installed or imported.
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear4bit(module: nn.Module) -> bool:
    """A 4-bit linear layer: lorakit's ``NF4Linear`` or bitsandbytes' ``Linear4bit`` (as loaded
    by transformers' ``BitsAndBytesConfig``; detected without importing bitsandbytes)."""
    cls = type(module)
    if getattr(cls, "lorakit_4bit", False):
        return True
    return cls.__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and cls.__module__.startswith("bitsandbytes")


def is_wrapper(module: nn.Module) -> bool:
    """A lorakit wrapper (a LoRA layer, a ``modules_to_save`` holder): its insides are not targets."""
    return bool(getattr(type(module), "lorakit_wrapper", False))


# ---------------------------------------------------------------------------------------- surgery
def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (path, module) a config may target: skips the root and the insides of lorakit wrappers."""
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(s + ".") for s in skip):
            continue
        if is_wrapper(module):
            skip.append(path)
        out.append((path, module))
    return out


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings()`` or an ``lm_head`` attribute), if any."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            return head
    for name in OUTPUT_HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """``id(module)`` → every path at which that module object sits in ``model`` (more than one
    when a module is shared, as T5 shares its embedding between encoder and decoder)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            paths.setdefault(id(module), []).append(path)
    return paths


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter)`` → every ``(path.name, module)`` that registers that parameter (more than
    one for tied weights, e.g. an output head that shares the input embedding's weight)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((f"{path}.{name}" if path else name, module))
    return owners


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the module at dotted ``path`` is."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
