"""Data-parallel training of models with adapters, on 2 CPU processes (gloo): DDP and FSDP2, in a
plain loop and through lk.Trainer, each equal to one process on the combined batch; FSDP2 runs
save gathered adapters and resume bit-identically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import parallel_loop
from .tolerance import assert_close

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _worker(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.helpers.train_worker", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _run(out: Path, *extra: str, world: int = 1) -> None:
    """The train worker's run in ``world`` processes (one: no process group)."""
    init = out.with_name(out.name + "-init")
    ranks = [["--world", str(world), "--rank", str(r), "--init", str(init)] for r in range(world)]
    procs = [
        _worker(out, "--dropout", "0", "--steps", str(STEPS), *extra, *rank) for rank in (ranks if world > 1 else [[]])
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def _final_adapter(out: Path) -> dict[str, torch.Tensor]:
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert newest.name == f"step-{STEPS:08d}"
    return load_file(newest / "adapter_model.safetensors")


def _assert_same_training(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], batch: int, steps: int) -> None:
    """Two processes average two half-batch gradients where one process averages the whole batch:
    the same sum in another order, at every step of the run."""
    assert set(got) == set(want)  # the same keys: no DDP "module." prefix in a saved adapter
    for key in want:
        assert_close(got[key], want[key], reduction=batch, depth=steps, msg=key)
        assert not torch.equal(want[key], torch.zeros_like(want[key])), key  # trained, not left at zero


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single") / "run"
    _run(out, "--batch", "16")
    return _final_adapter(out)


@pytest.mark.parametrize(("parallel", "accum"), [("none", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)])
def test_trainer_on_two_processes_equals_one_with_the_combined_batch(tmp_path, single, parallel, accum):
    """lk.Trainer splits each global batch by rank; the model is plain (the trainer all-reduces the
    adapter gradients), wrapped by DDP (DDP does, skipping all micro-batches but the last with
    ``no_sync``) or sharded by FSDP2 (FSDP reduce-scatters). 2 processes × batch 8/accum × accum
    micro-batches see the 16 examples one process sees in its step."""
    batch = str(8 // accum)
    _run(tmp_path / "run", "--batch", batch, "--grad-accum", str(accum), "--parallel", parallel, world=2)
    _assert_same_training(_final_adapter(tmp_path / "run"), single, batch=16, steps=STEPS)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_parallel_resume_is_bit_identical(tmp_path, parallel):
    """Train 5 steps, save (FSDP2: every rank gathers its shards), resume in fresh processes' worth
    of state (a fresh model sharded again, a disturbed RNG), finish: bit-identical to an
    uninterrupted run of the same layout."""
    _run(tmp_path / "whole", "--batch", "8", "--parallel", parallel, world=2)
    _run(tmp_path / "cut", "--batch", "8", "--parallel", parallel, "--cut", "5", world=2)
    want, got = _final_adapter(tmp_path / "whole"), _final_adapter(tmp_path / "cut")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_plain_loop_on_two_processes_equals_one_with_the_combined_batch(tmp_path, mode):
    """Without lk.Trainer: the user's own loop over a lorakit model wrapped by DistributedDataParallel
    or sharded by fully_shard (FSDP2 shards per parameter, so frozen and trainable tensors mix;
    FSDP1's flat parameters refuse that), each rank on its own half of every batch."""
    out = tmp_path / "state.pt"
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.parallel_loop", mode, str(tmp_path / "init"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, x, y = parallel_loop.model_and_data()
    parallel_loop.train(model, x, y)
    _assert_same_training(torch.load(out, weights_only=True), parallel_loop.trainable(model),
                          batch=parallel_loop.BATCH, steps=parallel_loop.STEPS)  # fmt: skip
