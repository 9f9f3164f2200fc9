"""Data-parallel training of models with adapters, on 2 CPU processes (gloo): DDP and FSDP2, in a
plain loop and through lk.Trainer, each equal to one process on the combined batch; FSDP2 runs
save gathered adapters and resume bit-identically."""

from __future__ import annotations

import json
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


def _worker(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.helpers.train_worker", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _run(out: Path, *extra: str, world: int = 1, env: dict[str, str] | None = None, ok: bool = True) -> list[str]:
    """The train worker's run in ``world`` processes (one: no process group); their stderr."""
    init = out.with_name(out.name + "-init")
    ranks = [["--world", str(world), "--rank", str(r), "--init", str(init)] for r in range(world)]
    procs = [_worker(out, "--dropout", "0", "--steps", str(STEPS), *extra, *rank, env=env)
             for rank in (ranks if world > 1 else [[]])]  # fmt: skip
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert (p.returncode == 0) == ok, err[-3000:]
        errors.append(err)
    return errors


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


@pytest.mark.parametrize(("parallel", "accum"),
                         [("none", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2), ("fsdp-part", 1)])  # fmt: skip
def test_trainer_on_two_processes_equals_one_with_the_combined_batch(tmp_path, single, parallel, accum):
    """lk.Trainer splits each global batch by rank; the model is plain (the trainer all-reduces the
    adapter gradients), wrapped by DDP (DDP does, skipping all micro-batches but the last with
    ``no_sync``) or sharded by FSDP2 (FSDP reduce-scatters; ``fsdp-part``: one layer sharded, the
    other plain, clipped together). 2 processes × batch 8/accum × accum
    micro-batches see the 16 examples one process sees in its step."""
    batch = str(8 // accum)
    _run(tmp_path / "run", "--batch", batch, "--grad-accum", str(accum), "--parallel", parallel, world=2)
    _assert_same_training(_final_adapter(tmp_path / "run"), single, batch=16, steps=STEPS)


@pytest.mark.parametrize("parallel", ["none", "ddp", "fsdp"])
def test_data_parallel_resume_is_bit_identical(tmp_path, parallel):
    """Train 5 steps, save (FSDP2: every rank gathers its shards), resume in fresh processes' worth
    of state (a fresh model sharded again, disturbed RNGs), finish: bit-identical to an
    uninterrupted run of the same layout, with dropout drawn from each process's own RNG."""
    run = ["--batch", "8", "--parallel", parallel, "--dropout", "0.1", "--rank-seed"]
    _run(tmp_path / "whole", *run, world=2)
    _run(tmp_path / "cut", *run, "--cut", "5", world=2)
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


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_nan_loss_on_one_process_is_skipped_or_raised_by_all(tmp_path, policy):
    """Process 1's loss is NaN at step 3: both processes skip that step (or both stop naming it);
    neither is left waiting in a collective the other never enters."""
    env = {"LORAKIT_TEST_NAN_AT": "3:1", "LORAKIT_TEST_ON_NONFINITE": policy}
    errors = _run(tmp_path / "run", "--batch", "8", world=2, env=env, ok=policy == "skip")
    if policy == "raise":
        assert all("step 3: loss is" in err for err in errors), [e[-500:] for e in errors]
        return
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in steps if r["loss"] is None] == [3]


def test_a_resume_with_another_number_of_processes_is_refused(tmp_path):
    """The data order and the gradients' averaging depend on the number of processes."""
    _run(tmp_path / "run", "--batch", "8", world=2)
    (err,) = _run(tmp_path / "run", "--batch", "8", "--steps", str(STEPS + 4), "--resume", ok=False)
    assert "world_size 2 -> 1" in err, err[-2000:]
