"""The rest of the parameter-efficient family, under the same calls as LoRA.

* **Selective** tuning trains a chosen subset of the model's own parameters: every bias (BitFit),
  named modules or numbered layers, or the output head only ("transfer learning"). Nothing is
  added, so there is nothing to merge: the tuned parameters *are* the model's.
* **Sequential bottleneck adapters** add ``y ← y + U σ(D y)`` after a chosen sublayer, with
  ``D ∈ R^{h×d}`` (down-projection), ``U ∈ R^{d×h}`` (up-projection, initialised to zero so the
  model is unchanged at the start) and a non-linearity ``σ``. They run *in series*, so they add
  latency and, being non-linear, cannot be merged into the base weights (LoRA's parallel, linear
  update can).

Both save as safetensors plus a JSON config, atomically, and load with every key and shape checked.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .atomic import write_folder
from .errors import InputError
from .files import (
    BOTTLENECK_CONFIG,
    KIND_CONFIGS,
    SELECTIVE_CONFIG,
    AdapterLoadError,
    check_folder_kind,
    read_tensors,
    save_tensors,
)
from .targeting import candidate_modules, is_suffix, layer_index, name_matches, set_submodule

WEIGHTS = "adapter_model.safetensors"
SELECTIVE_MODES = ("bias", "modules", "layers", "head")
NONLINEARITIES = ("relu", "gelu", "tanh")
_C = TypeVar("_C")


# ---------------------------------------------------------------------------------------- selective
@dataclass
class SelectiveConfig:
    """``mode``: ``bias`` (BitFit: every bias), ``modules`` (every parameter of the modules named in
    ``modules``, as names or a regex), ``layers`` (every parameter inside the numbered layers
    ``layers``, e.g. ``transformer.h.10.…``) or ``head`` (only the module named ``head``).
    ``layers`` also narrows ``bias`` and ``modules`` to those layers; ``layers_pattern`` names the
    layer list (``h``, ``layers``) when the model has more than one."""

    mode: str = "bias"
    modules: list[str] | str | None = None
    head: str | None = None
    layers: list[int] | None = None
    layers_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in SELECTIVE_MODES:
            raise InputError(f"SelectiveConfig.mode = {self.mode!r}; allowed: {', '.join(SELECTIVE_MODES)}")
        if self.mode == "modules" and not self.modules:
            raise InputError(f"SelectiveConfig.modules = {self.modules!r} with mode='modules'; allowed: module names")
        if self.mode == "layers" and not self.layers:
            raise InputError(f"SelectiveConfig.layers = {self.layers!r} with mode='layers'; allowed: layer indices, "
                             "e.g. [10, 11] (required)")  # fmt: skip
        if self.mode == "head" and not self.head:
            raise InputError("SelectiveConfig.head is required with mode='head'; allowed: a module name ('lm_head')")
        _check_names("SelectiveConfig.modules", self.modules)
        if self.head is not None and (not isinstance(self.head, str) or not self.head):
            raise InputError(f"SelectiveConfig.head = {self.head!r}; allowed: a module name such as 'lm_head'")
        unused = [f for f in ("modules", "head") if getattr(self, f) is not None and self.mode != f]
        if unused or (self.mode == "head" and self.layers is not None):
            shown = unused[0] if unused else "layers"
            raise InputError(f"SelectiveConfig.{shown} = {getattr(self, shown)!r} is not used with mode={self.mode!r}; "
                             "allowed: leave it out")  # fmt: skip
        if self.layers is not None and (
            not isinstance(self.layers, list | tuple) or not self.layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
        ):  # fmt: skip
            raise InputError(f"SelectiveConfig.layers = {self.layers!r}; allowed: a list of layer indices >= 0")
        if self.layers_pattern is not None and (not isinstance(self.layers_pattern, str) or not self.layers_pattern):
            raise InputError(f"SelectiveConfig.layers_pattern = {self.layers_pattern!r}; allowed: a name such as 'h'")


def _check_names(what: str, names: object) -> None:
    """``names``: None, a regex string, or a list of non-empty module names."""
    if names is None or isinstance(names, str):
        return
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"{what} = {names!r}; allowed: a list of non-empty module names, or a regex string")


def _paths(model: nn.Module, names: list[str] | str, what: str) -> list[str]:
    """The module paths ``names`` selects; every listed name must match (else the error names it,
    the nearest existing names and the model's module names)."""
    candidates = [p for p, _ in candidate_modules(model)]
    paths = [p for p in candidates if name_matches(names, p)]
    if isinstance(names, str):
        unmatched = [] if paths else [names]
    else:
        unmatched = [n for n in names if not any(is_suffix(n, p) for p in paths)]
    if unmatched:
        leaves = sorted({p.rsplit(".", 1)[-1] for p in candidates})
        close = sorted({c for n in unmatched for c in difflib.get_close_matches(n.rsplit(".", 1)[-1], leaves, 3, 0.4)})
        shown = ", ".join(leaves[:30]) + (" ..." if len(leaves) > 30 else "")
        raise InputError(f"{what}: {unmatched} match no module of the model (nearest: {', '.join(close) or 'none'}); "
                         f"allowed: module names such as {shown}")  # fmt: skip
    return paths


def select_trainable(model: nn.Module, config: SelectiveConfig) -> list[str]:
    """Freeze everything, then unfreeze what ``config`` selects; returns the trainable names.
    A config that selects nothing (or names a module or layer the model lacks) raises ``InputError``
    and leaves the model as it was."""
    names = _selected(model, config)
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    model.__dict__["lorakit_selective"] = config
    return names


def _selected(model: nn.Module, config: SelectiveConfig) -> list[str]:
    """The parameter names ``config`` selects (the model is not touched)."""
    if not isinstance(config, SelectiveConfig):
        raise InputError(f"config = {type(config).__name__}; allowed: a lorakit.family.SelectiveConfig")
    if config.mode == "layers":
        names = [n for n, _ in model.named_parameters()]  # narrowed to the layers below
    elif config.mode == "bias":
        names = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    else:
        wanted = config.head if config.mode == "head" else config.modules
        paths = _paths(model, wanted, f"SelectiveConfig.{config.mode}")
        names = [n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in paths)]
    if config.layers is not None:
        index = {n: layer_index(n, config.layers_pattern) for n in names}
        present = sorted({i for i in index.values() if i is not None})
        missing = sorted(set(config.layers) - set(present))
        if missing:
            raise InputError(
                f"SelectiveConfig.layers {missing} not found: the selected parameters sit in numbered layers "
                f"{present or 'none'}" + (f" of {config.layers_pattern!r}" if config.layers_pattern else "")
            )
        names = [n for n in names if index[n] in config.layers]
    if not names:
        raise InputError(f"{config} selects no parameter of this model")
    return names


