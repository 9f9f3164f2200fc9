"""A small trainer for adapters on any ``nn.Module`` with a loss, that survives being killed.

Each optimizer step: ``grad_accum`` micro-batches moved to the training device (``move_to``)
under autocast (bf16 on any device, fp16 with a gradient scaler on CUDA), adapter gradients
averaged across processes under ``torch.distributed`` (the model plain, wrapped by DDP, or
sharded by FSDP2's ``fully_shard`` before the trainer is built: ``lorakit.distributed``),
clipping, a non-finite check (stop naming the step, or skip it), the optimizer (``lorakit.optim``),
the schedule (linear warmup, then cosine / linear / constant).

The device is ``TrainerConfig.device`` (the model is moved there), or, when None, where the
model's first parameter lives; under ``torchrun`` call ``lorakit.devices.init_distributed()``
first. Data order is a pure function of ``(seed, epoch)``; with ``W`` processes each global batch
of ``W · batch_size`` examples is split by rank (two processes with batch ``b`` see what one with
``2b`` sees). Dropout draws from torch's global RNG as the caller left it (``lorakit.recipes``
seeds it from the recipe's seed).

Checkpoints (every ``save_every`` steps and at the end) hold the adapter in PEFT's format (or the
trainable parameters of a model without one), optimizer, scheduler and scaler state, the RNG
states, the step and a fingerprint of the frozen base, sealed atomically (``lorakit.train_state``).
``train(resume=True)`` takes the newest complete checkpoint (damaged ones are removed with one
warning each; when all are damaged it raises), refuses one trained on another base, data size,
``record`` or trajectory settings, or beyond ``max_steps`` (``lorakit.run_dir``), and cuts
``metrics.jsonl`` back to its step. ``train()`` without resume refuses an ``out_dir`` holding an
earlier run unless ``overwrite=True``, which deletes that run first. Progress: a tqdm bar when
stderr is a terminal, else a ``logging`` line (``lorakit.trainer``, INFO) every ``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, run_dir, train_state, trainer_checks
from .atomic import remove_tree
from .checkpoint import load_adapter_tensors, save_adapter
from .devices import autocast_settings, move_to, resolve_device, stderr_is_terminal, world
from .errors import InputError
from .injection import adapter_configs
from .optim import lr_factor, make_optimizer

logger = logging.getLogger(__name__)

MANIFEST = train_state.MANIFEST
TRAINABLE = train_state.TRAINABLE
METRICS = train_state.METRICS


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
    max_grad_norm: float | None = 1.0  # None: no clipping
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
    overwrite: bool = False  # train() without resume into an out_dir holding an earlier run: delete it

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        trainer_checks.check_config_values(values, lambda k: f"TrainerConfig.{k}")
        if self.bf16 and self.fp16:
            raise InputError("TrainerConfig: bf16 and fp16 exclude each other; set at most one")


OptimizerFactory = Callable[[list[nn.Parameter], TrainerConfig], torch.optim.Optimizer]


def config_optimizer(params: list[nn.Parameter], config: TrainerConfig) -> torch.optim.Optimizer:
    """The default ``optimizer_factory``: ``config.optimizer`` with ``config.lr`` and ``weight_decay``."""
    return make_optimizer(params, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Train the trainable parameters of ``model`` (what ``inject`` left trainable).

    ``loss_fn(model, batch) -> loss`` computes a scalar loss from a batch, and ``collate(indices)``
    builds the batch for a list of example indices of a dataset of ``num_examples`` examples; the
    batch is moved to the training device before ``loss_fn`` sees it. ``optimizer_factory(params,
    config)`` builds the optimizer instead of ``config.optimizer`` (any ``torch.optim.Optimizer``).
    ``record``, a JSON-able table of tables (what built the model and the data), is stored with
    each checkpoint, and a resume from a checkpoint whose record differs is refused. The arguments
    are checked here (``lorakit.trainer_checks``, ``lorakit.run_dir``), each loss at every step.
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
        record: Mapping[str, Any] | None = None,
    ) -> None:
        self.num_examples = trainer_checks.check_trainer_args(model, loss_fn, collate, num_examples, config,
                                                              TrainerConfig, eval_fn, optimizer_factory)  # fmt: skip
        self.model, self.loss_fn, self.collate, self.config, self.eval_fn = model, loss_fn, collate, config, eval_fn
        self.core = distributed.unwrap(model)  # the user's module under DDP / torch.compile: what is saved
        self.record = dict(record) if record is not None else None
        self.rank, self.world = world()
        run_dir.check_layout(config.out_dir, inside=not config.overwrite)
        trainer_checks.check_batch_fits(self.num_examples, config.batch_size, self.world)
        trainer_checks.warn_schedule(config.warmup_steps, config.max_steps)
        self.params = trainer_checks.check_trainable(model, len(adapter_configs(self.core)))
        self.device = resolve_device(config.device, model)
        if config.device is not None:
            model.to(self.device)
        self.amp, self.amp_dtype = autocast_settings(self.device.type, config.bf16, config.fp16)
        self.optimizer = (optimizer_factory or config_optimizer)(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda") if config.fp16 else None
        self.step = 0
        self.out = Path(config.out_dir)
        self.ckpt_dir = self.out / train_state.CHECKPOINTS
        self.losses: list[float] = []
        self.step_seconds: list[float] = []  # wall time of each optimizer step taken in this process
        self._base: dict[str, Any] | None = None

    def base_fingerprint(self) -> dict[str, Any]:
        """``train_state.base_fingerprint`` of the model's frozen parameters (computed once)."""
        if self._base is None:
            self._base = train_state.base_fingerprint(self.core)
        return self._base

    # ------------------------------------------------------------------ schedule and data
    def _lr_factor(self, step: int) -> float:
        return lr_factor(step, self.config.warmup_steps, self.config.max_steps, self.config.schedule)

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
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()

    def train_step(self) -> float | None:
        """One optimizer step; returns the mean loss, or None when a non-finite step was skipped.

        With fp16, gradients that overflow are the gradient scaler's business (as in any fp16
        training): the update is skipped, the scale lowered, and the step still counts."""
        c = self.config
        trainer_checks.check_same_parameters(self.model, self.params)
        self.model.train()
        total = 0.0
        for micro in range(c.grad_accum):
            batch = move_to(self.collate(self.micro_batch_indices(self.step, micro)), self.device)
            with distributed.sync_context(self.model, micro == c.grad_accum - 1):
                with self._autocast():
                    loss = self.loss_fn(self.model, batch)
                trainer_checks.check_loss(loss, self.step + 1)
                mean, finite = distributed.agree_on_loss(loss, self.world)  # every process skips or stops
                if not finite:
                    here = f"loss is {loss.item()}" if not torch.isfinite(loss) else "loss is not finite"
                    return self._nonfinite(here if self.world == 1 else f"{here} (process {self.rank})")
                scaled = loss / c.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += mean / c.grad_accum
        distributed.average_gradients(self.model, self.params, self.world)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = distributed.clip_grad_norm(self.params, c.max_grad_norm if c.max_grad_norm else float("inf"))
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
        return train_state.checkpoint_name(step)

    def save_checkpoint(self) -> Path | None:
        """Write the newest checkpoint atomically (rank 0 only) and keep the last ``keep_last``;
        temporary folders that killed writes left behind are removed first. Every process calls
        it: FSDP2's sharded adapter and optimizer state is gathered from all of them first."""
        state = distributed.optimizer_state(self.model, self.optimizer)  # before the parameters swap
        rngs = distributed.gather_objects(train_state.rng_state(self.device), self.world)  # each process's
        with distributed.full_trainable(self.core):
            return self._save_gathered({**state, "rng_by_rank": rngs}) if self.rank == 0 else None

    def _save_gathered(self, optimizer_state: dict[str, Any]) -> Path:
        train_state.remove_stale_temps(self.ckpt_dir)
        final = self.ckpt_dir / self.checkpoint_name(self.step)
        problem = train_state.checkpoint_problem(final) if final.exists() else None
        if final.exists() and problem is None:
            return final
        if problem:  # damaged on disk since: written again
            warnings.warn(f"lorakit: rewriting damaged checkpoint {final} ({problem})", UserWarning, stacklevel=3)
            train_state.remove_path(final)
        train_state.write_sealed(self.ckpt_dir, self.step, lambda tmp: self._write_checkpoint(tmp, optimizer_state))
        for old in self.complete_checkpoints()[self.config.keep_last :]:
            remove_tree(old)
        return final

    def _write_checkpoint(self, tmp: Path, optimizer_state: dict[str, Any]) -> None:
        if self.config.adapter in adapter_configs(self.core):
            save_adapter(self.core, tmp, name=self.config.adapter)
        else:  # no adapter (full fine-tuning, a head): keep what trains
            train_state.save_trainable(self.core, tmp)
        state = {**optimizer_state, "scheduler": self.scheduler.state_dict(),
                 **train_state.rng_state(self.device), "step": self.step}  # fmt: skip
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        buffer = io.BytesIO()  # written by Python: a full disk is OSError(ENOSPC), not torch's zip-writer error
        torch.save(state, buffer)
        (tmp / train_state.STATE).write_bytes(buffer.getbuffer())
        meta = {"step": self.step, "config": self._settings(), "base": self.base_fingerprint(),
                "examples": self.num_examples, "record": self.record}  # fmt: skip
        (tmp / train_state.META).write_text(json.dumps(meta, indent=2, default=str))

    def _settings(self) -> dict[str, Any]:
        """The config a checkpoint records and a resume must match, with the number of processes."""
        return {**asdict(self.config), "world_size": self.world}

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders that are complete (``train_state.checkpoint_problem``), newest first."""
        return train_state.complete_checkpoints(self.ckpt_dir)

    def resume(self) -> int:
        """Load the newest complete checkpoint onto the training device and cut ``metrics.jsonl``
        back to its step; returns that step (0 when there is no checkpoint at all). Damaged
        checkpoints are removed with one warning each; when every checkpoint is damaged, or the
        newest complete one was trained on another base, it raises and changes nothing."""
        c = self.config
        good, damaged = train_state.scan(self.ckpt_dir)
        if not good and damaged:
            listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
            raise TrainingError(f"{self.ckpt_dir}: every checkpoint is damaged ({listing}); nothing to resume "
                                "from: restore them, or start afresh with overwrite=True (lorakit train "
                                "--overwrite)")  # fmt: skip
        step = 0
        if good:
            path = good[0]
            run_dir.check_resumable(path, train_state.read_meta(path) or {}, self.base_fingerprint, self._settings(),
                                    self.record, self.num_examples)  # fmt: skip
            for bad, why in damaged if self.rank == 0 else []:
                warnings.warn(f"lorakit: skipping incomplete or damaged checkpoint {bad} ({why}); removing it",
                              UserWarning, stacklevel=2)  # fmt: skip
                train_state.remove_path(bad)
            step = self._load(path)
            logger.info("%s: resumed from %s (step %d)", c.desc, path, step)
        if self.rank == 0:
            train_state.remove_stale_temps(self.ckpt_dir)
            train_state.truncate_metrics(self.out / METRICS, step)
        self.step = step
        return step

    def _load(self, path: Path) -> int:
        with distributed.full_trainable(self.core, write_back=True):  # FSDP2: every process loads
            if (path / TRAINABLE).is_file():
                try:
                    train_state.load_trainable(self.core, path, self.device)
                except ValueError as err:
                    raise TrainingError(str(err)) from None
            else:
                load_adapter_tensors(self.core, path, name=self.config.adapter)
        state = train_state.load_state(path)
        distributed.load_optimizer_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        by_rank = state.get("rng_by_rank")
        train_state.restore_rng(by_rank[self.rank] if by_rank and len(by_rank) == self.world else state, self.device)
        return int(state["step"])

    # ------------------------------------------------------------------ the loop
    def _progress_bar(self) -> Any:
        """A tqdm bar when stderr is a terminal and tqdm is installed; else None (periodic log lines)."""
        if not (self.config.progress and self.rank == 0 and stderr_is_terminal()):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.config.max_steps, initial=self.step, desc=self.config.desc, unit="step", leave=False)

    def train(self, resume: bool = False) -> dict[str, Any]:
        c = self.config
        run_dir.start_run(self.out, resume, c.overwrite, remove=self.rank == 0)
        if self.world > 1:  # every process has looked at out_dir before rank 0 writes into it
            torch.distributed.barrier()
        if resume:
            self.resume()
        log: io.TextIOBase | None = None  # opened at its first line: an empty file is no earlier run
        bar = self._progress_bar()
        show = c.progress and self.rank == 0
        start, start_step, skipped = time.perf_counter(), self.step, 0
        try:
            while self.step < c.max_steps:
                tick = time.perf_counter()
                loss = self.train_step()
                self.step_seconds.append(time.perf_counter() - tick)
                if loss is not None:
                    self.losses.append(loss)
                skipped += loss is None
                record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
                evaluated = bool(c.eval_every and self.eval_fn and self.step % c.eval_every == 0)
                if evaluated:
                    record.update(self.eval_fn(self.model))
                periodic = self.step % c.log_every == 0 or self.step == c.max_steps or evaluated
                if self.rank == 0 and periodic:
                    log = log or open(self.out / METRICS, "a")  # noqa: SIM115
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
                train_state.pause_for_tests("LORAKIT_TEST_PAUSE_IN_STEP", self.step)
                if c.save_every and self.step % c.save_every == 0:
                    self.save_checkpoint()
            if skipped:
                message = trainer_checks.skipped_message(skipped, self.step - start_step, start_step)
                if skipped == self.step - start_step:
                    raise TrainingError(message)
                warnings.warn(message, UserWarning, stacklevel=2)
            self.save_checkpoint()
            if self.world > 1:
                torch.distributed.barrier()  # nobody leaves (and tears the group down) before rank 0 has saved
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        if self.rank == 0 and self.losses:
            with contextlib.suppress(ImportError):  # matplotlib is optional
                from .loss_plot import loss_curves

                smooth = max(1, min(25, len(self.losses) // 4))
                loss_curves({"train": self.losses}, self.out / train_state.LOSS_CURVE, smooth=smooth)
        last = self.losses[-1] if self.losses else None
        return {"step": self.step, "seconds": time.perf_counter() - start, "last_loss": last}
