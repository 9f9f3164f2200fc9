"""`lorakit train CONFIG`: a run from a TOML file, its resume, factories, and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.errors import InputError
from lorakit.recipes import RecipeError, build_data, build_model, run

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
        (TOY_RUN.replace("max_steps = 12", "max_steps = 12\nschedule = 'exp'"),
         "[train] schedule = 'exp' (str): expected one of 'cosine', 'linear', 'constant'"),
        # values of the wrong type or range: [section] key, the value, what is allowed
        (TOY_RUN.replace("max_steps = 12", 'max_steps = "10"'),
         "[train] max_steps = '10' (str): expected an integer >= 1"),
        (TOY_RUN.replace("batch_size = 32", "batch_size = 2.5"),
         "[train] batch_size = 2.5 (float): expected an integer >= 1"),
        (TOY_RUN.replace("lr = 0.01", "lr = -1"), "[train] lr = -1 (int): expected a finite number > 0"),
        (TOY_RUN.replace("lr = 0.01", 'lr = "1e-3"'),
         "[train] lr = '1e-3' (str): expected a finite number > 0 (write it without quotes: 1e-3)"),
        (TOY_RUN.replace("lr = 0.01", "lr = nan"), "[train] lr = nan (float): expected a finite number > 0"),
        (TOY_RUN.replace("lr = 0.01", 'lr = 0.01\nseed = "a"'), "[train] seed = 'a' (str): expected an integer in"),
        (TOY_RUN.replace("progress = false", 'progress = "false"'),
         "[train] progress = 'false' (str): expected true or false (a boolean, not a string)"),
        (TOY_RUN.replace("lr = 0.01", "lr = 0.01\nmax_grad_norm = -1.0"),
         "[train] max_grad_norm = -1.0 (float): expected a finite number > 0, or None (no clipping)"),
        (TOY_RUN.replace("lr = 0.01", 'lr = 0.01\ndevice = "meta"'),
         "[train] device 'meta': the meta device holds no data and cannot train"),
        (TOY_RUN.replace("lr = 0.01", 'lr = 0.01\ndevice = "banana"'),
         "[train] device 'banana' is not a device torch knows ('cpu', 'cuda', 'cuda:1'...)"),
        (TOY_RUN.replace("r = 4", 'r = 4\nuse_rslora = "false"'),
         "[lora] use_rslora = 'false' (str): expected true or false (a boolean, not a string)"),
        (TOY_RUN.replace("r = 4", 'r = "4"'), "[lora]: LoraConfig.r must be an integer >= 1, got '4'"),
        (TOY_RUN.replace("hidden = 16", "hidden = 16\nweights = 3"),
         "[model] weights = 3 (int): expected a path string"),
        (TOY_RUN.replace('factory = "tests.models:toy_data"\nn = 256', 'kind = "text"\nfiles = "*.md"\nseq = 0'),
         "[data] seq = 0 (int): expected an integer >= 1"),
        (TOY_RUN.replace('out_dir = "{out}"', "out_dir = 3"), "out_dir = 3: expected a non-empty path string"),
        (TOY_RUN.replace("[lora]\n", "lora = 3\n[other]\n"), "unknown section(s) ['other']"),
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
         "[data] kind = 'csv'; known: chat, jsonl, text"),
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

    n = build_data({"factory": "recipe_helpers:with_tokenizer", "n": 5}, tokenizer="TOK").num_examples
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
    err = capsys.readouterr().err
    assert code == 2 and f"no space left on device while writing checkpoint step-00000008 into {out / 'checkpoints'}" \
        in err  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"], \
        "the first checkpoint survives; the failed one never appears, nor does its temp folder"  # fmt: skip


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _write(tmp_path, TOY_RUN.replace("{out}", str(out)))
    assert main(["train", cfg]) == 0
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert f"out_dir {str(out)!r} holds an earlier run (step-00000004, step-00000008, step-00000012, metrics.jsonl)" \
        in err and "[train] overwrite = true" in err  # fmt: skip
    (out / "adapter" / "stale.txt").write_text("from run 1")
    assert run(cfg, overwrite=True)["step"] == 12
    assert not (out / "adapter" / "stale.txt").exists()
    Path(cfg).write_text(Path(cfg).read_text().replace("progress = false", "progress = false\noverwrite = true"))
    assert main(["train", cfg]) == 0
    assert main(["train", cfg, "--resume"]) == 2
    assert "resume and overwrite exclude each other" in capsys.readouterr().err


FACTORIES = {
    "raises": ("def build(hidden=16):\n    raise ValueError('no width ' + str(hidden))\n",
               "[model] factory = 'recipe_mod_raises:build' raised ValueError: no width 16"),
    "syntax": ("def build(:\n    pass\n",
               "[model] factory = 'recipe_mod_syntax:build': cannot import 'recipe_mod_syntax': syntax error in "
               "{path}, line 1: "),
    "import": ("raise RuntimeError('needs a GPU')\n",
               "[model] factory = 'recipe_mod_import:build': importing 'recipe_mod_import' raised RuntimeError: "
               "needs a GPU"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FACTORIES))
def test_a_failing_factory_is_named(tmp_path, capsys, monkeypatch, case):
    source, message = FACTORIES[case]
    module = tmp_path / f"recipe_mod_{case}.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = TOY_RUN.replace("tests.models:mlp_factory", f"recipe_mod_{case}:build")
    assert main(["train", _write(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert message.format(path=module) in err and "Traceback" not in err and err.count("\n") == 2
