"""The registry of layer kinds: which wrapper class adapts which module, per variant.

``register_kind`` adds a wrapper class (a ``LoraLayer`` subclass with a ``kind`` and a ``variant``)
for the modules its predicate accepts; later registrations win, so a new base type or a variant
is added without editing the others. ``wrap_module`` picks the class for a module, or raises
``UnsupportedModuleError`` naming the path, the type and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ArgumentTypeError, short_repr
from .base import LoraLayer, UnsupportedModuleError
from .eligibility import type_name


@dataclass(frozen=True)
class LayerKind:
    """A registered layer kind: the wrapper class, and which base modules it wraps."""

    cls: type[LoraLayer]
    accepts: Callable[[nn.Module], bool]
    variant: str = "lora"


_KINDS: list[LayerKind] = []


def register_kind(cls: type[LoraLayer], accepts: Callable[[nn.Module], bool]) -> None:
    """Make ``cls`` the wrapper of every module ``accepts`` says yes to, for adapters of
    ``cls.variant``. Later registrations win, so a variant or a new base type is added without
    editing the others."""
    if not (isinstance(cls, type) and issubclass(cls, LoraLayer)):
        raise ArgumentTypeError(
            f"lorakit.register_kind: cls = {short_repr(cls)}; allowed: a subclass of lorakit.LoraLayer"
        )
    if not callable(accepts):
        raise ArgumentTypeError(
            f"lorakit.register_kind: accepts = {short_repr(accepts)}; allowed: a callable (module) -> bool"
        )
    if not cls.kind:
        raise ValueError(f"{cls.__name__} must set the class attribute 'kind'")
    _KINDS.insert(0, LayerKind(cls, accepts, cls.variant))


def unregister_kind(cls: type[LoraLayer]) -> None:
    """Remove every registration of ``cls`` (the built-in kinds stay unless named)."""
    _KINDS[:] = [entry for entry in _KINDS if entry.cls is not cls]


def layer_class(kind: str, variant: str = "lora") -> type[LoraLayer]:
    """The wrapper class registered for ``kind`` (as stored in files) and ``variant``."""
    for entry in _KINDS:
        if entry.cls.kind == kind and entry.variant == variant:
            return entry.cls
    known = sorted({(e.cls.kind, e.variant) for e in _KINDS})
    raise KeyError(f"no LoRA layer kind {kind!r} of variant {variant!r}; registered: {known}")


def wrap_module(module: nn.Module, path: str, variant: str = "lora") -> LoraLayer:
    """The LoRA wrapper for ``module``; ``UnsupportedModuleError`` (a ``TypeError``) naming the
    path, the type and the reason when no kind wraps it exactly."""
    for entry in _KINDS:
        if entry.variant == variant and entry.accepts(module):
            problem = entry.cls.base_problem(module)
            if problem is not None:
                reason = f"({type_name(module)}) cannot take a LoRA adapter: {problem}"
                raise UnsupportedModuleError(f"module {path!r} {reason}", path, reason)
            return entry.cls(module)
    supported = sorted({e.cls.__name__ for e in _KINDS if e.variant == variant})
    reason = (
        f"is a {type_name(module)}, which LoRA cannot wrap; "
        "supported types: nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, transformers Conv1D, bitsandbytes Linear4bit "
        f"(wrappers registered for variant {variant!r}: {', '.join(supported) or 'none'})"
    )
    raise UnsupportedModuleError(f"module {path!r} {reason}", path, reason)
