"""Classifier training for the demos, on top of :class:`lorakit.Trainer`, and evaluation helpers.

Only parameters with ``requires_grad`` are optimised, so the same call trains a full model, a
LoRA adapter, or a head: what trains is decided by what ``inject`` left trainable.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FitResult:
    """Per-step training losses, per-epoch validation accuracy, and wall time."""

    step_losses: list[float] = field(default_factory=list)
    epoch_valid_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def fit_classifier(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    cosine: bool = True,
    desc: str = "train",
    progress: bool = True,
    out_dir: str | None = None,
) -> FitResult:
    """Train a classifier with cross-entropy through :class:`lorakit.Trainer` (AdamW, whole
    shuffled batches, optional cosine schedule, no clipping), checking validation accuracy after
    every epoch. Checkpoints, ``metrics.jsonl`` and ``loss_curve.png`` go to ``out_dir`` (a
    temporary folder when None)."""
    from lorakit import Trainer, TrainerConfig

    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    steps_per_epoch = max(1, len(yt) // batch_size)
    result = FitResult()

    def evaluate(m: nn.Module) -> dict[str, float]:
        acc = accuracy(m, *valid) if valid is not None else float("nan")
        result.epoch_valid_accuracy.append(acc)
        m.train()
        return {"valid_accuracy": acc}

    with tempfile.TemporaryDirectory() as scratch:
        config = TrainerConfig(
            out_dir=out_dir or scratch, max_steps=epochs * steps_per_epoch, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, schedule="cosine" if cosine else "constant", max_grad_norm=None,
            eval_every=steps_per_epoch if valid is not None else None, log_every=50, seed=seed,
            progress=progress, desc=desc, keep_last=1, overwrite=True,  # a demo owns its folder
        )  # fmt: skip
        trainer = Trainer(
            model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), lambda idx: (xt[idx], yt[idx]), len(yt), config,
            eval_fn=evaluate,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        result.seconds = time.perf_counter() - start
    result.step_losses = trainer.losses
    result.steps = trainer.step
    model.eval()
    return result


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Arg-max class of every row, in eval mode."""
    model.eval()
    xt = torch.as_tensor(x)
    out = [model(xt[i : i + batch_size]).argmax(-1) for i in range(0, len(xt), batch_size)]
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    return float((predict(model, x) == np.asarray(y)).mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """``m[i, j]``: how many of class ``i`` were predicted as ``j``."""
    m = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m
