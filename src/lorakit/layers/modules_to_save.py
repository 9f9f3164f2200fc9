"""``modules_to_save``: a module trained in full for each adapter (e.g. a new classification head)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModulesToSave(nn.Module):
    """``original_module`` stays frozen; each adapter gets its own trainable copy in
    ``modules_to_save[name]``. The active adapter's copy runs; with adapters disabled (or an
    adapter that has no copy here) the original runs.
    """

    lorakit_wrapper = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        module.requires_grad_(False)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a trainable copy of this module")
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        name = self.active_adapter
        if self.adapters_disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def saved_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors by their key below this module's path, as PEFT saves them."""
        return dict(self.modules_to_save[name].named_parameters())

    def unload(self) -> nn.Module:
        """What takes this wrapper's place when adapters are merged and unloaded."""
        return self.active_module()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)
