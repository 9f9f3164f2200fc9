"""Training checkpoints on disk: folders sealed atomically, verified on the way back, and the
state in them put back onto the device training runs on.

A checkpoint is written into a temporary folder; its files are fsynced and listed with their
SHA-256 in ``COMPLETE``, which is fsynced too, and the folder is then renamed into place. A folder
whose manifest is missing or does not match its files (a kill mid-save, a torn write) is skipped
with a warning.

The trainer state (``trainer_state.pt``: optimizer, scheduler, gradient scaler, RNG states, step)
is read with ``map_location="cpu"`` and ``weights_only=True``: the CPU RNG state must stay a CPU
``ByteTensor``, and optimizer state moves to its parameters' device in ``load_state_dict``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MANIFEST = "COMPLETE"
TRAINABLE = "trainable.safetensors"
STATE = "trainer_state.pt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp: Path, final: Path) -> Path:
    """Fsync every file of ``tmp``, list them with their SHA-256 in the manifest, and rename the
    folder to ``final``: after this, ``final`` is complete or absent, never half written."""
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    manifest = {name: sha256_file(tmp / name) for name in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with open(tmp / MANIFEST, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def verify(path: Path) -> bool:
    """Whether the folder's manifest lists exactly its files, each with a matching SHA-256."""
    try:
        listed = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if set(listed) != present:
        return False
    return all(sha256_file(path / name) == digest for name, digest in listed.items())


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``step-*`` folders of ``ckpt_dir`` whose manifest verifies, newest first; every other
    one is skipped with a ``UserWarning`` naming it."""
    if not ckpt_dir.is_dir():
        return []
    good = []
    for path in sorted(ckpt_dir.glob("step-*"), reverse=True):
        if verify(path):
            good.append(path)
        else:
            warnings.warn(f"lorakit: skipping incomplete or damaged checkpoint {path}", UserWarning, stacklevel=3)
    return good


def save_trainable(model: nn.Module, folder: Path) -> None:
    """The trainable parameters by name (a model without an adapter: full fine-tuning, a head)."""
    named = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(named, str(folder / TRAINABLE))


def load_trainable(model: nn.Module, folder: Path, device: torch.device) -> int:
    """Copy ``trainable.safetensors`` into the model's trainable parameters; returns how many.
    Raises ``ValueError`` when the file and the model disagree on the names."""
    saved = load_file(str(folder / TRAINABLE), device=str(device))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise ValueError(f"{folder}: holds {sorted(saved)}, the model trains {sorted(params)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])  # copy_ also crosses devices, for a model spread over several
    return len(saved)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states training draws from: the CPU generator and, on CUDA, the device's own."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def load_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.pt``, every tensor on the CPU, no pickled code."""
    return torch.load(folder / STATE, map_location="cpu", weights_only=True)


def pause_for_tests(variable: str) -> None:
    """Tests set this to widen the window in which a kill lands mid-checkpoint."""
    seconds = float(os.environ.get(variable, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)
