"""Optimizers by name, for ``TrainerConfig.optimizer``.

``adamw`` and ``sgd`` are torch's; ``adamw8bit`` (8-bit optimizer state), ``paged_adamw8bit`` and
``paged_adamw32bit`` (state paged between GPU and CPU memory through CUDA unified memory) are
bitsandbytes', imported only when asked for, and run on CUDA only. Anything else: pass
``Trainer(..., optimizer_factory=lambda params, config: ...)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .errors import InputError

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
