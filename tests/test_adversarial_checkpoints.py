"""The checkpoint folder under attack: an earlier run in out_dir, damaged and malformed checkpoints,
temp folders of killed writes, a full disk. Each case ends in an exact, stated outcome: nothing
is silently resumed from the wrong place, nothing is silently kept from another run."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from lorakit import train_state


def tiny(out: Path, fail_at: int | None = None, width: int = 4, rank: int = 2, examples: int = 64, record=None,
         **cfg) -> lk.Trainer:  # fmt: skip
    """A 4→4 linear layer with a rank-2 adapter; ``fail_at``: the loss of that call is NaN (the run
    stops there, as a crash would, its checkpoints kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width))
    lk.inject(model, lk.LoraConfig(r=rank, target_modules=["0"]))
    x = torch.randn(64, width, generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}

    def loss_fn(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = m(batch).pow(2).mean()
        return loss * float("nan") if calls["n"] == fail_at else loss

    settings = {"max_steps": 10, "save_every": 2, "batch_size": 8, "log_every": 1, "progress": False, **cfg}
    config = lk.TrainerConfig(out_dir=str(out), **settings)
    return lk.Trainer(model, loss_fn, lambda idx: x[idx], examples, config, record=record)


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:08d}" / "adapter_model.safetensors")


def crashed_at_7(out: Path) -> None:
    """Steps 1..6 done and checkpointed at 2, 4, 6; step 7 fails."""
    with pytest.raises(lk.TrainingError, match="step 7: loss is nan"):
        tiny(out, fail_at=7).train()
    assert names(out) == ["step-00000002", "step-00000004", "step-00000006"] and steps(out) == list(range(1, 7))


def reseal(folder: Path) -> None:
    """Rewrite the manifest so it matches the folder again (a checkpoint sealed with bad content)."""
    manifest = {p.name: train_state.sha256_file(p) for p in sorted(folder.iterdir()) if p.name != "COMPLETE"}
    (folder / "COMPLETE").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("whole")
    tiny(out).train()
    return adapter(out, 10)


# ------------------------------------------------------------------------------ one run per out_dir
def test_fresh_run_where_an_earlier_one_is_refused_and_overwrite_starts_afresh(tmp_path):
    tiny(tmp_path, max_steps=8).train()
    before = names(tmp_path), (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(lk.InputError, match=r"holds an earlier run \(step-00000004, step-00000006, step-00000008, "
                       r"metrics.jsonl\); resume it .* or overwrite it \(TrainerConfig\(overwrite=True\)"):  # fmt: skip
        tiny(tmp_path, max_steps=4).train()
    assert (names(tmp_path), (tmp_path / "metrics.jsonl").read_text()) == before
    with pytest.raises(lk.InputError, match="resume and overwrite exclude each other"):
        tiny(tmp_path, max_steps=4, overwrite=True).train(resume=True)
    tiny(tmp_path, max_steps=4, overwrite=True).train()
    assert names(tmp_path) == ["step-00000002", "step-00000004"] and steps(tmp_path) == [1, 2, 3, 4]
    assert tiny(tmp_path, max_steps=4).resume() == 4, "a later resume continues the new run, not the old one"


def test_metrics_hold_each_step_once_after_resumes(tmp_path, uninterrupted):
    crashed_at_7(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.1')  # a torn last line
    trainer = tiny(tmp_path)
    trainer.train(resume=True)
    assert steps(tmp_path) == list(range(1, 11))
    assert trainer.step == 10
    got = adapter(tmp_path, 10)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)


# ------------------------------------------------------------------------------ damaged checkpoints
def test_damaged_newest_is_skipped_with_one_warning_and_rewritten(tmp_path, uninterrupted):
    crashed_at_7(tmp_path)
    weights = tmp_path / "checkpoints" / "step-00000006" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a torn write the manifest catches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny(tmp_path)
        trainer.train(resume=True)  # resumes from 4, saves 6, 8 and 10
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "skipping incomplete or damaged checkpoint" in messages[0] and "step-00000006 (SHA-256 mismatch in " \
        "adapter_model.safetensors); removing it" in messages[0]  # fmt: skip
    assert names(tmp_path) == ["step-00000006", "step-00000008", "step-00000010"]
    assert all(train_state.checkpoint_problem(p) is None for p in (tmp_path / "checkpoints").iterdir())
    assert steps(tmp_path) == list(range(1, 11))
    got = adapter(tmp_path, 10)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)


