"""The trainer: kill -9 and resume bit-identically, DDP equivalence, non-finite steps, bad checkpoints."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk

ROOT = Path(__file__).resolve().parents[1]


def _worker(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.helpers.train_worker", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _final_adapter(out: Path) -> dict[str, torch.Tensor]:
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-00000040"
    return load_file(newest / "adapter_model.safetensors")


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    proc = _worker(reference)
    assert proc.wait(120) == 0, proc.stderr.read()
    want = _final_adapter(reference)

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(4):
        # A pause inside every save makes some kills land while a checkpoint is half written.
        proc = _worker(killed, "--resume", env={"LORAKIT_TEST_PAUSE_IN_SAVE": "0.15"})
        time.sleep(rng.uniform(2.0, 3.5) if attempt == 0 else rng.uniform(0.5, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
    assert kills >= 2, "the runs finished before they could be killed; the test proves nothing"
    leftovers = list((killed / "checkpoints").glob(".step-*")) if (killed / "checkpoints").exists() else []
    proc = _worker(killed, "--resume")
    assert proc.wait(120) == 0, proc.stderr.read()
    got = _final_adapter(killed)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # at most keep_last complete checkpoints remain
    assert len(list((killed / "checkpoints").glob("step-*"))) <= 2
    print(f"kills: {kills}, half-written checkpoints found: {len(leftovers)}")


def test_ddp_two_processes_equal_one_with_double_batch(tmp_path):
    single = tmp_path / "single"
    proc = _worker(single, "--batch", "16", "--dropout", "0", "--steps", "40")
    assert proc.wait(120) == 0, proc.stderr.read()
    init = tmp_path / "dist_init"
    ddp = tmp_path / "ddp"
    procs = [_worker(ddp, "--batch", "8", "--dropout", "0", "--steps", "40", "--world", "2", "--rank", str(r),
                     "--init", str(init)) for r in range(2)]  # fmt: skip
    for p in procs:
        assert p.wait(180) == 0, p.stderr.read()
    a, b = _final_adapter(single), _final_adapter(ddp)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def _tiny(tmp_path: Path, loss_fn, **cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(64, 4)
    config = lk.TrainerConfig(out_dir=str(tmp_path), batch_size=8, progress=False, **cfg)
    return lk.Trainer(model, loss_fn, lambda idx: x[idx], 64, config)


def test_nonfinite_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(batch).pow(2).mean()
        return loss * float("nan") if calls["n"] == 7 else loss

    trainer = _tiny(tmp_path, loss_fn, max_steps=10, save_every=3)
    with pytest.raises(lk.TrainingError, match=r"step 7: loss is nan"):
        trainer.train()
    saved = trainer.complete_checkpoints()
    assert [p.name for p in saved] == ["step-00000006", "step-00000003"]

    calls["n"] = 0
    skipping = _tiny(tmp_path / "skip", loss_fn, max_steps=10, on_nonfinite="skip")
    assert skipping.train()["step"] == 10
    assert len(skipping.losses) == 9


def test_damaged_checkpoint_is_skipped(tmp_path):
    trainer = _tiny(tmp_path, lambda m, b: m(b).pow(2).mean(), max_steps=6, save_every=2)
    trainer.train()
    newest = tmp_path / "checkpoints" / "step-00000006"
    data = (newest / "adapter_model.safetensors").read_bytes()
    (newest / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # torn write
    fresh = _tiny(tmp_path, lambda m, b: m(b).pow(2).mean(), max_steps=6, save_every=2)
    with pytest.warns(UserWarning, match=r"skipping incomplete or damaged checkpoint .*step-00000006"):
        assert fresh.resume() == 4
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 1
    assert (tmp_path / "loss_curve.png").exists()


def test_resume_in_process_continues_bit_identically(tmp_path):
    """A fresh model resuming from a checkpoint takes exactly the steps the uninterrupted run took
    (dropout on: the RNG state comes back too), and the checkpoint loads with weights_only."""
    from tests.helpers.train_worker import resume_check

    run = resume_check(tmp_path, steps=8, cut=4, device="cpu")
    assert run["resumed"] == run["whole"][4:]
    for name, want in run["whole_params"].items():
        assert torch.equal(run["resumed_params"][name], want), name
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000004" / "trainer_state.pt",
                       map_location="cpu", weights_only=True)  # fmt: skip
    assert state["rng"].dtype == torch.uint8 and state["rng"].device.type == "cpu"
    assert "cuda_rng" not in state and "scaler" not in state and state["step"] == 4


def test_model_without_adapter_resumes_its_trainable_parameters(tmp_path):
    def run(out: Path, seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        model[0].requires_grad_(False)  # a frozen body, a trained head
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
        config = lk.TrainerConfig(out_dir=str(out), max_steps=4, batch_size=8, device="cpu", progress=False)
        return model, lk.Trainer(model, lambda m, b: m(b).pow(2).mean(), lambda idx: x[idx], 32, config)

    model, trainer = run(tmp_path, 0)
    trainer.train()
    assert (tmp_path / "checkpoints" / "step-00000004" / "trainable.safetensors").is_file()
    other, fresh = run(tmp_path, 1)
    assert fresh.resume() == 4
    assert torch.equal(other[2].weight, model[2].weight) and torch.equal(other[2].bias, model[2].bias)
    assert not torch.equal(other[0].weight, model[0].weight), "frozen weights are not part of the checkpoint"


def test_batches_of_any_structure_reach_the_loss_on_the_model_device(tmp_path):
    seen = []

    def loss_fn(model, batch):
        seen.append({k: v.device for k, v in batch.items()})
        return model(batch["x"]).pow(2).mean()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(16, 4)
    config = lk.TrainerConfig(out_dir=str(tmp_path), max_steps=2, batch_size=8, progress=False)
    trainer = lk.Trainer(model, loss_fn, lambda idx: {"x": x[idx]}, 16, config)
    assert trainer.device == torch.device("cpu")
    trainer.train()
    assert seen == [{"x": torch.device("cpu")}] * 2


def test_config_errors():
    with pytest.raises(ValueError, match="schedule"):
        lk.TrainerConfig(out_dir="x", max_steps=3, schedule="exp")
    with pytest.raises(ValueError, match="on_nonfinite"):
        lk.TrainerConfig(out_dir="x", max_steps=3, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="bf16 and fp16"):
        lk.TrainerConfig(out_dir="x", max_steps=3, bf16=True, fp16=True)
    with pytest.raises(ValueError, match="unknown optimizer"):
        lk.TrainerConfig(out_dir="x", max_steps=3, optimizer="adam9bit")


def test_fsdp2_shards_a_model_with_frozen_and_trainable_parameters(tmp_path):
    """PEFT users hit "Must flatten tensors with uniform requires_grad" with FSDP1's flat
    parameters; FSDP2 shards per parameter, so adapters inside the model just work (CPU, gloo)."""
    out = tmp_path / "fsdp.pt"
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.fsdp_worker", str(tmp_path / "init"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    sharded = torch.load(out, weights_only=True)
    from tests.helpers.fsdp_worker import model_and_data, train

    model, x, y = model_and_data()
    train(model, x, y)
    single = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(sharded) == set(single)
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6)
