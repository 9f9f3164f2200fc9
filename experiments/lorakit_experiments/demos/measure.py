"""Measurements the real-model demos report: peak resident memory per phase and bytes on disk."""

from __future__ import annotations

import gc
import os
from pathlib import Path


def _vm(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak resident set (MB) of this process within a ``with`` block.

    Linux keeps the high-water mark in ``VmHWM``; writing 5 to ``/proc/self/clear_refs`` resets it
    to the current resident set, so phases run one after another in one process are measured
    separately. Where that is not possible ``peak_mb`` stays None rather than report a wrong figure.
    """

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.peak_mb: float | None = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._ok = True
        except OSError:
            self._ok = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ok:
            self.peak_mb = _vm("VmHWM")


def folder_bytes(path: str | os.PathLike[str], pattern: str = "*.safetensors") -> int:
    """Bytes of the files matching ``pattern`` under ``path`` (the weights, not configs or cards)."""
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def write_results(out: str | os.PathLike[str], results: dict) -> Path:
    """``out/results.json``, written atomically (a temp file, then a rename)."""
    import json

    path = Path(out) / "results.json"
    tmp = path.with_name(".results.json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    return path
