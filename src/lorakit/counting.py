"""Parameter counts of a model with adapters: trainable, total, and the original model's own."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import LoraLayer, ModulesToSave
from .targeting import is_linear4bit, require_module


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a model with adapters.

    ``base``: parameters of the original model; ``total``: everything the model holds now
    (base + adapters); ``trainable``: those that require gradients.
    """

    trainable: int
    total: int
    base: int

    @property
    def adapter(self) -> int:
        return self.total - self.base

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of the original model's."""
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} of {self.base:,} base parameters ({self.trainable_percent:.2f}%), "
            f"{self.total:,} in total"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable, total and original-model parameters (shared tensors counted once)."""
    require_module(model, "lorakit.count_parameters")
    adapter_ids: set[int] = set()
    packed: dict[int, int] = {}  # a packed 4-bit weight stands for in·out weights, two per byte
    for module in model.modules():
        if isinstance(module, LoraLayer):
            adapter_ids.update(id(p) for name in module.lora_A for p in module.adapter_params(name).values())
        elif isinstance(module, ModulesToSave):
            adapter_ids.update(id(p) for p in module.modules_to_save.parameters())
        elif getattr(module, "is_lorakit_adapter", False):  # e.g. bottleneck adapters
            adapter_ids.update(id(p) for p in module.adapter_parameters())
        elif is_linear4bit(module):
            packed[id(module.weight)] = module.in_features * module.out_features
    trainable = total = base = 0
    for p in model.parameters():  # parameters() already yields each shared tensor once
        n = packed.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
        base += 0 if id(p) in adapter_ids else n
    return ParameterCount(trainable=trainable, total=total, base=base)
