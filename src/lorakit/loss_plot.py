"""The training-loss figure (``loss_curve.png``) a training run writes; matplotlib is imported
only when a figure is drawn, and only its headless Agg backend is used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (``ImportError`` when matplotlib is missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(
    curves: dict[str, Sequence[float]], path: str | Path, smooth: int = 25, ylabel: str = "training loss"
) -> Path:
    """Training loss per step (moving average over ``smooth`` steps), one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, losses in curves.items():
        y = np.asarray(losses, dtype=float)
        if len(y) >= smooth > 1:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        ax.plot(np.arange(len(y)), y, label=label, linewidth=1.3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{ylabel} (moving average of {smooth})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
