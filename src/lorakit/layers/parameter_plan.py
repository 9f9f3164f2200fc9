"""Which parameters ``LoraConfig.target_parameters`` names, and where their wrappers go.

A name matches the parameter ``<module path>.<param>`` that it equals or is a whole dotted suffix
of (PEFT's rule), for parameters registered on the module itself. Each module's targeted
parameters get one ``LoraParameter`` each, nested in registration order (the first registered is
innermost), so the layer of parameter ``i`` of ``n`` sits at ``<module>`` plus ``.base_layer``
``n-1-i`` times. A later adapter must target the same parameters of a module (as in PEFT), and
reuses the wrappers. Everything is checked before the model changes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from torch import nn

from ..config import LoraConfig
from ..targeting import is_suffix, name_matches, parameter_owners
from .base import LoraLayer
from .modules_to_save import ModulesToSave
from .parameter import LoraParameter


@dataclass
class ParameterOwner:
    """A module with targeted parameters, as the model holds it now."""

    path: str  # where the module (or the outermost wrapper around it) sits
    module: nn.Module
    chain: list[LoraLayer]  # the wrappers around it now, outermost first
    params: list[str]  # its targeted parameters, in registration order
    parent: nn.Module | None  # the module holding it (seen through wrappers)


@dataclass
class ParameterPlan:
    """Where adapter layers go for ``target_parameters``: ``layers`` maps each layer's path to
    (the layer, existing or new, and the parameter's path, which ``rank_pattern`` keys match);
    ``outermost`` maps a module path to the new wrapper chain to put there."""

    layers: dict[str, tuple[LoraParameter, str]] = field(default_factory=dict)
    outermost: dict[str, LoraParameter] = field(default_factory=dict)


def parameter_targets(model: nn.Module, names: list[str]) -> list[ParameterOwner]:
    """Every module registering a parameter that ``names`` matches, in model order (a module shared
    at several paths is listed once; lorakit wrappers are seen through, their own tables skipped)."""
    found: list[ParameterOwner] = []
    seen: set[int] = set()

    def walk(module: nn.Module, path: str, chain: list[LoraLayer], parent: nn.Module | None) -> None:
        if isinstance(module, LoraLayer):
            walk(module.base_layer, path, [*chain, module], parent)
            return
        if isinstance(module, ModulesToSave) or id(module) in seen:
            return
        seen.add(id(module))
        params = [n for n, _ in module.named_parameters(recurse=False) if name_matches(names, _join(path, n))]
        if params:
            found.append(ParameterOwner(path, module, chain, params, parent))
        for child_name, child in module.named_children():
            walk(child, _join(path, child_name), [], module)

    walk(model, "", [], None)
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def plan_parameters(model: nn.Module, config: LoraConfig, module_targets: list[str]) -> ParameterPlan:
    """Check every parameter ``config.target_parameters`` names and plan its layer; one
    ``ValueError`` lists every problem. Builds the new wrappers (unplaced); changes nothing."""
    names = config.target_parameters or []
    owners = parameter_targets(model, names)
    holders = parameter_owners(model)
    plan, problems = ParameterPlan(), []
    keys = [_join(o.path, p) for o in owners for p in o.params]
    unmatched = [n for n in names if not any(is_suffix(n, k) for k in keys)]
    if unmatched:
        problems.append(_no_match(unmatched, model))
    for owner in owners:
        where = f"module {owner.path or '(the model itself)'!r} ({type(owner.module).__name__})"
        wrapped = [w for w in owner.chain if not isinstance(w, LoraParameter)]
        existing = [w.param_name for w in owner.chain if isinstance(w, LoraParameter)]
        if not owner.path:
            problems.append(f"{owner.params}: a parameter registered on the model itself cannot be adapted (its "
                            "wrapper would have to replace the model); target a submodule's parameter")  # fmt: skip
        elif wrapped or owner.path in module_targets:
            problems.append(f"{where} carries (or gets) a LoRA layer from target_modules, so its parameters "
                            f"{owner.params} cannot also be targeted; drop one of the two")  # fmt: skip
        elif existing and sorted(existing) != sorted(owner.params):
            problems.append(f"{where}: other adapters target its parameters {sorted(existing)}, this one "
                            f"{owner.params}; adapters must all target the same parameters of a module")  # fmt: skip
        elif isinstance(owner.parent, nn.MultiheadAttention) and owner.path.endswith(".out_proj"):
            problems.append(f"{where} is the output projection of an nn.MultiheadAttention, which reads its weight "
                            "without calling it; target the attention module itself (target_modules)")  # fmt: skip
        else:
            problems += [f"{where}: {why}" for p in owner.params
                         if (why := LoraParameter.parameter_problem(owner.module, p)) is not None]  # fmt: skip
            for p in owner.params:
                tied = [k for k, m in holders.get(id(getattr(owner.module, p)), []) if m is not owner.module]
                if tied:
                    problems.append(f"{where}: parameter {p!r} is also {', '.join(tied)} (tied weights), which an "
                                    "adapter on one place of it cannot keep apart when merged; use target_modules, "
                                    "which unties a merged copy")  # fmt: skip
        if problems:
            continue
        chain = owner.chain if existing else _new_chain(owner.module, owner.params)
        if not existing:
            plan.outermost[owner.path] = chain[0]  # type: ignore[assignment]
        for depth, layer in enumerate(chain):
            assert isinstance(layer, LoraParameter)
            plan.layers[owner.path + ".base_layer" * depth] = (layer, _join(owner.path, layer.param_name))
    if problems:
        raise ValueError("target_parameters:\n  " + "\n  ".join(problems))
    return plan


def _new_chain(module: nn.Module, params: list[str]) -> list[LoraLayer]:
    """Nested wrappers, the first registered parameter innermost; returned outermost first."""
    chain: list[LoraLayer] = []
    inner = module
    for name in params:
        inner = LoraParameter(inner, name)
        chain.insert(0, inner)
    return chain


def _no_match(unmatched: list[str], model: nn.Module) -> str:
    keys = [k for k, _ in model.named_parameters() if ".lora_" not in k]
    lines = [f"{len(unmatched)} name(s) matched no parameter of the model:"]
    for name in unmatched:
        close = difflib.get_close_matches(name, keys, n=3, cutoff=0.3)
        lines.append(f"    {name!r}: nearest parameters: {', '.join(close) or 'none close'}")
    return "\n".join(lines)
