"""LoRA+ (Hayou et al. 2024): train B with a larger learning rate than A.

With ``ΔW = s · B A``, B starts at zero and A at random; the paper shows that equal learning rates
leave B's updates too small when the width is large, and sets ``η_B = λ · η_A`` (λ about 16).
The parameter groups follow PEFT's ``create_loraplus_optimizer``:

* A factors (and any other trainable matrix, e.g. a ``modules_to_save`` copy): ``lr``;
* B factors and every vector (biases, lora biases, DoRA magnitudes): ``λ · lr``;
* both factors of adapted embeddings: ``embedding_lr`` (PEFT's default 1e-6);

all with ``weight_decay`` except biases and the parameters of LayerNorm layers.

``loraplus_groups`` feeds any torch optimizer; ``loraplus`` returns an ``optimizer_factory`` for
``lk.Trainer`` (the optimizer, learning rate and weight decay come from its ``TrainerConfig``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .injection import lora_layers
from .layers import LoraEmbedding
from .optim import make_optimizer
from .targeting import require_module


def loraplus_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, embedding_lr: float = 1e-6, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in LoRA+ groups (see the module docstring); groups
    that would be empty are left out. Each parameter appears exactly once."""
    require_module(model, "lorakit.loraplus_groups")
    for what, value, floor in (("lr", lr, 0.0), ("ratio", ratio, 0.0), ("embedding_lr", embedding_lr, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= floor:
            raise InputError(f"lorakit.loraplus_groups: {what} = {value!r}; allowed: a finite number > 0")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise InputError(f"lorakit.loraplus_groups: weight_decay = {weight_decay!r}; allowed: a number >= 0")
    embedding_ids = {id(p) for _, layer in lora_layers(model) if isinstance(layer, LoraEmbedding)
                     for table in (layer.lora_A, layer.lora_B) for p in table.values()}  # fmt: skip
    # every B factor a layer holds, by its PEFT key (a MultiheadAttention holds two: in_proj's and out_proj's)
    b_ids = {id(p) for _, layer in lora_layers(model) for n in layer.lora_B
             for key, p in layer.adapter_params(n).items() if key.endswith("lora_B.weight")}  # fmt: skip
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for n, p in model.named_parameters() if "bias" in n}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in model.parameters():  # each shared tensor once
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids:
            groups["embedding"].append(p)
        elif id(p) in b_ids or p.dim() <= 1:
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {
        "A": {"lr": lr, "weight_decay": weight_decay},
        "embedding": {"lr": embedding_lr, "weight_decay": weight_decay},
        "B": {"lr": lr * ratio, "weight_decay": weight_decay},
        "B_no_decay": {"lr": lr * ratio, "weight_decay": 0.0},
    }
    return [{"params": params, "name": f"loraplus_{key}", **settings[key]} for key, params in groups.items() if params]


def loraplus(
    model: nn.Module, ratio: float = 16.0, embedding_lr: float = 1e-6
) -> Callable[[list[nn.Parameter], Any], torch.optim.Optimizer]:
    """An ``optimizer_factory`` for ``lk.Trainer``: ``config.optimizer`` over ``loraplus_groups``
    with ``config.lr`` and ``config.weight_decay``. The Trainer's parameters must be the model's
    trainable ones (it refuses to build otherwise)."""

    def factory(params: list[nn.Parameter], config: Any) -> torch.optim.Optimizer:
        groups = loraplus_groups(model, config.lr, ratio, embedding_lr, config.weight_decay)
        grouped = {id(p) for g in groups for p in g["params"]}
        if grouped != {id(p) for p in params}:
            raise InputError(
                "lorakit.loraplus: the Trainer trains other parameters than the model's trainable ones "
                f"({len(params)} vs {len(grouped)}); build the factory for the model the Trainer trains"
            )
        return make_optimizer(groups, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)

    return factory
