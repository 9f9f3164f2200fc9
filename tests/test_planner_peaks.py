"""The planner against measured peaks: one LoRA training step of three language-model
architectures (Llama, Qwen2, Mixtral-style experts; and Llama with the chunked loss, or with
checkpointing that keeps the attention), with and without gradient checkpointing, each in a fresh
process (``benchmarks/memory_planner.py --llm-worker``), must be planned within 15%."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cpu_memory import heap_in_use

pytest.importorskip("transformers")
WORKER = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_planner.py"


@pytest.mark.skipif(heap_in_use() is None, reason="peaks come from glibc's mallinfo2")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
@pytest.mark.parametrize("model", ["llama", "qwen2", "mixtral", "llama-vocab-256", "llama+chunked-loss",
                                   "llama+keep"])
def test_the_plan_is_within_15_percent_of_the_measured_peak(model, checkpointing):
    name, _, chunked = model.partition("+")
    if chunked == "keep" and not checkpointing:
        pytest.skip("keeping the attention is a checkpointing option")
    option = {"chunked-loss": "1", "keep": "k"}.get(chunked, "0")
    command = [sys.executable, str(WORKER), "--llm-worker", name, str(int(checkpointing)), option]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["predicted_bytes"] / result["peak_bytes"]
    assert 0.85 <= ratio <= 1.15, result
