"""Adapter folders as files, without a model: names, atomic writes, safe reads.

A folder (PEFT's layout) holds ``adapter_config.json`` and ``adapter_model.safetensors``. A save
writes both into a hidden sibling folder, fsyncs them and swaps the folder in at once (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere old aside then new in, a kill between rolled back by the
next save or load), other files hard-linked across: readers see the old pair or the new one. The
weights record a digest of the config (``config_digest``); a pair that disagrees (a torn save) is
refused. The writing itself is ``lorakit.atomic``'s.
Reads take only safetensors (never a pickle), check the header before reading any data, and
refuse NaN or infinite values. Every safetensors file lorakit writes is canonical (sorted header
keys): identical saves give identical bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .atomic import recover_folder
from .config import LoraConfig
from .errors import InputError, short_repr

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: the configs of ``lorakit.family``'s adapters, saved beside the same ``WEIGHTS_NAME``
SELECTIVE_CONFIG, BOTTLENECK_CONFIG = "selective_config.json", "bottleneck_config.json"
#: the weights' ``__metadata__`` key listing (JSON) the adapted matrices stored ``[in, out]`` (Conv1D)
IN_OUT_KEY = "lorakit.stored_in_out"
#: the weights' ``__metadata__`` key holding the SHA-256 of the config saved with them
CONFIG_SHA_KEY = "lorakit.config_sha256"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_CONFIG_BYTES = 16 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class AdapterLoadError(InputError):
    """An adapter checkpoint cannot be loaded into this model; the message says exactly why."""


#: config keys that describe the adapter without changing what it computes: editing them by hand
#: (e.g. pointing base_model_name_or_path at a local copy) must not break the tie below
DESCRIPTIVE_KEYS = frozenset({"base_model_name_or_path", "revision", "task_type", "inference_mode"})


def config_digest(peft_config: dict) -> str:
    """SHA-256 of the config's canonical JSON, less its descriptive keys: layout and whitespace
    do not count, a changed value does."""
    kept = {k: v for k, v in peft_config.items() if k not in DESCRIPTIVE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted (``__metadata__`` too) and
    padded with spaces to a multiple of 8 bytes: equal tensors and metadata give equal bytes (the
    writer's own key order varies from process to process). Data offsets count from the end of the
    header, so the tensor data is kept as it is."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The canonical safetensors bytes of ``tensors`` (``format: pt`` added to ``metadata``)."""
    return canonical_safetensors(save(tensors, metadata={"format": "pt", **(metadata or {})}))


