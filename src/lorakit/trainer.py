"""A small trainer for adapters on any ``nn.Module`` with a loss, that survives being killed.

What it does each optimizer step: ``grad_accum`` micro-batches moved to the training device
(``move_to``) under autocast (bf16 on any device, fp16 with a gradient scaler on CUDA), the
adapter gradients averaged across processes when ``torch.distributed`` is initialised (one
flattened all-reduce on the gradients' own device: frozen weights never join it), clipping, a
non-finite check (stop with an error naming the step, or skip the step), the optimizer (AdamW by
default; see ``lorakit.optim``), the learning-rate schedule (linear warmup, then cosine / linear /
constant).

The device is ``TrainerConfig.device``, to which the model is moved when the trainer is built, or,
when None, wherever the model's first parameter lives. Under ``torchrun`` call
``lorakit.devices.init_distributed()`` first: it joins the process group (NCCL on CUDA, gloo
otherwise) and returns this process's device.

Data order is a pure function of ``(seed, epoch)``; with a world of ``W`` processes each global
batch of ``W · batch_size`` examples is split by rank, so two processes with batch ``b`` see the
same examples per step as one process with batch ``2b``.

Checkpoints (every ``save_every`` steps and at the end) hold the adapter in PEFT's format (or,
for a model without an adapter, its trainable parameters), the optimizer, scheduler and gradient
scaler state, the RNG states (CPU, and the CUDA device's) and the step, sealed atomically (see
``lorakit.train_state``); ``resume`` takes the newest checkpoint whose manifest verifies and skips
any other with a warning. Progress: a tqdm bar when stderr is a terminal, else a line through
``logging`` (logger ``lorakit.trainer``, level INFO) every ``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from torch import nn

from . import train_state
from .checkpoint import load_adapter_tensors, save_adapter
from .devices import autocast_settings, move_to, parse_device, resolve_device, world
from .errors import InputError
from .injection import adapter_configs
from .optim import check_optimizer_name, make_optimizer

logger = logging.getLogger(__name__)

MANIFEST = train_state.MANIFEST
TRAINABLE = train_state.TRAINABLE


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
    bf16: bool = False  # bf16 autocast (any device)
    fp16: bool = False  # fp16 autocast with a GradScaler (CUDA only)
    device: str | torch.device | None = None  # None: where the model is; else the model is moved there
    optimizer: str = "adamw"  # adamw | sgd | adamw8bit | paged_adamw8bit | paged_adamw32bit (lorakit.optim)
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
            raise InputError("TrainerConfig: max_steps, batch_size, grad_accum and keep_last must be >= 1")
        if self.log_every < 1:
            raise InputError(f"TrainerConfig.log_every must be >= 1, got {self.log_every}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise InputError(f"TrainerConfig.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise InputError(f"TrainerConfig.on_nonfinite must be raise or skip, got {self.on_nonfinite!r}")
        if self.bf16 and self.fp16:
            raise InputError("TrainerConfig: bf16 and fp16 exclude each other; set at most one")
        check_optimizer_name(self.optimizer)
        if self.device is not None:
            parse_device(self.device)


OptimizerFactory = Callable[[list[nn.Parameter], TrainerConfig], torch.optim.Optimizer]


def config_optimizer(params: list[nn.Parameter], config: TrainerConfig) -> torch.optim.Optimizer:
    """The default ``optimizer_factory``: ``config.optimizer`` with ``config.lr`` and ``weight_decay``."""
    return make_optimizer(params, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Trainer:
    """Train the trainable parameters of ``model`` (what ``inject`` left trainable).

    ``loss_fn(model, batch) -> loss`` computes a scalar loss from a batch, and ``collate(indices)``
    builds the batch for a list of example indices of a dataset of ``num_examples`` examples; the
    batch is moved to the training device before ``loss_fn`` sees it. ``optimizer_factory(params,
    config)`` builds the optimizer instead of ``config.optimizer`` (any ``torch.optim.Optimizer``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        collate: Callable[[list[int]], Any],
        num_examples: int,
        config: TrainerConfig,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
    ) -> None:
        self.model, self.loss_fn, self.collate, self.config, self.eval_fn = model, loss_fn, collate, config, eval_fn
        self.num_examples = num_examples
        self.rank, self.world = world()
        self.device = resolve_device(config.device, model)
        if config.device is not None:
            model.to(self.device)
        self.amp, self.amp_dtype = autocast_settings(self.device.type, config.bf16, config.fp16)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters: inject an adapter first")
        self.optimizer = (optimizer_factory or config_optimizer)(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda") if config.fp16 else None
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
        """Average the trainable gradients over the processes: one flattened all-reduce, on the
        device the gradients live on (NCCL needs CUDA tensors there, gloo takes either)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> float | None:
        """One optimizer step; returns the mean loss, or None when a non-finite step was skipped.

        With fp16, gradients that overflow are the gradient scaler's business (as in any fp16
        training): the update is skipped, the scale lowered, and the step still counts."""
        c = self.config
        self.model.train()
        total = 0.0
        for micro in range(c.grad_accum):
            batch = move_to(self.collate(self.micro_batch_indices(self.step, micro)), self.device)
            with self._autocast():
                loss = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss):
                return self._nonfinite(f"loss is {loss.item()}")
            scaled = loss / c.grad_accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.item() / c.grad_accum
        self._all_reduce_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when the gradients overflowed
            self.scaler.update()
        elif not torch.isfinite(norm):
            return self._nonfinite(f"gradient norm is {norm.item()}")
        else:
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
            train_state.save_trainable(self.model, tmp)
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **train_state.rng_state(self.device),
            "step": self.step,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, tmp / train_state.STATE)
        meta = {"step": self.step, "config": asdict(self.config)}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2, default=str))
        train_state.pause_for_tests("LORAKIT_TEST_PAUSE_IN_SAVE")
        train_state.seal(tmp, final)
        for old in self.complete_checkpoints()[self.config.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders whose manifest verifies, newest first; any other is skipped with a
        ``UserWarning``."""
        return train_state.complete_checkpoints(self.ckpt_dir)

    def resume(self) -> int:
        """Load the newest complete checkpoint onto the training device; returns its step (0 when
        there is none)."""
        checkpoints = self.complete_checkpoints()
        if not checkpoints:
            return 0
        path = checkpoints[0]
        if (path / TRAINABLE).is_file():
            try:
                tensors = train_state.load_trainable(self.model, path, self.device)
            except ValueError as err:
                raise TrainingError(str(err)) from None
        else:
            tensors = load_adapter_tensors(self.model, path, name=self.config.adapter)
        state = train_state.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        train_state.restore_rng(state, self.device)
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
        show = c.progress and self.rank == 0
        if show and _stderr_is_terminal():
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
                periodic = self.step % c.log_every == 0 or self.step == c.max_steps or evaluated
                if log is not None and periodic:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                rate = (self.step - start_step) * c.batch_size * self.world * c.grad_accum
                rate /= max(time.perf_counter() - start, 1e-9)
                loss_text = f"{loss:.4f}" if loss is not None else "skip"
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=loss_text, ex_per_s=f"{rate:.0f}")
                elif show and periodic:
                    extra = "".join(f" {k} {v:.4g}" for k, v in record.items() if k not in ("step", "loss", "lr")
                                    and isinstance(v, (int, float)))  # fmt: skip
                    logger.info("%s: step %d/%d loss %s lr %.3g %.0f examples/s%s", c.desc, self.step,
                                c.max_steps, loss_text, record["lr"], rate, extra)  # fmt: skip
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
                from .loss_plot import loss_curves

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
