"""PNG figures for experiment results (matplotlib, headless Agg backend).

``loss_curves`` is the library's own figure (:func:`lorakit.loss_plot.loss_curves`), reused here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorakit.loss_plot import loss_curves, pyplot

__all__ = ["confusion_matrices", "loss_curves", "loss_panel", "optional_pyplot", "save_figure"]


def optional_pyplot():
    """matplotlib's pyplot (Agg), or None when matplotlib is not installed (figures are optional)."""
    try:
        return pyplot()
    except ImportError:
        return None


def save_figure(fig, path: str | Path) -> str:
    """Lay out, write as a 120-dpi PNG, close; returns the path."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def loss_panel(ax, curves: dict[str, list[float]], ylabel: str = "training loss") -> None:
    """One line per named training-loss curve, against the step."""
    for name, losses in curves.items():
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=name, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()


def confusion_matrices(panels: Sequence[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """Side-by-side confusion matrices (rows: true class, columns: predicted), counts annotated
    off the diagonal where they are large enough to read."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels, strict=True):
        ax.imshow(np.log1p(m), cmap="Blues")
        acc = np.trace(m) / max(m.sum(), 1)
        ax.set_title(f"{title}\naccuracy {100 * acc:.2f}%", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if i == j or m[i, j] >= 5:
                    color = "white" if i == j else ("crimson" if m[i, j] >= 50 else "black")
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6.5, color=color)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