def save_selected(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """The trainable parameters (by the model's own names) and the config, written atomically."""
    config = model.__dict__.get("lorakit_selective")
    if config is None:
        raise InputError("the model has no selective tuning: call select_trainable first")
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return _write(directory, tensors, "selective", asdict(config))


def load_selected(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load saved selective parameters into ``model`` (config, every key and shape checked first)."""
    config = _read_config(directory, SELECTIVE_CONFIG, SelectiveConfig)
    try:
        names = set(_selected(model, config))
    except InputError as err:
        raise AdapterLoadError(f"{directory}: {err}") from None
    tensors = read_tensors(directory)
    params = dict(model.named_parameters())
    bad = [f"unexpected key {k}" for k in sorted(tensors) if k not in names]
    bad += [f"missing key {k}" for k in sorted(names - set(tensors))]
    bad += [f"shape mismatch for {k}: model {tuple(params[k].shape)}, file {tuple(t.shape)}"
            for k, t in tensors.items() if k in names and params[k].shape != t.shape]  # fmt: skip
    if bad:
        raise AdapterLoadError(f"{directory}: " + "; ".join(bad))
    select_trainable(model, config)
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    return model


def _read_config(directory: str | os.PathLike[str], name: str, cls: type[_C]) -> _C:
    """The JSON config ``name`` in ``directory`` as ``cls``: a JSON object with known keys and good values."""
    path = Path(directory) / name
    if not path.is_file():
        raise AdapterLoadError(f"{directory}: no {name} here")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AdapterLoadError(f"{path}: not a valid JSON config ({type(err).__name__}: {err})") from None
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path}: the JSON is a {type(data).__name__}; allowed: an object with keys {allowed}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise AdapterLoadError(f"{path}: unknown keys {unknown}; allowed: {allowed}")
    try:
        return cls(**data)
    except InputError as err:
        raise AdapterLoadError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------- bottleneck
@dataclass
class BottleneckConfig:
    """Bottleneck adapters of width ``bottleneck`` after every module in ``target_modules``."""

    target_modules: list[str] | str = field(default_factory=list)
    bottleneck: int = 16
    nonlinearity: str = "relu"

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise InputError("BottleneckConfig.target_modules is required; allowed: module names or a regex")
        _check_names("BottleneckConfig.target_modules", self.target_modules)
        b = self.bottleneck
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InputError(f"BottleneckConfig.bottleneck = {b!r}; allowed: a whole number >= 1")
        if self.nonlinearity not in NONLINEARITIES:
            raise InputError(f"BottleneckConfig.nonlinearity = {self.nonlinearity!r}; allowed: "
                             f"{', '.join(NONLINEARITIES)}")  # fmt: skip


class BottleneckAdapter(nn.Module):
    """``y = m(x);  y + U σ(D y)`` with ``U = 0`` at the start (the model is unchanged)."""

    is_lorakit_adapter = True

    def __init__(self, module: nn.Module, width: int, bottleneck: int, nonlinearity: str) -> None:
        super().__init__()
        self.module = module
        module.requires_grad_(False)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh()}[nonlinearity]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*self.down.parameters(), *self.up.parameters()]

    def forward(self, *args, **kwargs):
        y = self.module(*args, **kwargs)
        return y + self.up(self.act(self.down(y)))


def _output_width(module: nn.Module, path: str) -> int:
    for attr in ("out_features", "embedding_dim", "normalized_shape"):
        value = getattr(module, attr, None)
        if value is not None:
            return int(value[-1] if isinstance(value, (tuple, list, torch.Size)) else value)
    raise InputError(f"BottleneckConfig.target_modules: cannot tell the output width of {path!r} "
                     f"({type(module).__name__}); allowed: a Linear, Embedding or LayerNorm")  # fmt: skip


def inject_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Freeze the model and add a bottleneck adapter after every targeted module. Every target is
    checked first: a refused config leaves the model as it was."""
    _inject(model, config, _plan(model, config))
    return model


def _plan(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, nn.Module, int, torch.device]]:
    """(path, module, output width, device) of every target; raises before anything changes."""
    if not isinstance(config, BottleneckConfig):
        raise InputError(f"config = {type(config).__name__}; allowed: a lorakit.family.BottleneckConfig")
    if model.__dict__.get("lorakit_bottleneck") is not None:
        raise InputError("the model already has bottleneck adapters; allowed: one inject_bottleneck per model")
    plan = []
    for path in _paths(model, config.target_modules, "BottleneckConfig.target_modules"):
        module = model.get_submodule(path)
        param = next(module.parameters(), None)
        if param is None:
            raise InputError(f"BottleneckConfig.target_modules: {path!r} ({type(module).__name__}) has no weights; "
                             "allowed: a Linear, Embedding or LayerNorm")  # fmt: skip
        plan.append((path, module, _output_width(module, path), param.device))
    return plan


def _inject(model: nn.Module, config: BottleneckConfig, plan: list[tuple[str, nn.Module, int, torch.device]]) -> None:
    model.requires_grad_(False)
    for path, module, width, device in plan:
        wrapper = BottleneckAdapter(module, width, config.bottleneck, config.nonlinearity)
        set_submodule(model, path, wrapper.to(device))
    model.__dict__["lorakit_bottleneck"] = config


def save_bottleneck(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    config = model.__dict__.get("lorakit_bottleneck")
    if config is None:
        raise InputError("the model has no bottleneck adapters: call inject_bottleneck first")
    tensors = {k: p.detach().contiguous() for k, p in _bottleneck_params(model).items()}
    return _write(directory, tensors, "bottleneck", asdict(config))


def load_bottleneck(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Inject from the saved config and load the adapter weights; config, keys and shapes are all
    checked before the model changes."""
    config = _read_config(directory, BOTTLENECK_CONFIG, BottleneckConfig)
    try:
        plan = _plan(model, config)
    except InputError as err:
        raise AdapterLoadError(f"{directory}: {err}") from None
    tensors = read_tensors(directory)
    d = config.bottleneck
    shapes = {}
    for path, _, w, _ in plan:
        for name, shape in (("down.weight", (d, w)), ("down.bias", (d,)), ("up.weight", (w, d)), ("up.bias", (w,))):
            shapes[f"{path}.{name}"] = shape
    bad = sorted(set(shapes) ^ set(tensors))
    bad += [f"{k} {tuple(tensors[k].shape)} != {shapes[k]}" for k in sorted(set(shapes) & set(tensors))
            if tuple(tensors[k].shape) != shapes[k]]  # fmt: skip
    if bad:
        raise AdapterLoadError(f"{directory}: adapter tensors do not match the model: {bad}")
    _inject(model, config, plan)
    expected = _bottleneck_params(model)
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    return model


def _bottleneck_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``<path>.down.weight`` etc. → parameter, for every bottleneck adapter."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, BottleneckAdapter):
            for name, p in [*m.down.named_parameters(prefix="down"), *m.up.named_parameters(prefix="up")]:
                out[f"{path}.{name}"] = p
    return out


def _write(directory: str | os.PathLike[str], tensors: dict, kind: str, config: dict) -> Path:
    """Tensors and their JSON config, written together (the folder's pair changes at once), never
    into a folder holding another kind of adapter (whose weights have the same file name)."""
    check_folder_kind(directory, kind)
    text = (json.dumps(config, indent=2) + "\n").encode()
    files = {WEIGHTS: save_tensors(tensors), KIND_CONFIGS[kind]: text}
    return write_folder(directory, files) / WEIGHTS


def merge_bottleneck(model: nn.Module) -> None:
    """Always an error: say why."""
    raise TypeError(
        "bottleneck adapters cannot be merged: they sit in series after a layer and contain a "
        "non-linearity, so y + U·σ(D·y) is no linear map that could be folded into W0; keep them unmerged "
        "(or use LoRA, whose update B·A is linear and merges with zero added latency)"
    )
