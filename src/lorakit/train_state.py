"""Training checkpoints on disk: folders sealed atomically, verified on the way back, and the
state in them put back onto the device training runs on.

A checkpoint is written into a temporary folder ``.step-N.tmp-PID``; its files are fsynced and
listed with their SHA-256 in ``COMPLETE``, which is fsynced too, and the folder is then renamed
into place. A folder whose manifest is missing, of the wrong shape or does not match its files,
that lacks a file every checkpoint has, or whose ``trainer.json`` does not describe its step, is
damaged (``checkpoint_problem`` says why). A write that fails (a full disk) removes its temporary
folder; one killed mid-write leaves it behind for ``remove_stale_temps``.

``trainer.json`` also holds a fingerprint of the frozen base (``base_fingerprint``: names, shapes,
dtypes and a SHA-256 of every frozen parameter's bytes), the data's size and the caller's record
of the run (a recipe's sections), so that a resume onto another base, other data or another
recipe is refused (``lorakit.run_dir``) instead of silently training a mixture.

The trainer state (``trainer_state.pt``: optimizer, scheduler, gradient scaler, RNG states, step)
is read with ``map_location="cpu"`` and ``weights_only=True``: the CPU RNG state must stay a CPU
``ByteTensor``, and optimizer state moves to its parameters' device in ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from .atomic import fsync_path, remove_tree

logger = logging.getLogger(__name__)

MANIFEST = "COMPLETE"
TRAINABLE = "trainable.safetensors"
STATE = "trainer_state.pt"
META = "trainer.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # lorakit.checkpoint.WEIGHTS_NAME (a higher tier)
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOSS_CURVE = "loss_curve.png"
_STEP_DIR = re.compile(r"step-(\d{8})")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    fsync_path(final.parent)
    return final


def _manifest_problem(path: Path) -> str | None:
    try:
        listed = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} manifest"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"unreadable manifest ({type(err).__name__})"
    if not isinstance(listed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _DIGEST.fullmatch(v) for k, v in listed.items()
    ):
        return "manifest is not a table of file names and SHA-256 digests"
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if set(listed) != present:
        return f"manifest lists {sorted(listed)}, the folder holds {sorted(present)}"
    bad = [name for name, digest in sorted(listed.items()) if sha256_file(path / name) != digest]
    return f"SHA-256 mismatch in {', '.join(bad)}" if bad else None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None when it is complete."""
    match = _STEP_DIR.fullmatch(path.name)
    if match is None:
        return "not named step-NNNNNNNN"
    if not path.is_dir():
        return "a file, not a checkpoint folder"
    try:
        problem = _manifest_problem(path)
    except OSError as err:  # removed or unreadable while being read
        problem = f"unreadable ({err})"
    if problem:
        return problem
    missing = [n for n in (STATE, META) if not (path / n).is_file()]
    if not (path / TRAINABLE).is_file() and not (path / ADAPTER_WEIGHTS).is_file():
        missing.append(f"{ADAPTER_WEIGHTS} or {TRAINABLE}")
    if missing:
        return f"missing {', '.join(missing)}"
    meta = read_meta(path)
    if meta is None or meta.get("step") != int(match.group(1)):
        return f"{META} does not describe step {int(match.group(1))}"
    return None


def verify(path: Path) -> bool:
    """Whether the folder is a complete checkpoint (``checkpoint_problem`` finds nothing)."""
    return checkpoint_problem(path) is None


