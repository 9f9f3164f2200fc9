"""A small, plain training loop for classifiers held in memory (used by the demos).

Only parameters with ``requires_grad`` are optimised, so the same call trains a full model, a
LoRA adapter, or a head: what trains is decided by what ``inject`` left trainable.
"""

from __future__ import annotations

import math
import sys
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


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra; training works without a bar
        return None
    # Redraw often on a terminal, rarely into a log file.
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not enabled, mininterval=interval)


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
) -> FitResult:
    """Adam on the trainable parameters, cross-entropy loss, shuffled mini-batches.

    With ``cosine`` the learning rate follows ``lr · ½(1 + cos(π · step / total))``: large steps
    early, small ones at the end, which settles the final weights without a tuned schedule.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (did inject freeze everything?)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(yt) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total))) if cosine else None
    )
    result = FitResult()
    bar = _progress(total, desc, progress)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            result.step_losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if i % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
        if valid is not None:
            result.epoch_valid_accuracy.append(accuracy(model, *valid))
            model.train()
    result.seconds = time.perf_counter() - start
    result.steps = len(result.step_losses)
    if bar is not None:
        bar.close()
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
