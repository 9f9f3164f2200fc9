"""One training run per ``out_dir``: its layout checked before anything runs, an earlier run
refused (or deleted, with ``overwrite``), and a resume checked against the checkpoint it continues.

An earlier run is what a run leaves: checkpoint folders (finished or not) and a non-empty
``metrics.jsonl`` (a run stopped before its first checkpoint still counts once it recorded a
step; an empty file does not). ``out_dir`` must be a folder (or absent), ``checkpoints`` a folder
and ``metrics.jsonl`` a file; anything else is refused, naming the path, before training starts.

A resume continues the same run, so it is refused (``InputError``, naming each change old → new)
when the checkpoint it would continue was trained

* on another frozen base (``base_fingerprint``), or on data of another size;
* from another recipe: the ``record`` a caller stores with each checkpoint (``lorakit.recipes``
  stores the recipe's ``[model]``, ``[data]``, ``[lora]`` sections and its seed);
* with other settings in ``REFUSED``, which change the run's trajectory (the data order, the
  learning rate, the update);
* to a step beyond ``max_steps`` (a shorter run cannot continue a longer one).

``max_steps`` may grow (training longer) and ``on_nonfinite`` may change (``'skip'`` after a
non-finite step stopped the run): each is resumed with a warning, since the schedule or the
skipped steps differ from an uninterrupted run. The rest (``save_every``, ``keep_last``,
``eval_every``, ``log_every``, ``progress``, ``desc``, ``device``) changes nothing that is learned.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import InputError
from .train_state import CHECKPOINTS, LOSS_CURVE, METRICS, fingerprint_mismatch, remove_path, stale_temps

logger = logging.getLogger(__name__)

REFUSED = ("batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm", "bf16",
           "fp16", "optimizer", "seed", "adapter", "world_size")  # fmt: skip
WARNED = ("max_steps", "on_nonfinite")
AFRESH = ("train into another out_dir, or start afresh with overwrite (lorakit train --overwrite, [train] "
          "overwrite = true, TrainerConfig(overwrite=True)), which deletes the earlier run")  # fmt: skip


def check_layout(out_dir: str | os.PathLike[str], inside: bool = True) -> None:
    """Refuse an ``out_dir`` that is not a folder (or under a file) and, with ``inside``, a
    ``checkpoints`` that is not a folder or a ``metrics.jsonl`` that is not a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir {str(out)!r} is a file; allowed: a folder, existing or to be created")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and parent is not None and not parent.is_dir():
        raise InputError(f"out_dir {str(out)!r}: {parent} is a file, not a folder; allowed: a path under a folder")
    if not inside:
        return
    for path, kind in ((out / CHECKPOINTS, "folder"), (out / METRICS, "file")):
        wrong = path.is_dir() if kind == "file" else (path.exists() or path.is_symlink()) and not path.is_dir()
        if wrong:
            raise InputError(f"{path} is not a {kind} (a run keeps its {path.name} there); remove it, or "
                             f"{AFRESH}")  # fmt: skip


def earlier_run(out_dir: str | os.PathLike[str]) -> list[Path]:
    """What an earlier training run left in ``out_dir``: checkpoints (finished or not) and a
    ``metrics.jsonl`` that holds something."""
    out = Path(out_dir)
    ckpt = out / CHECKPOINTS
    found = [*sorted(ckpt.glob("step-*")), *stale_temps(ckpt)] if ckpt.is_dir() else []
    metrics = out / METRICS
    return found + [metrics] * (metrics.is_file() and metrics.stat().st_size > 0)


def check_out_dir(out_dir: str | os.PathLike[str], resume: bool, overwrite: bool) -> None:
    """Refuse a bad layout (``check_layout``; what ``overwrite`` deletes is not checked), and a
    fresh run (no resume, no overwrite) where an earlier one left its files."""
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other: resume continues the run in out_dir, "
                         "overwrite deletes it and starts afresh")  # fmt: skip
    check_layout(out_dir, inside=not overwrite)
    found = [] if resume or overwrite else earlier_run(out_dir)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise InputError(
            f"out_dir {str(out_dir)!r} holds an earlier run ({names}); resume it (train(resume=True), lorakit "
            "train --resume), choose another out_dir, or overwrite it (TrainerConfig(overwrite=True), "
            "[train] overwrite = true, lorakit train --overwrite)"
        )