def read_meta(path: Path) -> dict[str, Any] | None:
    """``trainer.json``: a table with an integer ``step`` and a ``config`` table, else None."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(meta, dict) and type(meta.get("step")) is int and isinstance(meta.get("config"), dict)
    return meta if ok and ("base" not in meta or _is_fingerprint(meta["base"])) else None


def _is_fingerprint(base: Any) -> bool:
    if not (isinstance(base, dict) and isinstance(base.get("sha256"), str) and isinstance(base.get("tensors"), dict)):
        return False
    return all(isinstance(v, list) and len(v) == 3 and isinstance(v[0], list) and isinstance(v[1], str)
               and (v[2] is None or isinstance(v[2], str)) for v in base["tensors"].values())  # fmt: skip


def scan(ckpt_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(complete, damaged)``: the ``step-*`` folders of ``ckpt_dir``, newest first, the damaged
    ones with the reason."""
    good: list[Path] = []
    damaged: list[tuple[Path, str]] = []
    if not ckpt_dir.is_dir():
        return good, damaged
    for path in sorted(ckpt_dir.glob("step-*"), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            good.append(path)
        else:
            damaged.append((path, problem))
    return good, damaged


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete ``step-*`` folders of ``ckpt_dir``, newest first."""
    return scan(ckpt_dir)[0]


def stale_temps(ckpt_dir: Path) -> list[Path]:
    """Temporary folders of checkpoint writes that never finished (a process killed mid-save)."""
    return sorted(ckpt_dir.glob(".step-*.tmp-*")) if ckpt_dir.is_dir() else []


def remove_path(path: Path) -> None:
    """Delete ``path``: a folder with what it holds, or a file (or link); missing is fine."""
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temps(ckpt_dir: Path) -> int:
    temps = stale_temps(ckpt_dir)
    for tmp in temps:
        remove_path(tmp)
    return len(temps)


def write_sealed(ckpt_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary folder, which is then sealed as ``step-N``. On any error
    the temporary folder is removed (the earlier checkpoints are untouched); a full disk is
    reported as such, naming the folder."""
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
    try:
        remove_path(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        pause_for_tests("LORAKIT_TEST_PAUSE_IN_SAVE", step)
        return seal(tmp, final)
    except BaseException as err:
        remove_path(tmp)
        if _disk_full(err):
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while writing checkpoint {final.name} into {ckpt_dir}; the earlier "
                "checkpoints there are intact: free some space, then resume",
            ) from err
        raise


def _disk_full(err: BaseException | None) -> bool:
    """An ``OSError(ENOSPC)``, also behind another error (a library that wraps it)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _tensor_bytes(t: torch.Tensor) -> memoryview | None:
    if t.device.type == "meta" or hasattr(t, "to_local"):  # no data here, or one shard of a DTensor
        return None
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Name → ``[shape, dtype, sha256 of the bytes]`` of every frozen parameter (the base a
    checkpoint's adapter belongs to), and one SHA-256 over all of it."""
    tensors: dict[str, list[Any]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        data = _tensor_bytes(p)
        digest = hashlib.sha256(data).hexdigest() if data is not None else None
        tensors[name] = [list(p.shape), str(p.dtype).removeprefix("torch."), digest]
    total = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()
    return {"sha256": total, "tensors": tensors}


def fingerprint_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two ``base_fingerprint``s (None: the same base)."""
    if saved.get("sha256") == now["sha256"]:
        return None
    old, new = saved.get("tensors"), now["tensors"]
    if not isinstance(old, dict):
        return "the checkpoint's base fingerprint is unreadable"
    diffs = [f"{n} only in the checkpoint's base" for n in sorted(set(old) - set(new))]
    diffs += [f"{n} only in this base" for n in sorted(set(new) - set(old))]
    for name in sorted(set(old) & set(new)):
        (s0, d0, h0), (s1, d1, h1) = old[name], new[name]
        if (s0, d0) != (s1, d1):
            diffs.append(f"{name} was {d0}{s0}, is {d1}{s1}")
        elif h0 and h1 and h0 != h1:
            diffs.append(f"{name} has other values")
    if not diffs:
        return None  # the same where it can be compared (sharded tensors are checked by shape only)
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return f"{len(diffs)} of {len(set(old) | set(new))} frozen tensors differ: {'; '.join(diffs[:3])}{more}"


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (and drop a torn last line); returns
    how many records were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and type(record.get("step")) is int and record["step"] <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def save_trainable(model: nn.Module, folder: Path) -> None:
    """The trainable parameters by name (a model without an adapter: full fine-tuning, a head)."""
    named = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    (folder / TRAINABLE).write_bytes(save(named))  # Python's write: a full disk is OSError(ENOSPC)


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


def pause_for_tests(variable: str, step: int | None = None) -> None:
    """A pause in which tests kill the process at a known point (mid-checkpoint, between steps):
    ``variable`` = ``"SECONDS"`` pauses every time, ``"SECONDS@STEP"`` only at that step, and the
    step is appended to the file ``LORAKIT_TEST_PAUSE_NOTIFY`` names when the pause starts."""
    seconds, _, at = (os.environ.get(variable, "") or "0").partition("@")
    if float(seconds) <= 0 or (at and step != int(at)):
        return
    notify = os.environ.get("LORAKIT_TEST_PAUSE_NOTIFY")
    if notify:
        with contextlib.suppress(OSError), open(notify, "a") as f:
            f.write(f"{step}\n")
    time.sleep(float(seconds))
