"""Sharing adapters through the Hugging Face Hub (``huggingface_hub``, imported only when used).

A hub repository written here is a PEFT adapter repository: ``adapter_config.json``,
``adapter_model.safetensors`` and a model card (``README.md``) that names the base model, the
configuration, the trainable parameters and any metrics. ``peft`` and lorakit both load it.
``load_adapter(model, "owner/name")`` resolves a hub id through ``huggingface_hub``'s cache, so it
works offline (``HF_HUB_OFFLINE=1``) once the repository is cached.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from .atomic import write_folder
from .checkpoint import adapter_state_files
from .counting import count_parameters
from .files import check_folder_kind
from .injection import adapter_configs


def model_card(
    model: nn.Module,
    *,
    name: str = "default",
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    description: str | None = None,
) -> str:
    """A model card (``README.md``) for adapter ``name``: hub metadata, the configuration, the
    trainable parameters, the metrics, and how to load it with lorakit and with peft."""
    config = adapter_configs(model)[name]
    counts = count_parameters(model)
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    front = ["---", "library_name: peft", "tags:", "- lorakit", "- lora"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = [
        *front, "", f"# LoRA adapter{f' for {base_model}' if base_model else ''}", "",
        description or "A LoRA adapter trained with lorakit; stored in Hugging Face PEFT's format.", "",
        "| setting | value |", "|---|---|", f"| rank r | {config.r} |", f"| alpha | {config.alpha:g} |",
        f"| scaling | {'alpha/sqrt(r)' if config.use_rslora else 'alpha/r'} |", f"| target modules | {targets} |",
        f"| dropout | {config.dropout:g} |",
        f"| trainable parameters | {counts.trainable:,} ({counts.trainable_percent:.3f}% of {counts.base:,}) |",
    ]  # fmt: skip
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "", "## Use", "", "```python", "import lorakit as lk",
        "lk.load_adapter(model, \"<this repo id>\")   # model: the base model as an nn.Module", "```", "",
        "```python", "from peft import PeftModel",
        "model = PeftModel.from_pretrained(model, \"<this repo id>\")", "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def save_for_hub(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    name: str = "default",
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    description: str | None = None,
) -> Path:
    """Write what :func:`push_to_hub` uploads (adapter files + ``README.md``) to ``directory``, all
    three replaced together; ``base_model`` is also the config's ``base_model_name_or_path``."""
    card = model_card(model, name=name, base_model=base_model, metrics=metrics, description=description)
    check_folder_kind(directory, "LoRA")
    files = {**adapter_state_files(model, name, base_model=base_model), "README.md": card.encode()}
    write_folder(directory, files)
    return Path(directory)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    name: str = "default",
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    description: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload adapter ``name`` with a model card to the hub repository ``repo_id`` (created when
    missing) in one commit; returns the commit URL. Needs network access and a write token."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hub(model, tmp, name=name, base_model=base_model, metrics=metrics, description=description)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, revision=revision,
            commit_message=commit_message or f"lorakit: upload adapter {name!r}",
        )  # fmt: skip
    return str(getattr(info, "commit_url", info))
