"""`lorakit train CONFIG`: a run from a TOML file, its resume, factories, and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.errors import InputError
from lorakit.recipes import RecipeError, build_data, build_model

from .models import SeedMLP, mlp_factory

TOY_RUN = """
out_dir = "{out}"
[model]
factory = "tests.models:mlp_factory"
hidden = 16
[data]
factory = "tests.models:toy_data"
n = 256
[lora]
r = 4
alpha = 4.0
target_modules = ["fc1", "fc2"]
[train]
max_steps = 12
batch_size = 32
lr = 0.01
save_every = 4
progress = false
"""


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text.replace("{out}", str(tmp_path / "o")))
    return str(path)


def test_train_from_toml_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _write(tmp_path, TOY_RUN.replace("{out}", str(out)))
    assert main(["train", cfg]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008",
                                                                              "step-00000012"]  # fmt: skip
    assert main(["train", cfg, "--resume"]) == 0  # already complete: nothing more to do
    printed = capsys.readouterr().out
    assert "trained 12 steps on 256 examples; adapter written to" in printed


def test_recipe_error_is_an_input_error_with_a_hint(tmp_path, capsys):
    assert issubclass(RecipeError, InputError) and issubclass(RecipeError, ValueError)
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "missing.toml: no such config file" in err and "hint: check the input files and options" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TOY_RUN.replace("r = 4", "r = 4\nrank = 8"), "unknown option 'rank'"),
        (TOY_RUN.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 1"), "[train]: unknown key(s) ['learning_rate']"),
        (TOY_RUN + "\n[extras]\nx = 1\n", "unknown section(s) ['extras']"),
        (
            TOY_RUN.replace("hidden = 16", 'hidden = 16\nweights = "/nope/base.safetensors"'),
            "weights = '/nope/base.safetensors': no such file",
        ),
        (TOY_RUN.replace('factory = "tests.models:mlp_factory"\nhidden = 16', 'hf_pretrained = "/nope/model"'),
         "no config.json there"),
        (TOY_RUN.replace('factory = "tests.models:mlp_factory"\nhidden = 16', ""),
         "[model] needs one of factory, hf_pretrained, hf_config"),
        (TOY_RUN.replace("max_steps = 12", "max_steps = 12\nschedule = 'exp'"), "schedule must be"),
        ("out_dir = 'x'\n[model\n", "not valid TOML"),
        # factories that cannot be found or called
        (TOY_RUN.replace("tests.models:mlp_factory", "tests.no_such_module:build"),
         "[model] factory = 'tests.no_such_module:build': cannot import 'tests.no_such_module'"),
        (TOY_RUN.replace("tests.models:mlp_factory", "tests.models:no_such_factory"),
         "'tests.models' has no attribute 'no_such_factory'"),
        (TOY_RUN.replace("tests.models:mlp_factory", "tests.models:NOT_CALLABLE"),
         "'NOT_CALLABLE' is not callable (type int)"),
        (TOY_RUN.replace("tests.models:mlp_factory", "tests.models.mlp_factory"),
         "expected a string 'package.module:callable'"),
        (TOY_RUN.replace("hidden = 16", "hidden = 16\ndepth = 3"),
         "[model] factory 'tests.models:mlp_factory' cannot be called with the keyword arguments ['depth', 'hidden']"),
        (TOY_RUN.replace("n = 256", "n = 256\nshuffle = true"), "it accepts: n, classes, tokenizer"),
        (TOY_RUN.replace("n = 256", "n = 256\ntokenizer = 'bytes'"), "the model's tokenizer is passed"),
        (TOY_RUN.replace('"tests.models:toy_data"\nn = 256', '"tests.models:mlp_factory"'),
         "returned SeedMLP; expected (collate, num_examples, loss_fn)"),
        (TOY_RUN.replace('factory = "tests.models:toy_data"\nn = 256', 'kind = "csv"'),
         "[data] kind = 'csv'; known: jsonl, text"),
    ],
)
def test_bad_configs_are_one_clear_line(tmp_path, capsys, text, message):
    code = main(["train", _write(tmp_path, text)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_weights_are_loaded_strictly(tmp_path):
    good = mlp_factory(hidden=16)
    with torch.no_grad():
        good.fc1.weight.fill_(0.5)
    save_file({k: v.contiguous() for k, v in good.state_dict().items()}, str(tmp_path / "good.safetensors"))
    spec = {"factory": "tests.models:mlp_factory", "hidden": 16, "weights": str(tmp_path / "good.safetensors")}
    model, tokenizer = build_model(spec)
    assert isinstance(model, SeedMLP) and tokenizer is None
    assert torch.equal(model.fc1.weight, good.fc1.weight)
    with pytest.raises(RecipeError, match="do not fit the model"):
        build_model({**spec, "hidden": 32})


def test_data_factory_gets_the_tokenizer_only_when_it_takes_one(tmp_path, monkeypatch):
    (tmp_path / "recipe_helpers.py").write_text(
        "seen = {}\n"
        "def with_tokenizer(n, tokenizer):\n"
        "    seen['tokenizer'] = tokenizer\n"
        "    return (lambda idx: idx), n, (lambda m, b: b)\n"
        "def without_tokenizer(n, **options):\n"
        "    seen['options'] = options\n"
        "    return (lambda idx: idx), n, (lambda m, b: b)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import recipe_helpers

    _, n, _ = build_data({"factory": "recipe_helpers:with_tokenizer", "n": 5}, tokenizer="TOK")
    assert n == 5 and recipe_helpers.seen["tokenizer"] == "TOK"
    build_data({"factory": "recipe_helpers:without_tokenizer", "n": 5, "seq": 9}, tokenizer="TOK")
    assert recipe_helpers.seen["options"] == {"seq": 9}


def test_bad_jsonl_row_names_the_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n{"text": 3}\n')
    text = TOY_RUN.replace('factory = "tests.models:toy_data"\nn = 256', f'kind = "jsonl"\npath = "{data}"')
    code = main(["train", _write(tmp_path, text)])
    assert code == 2 and "train.jsonl, line 2: expected an object with a string field 'text'" in capsys.readouterr().err


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
    code = main(["train", _write(tmp_path, TOY_RUN.replace("{out}", str(out)))])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    complete = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert complete == ["step-00000004"], "the first checkpoint survives; the failed one never appears"
