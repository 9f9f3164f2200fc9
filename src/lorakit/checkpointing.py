"""Activation checkpointing per block, with the option to keep what is cheap to store.

Checkpointing a block keeps only its input in the forward and runs the block again in the
backward. That second run costs what the block's forward costs, but not every part of it is worth
recomputing: attention over ``n`` tokens costs ``O(n²·h)`` to compute and ``O(n·h)`` to store
(its output and one log-sum-exp per head and token), while everything else in a block is linear
in ``n`` both ways. ``keep=("attention",)`` stores the fused attention kernels' outputs
(torch's selective checkpointing, ``create_selective_checkpoint_contexts``) and recomputes the
rest: per block ``n·(h + heads)`` more values kept, and no attention forward in the backward.

LoRA needs nothing else from the checkpoint: its layers' recomputation draws the same dropout
masks (the RNG state is restored, ``preserve_rng_state``), and what they keep for the backward is
already minimal (``lorakit.functional``: the input the frozen layer has anyway, the ``[n, r]``
product and a one-byte dropout mask).

A transformers model is checkpointed by its own ``activation_checkpointing_enable`` (or, before
transformers 5, ``gradient_checkpointing_enable``) with ``use_reentrant=False`` and, with
``keep``, the selective context; other models name their ``blocks``, whose ``forward`` is wrapped
(and put back by :func:`disable_checkpointing`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from .errors import InputError
from .instance_forward import InstanceForward

#: what ``keep`` may name, and the aten ops whose outputs are then stored instead of recomputed
KEEPABLE: dict[str, tuple[str, ...]] = {
    "attention": (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward",
    ),
}  # fmt: skip


class _KeepPolicy:
    """Selective-checkpointing policy: store the outputs of the named ops, recompute the rest. It
    remembers whether it ever stored one, so that a model whose attention never reaches those
    kernels (eager attention, sdpa's math path) is reported once instead of silently kept nothing."""

    def __init__(self, keep: Sequence[str]) -> None:
        ops = {name for k in keep for name in KEEPABLE[k]}
        self.ops = {getattr(torch.ops.aten, name).default for name in ops if hasattr(torch.ops.aten, name)}
        self.keep = tuple(keep)
        self.kept = 0
        self.calls = 0
        self.warned = False

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> torch_checkpoint.CheckpointPolicy:
        if op in self.ops:
            self.kept += 1
            return torch_checkpoint.CheckpointPolicy.MUST_SAVE
        return torch_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE

    def context(self) -> tuple[Any, Any]:
        self.calls += 1
        if self.calls > 2 and not self.kept and not self.warned:
            self.warned = True
            warnings.warn(f"checkpointing with keep={self.keep}: nothing was kept, since the model's attention does "
                          "not run torch's fused attention kernels (attn_implementation='eager', or sdpa's math path); "
                          "every block is recomputed in full", UserWarning, stacklevel=4)  # fmt: skip
        return torch_checkpoint.create_selective_checkpoint_contexts(self)


def check_keep(keep: Iterable[str] | str | None) -> tuple[str, ...]:
    """``keep`` as a tuple of known names, or an ``InputError`` naming the unknown one."""
    if keep is None:
        return ()
    if not isinstance(keep, (str, list, tuple)):
        raise InputError(f"checkpointing keep = {keep!r}; allowed: None, a name or a list of {sorted(KEEPABLE)}")
    names = (keep,) if isinstance(keep, str) else tuple(keep)
    for name in names:
        if not isinstance(name, str) or name not in KEEPABLE:
            raise InputError(f"checkpointing keep = {name!r} is unknown; allowed: {sorted(KEEPABLE)}")
    return names


def checkpoint_kwargs(keep: Sequence[str]) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` (non-reentrant; selective with ``keep``)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if keep:
        kwargs["context_fn"] = _KeepPolicy(keep).context
    return kwargs


def enable_checkpointing(
    model: nn.Module, keep: Iterable[str] | str | None = None, blocks: Iterable[nn.Module] | None = None
) -> nn.Module:
    """Checkpoint each block of ``model``: a transformers model's decoder layers, or ``blocks``.
    ``keep=("attention",)`` stores the attention kernels' outputs instead of recomputing them
    (module docstring). Returns ``model``."""
    names = check_keep(keep)
    kwargs = checkpoint_kwargs(names)
    if blocks is not None:
        one = isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential))
        wrapped = [] if one else list(blocks)
        if not wrapped or not all(isinstance(b, nn.Module) for b in wrapped):
            raise InputError("enable_checkpointing: blocks must be a non-empty list of the model's nn.Modules")
        if getattr(getattr(model, "config", None), "use_cache", False):
            raise InputError(f"enable_checkpointing: {type(model).__name__} fills a key/value cache in its forward "
                             "(config.use_cache), which a block's recomputation would fill twice; call "
                             "enable_checkpointing(model) without blocks (transformers turns the cache off), or set "
                             "model.config.use_cache = False")  # fmt: skip
        inside = {id(m) for m in model.modules()}
        for block in wrapped:
            if id(block) not in inside:
                raise InputError(f"enable_checkpointing: a {type(block).__name__} in blocks is not part of the model")
            CheckpointedForward.install(block, names, kwargs)
        return model
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise InputError(f"enable_checkpointing: {type(model).__name__} is not a transformers model; name the modules "
                         "to checkpoint with blocks=[...] (e.g. its decoder layers)")  # fmt: skip
    if not is_checkpointing(model):
        raise InputError(f"enable_checkpointing: {type(model).__name__} did not turn checkpointing on")
    return model


def is_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) or one of its modules (``blocks``) is checkpointed."""
    blocks = any(isinstance(m.__dict__.get("forward"), CheckpointedForward) for m in model.modules())
    return blocks or _transformers_checkpointing(model)


def _transformers_checkpointing(model: nn.Module) -> bool:
    new = hasattr(type(model), "is_activation_checkpointing")  # transformers 5 renamed it
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))


#: keyword arguments through which a block fills a key/value cache (which a recomputation would fill twice)
CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")


class CheckpointedForward(InstanceForward):
    """A block's ``forward`` while it is checkpointed (``lorakit.instance_forward``)."""

    def __init__(self, block: nn.Module, previous: Any, keep: tuple[str, ...], kwargs: dict[str, Any] | None) -> None:
        super().__init__(block, previous)
        self.keep = keep
        self.kwargs = kwargs if kwargs is not None else checkpoint_kwargs(keep)  # shared by a model's blocks

    def __reduce__(self) -> tuple[Any, ...]:
        return (CheckpointedForward, (self.module, self.previous, self.keep, None))  # the policy is rebuilt

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if not (self.module.training and torch.is_grad_enabled()):
            return self.plain()(*args, **kw)
        if any(kw.get(name) is not None for name in CACHE_ARGS) or kw.get("use_cache"):
            raise InputError(f"a checkpointed {type(self.module).__name__} was asked to fill a key/value cache while "
                             "training, which its recomputation would fill twice; pass use_cache=False (or set "
                             "model.config.use_cache = False)")  # fmt: skip
        return torch_checkpoint.checkpoint(self.plain(), *args, **self.kwargs, **kw)


def disable_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_checkpointing` (both kinds), putting back the forwards that were there
    before. Returns ``model``."""
    for module in model.modules():
        current = module.__dict__.get("forward")
        if isinstance(current, CheckpointedForward):
            current.restore()
    if _transformers_checkpointing(model):
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    return model