def start_run(out_dir: str | os.PathLike[str], resume: bool, overwrite: bool, remove: bool = True) -> None:
    """``check_out_dir``, then, for ``overwrite`` (and ``remove``: rank 0), the earlier run deleted."""
    check_out_dir(out_dir, resume, overwrite)
    removed = remove_run(out_dir) if overwrite and remove else []
    if removed:
        logger.info("overwrite: removed the earlier run's %s from %s", ", ".join(removed), out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)


def remove_run(out_dir: str | os.PathLike[str]) -> list[str]:
    """Delete an earlier run's checkpoints, metrics and loss curve; returns what was there."""
    out = Path(out_dir)
    removed = [p for p in (out / CHECKPOINTS, out / METRICS, out / LOSS_CURVE) if p.exists() or p.is_symlink()]
    for path in removed:
        remove_path(path)
    return [p.name for p in removed]


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def record_changes(old: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"[section] key old -> new"`` for each key of a record (section → table) that differs."""
    changes = []
    old, now = _canonical(old), _canonical(now)
    for section in sorted(set(old) | set(now)):
        a, b = old.get(section), now.get(section)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            a, b = ({} if a is None else {"": a}), ({} if b is None else {"": b})
        for key in sorted(set(a) | set(b)):
            if a.get(key, ...) != b.get(key, ...):
                shown = [repr(t[key]) if key in t else "(unset)" for t in (a, b)]
                changes.append(f"[{section}]{' ' + key if key else ''} {shown[0]} -> {shown[1]}")
    return changes


def check_resumable(path: Path, meta: Mapping[str, Any], base: Callable[[], dict[str, Any]],
                    config: Mapping[str, Any], record: Mapping[str, Any] | None = None,
                    examples: int | None = None) -> None:  # fmt: skip
    """Refuse (``InputError``) to resume checkpoint ``path`` (its ``trainer.json`` is ``meta``)
    with ``config`` (a ``TrainerConfig`` as a dict), ``record`` and ``examples`` (the data's
    size), or onto the base whose fingerprint ``base()`` gives, as the module docstring says."""
    step, now = meta.get("step", 0), _canonical(dict(config))
    if step > now["max_steps"]:
        raise InputError(f"resume: the newest checkpoint {path} is at step {step}, beyond max_steps = "
                         f"{now['max_steps']}; resume with max_steps >= {step} (training longer is allowed), or "
                         f"{AFRESH}")  # fmt: skip
    if record is not None and isinstance(meta.get("record"), dict):
        changed = record_changes(meta["record"], record)
        if changed:
            raise InputError(f"resume: {path} was trained from another recipe ({'; '.join(changed)}); a resume "
                             f"continues the same run: restore them, or {AFRESH}")  # fmt: skip
    elif record is not None:
        warnings.warn(f"lorakit: {path} holds no record of its recipe; resuming without checking it", stacklevel=3)
    old = meta.get("config", {})
    changed = [f"{k} {old[k]!r} -> {now[k]!r}" for k in REFUSED if k in old and k in now and old[k] != now[k]]
    if examples is not None and type(meta.get("examples")) is int and meta["examples"] != examples:
        changed.append(f"num_examples {meta['examples']} -> {examples}")
    if changed:
        raise InputError(f"resume: {path} was trained with other settings ({'; '.join(changed)}); they change the "
                         f"run's trajectory, so a resume keeps them (max_steps may grow): restore them, or "
                         f"{AFRESH}")  # fmt: skip
    if "base" not in meta:
        warnings.warn(f"lorakit: {path} holds no fingerprint of its base; resuming unchecked", stacklevel=3)
    else:
        mismatch = fingerprint_mismatch(meta["base"], base())
        if mismatch:
            raise InputError(
                f"resume: the frozen base is not the one {path} was trained on ({mismatch}); resume with the "
                "same base model (and, for random weights, the same seed), or train into another out_dir"
            )
    warned = [f"{k} {old[k]!r} -> {now[k]!r}" for k in WARNED if k in old and k in now and old[k] != now[k]]
    if warned:
        warnings.warn(f"lorakit: resuming {path} with other settings than it was trained with "
                      f"({', '.join(warned)}); the run will not match an uninterrupted one", stacklevel=3)  # fmt: skip