def test_every_checkpoint_damaged_refuses_to_resume_and_keeps_them(tmp_path):
    crashed_at_7(tmp_path)
    for folder in (tmp_path / "checkpoints").iterdir():
        (folder / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(lk.TrainingError, match=r"every checkpoint is damaged \(step-00000006: SHA-256 mismatch in "
                       r"trainer_state.pt; step-00000004: .*; nothing to resume from"):  # fmt: skip
        tiny(tmp_path).train(resume=True)
    assert names(tmp_path) == ["step-00000002", "step-00000004", "step-00000006"] and steps(tmp_path) == [*range(1, 7)]


def _list(f: Path) -> None:
    (f / "COMPLETE").write_text(json.dumps(sorted(json.loads((f / "COMPLETE").read_text()))))


MALFORMED = {
    "manifest is a JSON list": (_list, "manifest is not a table of file names and SHA-256 digests"),
    "manifest is not JSON": (lambda f: (f / "COMPLETE").write_text("{"), "unreadable manifest (JSONDecodeError)"),
    "manifest missing": (lambda f: (f / "COMPLETE").unlink(), "no COMPLETE manifest"),
    "manifest lacks a file": (
        lambda f: (f / "COMPLETE").write_text(json.dumps({"trainer.json": "0" * 64})),
        "manifest lists ['trainer.json'], the folder holds ['adapter_config.json', 'adapter_model.safetensors', "
        "'trainer.json', 'trainer_state.pt']",
    ),
    "digest of the wrong type": (
        lambda f: (f / "COMPLETE").write_text(json.dumps(dict.fromkeys(json.loads((f / "COMPLETE").read_text()), 7))),
        "manifest is not a table of file names and SHA-256 digests",
    ),
    "a file the manifest does not list": (lambda f: (f / "stray.txt").write_text("x"), "the folder holds ["),
    "trainer.json is a list, sealed": (
        lambda f: ((f / "trainer.json").write_text("[6]"), reseal(f)),
        "trainer.json does not describe step 6",
    ),
    "trainer.json names another step, sealed": (
        lambda f: ((f / "trainer.json").write_text(json.dumps({"step": 7, "config": {}})), reseal(f)),
        "trainer.json does not describe step 6",
    ),
    "base fingerprint of the wrong shape, sealed": (
        lambda f: ((f / "trainer.json").write_text(json.dumps({"step": 6, "config": {}, "base": [1]})), reseal(f)),
        "trainer.json does not describe step 6",
    ),
    "trainer state missing, sealed": (
        lambda f: ((f / "trainer_state.pt").unlink(), reseal(f)),
        "missing trainer_state.pt",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_damaged(tmp_path, case):
    crashed_at_7(tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000006"
    damage, reason = MALFORMED[case]
    damage(newest)
    assert reason in train_state.checkpoint_problem(newest)
    assert [p.name for p in train_state.complete_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000004", "step-00000002"]  # fmt: skip
    with pytest.warns(UserWarning, match="step-00000006 .*removing it"):
        assert tiny(tmp_path).resume() == 4
    assert not newest.exists() and steps(tmp_path) == [1, 2, 3, 4]


def test_temp_folders_of_killed_writes_are_removed_on_save_and_on_resume(tmp_path):
    crashed_at_7(tmp_path)
    ckpts = tmp_path / "checkpoints"
    for name in (".step-00000008.tmp-4242", ".step-00000010.tmp-77"):
        (ckpts / name).mkdir()
        (ckpts / name / "trainer_state.pt").write_bytes(b"half")
    trainer = tiny(tmp_path)
    assert trainer.resume() == 6 and names(tmp_path) == ["step-00000002", "step-00000004", "step-00000006"]
    (ckpts / ".step-00000007.tmp-1").mkdir()
    trainer.train_step()
    trainer.save_checkpoint()
    assert names(tmp_path) == ["step-00000004", "step-00000006", "step-00000007"]
    (ckpts / ".step-00000009.tmp-1").mkdir()
    with pytest.raises(lk.InputError, match=r"holds an earlier run \(step-00000004, .*\.step-00000009\.tmp-1"):
        tiny(tmp_path).train()


# ------------------------------------------------------------------------------ a full disk
def test_full_disk_while_checkpointing_names_the_folder_and_keeps_the_rest(tmp_path, monkeypatch, uninterrupted):
    real_save, calls = torch.save, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    where = re.escape(str(tmp_path / "checkpoints"))
    with pytest.raises(OSError, match=rf"no space left on device while writing checkpoint step-00000004 into {where}; "
                       "the earlier checkpoints there are intact") as err:  # fmt: skip
        tiny(tmp_path).train()
    assert err.value.errno == errno.ENOSPC
    assert names(tmp_path) == ["step-00000002"], "no temp folder left, the earlier checkpoint kept"
    assert train_state.checkpoint_problem(tmp_path / "checkpoints" / "step-00000002") is None
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes and ends where it would have
    tiny(tmp_path).train(resume=True)
    got = adapter(tmp_path, 10)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted) and steps(tmp_path) == [*range(1, 11)]


def test_full_disk_on_a_real_tmpfs(tmp_path):
    """The same on a real, small tmpfs (root only; skipped where mounting is not allowed). The mount
    point lies outside pytest's temp folders, which other pytest sessions may clean up meanwhile."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    probe = tmp_path / "probe"
    tiny(probe, width=256, rank=64, max_steps=1, save_every=1).train()
    size = sum(p.stat().st_size for p in (probe / "checkpoints" / "step-00000001").iterdir())
    disk = Path(tempfile.mkdtemp(prefix="lorakit-tmpfs-"))
    limit = (size * 3 // 2 + 65536) // 4096 * 4096  # one checkpoint and the metrics fit, two do not
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        disk.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(OSError, match=r"no space left on device while writing checkpoint step-00000002 into"):
            tiny(disk, width=256, rank=64, max_steps=4, save_every=1).train()
        assert names(disk) == ["step-00000001"]
        assert train_state.checkpoint_problem(disk / "checkpoints" / "step-00000001") is None
        assert steps(disk) == [1, 2] and not list((disk / "checkpoints").glob(".step-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
        disk.rmdir()


# ------------------------------------------------------------------------------ layouts checked up front
def test_a_file_among_the_checkpoints_is_removed_on_resume_and_the_run_ends_as_uninterrupted(tmp_path, uninterrupted):
    crashed_at_7(tmp_path)
    (tmp_path / "checkpoints" / "step-00000008").write_text("not a checkpoint")
    (tmp_path / "checkpoints" / ".step-00000008.tmp-99").write_text("a torn temp file")
    with pytest.warns(UserWarning, match=r"skipping incomplete or damaged checkpoint .*step-00000008 \(a file, not a "
                      r"checkpoint folder\); removing it"):  # fmt: skip
        tiny(tmp_path).train(resume=True)
    assert names(tmp_path) == ["step-00000006", "step-00000008", "step-00000010"]
    got = adapter(tmp_path, 10)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted) and steps(tmp_path) == [*range(1, 11)]


def test_a_checkpoints_file_is_refused_before_training_and_replaced_by_overwrite(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    where = re.escape(str(tmp_path / "checkpoints"))
    for resume in (False, True):
        with pytest.raises(lk.InputError, match=rf"^{where} is not a folder \(a run keeps its checkpoints there\); "
                           "remove it, or train into another out_dir, or start afresh with overwrite"):  # fmt: skip
            tiny(tmp_path).train(resume=resume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"], "nothing was trained or written"
    tiny(tmp_path, max_steps=2, overwrite=True).train()
    assert names(tmp_path) == ["step-00000002"]


# ------------------------------------------------------------------------------ a resume continues the same run
RESUMED_WITH = {
    "lr": ({"lr": 0.01}, "with other settings (lr 0.001 -> 0.01); they change the run's trajectory"),
    "seed": ({"seed": 3}, "with other settings (seed 0 -> 3)"),
    "grad_accum": ({"grad_accum": 2}, "with other settings (grad_accum 1 -> 2)"),
    "data size": ({"examples": 32}, "with other settings (num_examples 64 -> 32)"),
    "record": ({"record": {"data": {"n": 2}}}, "from another recipe ([data] n 1 -> 2)"),
    "max_steps below": ({"max_steps": 4}, "step-00000006 is at step 6, beyond max_steps = 4; resume with max_steps >= "
                        "6"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RESUMED_WITH))
def test_resume_with_settings_that_change_the_run_is_refused(tmp_path, case):
    with pytest.raises(lk.TrainingError):
        tiny(tmp_path, fail_at=7, record={"data": {"n": 1}}).train()
    before = names(tmp_path), (tmp_path / "metrics.jsonl").read_text()
    changes, message = RESUMED_WITH[case]
    with pytest.raises(lk.InputError) as caught:
        tiny(tmp_path, **{"record": {"data": {"n": 1}}, **changes}).train(resume=True)
    assert str(caught.value).startswith("resume: ") and message in str(caught.value), str(caught.value)
    assert (names(tmp_path), (tmp_path / "metrics.jsonl").read_text()) == before, "a refused resume changes nothing"


def test_resume_may_skip_non_finite_steps_and_log_differently(tmp_path, uninterrupted):
    crashed_at_7(tmp_path)
    with pytest.warns(UserWarning, match=r"other settings than it was trained with \(on_nonfinite 'raise' -> 'skip'\)"):
        tiny(tmp_path, on_nonfinite="skip", log_every=5, keep_last=1, desc="again").train(resume=True)
    got = adapter(tmp_path, 10)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)
    with pytest.warns(UserWarning, match="holds no record of its recipe; resuming without checking it"):
        tiny(tmp_path, record={"data": {"n": 1}}).resume()
