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

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from .files import AdapterLoadError, atomic_write, read_tensors
from .targeting import candidate_modules, layer_index, name_matches, no_match_message, set_submodule

SELECTIVE_CONFIG = "selective_config.json"
BOTTLENECK_CONFIG = "bottleneck_config.json"
WEIGHTS = "adapter_model.safetensors"


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
        if self.mode not in ("bias", "modules", "layers", "head"):
            raise ValueError(f"SelectiveConfig.mode must be bias, modules, layers or head, got {self.mode!r}")
        if self.mode == "modules" and not self.modules:
            raise ValueError("SelectiveConfig.modules is required with mode='modules'")
        if self.mode == "layers" and not self.layers:
            raise ValueError("SelectiveConfig.layers (layer indices, e.g. [10, 11]) is required with mode='layers'")
        if self.mode == "head" and not self.head:
            raise ValueError("SelectiveConfig.head is required with mode='head' (e.g. 'lm_head' or 'fc3')")
        if self.layers is not None and (
            not isinstance(self.layers, list | tuple) or not all(isinstance(i, int) and i >= 0 for i in self.layers)
        ):
            raise ValueError(f"SelectiveConfig.layers must be a list of layer indices >= 0, got {self.layers!r}")


def select_trainable(model: nn.Module, config: SelectiveConfig) -> list[str]:
    """Freeze everything, then unfreeze what ``config`` selects; returns the trainable names."""
    names: list[str] = []
    model.requires_grad_(False)
    if config.mode == "layers":
        names = [n for n, _ in model.named_parameters()]  # narrowed to the layers below
    elif config.mode == "bias":
        names = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    else:
        wanted = [config.head] if config.mode == "head" else config.modules
        paths = [p for p, _ in candidate_modules(model) if name_matches(wanted, p)]
        if not paths:
            listed = wanted if isinstance(wanted, list) else [wanted]
            raise ValueError(no_match_message(listed, [p for p, _ in candidate_modules(model)]))
        names = [n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in paths)]
    if config.layers is not None and config.mode != "head":
        index = {n: layer_index(n, config.layers_pattern) for n in names}
        present = sorted({i for i in index.values() if i is not None})
        missing = sorted(set(config.layers) - set(present))
        if missing:
            raise ValueError(
                f"SelectiveConfig.layers {missing} not found: the selected parameters sit in numbered layers "
                f"{present or 'none'}" + (f" of {config.layers_pattern!r}" if config.layers_pattern else "")
            )
        names = [n for n in names if index[n] in config.layers]
    if not names:
        raise ValueError(f"{config} selects no parameter of this model")
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    model.__dict__["lorakit_selective"] = config
    return names


def save_selected(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """The trainable parameters (by the model's own names) and the config, written atomically."""
    config = model.__dict__.get("lorakit_selective")
    if config is None:
        raise ValueError("the model has no selective tuning: call select_trainable first")
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return _write(directory, tensors, SELECTIVE_CONFIG, asdict(config))


def load_selected(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load saved selective parameters into ``model`` (every key and shape checked first)."""
    tensors = read_tensors(directory)
    params = dict(model.named_parameters())
    bad = [f"unexpected key {k}" for k in tensors if k not in params]
    bad += [f"shape mismatch for {k}: model {tuple(params[k].shape)}, file {tuple(t.shape)}"
            for k, t in tensors.items() if k in params and params[k].shape != t.shape]  # fmt: skip
    if bad:
        raise AdapterLoadError(f"{directory}: " + "; ".join(bad))
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    config = json.loads((Path(directory) / SELECTIVE_CONFIG).read_text())
    select_trainable(model, SelectiveConfig(**config))
    return model


# ---------------------------------------------------------------------------------------- bottleneck
@dataclass
class BottleneckConfig:
    """Bottleneck adapters of width ``bottleneck`` after every module in ``target_modules``."""

    target_modules: list[str] | str = field(default_factory=list)
    bottleneck: int = 16
    nonlinearity: str = "relu"

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ValueError("BottleneckConfig.target_modules is required")
        if self.bottleneck < 1:
            raise ValueError(f"BottleneckConfig.bottleneck must be >= 1, got {self.bottleneck}")
        if self.nonlinearity not in ("relu", "gelu", "tanh"):
            raise ValueError(f"BottleneckConfig.nonlinearity must be relu, gelu or tanh, got {self.nonlinearity!r}")


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
    raise TypeError(f"cannot tell the output width of {path!r} ({type(module).__name__}); target a Linear or LayerNorm")


def inject_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Freeze the model and add a bottleneck adapter after every targeted module."""
    candidates = [p for p, _ in candidate_modules(model)]
    paths = [p for p in candidates if name_matches(config.target_modules, p)]
    if not paths:
        names = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
        raise ValueError(no_match_message(names, candidates))
    model.requires_grad_(False)
    for path in paths:
        module = model.get_submodule(path)
        wrapper = BottleneckAdapter(module, _output_width(module, path), config.bottleneck, config.nonlinearity)
        set_submodule(model, path, wrapper.to(next(module.parameters()).device))
    model.__dict__["lorakit_bottleneck"] = config
    return model


def save_bottleneck(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    config = model.__dict__.get("lorakit_bottleneck")
    if config is None:
        raise ValueError("the model has no bottleneck adapters: call inject_bottleneck first")
    tensors = {k: p.detach().contiguous() for k, p in _bottleneck_params(model).items()}
    return _write(directory, tensors, BOTTLENECK_CONFIG, asdict(config))


def load_bottleneck(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Inject from the saved config and load the adapter weights (keys and shapes checked)."""
    path = Path(directory) / BOTTLENECK_CONFIG
    if not path.is_file():
        raise AdapterLoadError(f"{directory}: no {BOTTLENECK_CONFIG} here")
    inject_bottleneck(model, BottleneckConfig(**json.loads(path.read_text())))
    tensors = read_tensors(directory)
    expected = _bottleneck_params(model)
    bad = sorted(set(expected) ^ set(tensors))
    bad += [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if bad:
        raise AdapterLoadError(f"{directory}: adapter tensors do not match the model: {bad}")
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


def _write(directory: str | os.PathLike[str], tensors: dict, config_name: str, config: dict) -> Path:
    """Tensors and their JSON config, each written atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write(out / config_name, (json.dumps(config, indent=2) + "\n").encode())
    return out / WEIGHTS


def merge_bottleneck(model: nn.Module) -> None:
    """Always an error: say why."""
    raise TypeError(
        "bottleneck adapters cannot be merged: they sit in series after a layer and contain a "
        "non-linearity, so y + U·σ(D·y) is no linear map that could be folded into W0; keep them unmerged "
        "(or use LoRA, whose update B·A is linear and merges with zero added latency)"
    )