def adapter_files(
    peft_config: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict[str, bytes]:
    """The two files of an adapter folder, tied together: the weights record the config's digest
    (and ``metadata``)."""
    config = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
    weights = save_tensors(tensors, {**(metadata or {}), CONFIG_SHA_KEY: config_digest(peft_config)})
    return {WEIGHTS_NAME: weights, CONFIG_NAME: config}


#: the config file of each kind of adapter saved into a folder with ``WEIGHTS_NAME``
KIND_CONFIGS = {"LoRA": CONFIG_NAME, "selective": SELECTIVE_CONFIG, "bottleneck": BOTTLENECK_CONFIG}


def check_folder_kind(directory: str | os.PathLike[str], kind: str) -> None:
    """Refuse to save a ``kind`` adapter (a key of ``KIND_CONFIGS``) into a folder holding another
    kind's config: its weights share ``WEIGHTS_NAME``, so the save would destroy the other adapter
    and leave its config beside weights that are not its own. A soft prompt's
    ``adapter_config.json`` counts as another kind."""
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        return  # ``write_folder`` refuses it
    folder = Path(directory)
    for other, name in KIND_CONFIGS.items():
        path = folder / name
        if not os.path.lexists(path):
            continue
        found = other
        if other == "LoRA":
            with contextlib.suppress(OSError, ValueError, AttributeError, RecursionError):  # unreadable: LoRA
                found = str(json.loads(path.read_bytes()).get("peft_type") or "LORA")
        if found.upper() != kind.upper():
            raise InputError(
                f"{folder}: holds {name} (a {found} adapter); saving a {kind} adapter here would overwrite its "
                f"{WEIGHTS_NAME} and leave {name} beside weights that are not its own; choose another folder"
            )


# ---------------------------------------------------------------------------------------- reading
def _regular_file(path: Path, what: str) -> bool:
    """True for a regular file (or a symlink to one: the Hugging Face cache), False when absent."""
    if not os.path.lexists(path):
        return False
    try:
        os.stat(path)
    except OSError as err:
        kind = "a symbolic link loop" if err.errno == errno.ELOOP else "a broken symbolic link"
        raise AdapterLoadError(f"{path}: the {what} is {kind} (to {os.readlink(path)})") from None
    if not stat.S_ISREG(path.stat().st_mode):
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise AdapterLoadError(f"{path}: the {what} is {kind}")
    return True


def _config_bytes(directory: str | os.PathLike[str]) -> bytes:
    path = Path(directory) / CONFIG_NAME
    if not _regular_file(path, "config"):
        raise AdapterLoadError(f"{path}: no {CONFIG_NAME} here; is {directory} an adapter directory?")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{path}: {size:,} bytes, too large for an adapter config (limit {MAX_CONFIG_BYTES:,})")
    return path.read_bytes()


def _parse_config(path: Path, data: bytes) -> LoraConfig:
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise AdapterLoadError(f"{path}: JSON nested too deeply to be an adapter config") from None
    try:
        return LoraConfig.from_peft_dict(parsed)
    except (ValueError, RecursionError) as err:
        raise AdapterLoadError(f"{path}: {err}") from None


def read_config(directory: str | os.PathLike[str]) -> LoraConfig:
    """The ``LoraConfig`` stored in an adapter directory (PEFT's or ours)."""
    return _parse_config(Path(directory) / CONFIG_NAME, _config_bytes(directory))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    if len(found := dict(pairs)) < len(pairs):
        raise ValueError(f"the header lists {sorted(k for k in found if [p[0] for p in pairs].count(k) > 1)} twice")
    return found


def _header(path: Path) -> dict[str, dict]:
    """The safetensors header (tensor name → dtype, shape, offsets), refusing duplicate names."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if not 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise ValueError(f"header length {length:,} does not fit the file")
        try:
            header = json.loads(f.read(length), object_pairs_hook=_no_duplicates)
        except RecursionError:
            raise ValueError("header JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def read_tensors(
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    name: str = WEIGHTS_NAME,
    *,
    check: Callable[[dict[str, tuple[int, ...]], dict[str, str]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory, on ``device``; only safetensors, never a pickle.

    The header is checked before any data is read: every tensor must be floating point (F16, BF16,
    F32, F64), and ``check(shapes, metadata)``, when given, may raise on the shapes; then every value
    must be finite."""
    directory = Path(directory)
    path = directory / name
    if not _regular_file(path, "weights file"):
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickles:
            raise AdapterLoadError(
                f"{directory}: found {', '.join(pickles)} but no {name}. lorakit never loads pickle "
                "files (unpickling can run arbitrary code); convert the adapter to safetensors first "
                "(e.g. with peft: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterLoadError(f"{directory}: no {name} here")
    try:
        header = _header(path)  # duplicate names (safetensors keeps the last one silently)
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            bad = [f"{k} ({header[k].get('dtype')})" for k in keys if header[k].get("dtype") not in FLOAT_DTYPES]
            if bad:
                raise AdapterLoadError(
                    f"{path}: tensors must be floating point ({', '.join(FLOAT_DTYPES)}); not: {', '.join(sorted(bad))}"
                )
            if check is not None:
                check({k: tuple(header[k]["shape"]) for k in keys}, metadata)
            tensors = {k: f.get_tensor(k) for k in keys}
    except AdapterLoadError:
        raise
    except (SafetensorError, OSError, ValueError, struct.error, KeyError, TypeError) as err:
        size = path.stat().st_size
        why = f"{size} bytes; truncated or corrupted?"
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({why}): {err}") from None
    nonfinite = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if nonfinite:
        raise AdapterLoadError(f"{path}: NaN or infinite values in {', '.join(nonfinite)}")
    return tensors


def read_adapter(
    directory: str | os.PathLike[str], device: torch.device | str = "cpu", metadata: dict[str, str] | None = None
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and the tensors of an adapter folder, both checked: the config parses, the
    weights' header (dtypes; the config is the one saved with the weights; at least one LoRA factor)
    before any data is read, then the values (finite). ``offline.factor_pairs`` checks the factors
    against the config. ``metadata``, when given, receives the weights' ``__metadata__``."""
    directory = Path(directory)
    if not directory.is_dir():
        recover_folder(directory)  # a save killed between its two renames
    raw = _config_bytes(directory)
    config = _parse_config(directory / CONFIG_NAME, raw)

    def check(shapes: dict[str, tuple[int, ...]], found: dict[str, str]) -> None:
        recorded = found.get(CONFIG_SHA_KEY)
        if recorded is not None and recorded != config_digest(json.loads(raw)):
            raise AdapterLoadError(
                f"{directory}: torn save: {WEIGHTS_NAME} was saved with a different {CONFIG_NAME} "
                f"(one whose values other than {', '.join(sorted(DESCRIPTIVE_KEYS))} differ), so weights "
                f"and config come from different saves; save the adapter again (or undo a hand edit of "
                f"{CONFIG_NAME})"
            )
        if not any(".lora_" in k or k.endswith(".trainable_tokens_delta") for k in shapes):
            raise AdapterLoadError(
                f"{directory}: {CONFIG_NAME} is a LoRA config, but {WEIGHTS_NAME} holds no LoRA factor "
                f"(no lora_A/lora_B tensor) for any module it targets ({short_repr(config.target_modules)}): "
                "these weights are not this adapter's (another kind of adapter saved into the folder?)"
            )
        if metadata is not None:
            metadata.update(found)

    return config, read_tensors(directory, device, check=check)


_REPO_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_adapter(
    source: str | os.PathLike[str], *, revision: str | None = None, subfolder: str | None = None
) -> Path:
    """The local folder of an adapter given as a folder or as a hub id (``owner/name`` or
    ``hf://owner/name``). Hub ids go through ``huggingface_hub.snapshot_download`` (imported only
    here), which reads the local cache first and only that when ``HF_HUB_OFFLINE=1``."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise AdapterLoadError(f"adapter = {source!r}: name an adapter folder or hub id (an empty path is refused)")
    path = Path(source)
    if not path.is_dir():
        recover_folder(path)  # a save killed between its two renames left the folder aside
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


def resolve_model_folder(source: str | os.PathLike[str], where: str) -> Path:
    """The local folder of a transformers model given as a folder (with ``config.json``) or as a
    hub id (``owner/name``) already in the Hugging Face cache. Never downloads: a model is
    gigabytes, and a run must not depend on the network; the error says how to fetch it."""
    path = Path(source)
    if (path / "config.json").is_file():
        return path
    text = os.fspath(source)
    if path.exists() or not _REPO_ID.match(text):
        raise InputError(f"{where}: {text!r} is not a model folder (no config.json there) nor a hub id 'owner/name'")
    repo_id = text.removeprefix("hf://")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise InputError(f"{where}: {text!r}: no such folder; a hub id needs huggingface_hub installed") from None
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise InputError(f"{where}: no folder {text!r} here, and no hub id {repo_id!r} in the local Hugging Face "
                         f"cache (lorakit never downloads a model during a run; fetch it first: hf download "
                         f"{repo_id})") from None  # fmt: skip
    if not (folder / "config.json").is_file():
        raise InputError(f"{where}: the cached {repo_id!r} ({folder}) has no config.json")
    return folder
