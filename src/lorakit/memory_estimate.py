"""What the planner returns: bytes by component of one training step, and their table."""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9


@dataclass
class MemoryEstimate:
    """Bytes by component; ``total`` adds them up."""

    method: str
    weights: float
    gradients: float = 0.0
    optimizer: float = 0.0
    adapter: float = 0.0
    activations: float = 0.0
    trainable: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        # The weights' gradients appear as the backward frees the activations: a step holds the
        # larger of the two at its peak, not both (measured: benchmarks/memory_planner.py).
        return self.weights + self.optimizer + self.adapter + max(self.gradients, self.activations)

    def as_gb(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GB, 3) for k in ("weights", "gradients", "optimizer", "adapter",
                                                            "activations", "total")}  # fmt: skip


def format_report(est: list[MemoryEstimate], title: str) -> str:
    rows = [f"{title}", "", "| method | weights | gradients | optimizer | adapter | activations | total (GB) |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for e in est:
        g = e.as_gb()
        rows.append(f"| {e.method} | {g['weights']:.3f} | {g['gradients']:.3f} | {g['optimizer']:.3f} | "
                    f"{g['adapter']:.3f} | {g['activations']:.3f} | {g['total']:.3f} |")  # fmt: skip
    return "\n".join(rows)
