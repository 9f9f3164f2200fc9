"""Hugging Face models that hold adapters: ``model.save_pretrained(dir)`` saves the adapters.

transformers' own ``save_pretrained`` would write the injected model's state dict, whose keys
(``q_proj.base_layer.weight``, ``q_proj.lora_A.default``) a plain ``from_pretrained`` does not
know: it silently re-initialises every adapted module at random and reports the keys in one log
line. So while a model holds adapters, lorakit gives it an instance-level ``save_pretrained`` that
does what PEFT's ``PeftModel.save_pretrained`` does: it writes each adapter in PEFT's format (the
adapter ``default`` at the top of the folder, any other in a sub-folder named after it, as PEFT
lays them out) and logs that only the adapter was saved. ``from_pretrained(dir)`` then finds
``adapter_config.json``: with peft installed transformers loads the base model named in its
``base_model_name_or_path`` and the adapter on top (the same model); without peft, or without a
known base, it fails with an error instead of loading a wrong model.

The whole model, ΔW in its weights: ``lorakit.merge_and_unload(model).save_pretrained(dir)``. The
class's own method comes back when the model's last adapter goes (``merge_and_unload``,
``delete_adapter``). ``deepcopy``, ``pickle``/``torch.save(model)`` and Hugging Face's ``Trainer``
(which calls ``save_pretrained(dir, state_dict=..., ...)``) keep working.

``model.state_dict()`` (and ``torch.save(model.state_dict())``) is unchanged: it holds the wrapped
keys and loads into a model injected the same way; ``load_state_dict`` on a plain model reports
the mismatch (strict by default).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import save_adapter
from .errors import ArgumentTypeError, InputError, short_repr
from .injection import CONFIGS_ATTR, adapter_configs, register_adapter_hook
from .targeting import require_module

logger = logging.getLogger(__name__)

ROOT_ADAPTER = "default"


def save_adapters(
    model: nn.Module, directory: str | os.PathLike[str], names: list[str] | str | None = None
) -> list[Path]:
    """Save adapters ``names`` (default: all) the way PEFT's ``save_pretrained`` lays them out:
    ``default`` in ``directory`` itself, any other adapter in ``directory/<name>``. Returns the
    folders written."""
    require_module(model, "lorakit.save_adapters")
    if not isinstance(directory, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"lorakit.save_adapters: directory = {short_repr(directory)}; allowed: a folder path (str or os.PathLike)"
        )
    configs = adapter_configs(model)
    if not configs:
        raise InputError("the model holds no adapters to save; lorakit.inject or lorakit.load_adapter adds one")
    if names is not None and not isinstance(names, (str, list, tuple)):
        raise ArgumentTypeError(
            f"lorakit.save_adapters: names = {short_repr(names)}; allowed: None (every adapter), an "
            f"adapter name or a list of them, among {sorted(configs)}"
        )
    wanted = list(configs) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in configs]
    if unknown:
        raise InputError(f"no adapter named {unknown}; the model holds {sorted(configs)}")
    root = Path(directory)
    folders = []
    for name in wanted:
        folder = root if name == ROOT_ADAPTER else root / name
        save_adapter(model, folder, name)
        folders.append(folder)
    return folders


class AdapterSavePretrained:
    """``model.save_pretrained`` while ``model`` holds adapters: saves the adapters in PEFT's
    format (see the module docstring). Takes ``save_pretrained``'s arguments; ``state_dict`` is not
    used (the adapter tensors are read from the model), ``push_to_hub`` is refused."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.warned = False

    def __call__(
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        state_dict: dict[str, Any] | None = None,
        push_to_hub: bool = False,
        selected_adapters: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if push_to_hub:
            raise InputError(
                "save_pretrained(push_to_hub=True) on a model with lorakit adapters: use "
                "lorakit.push_to_hub(model, repo_id) for the adapter, or lorakit.merge_and_unload(model) first"
            )
        if not is_main_process:
            return
        folders = save_adapters(self.model, save_directory, selected_adapters)
        if state_dict is not None:
            logger.debug("save_pretrained: the adapter tensors were read from the model, not from state_dict")
        report = logger.info if self.warned else logger.warning
        self.warned = True
        report(
            "save_pretrained saved only the adapter%s (%s) in PEFT's format to %s, not the whole model; for the "
            "model with the adapter merged into its weights call lorakit.merge_and_unload(model).save_pretrained(dir)",
            "s" if len(folders) > 1 else "", ", ".join(selected_adapters or list(adapter_configs(self.model))),
            save_directory,
        )  # fmt: skip


def keep_save_pretrained_in_step(model: nn.Module) -> None:
    """Give ``model`` the adapter-saving ``save_pretrained`` while it holds adapters (when its
    class has a ``save_pretrained``); take it away when the last adapter goes."""
    current = model.__dict__.get("save_pretrained")
    holds = bool(model.__dict__.get(CONFIGS_ATTR))
    if holds and not isinstance(current, AdapterSavePretrained):
        if callable(getattr(type(model), "save_pretrained", None)) and current is None:
            model.__dict__["save_pretrained"] = AdapterSavePretrained(model)
    elif not holds and isinstance(current, AdapterSavePretrained):
        del model.__dict__["save_pretrained"]


register_adapter_hook(keep_save_pretrained_in_step)
