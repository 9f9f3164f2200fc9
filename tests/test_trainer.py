"""The trainer: kill -9 and resume bit-identically, non-finite steps, bad checkpoints (data-parallel
runs: tests/test_parallel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk

from .helpers.train_worker import Child

ROOT = Path(__file__).resolve().parents[1]


def _final_adapter(out: Path) -> dict[str, torch.Tensor]:
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-00000040"
    return load_file(newest / "adapter_model.safetensors")


def _metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    """Four kill -9s at known points (two mid-checkpoint, two between checkpoints), then a resume
    to the end: bit-identical to an uninterrupted run, each resume continuing from the newest
    complete checkpoint, and one run's worth of metrics and checkpoints left."""
    reference = Child("worker", [str(tmp_path / "reference")], tmp_path / "reference.log")
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    # (the pause the kill lands in, at step, the step the run resumed from, complete checkpoints left)
    plan = [("SAVE", 8, None, [4]), ("STEP", 14, 4, [8, 12]), ("SAVE", 24, 12, [16, 20]), ("STEP", 31, 20, [24, 28])]
    for attempt, (where, step, resumed_from, complete) in enumerate(plan):
        notify = tmp_path / f"notify-{attempt}"
        env = {f"LORAKIT_TEST_PAUSE_IN_{where}": f"60@{step}", "LORAKIT_TEST_PAUSE_NOTIFY": str(notify)}
        child = Child("worker", [str(killed), *(["--resume"] if attempt else [])], tmp_path / f"{attempt}.log", env)
        child.kill_when(lambda n=notify, s=step: n.exists() and n.read_text() == f"{s}\n")
        temps = [p.name for p in ckpts.glob(".step-*")]
        assert temps == ([f".step-{step:08d}.tmp-{child.process.pid}"] if where == "SAVE" else []), temps
        assert sorted(p.name for p in ckpts.glob("step-*")) == [f"step-{k:08d}" for k in complete]
        assert _metric_steps(killed)[-1] == step
        if resumed_from is not None:
            assert f"resumed from {ckpts / f'step-{resumed_from:08d}'} (step {resumed_from})" in child.output()
    final = Child("worker", [str(killed), "--resume"], tmp_path / "final.log")
    assert final.wait() == 0, final.output()
    assert f"resumed from {ckpts / 'step-00000028'} (step 28)" in final.output()
    assert reference.wait() == 0, reference.output()
    want, got = _final_adapter(tmp_path / "reference"), _final_adapter(killed)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000036", "step-00000040"]
    assert _metric_steps(killed) == list(range(1, 41)) == _metric_steps(tmp_path / "reference")


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
    trainer = _tiny(tmp_path, lambda m, b: m(b).pow(2).mean(), max_steps=6, save_every=2, log_every=1)
    trainer.train()
    newest = tmp_path / "checkpoints" / "step-00000006"
    data = (newest / "adapter_model.safetensors").read_bytes()
    (newest / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # torn write
    fresh = _tiny(tmp_path, lambda m, b: m(b).pow(2).mean(), max_steps=6, save_every=2, log_every=1)
    with pytest.warns(UserWarning, match=r"skipping incomplete or damaged checkpoint .*step-00000006 \(SHA-256 "
                      r"mismatch in adapter_model.safetensors\); removing it"):  # fmt: skip
        assert fresh.resume() == 4
    assert not newest.exists() and _metric_steps(tmp_path) == [1, 2, 3, 4]
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
    def run(out: Path, head_seed: int, body_seed: int = 0):
        torch.manual_seed(body_seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        model[0].requires_grad_(False)  # a frozen body, a trained head
        torch.manual_seed(head_seed)
        model[2].reset_parameters()
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
        config = lk.TrainerConfig(out_dir=str(out), max_steps=4, batch_size=8, device="cpu", progress=False)
        return model, lk.Trainer(model, lambda m, b: m(b).pow(2).mean(), lambda idx: x[idx], 32, config)

    model, trainer = run(tmp_path, 0)
    trainer.train()
    assert (tmp_path / "checkpoints" / "step-00000004" / "trainable.safetensors").is_file()
    other, fresh = run(tmp_path, 1)
    assert not torch.equal(other[2].weight, model[2].weight)
    assert fresh.resume() == 4
    assert torch.equal(other[2].weight, model[2].weight) and torch.equal(other[2].bias, model[2].bias)
    _, on_another_body = run(tmp_path, 0, body_seed=1)  # the frozen body is the base: checked, not saved
    with pytest.raises(
        lk.InputError,
        match=r"the frozen base is not the one .*step-00000004 was trained on "
        r"\(2 of 2 frozen tensors differ: 0.bias has other values; 0.weight has other values\)",
    ):
        on_another_body.resume()


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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_steps", "10", "TrainerConfig.max_steps = '10' (str): expected an integer >= 1"),
        ("max_steps", 0, "TrainerConfig.max_steps = 0 (int): expected an integer >= 1"),
        ("batch_size", 2.5, "TrainerConfig.batch_size = 2.5 (float): expected an integer >= 1"),
        ("grad_accum", True, "TrainerConfig.grad_accum = True (bool): expected an integer >= 1"),
        ("lr", -1, "TrainerConfig.lr = -1 (int): expected a finite number > 0"),
        ("lr", float("nan"), "TrainerConfig.lr = nan (float): expected a finite number > 0"),
        ("weight_decay", -0.1, "TrainerConfig.weight_decay = -0.1 (float): expected a finite number >= 0"),
        ("max_grad_norm", -1.0, "TrainerConfig.max_grad_norm = -1.0 (float): expected a finite number > 0, or None"),
        ("max_grad_norm", 0, "TrainerConfig.max_grad_norm = 0 (int): expected a finite number > 0, or None"),
        ("warmup_steps", -2, "TrainerConfig.warmup_steps = -2 (int): expected an integer >= 0"),
        ("save_every", 0, "TrainerConfig.save_every = 0 (int): expected an integer >= 1, or None"),
        ("seed", "a", "TrainerConfig.seed = 'a' (str): expected an integer in [0, 2**32)"),
        ("seed", -1, "TrainerConfig.seed = -1 (int): expected an integer in [0, 2**32)"),
        ("progress", "false", "TrainerConfig.progress = 'false' (str): expected true or false (a boolean, not a"),
        ("overwrite", 1, "TrainerConfig.overwrite = 1 (int): expected true or false"),
        ("adapter", "", "TrainerConfig.adapter = '' (str): expected a non-empty string"),
        ("device", "meta", "TrainerConfig.device 'meta': the meta device holds no data and cannot train"),
        ("device", "banana", "TrainerConfig.device 'banana' is not a device torch knows ('cpu', 'cuda', 'cuda:1'"),
        ("optimizer", "lion", "TrainerConfig.optimizer = 'lion': unknown optimizer 'lion'; choose one of adamw"),
    ],
)
def test_bad_config_values_name_the_field_the_value_and_what_is_allowed(field, value, message):
    with pytest.raises(lk.InputError) as err:
        lk.TrainerConfig(out_dir="x", **{"max_steps": 3, field: value})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_parameters_replaced_after_the_trainer_was_built_are_refused(tmp_path):
    """FSDP2's fully_shard (or to_empty, load_state_dict(assign=True)) after building the Trainer
    replaces the parameters the optimizer holds: stepping would train nothing the model uses."""
    trainer = _tiny(tmp_path, lambda m, b: m(b).pow(2).mean(), max_steps=2)
    layer = trainer.model[0]
    layer.lora_A["default"] = nn.Parameter(layer.lora_A["default"].detach().clone())
    with pytest.raises(lk.InputError, match="parameters were replaced after the Trainer was built"):
        trainer.train_step()
