"""Where ``LoraConfig.trainable_token_indices`` puts its ``TrainableTokens`` wrappers.

A list of token ids means the model's input embedding (``get_input_embeddings()``); a dict names
modules by whole dotted suffix. Every module that shares the chosen embedding's weight (a tied
output head) is wrapped too, sharing the values. Everything is checked before the model changes.
"""

from __future__ import annotations

import difflib

from torch import nn

from ..config import LoraConfig
from ..targeting import candidate_modules, is_suffix, module_paths, parameter_owners
from .base import LoraLayer
from .modules_to_save import ModulesToSave
from .trainable_tokens import TrainableTokens

#: path → (token ids, path of the wrapper whose values it shares (None: it holds them), other holders
#: of its weight that do not follow it: a merge gives it its own copy)
TokenPlan = dict[str, tuple[list[int], str | None, tuple[str, ...]]]


def plan_tokens(model: nn.Module, config: LoraConfig, module_targets: list[str], saved: list[str]) -> TokenPlan:
    """Check and place ``config.trainable_token_indices``; ``ValueError`` naming every problem."""
    spec = config.trainable_token_indices
    if not spec:
        return {}
    chosen: dict[str, list[int]] = {}
    problems: list[str] = []
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    paths = module_paths(model).get(id(embedding), []) if isinstance(embedding, nn.Module) else []
    if isinstance(spec, list):
        if not paths:
            raise ValueError("trainable_token_indices is a list, which means the input embedding, but this model has "
                             "no get_input_embeddings(); name the module: {'embed_tokens': [...]}")  # fmt: skip
        chosen[paths[0]] = spec
    else:
        names = [p for p, _ in candidate_modules(model)]
        for name, ids in spec.items():
            found = [p for p in names if is_suffix(name, p)]
            if not found:
                close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
                problems.append(f"{name!r} matches no module; nearest: {', '.join(close) or 'none close'}")
            for path in found:
                if chosen.setdefault(path, ids) != ids:
                    problems.append(f"module {path!r} is named twice with different token ids")
    plan: TokenPlan = {}
    for path, ids in chosen.items():
        problem = _problem(model, path, ids, module_targets, saved)
        if problem is not None:
            problems.append(f"module {path!r} {problem}")
            continue
        plan[path] = (ids, None, ())
    # As PEFT: modules tied to the input embedding follow its rows; any other sharing of a chosen
    # module's weight is recorded, so that merging gives that module its own copy.
    owners = parameter_owners(model)
    for path in list(plan):
        module = _base(model.get_submodule(path))
        holders = {_holder(model, where.rpartition(".")[0]) for where, _ in owners.get(id(module.weight), [])} - {path}
        if path not in paths:
            plan[path] = (plan[path][0], None, tuple(sorted(holders)))
            continue
        for tied in sorted(holders - set(plan)):
            problem = _problem(model, tied, plan[path][0], module_targets, saved, tied=True)
            if problem is not None:
                problems.append(f"module {tied!r} shares the weight of {path!r} (tied) and {problem}")
            plan[tied] = (plan[path][0], path, ())
    if problems:
        raise ValueError("trainable_token_indices:\n  " + "\n  ".join(problems))
    return plan


def _base(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, TrainableTokens) else module


def _holder(model: nn.Module, path: str) -> str:
    """The path of the module to wrap for a weight owner at ``path`` (the wrapper, once wrapped)."""
    parent, _, leaf = path.rpartition(".")
    if leaf == "original_module" and isinstance(model.get_submodule(parent), TrainableTokens):
        return parent
    return path


def _problem(
    model: nn.Module, path: str, ids: list[int], targets: list[str], saved: list[str], tied: bool = False
) -> str | None:
    module = model.get_submodule(path) if path else model
    if isinstance(module, TrainableTokens):
        if module.tied_to is not None and not tied:
            return f"follows the tied weight of {module.tied_to!r}; name that module instead"
    elif isinstance(module, (LoraLayer, ModulesToSave)) or path in targets or path in saved or not path:
        return "also carries (or gets) a LoRA adapter or modules_to_save; trainable tokens need the plain module"
    return TrainableTokens.module_problem(_base(module), ids)
