"""A small trainer for adapters on any ``nn.Module`` with a loss, that survives being killed.

What it does each optimizer step: ``grad_accum`` micro-batches (bf16 autocast optional), the
adapter gradients averaged across processes when ``torch.distributed`` is initialised (one
flattened all-reduce: frozen weights never join it), clipping, a non-finite check (stop with an
error naming the step, or skip the step), AdamW, the learning-rate schedule (linear warmup, then
cosine / linear / constant).

Data order is a pure function of ``(seed, epoch)``; with a world of ``W`` processes each global
batch of ``W · batch_size`` examples is split by rank, so two processes with batch ``b`` see the
same examples per step as one process with batch ``2b``.

Checkpoints (every ``save_every`` steps and at the end) hold the adapter in PEFT's format (or,
for a model without an adapter, its trainable parameters), the optimizer and scheduler state, the
RNG state and the step. Each is written into a temporary
folder, its files fsynced and listed with their SHA-256 in ``COMPLETE``, then renamed into place;
``resume`` takes the newest checkpoint whose manifest verifies and skips any other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import load_adapter_tensors, save_adapter
from .injection import adapter_configs

MANIFEST = "COMPLETE"
TRAINABLE = "trainable.safetensors"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient, a bad checkpoint folder...)."""


@dataclass
class TrainerConfig:
    out_dir: str
    max_steps: int
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    save_every: int | None = None
    keep_last: int = 3
    eval_every: int | None = None
    log_every: int = 10
    on_nonfinite: str = "raise"  # raise | skip
    seed: int = 0
    adapter: str = "default"
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.keep_last < 1:
            raise ValueError("TrainerConfig: max_steps, batch_size, grad_accum and keep_last must be >= 1")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"TrainerConfig.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"TrainerConfig.on_nonfinite must be raise or skip, got {self.on_nonfinite!r}")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Trainer:
    """Train the trainable parameters of ``model`` (what ``inject`` left trainable).

    ``loss_fn(model, batch) -> loss`` computes a scalar loss from a batch, and ``collate(indices)``
    builds the batch for a list of example indices of a dataset of ``num_examples`` examples.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        collate: Callable[[list[int]], Any],
        num_examples: int,
        config: TrainerConfig,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.collate, self.config, self.eval_fn = model, loss_fn, collate, config, eval_fn
        self.num_examples = num_examples
        self.rank, self.world = _world()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters: inject an adapter first")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.out = Path(config.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.losses: list[float] = []
        self.step_seconds: list[float] = []  # wall time of each optimizer step taken in this process

    # ------------------------------------------------------------------ schedule and data
    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
        if c.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if c.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    def micro_batch_indices(self, step: int, micro: int) -> list[int]:
        """This process's examples for micro-batch ``micro`` of optimizer step ``step``."""
        c = self.config
        global_batch = c.batch_size * self.world
        per_epoch = self.num_examples // global_batch
        if per_epoch < 1:
            raise TrainingError(f"{self.num_examples} examples cannot fill one global batch of {global_batch}")
        k = step * c.grad_accum + micro
        epoch, position = divmod(k, per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(c.seed * 100_003 + epoch))
        chunk = order[position * global_batch : (position + 1) * global_batch]
        return chunk[self.rank * c.batch_size : (self.rank + 1) * c.batch_size].tolist()

    # ------------------------------------------------------------------ one step
    def _all_reduce_grads(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for p, g in zip(self.params, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g

    def train_step(self) -> float | None:
        """One optimizer step; returns the mean loss, or None when a non-finite step was skipped."""
        c = self.config
        self.model.train()
        total = 0.0
        for micro in range(c.grad_accum):
            batch = self.collate(self.micro_batch_indices(self.step, micro))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
                loss = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss):
                return self._nonfinite(f"loss is {loss.item()}")
            (loss / c.grad_accum).backward()
            total += loss.item() / c.grad_accum
        self._all_reduce_grads()
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm else float("inf"))
        if not torch.isfinite(norm):
            return self._nonfinite(f"gradient norm is {norm.item()}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def _nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.on_nonfinite == "raise":
            raise TrainingError(
                f"step {self.step + 1}: {what}; stopping (checkpoints already saved are intact; "
                "set on_nonfinite='skip' to skip such steps)"
            )
        self.step += 1  # skipped: the data position still advances, the weights do not
        self.scheduler.step()
        return None

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_name(self, step: int) -> str:
        return f"step-{step:08d}"

    def save_checkpoint(self) -> Path | None:
        """Write the newest checkpoint atomically (rank 0 only) and keep the last ``keep_last``."""
        if self.rank != 0:
            return None
        final = self.ckpt_dir / self.checkpoint_name(self.step)
        if final.exists():
            return final
        tmp = self.ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.config.adapter in adapter_configs(self.model):
            save_adapter(self.model, tmp, name=self.config.adapter)
        else:  # no adapter (full fine-tuning, a head): keep what trains
            named = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(named, str(tmp / TRAINABLE))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": self.step,
        }
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "config": asdict(self.config)}, indent=2))
        _test_pause("LORAKIT_TEST_PAUSE_IN_SAVE")
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        manifest = {name: _sha256(tmp / name) for name in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        with open(tmp / MANIFEST, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _fsync_dir(self.ckpt_dir)
        for old in self.complete_checkpoints()[self.config.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders whose manifest verifies, newest first; anything else is skipped."""
        if not self.ckpt_dir.is_dir():
            return []
        good = []
        for path in sorted(self.ckpt_dir.glob("step-*"), reverse=True):
            if _verify(path):
                good.append(path)
            else:
                print(f"lorakit: skipping incomplete or damaged checkpoint {path}", file=sys.stderr)
        return good

    def resume(self) -> int:
        """Load the newest complete checkpoint; returns its step (0 when there is none)."""
        checkpoints = self.complete_checkpoints()
        if not checkpoints:
            return 0
        path = checkpoints[0]
        if (path / TRAINABLE).is_file():
            saved = load_file(str(path / TRAINABLE))
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            if set(saved) != set(params):
                raise TrainingError(f"{path}: holds {sorted(saved)}, the model trains {sorted(params)}")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
            tensors = len(saved)
        else:
            tensors = load_adapter_tensors(self.model, path, name=self.config.adapter)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        assert tensors > 0
        return self.step

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False) -> dict[str, Any]:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        log = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None  # noqa: SIM115
        bar = None
        if c.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.max_steps, initial=self.step, desc=c.desc, unit="step", leave=False)
        start, start_step = time.perf_counter(), self.step
        try:
            while self.step < c.max_steps:
                tick = time.perf_counter()
                loss = self.train_step()
                self.step_seconds.append(time.perf_counter() - tick)
                if loss is not None:
                    self.losses.append(loss)
                record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
                evaluated = bool(c.eval_every and self.eval_fn and self.step % c.eval_every == 0)
                if evaluated:
                    record.update(self.eval_fn(self.model))
                if log is not None and (self.step % c.log_every == 0 or self.step == c.max_steps or evaluated):
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    rate = (self.step - start_step) * c.batch_size * self.world * c.grad_accum
                    bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "skip",
                                    ex_per_s=f"{rate / max(time.perf_counter() - start, 1e-9):.0f}")  # fmt: skip
                if c.save_every and self.step % c.save_every == 0:
                    self.save_checkpoint()
            self.save_checkpoint()
            if self.world > 1:
                torch.distributed.barrier()  # nobody leaves (and tears the group down) before rank 0 has saved
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        if self.rank == 0 and self.losses:
            try:
                from .plots import loss_curves

                loss_curves(
                    {"train": self.losses}, self.out / "loss_curve.png", smooth=max(1, min(25, len(self.losses) // 4))
                )
            except ImportError:
                pass
        return {
            "step": self.step,
            "seconds": time.perf_counter() - start,
            "last_loss": self.losses[-1] if self.losses else None,
        }


def _verify(path: Path) -> bool:
    manifest = path / MANIFEST
    try:
        listed = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if set(listed) != present:
        return False
    return all(_sha256(path / name) == digest for name, digest in listed.items())


def _test_pause(variable: str) -> None:
    """Tests set this to widen the window in which a kill lands mid-checkpoint."""
    seconds = float(os.environ.get(variable, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)
