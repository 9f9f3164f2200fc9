"""Putting one adapter into a model as a transaction: plan (check everything, change nothing),
apply, and roll back on any failure, so a failed ``inject`` leaves the model as it was.

Two model shapes need care here. A module that sits at several paths (one object shared, as T5
shares its embedding) gets one wrapper placed at every one of them, so the adapter runs wherever
the module runs. A weight tensor shared by several modules (tied weights, e.g. ``lm_head`` and
the input embedding) is recorded on the wrapper (``weight_shared_with``): merging then gives the
adapted module its own copy (``LoraLayer.add_to_base``), and a warning names the other holders.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import TypeVar

from torch import nn

from ..config import LoraConfig
from ..errors import InputError
from ..targeting import candidate_modules, is_suffix, module_paths, parameter_owners, set_submodule
from .base import LoraLayer, UnsupportedModuleError
from .loftq import initialize as loftq_initialize
from .modules_to_save import ModulesToSave
from .parameter import LoraParameter
from .parameter_plan import ParameterPlan, plan_parameters
from .registry import wrap_module
from .token_plan import TokenPlan, plan_tokens
from .trainable_tokens import TokenRows, TrainableTokens

#: (path, module that sat there before), in the order the modules were replaced
Undo = list[tuple[str, nn.Module]]
H = TypeVar("H", bound=ModulesToSave)


@dataclass
class AdapterPlan:
    """What adding one adapter will do, worked out (and checked) before anything changes."""

    targets: list[str]
    wrappers: dict[str, LoraLayer] = field(default_factory=dict)  # path → new wrapper (not yet placed)
    ranks: dict[str, tuple[int, float]] = field(default_factory=dict)  # path → (r, scaling)
    saved: list[str] = field(default_factory=list)  # modules_to_save paths
    paths: dict[int, list[str]] = field(default_factory=dict)  # id(module) → every path it sits at
    parameters: ParameterPlan = field(default_factory=ParameterPlan)  # target_parameters' layers
    tokens: TokenPlan = field(default_factory=dict)  # trainable_token_indices' wrappers


def plan_adapter(model: nn.Module, config: LoraConfig, targets: list[str]) -> AdapterPlan:
    """Check that every target can take the adapter (type, weight, rank, alpha) and that every
    ``modules_to_save`` name resolves; raise one error naming every problem. Changes nothing."""
    plan = AdapterPlan(targets, paths=module_paths(model))
    owners = parameter_owners(model)
    problems: list[str] = []
    refused: dict[str, list[str]] = {}  # reason → paths
    for path in targets:
        module = model.get_submodule(path)
        parent = model.get_submodule(path.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention) and path.endswith(".out_proj"):
            problems.append(f"{path!r} is the output projection of an nn.MultiheadAttention, which reads its weight "
                            "without calling it, so an adapter there would never run; target the attention module "
                            f"{path.rpartition('.')[0]!r} itself (it adapts both projections)")  # fmt: skip
        elif isinstance(module, LoraParameter) and module.kind == LoraParameter.kind:
            problems.append(f"{path!r} carries adapters on its parameter {module.param_name!r} (target_parameters), "
                            "so it cannot also be targeted as a module; drop one of the two")  # fmt: skip
        elif isinstance(module, LoraLayer):
            if module.variant != config.variant:
                problems.append(
                    f"{path!r} holds {module.variant!r} adapters {sorted(module.lora_A)}; a {config.variant!r} "
                    "adapter cannot share a layer with them"
                )
        else:
            try:
                wrapper = wrap_module(module, path, config.variant)
            except UnsupportedModuleError as err:
                refused.setdefault(err.reason or str(err), []).append(path)
                continue
            weight = dict(module.named_parameters(recurse=False)).get("weight")
            shared = owners.get(id(weight), []) if weight is not None else []
            wrapper.weight_shared_with = tuple(where for where, owner in shared if owner is not module)
            plan.wrappers[path] = wrapper
        problems += _rank_problems(config, path, plan)
    if config.target_parameters:
        try:
            plan.parameters = plan_parameters(model, config, targets)
        except ValueError as err:
            problems.append(str(err))
        for path, (_, key) in plan.parameters.layers.items():
            problems += _rank_problems(config, path, plan, key)
    for reason, paths in refused.items():
        names = ", ".join(repr(p) for p in paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
        problems.append(f"module {names} {reason}" if len(paths) == 1 else f"{len(paths)} modules ({names}) {reason}")
    if problems:
        one = len(problems) == 1 and [len(paths) for paths in refused.values()] == [1]
        path, reason = next((paths[0], why) for why, paths in refused.items()) if one else (None, None)
        raise UnsupportedModuleError("\n".join(problems), path, reason)
    for module_name in config.modules_to_save or []:
        paths = [p for p, _ in candidate_modules(model) if is_suffix(module_name, p)]
        if not paths:
            leaves = sorted({p.rsplit(".", 1)[-1] for p, _ in candidate_modules(model)})
            close = difflib.get_close_matches(module_name, leaves, n=5, cutoff=0.4)
            raise InputError(
                f"modules_to_save: {module_name!r} matches no module; nearest existing names: {close or 'none close'}"
            )
        adapted = [*targets, *plan.parameters.outermost, *_owner_paths(plan.parameters)]
        for path in paths:
            inside = [p for p in adapted if p == path or p.startswith(path + ".")]
            # a modules_to_save holder from another adapter is fine (it gets one more copy); adapters are not
            held = model.get_submodule(path).named_modules(prefix=path)
            wrapped = [p for p, m in held if isinstance(m, (LoraLayer, TrainableTokens))
                       or (p != path and isinstance(m, ModulesToSave))]  # fmt: skip
            if inside or wrapped:
                raise InputError(f"modules_to_save: {path!r} holds adapted modules ({(inside or wrapped)[0]!r}, ...); "
                                 "a module is either trained in full or adapted, not both")  # fmt: skip
        plan.saved += paths
    try:
        taken = [*targets, *_owner_paths(plan.parameters)]
        plan.tokens = plan_tokens(model, config, taken, plan.saved)
    except ValueError as err:
        raise InputError(str(err)) from None
    return plan


def _owner_paths(plan: ParameterPlan) -> list[str]:
    """The modules whose parameters the plan adapts (their paths without the nested ``.base_layer``)."""
    return sorted({p.split(".base_layer")[0] for p in plan.layers})


def _rank_problems(config: LoraConfig, path: str, plan: AdapterPlan, key: str | None = None) -> list[str]:
    """Rank and alpha of the layer at ``path``; ``rank_pattern`` keys match ``key`` (default: ``path``)."""
    key = path if key is None else key
    try:
        r, alpha = config.rank_for(key), config.alpha_for(key)
    except (TypeError, ValueError) as err:
        return [f"module {path!r}: rank_pattern/alpha_pattern gives no usable value ({err})"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        return [f"module {key!r}: rank {r!r} (from r or rank_pattern) must be an integer >= 1"]
    if not math.isfinite(alpha) or alpha <= 0:
        return [f"module {key!r}: alpha {alpha!r} (from alpha or alpha_pattern) must be a finite number > 0"]
    plan.ranks[path] = (r, config.scaling(r, alpha))
    return []


def apply_plan(
    model: nn.Module, config: LoraConfig, name: str, plan: AdapterPlan, active: str | None, first: bool, undo: Undo
) -> None:
    """Carry out ``plan`` for adapter ``name`` (``active``: the adapter running now; ``first``:
    the model holds no adapter yet, so its whole base is frozen). Every module replaced is
    recorded in ``undo``."""
    if first:
        model.requires_grad_(False)
    for path, wrapper in plan.wrappers.items():
        module = wrapper.base_layer
        module.requires_grad_(False)
        _same_mode(wrapper, module)
        for alias in plan.paths.get(id(module), [path]):  # a shared module is adapted wherever it sits
            undo.append((alias, module))
            set_submodule(model, alias, wrapper)
        if wrapper.weight_shared_with:
            warnings.warn(
                f"{path}.weight is also {', '.join(wrapper.weight_shared_with)} (tied weights): the adapter on "
                f"{path!r} changes only {path!r}; merging gives {path!r} its own copy of the weight (the others keep "
                "theirs) and unmerging ties them again",
                stacklevel=4,  # the caller of inject
            )
    new_layers = set()
    for path, outermost in plan.parameters.outermost.items():
        module = model.get_submodule(path)
        module.requires_grad_(False)
        new_layers |= {id(m) for m in outermost.modules() if isinstance(m, LoraLayer)}
        for wrapper in (m for m in outermost.modules() if isinstance(m, LoraLayer)):
            _same_mode(wrapper, module, skip=wrapper.base_layer)
        for alias in plan.paths.get(id(module), [path]):
            undo.append((alias, module))
            set_submodule(model, alias, outermost)
    for path in [*plan.targets, *plan.parameters.layers]:
        layer = model.get_submodule(path)
        assert isinstance(layer, LoraLayer)
        r, scaling = plan.ranks[path]
        loftq = config.init == "loftq"  # a dense start, then LoftQ quantizes the base and sets A and B
        layer.add_adapter(name, r, scaling, float(config.dropout), "default" if loftq else config.init)
        if loftq:
            loftq_initialize(layer, name, config.loftq_iter)
        if config.lora_bias:
            layer.add_lora_bias(name)
        for p in layer.adapter_params(name).values():
            p.requires_grad_(False)
        if path in plan.wrappers or id(layer) in new_layers:
            layer.active_adapter = active
    for path in plan.saved:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = _place(model, plan, undo, path, ModulesToSave(module), active)
        module.add_adapter(name)
        module.modules_to_save[name].requires_grad_(False)
    shared: dict[str, TokenRows] = {}
    for path, (ids, tied_to, shared_with) in plan.tokens.items():
        module = model.get_submodule(path)
        if not isinstance(module, TrainableTokens):
            module = _place(model, plan, undo, path, TrainableTokens(module, tied_to), active)
            module.weight_shared_with = shared_with
        rows = module.add_rows(name, ids, shared.get(tied_to) if tied_to is not None else None)
        shared[path] = rows
        rows.requires_grad_(False)
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora_" not in pname:
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for path in plan.targets:
            bias = getattr(model.get_submodule(path).base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


def _place(model: nn.Module, plan: AdapterPlan, undo: Undo, path: str, holder: H, active: str | None) -> H:
    """Put ``holder`` (a ``modules_to_save`` or tokens wrapper of the module at ``path``) wherever
    that module sits, in its train/eval mode; returns ``holder``."""
    module = holder.original_module
    _same_mode(holder, module)
    holder.active_adapter = active
    for alias in plan.paths.get(id(module), [path]):
        undo.append((alias, module))
        set_submodule(model, alias, holder)
    return holder


def _same_mode(wrapper: nn.Module, module: nn.Module, skip: nn.Module | None = None) -> None:
    """The wrapper and its own containers take the wrapped module's train/eval mode (an eval-mode
    model stays in eval mode); the wrapped module (or ``skip``, what the wrapper holds) keeps its own."""
    wrapper.training = module.training
    for child in wrapper.children():
        if child is not (module if skip is None else skip):
            child.train(module.training)


def roll_back(model: nn.Module, name: str, undo: Undo, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Undo a partly applied plan: adapter ``name`` leaves the wrappers that held other adapters
    before, new wrappers give way to the modules they wrapped, ``requires_grad`` flags return."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.forget_adapter(name)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            del module.modules_to_save[name]
    for path, old in reversed(undo):
        set_submodule(model, path, old)
    for p, flag in flags:
        p.requires_grad_(flag)
