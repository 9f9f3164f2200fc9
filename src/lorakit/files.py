"""Adapter folders as files, without a model: their names, atomic writes, safe reads, and
finding a folder given as a path or as a Hugging Face Hub id.

An adapter folder (PEFT's layout) holds ``adapter_config.json`` and ``adapter_model.safetensors``.
Only safetensors are ever read (never a pickle); every write goes to a temporary file in the same
folder, is fsynced, then renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import LoraConfig
from .errors import InputError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT's prefix of every tensor key (``base_model.model.<module path>.lora_A.weight``)
PREFIX = "base_model.model."

_REPO_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AdapterLoadError(InputError):
    """An adapter checkpoint cannot be loaded into this model; the message says exactly why."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_config(directory: str | os.PathLike[str]) -> LoraConfig:
    """The ``LoraConfig`` stored in an adapter directory (PEFT's or ours)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path}: no {CONFIG_NAME} here; is {directory} an adapter directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{path}: not valid JSON ({err})") from None
    try:
        return LoraConfig.from_peft_dict(data)
    except ValueError as err:
        raise AdapterLoadError(f"{path}: {err}") from None


def read_tensors(
    directory: str | os.PathLike[str], device: torch.device | str = "cpu", name: str = WEIGHTS_NAME
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory, on ``device``; only safetensors, never a pickle."""
    directory = Path(directory)
    path = directory / name
    if not path.is_file():
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickles:
            raise AdapterLoadError(
                f"{directory}: found {', '.join(pickles)} but no {name}. lorakit never loads pickle "
                "files (unpickling can run arbitrary code); convert the adapter to safetensors first "
                "(e.g. with peft: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterLoadError(f"{directory}: no {name} here")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        size = path.stat().st_size
        raise AdapterLoadError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupted?): {err}"
        ) from None


def resolve_adapter(
    source: str | os.PathLike[str], *, revision: str | None = None, subfolder: str | None = None
) -> Path:
    """The local folder of an adapter given as a folder or as a hub id (``owner/name`` or
    ``hf://owner/name``). Hub ids go through ``huggingface_hub.snapshot_download`` (imported only
    here), which reads the local cache first and only that when ``HF_HUB_OFFLINE=1``."""
    path = Path(source)
    if path.is_dir():
        return path / subfolder if subfolder else path
    text = str(source)
    if not _REPO_ID.match(text):
        raise AdapterLoadError(
            f"{text}: no such adapter folder (no {CONFIG_NAME} here), and not a hub id of the form 'owner/name'"
        )
    repo_id = text.removeprefix("hf://")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise AdapterLoadError(f"{text}: no such folder; loading from the hub needs huggingface_hub") from None
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=[prefix + CONFIG_NAME, prefix + WEIGHTS_NAME]
        )
    except LocalEntryNotFoundError as err:
        raise AdapterLoadError(
            f"{repo_id}: not a local folder and not in the Hugging Face cache "
            f"({'offline mode is on' if os.environ.get('HF_HUB_OFFLINE') else 'and the hub was not reachable'}): {err}"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise AdapterLoadError(f"{repo_id}: could not fetch the adapter from the hub: {err}") from None
    return Path(folder) / prefix if prefix else Path(folder)
