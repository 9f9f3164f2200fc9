"""Optimizers by name, for ``TrainerConfig.optimizer``, and the values the optimization settings
of a ``TrainerConfig`` may take (``check_training_values``).

``adamw`` and ``sgd`` are torch's; ``adamw8bit`` (8-bit optimizer state), ``paged_adamw8bit`` and
``paged_adamw32bit`` (state paged between GPU and CPU memory through CUDA unified memory) are
bitsandbytes', imported only when asked for, and run on CUDA only. Anything else: pass
``Trainer(..., optimizer_factory=lambda params, config: ...)``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .errors import InputError, is_whole

TORCH_OPTIMIZERS = ("adamw", "sgd")
BNB_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "paged_adamw32bit")
OPTIMIZERS = TORCH_OPTIMIZERS + BNB_OPTIMIZERS


def check_optimizer_name(name: str) -> None:
    """Raise ``InputError`` naming the choices when ``name`` is not a known optimizer."""
    if name not in OPTIMIZERS:
        raise InputError(
            f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}, or pass "
            "Trainer(..., optimizer_factory=lambda params, config: ...) for any other"
        )


def _num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _number(text: str) -> int | float | None:
    """The number a string spells (``"1e-3"``, ``"10"``), or None."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


_AT_LEAST_1 = ("an integer >= 1", lambda v: is_whole(v) and v >= 1)
_EVERY = ("an integer >= 1, or None", lambda v: v is None or (is_whole(v) and v >= 1))
_BOOL = ("true or false (a boolean, not a string)", lambda v: isinstance(v, bool))
# What each TrainerConfig field takes: (the allowed values in words, the check).
FIELD_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "out_dir": ("a non-empty path", lambda v: isinstance(v, (str, os.PathLike)) and str(v) != ""),
    "max_steps": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "grad_accum": _AT_LEAST_1,
    "keep_last": _AT_LEAST_1, "log_every": _AT_LEAST_1, "save_every": _EVERY, "eval_every": _EVERY,
    "warmup_steps": ("an integer >= 0", lambda v: is_whole(v) and v >= 0),
    "lr": ("a finite number > 0", lambda v: _num(v) and v > 0),
    "weight_decay": ("a finite number >= 0", lambda v: _num(v) and v >= 0),
    "max_grad_norm": ("a finite number > 0, or None (no clipping)", lambda v: v is None or (_num(v) and v > 0)),
    "bf16": _BOOL, "fp16": _BOOL, "progress": _BOOL, "overwrite": _BOOL,
    "schedule": ("one of 'cosine', 'linear', 'constant'", lambda v: v in ("cosine", "linear", "constant")),
    "on_nonfinite": ("'raise' or 'skip'", lambda v: v in ("raise", "skip")),
    "optimizer": (f"one of {', '.join(OPTIMIZERS)}", lambda v: isinstance(v, str)),
    "seed": ("an integer in [0, 2**32)", lambda v: is_whole(v) and 0 <= v < 2**32),
    "adapter": ("a non-empty string", lambda v: isinstance(v, str) and v != ""),
    "desc": ("a string", lambda v: isinstance(v, str)),
    "device": ("None, a torch.device or a string such as 'cpu', 'cuda', 'cuda:1'",
               lambda v: v is None or (isinstance(v, (str, torch.device, int)) and not isinstance(v, bool))),
}  # fmt: skip


def check_training_values(values: Mapping[str, Any], label: Callable[[str], str]) -> None:
    """Raise ``InputError`` for the first value a ``TrainerConfig`` field cannot take, naming
    ``label(field)``, the value, its type and what is allowed (a device is checked for its type
    only; unknown names are the caller's business)."""
    for key, value in values.items():
        allowed, ok = FIELD_RULES.get(key, ("", lambda v: True))
        if not ok(value):
            number = _number(value) if isinstance(value, str) else None
            quoted = number is not None and ok(number)
            hint = f" (write it without quotes: {value.strip()})" if quoted else ""
            raise InputError(f"{label(key)} = {value!r} ({type(value).__name__}): expected {allowed}{hint}")
        if key == "optimizer":
            try:
                check_optimizer_name(value)
            except InputError as err:
                raise InputError(f"{label(key)} = {value!r}: {err}") from None


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate's factor at ``step``: a linear warmup over ``warmup_steps``, then
    ``schedule`` (cosine / linear decay to 0 at ``max_steps``, or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def _devices(params: list[Any]) -> set[torch.device]:
    tensors: list[torch.Tensor] = []
    for p in params:
        tensors.extend(p["params"] if isinstance(p, dict) else [p])
    return {t.device for t in tensors}


def make_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (tensors or parameter groups); ``kwargs`` go to its
    constructor (e.g. ``momentum=0.9`` for ``sgd``, ``betas=...`` for the AdamW variants)."""
    check_optimizer_name(name)
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kwargs)
    off_cuda = sorted(str(d) for d in _devices(params) if d.type != "cuda")
    if off_cuda or not torch.cuda.is_available():
        where = ", ".join(off_cuda) or "a machine without CUDA"
        raise InputError(
            f"optimizer {name!r} (bitsandbytes' 8-bit / paged state) runs on CUDA only, and the parameters "
            f"are on {where}; use optimizer='adamw' (an adapter's optimizer state is small) or train on a GPU "
            "(TrainerConfig(device='cuda'))"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"optimizer {name!r} needs bitsandbytes: pip install 'lorakit[quant]'") from None
    cls = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay, **kwargs)


def paged_adamw(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], bits: int = 8, **kwargs: Any
) -> torch.optim.Optimizer:
    """bitsandbytes' paged AdamW with 8- or 32-bit state (``make_optimizer(params, "paged_adamw8bit")``)."""
    if bits not in (8, 32):
        raise InputError(f"paged AdamW comes in 8 and 32 bits, got {bits}")
    return make_optimizer(params, f"paged_adamw{bits}bit", **kwargs)
