"""Recipes under attack, through ``lorakit train``: a resume that would continue a run under another
recipe, YAML 1.1's quirks (octal, base 60, yes/no, repeated keys), YAML syntax errors, a batch larger
than the data, and out_dir layouts that cannot hold a run. Each case ends in one exact line (exit 2)
before anything is trained or written, or in the stated run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.recipe_files import load_yaml, read_config

TOML = """out_dir = "{out}"
model = {{ factory = "tests.models:mlp_factory" }}
data = {{ factory = "tests.models:toy_data", n = 64 }}
lora = {{ r = 2, alpha = 4.0, target_modules = ["fc1", "fc2"] }}
train = {{ max_steps = 4, batch_size = 8, lr = 0.01, save_every = 2, log_every = 1, progress = false }}
"""


def write(folder: Path, out: Path, text: str = TOML, name: str = "run.toml") -> str:
    path = folder / name
    path.write_text(text.format(out=out))
    return str(path)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """out_dir of a finished 4-step run of ``TOML`` (checkpoints at 2 and 4)."""
    folder = tmp_path_factory.mktemp("trained")
    assert main(["train", write(folder, folder / "out")]) == 0
    return folder / "out"


def fresh_copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


# ------------------------------------------------------------------------------ resume keeps the recipe
CHANGED = {
    "lora alpha": (("alpha = 4.0", "alpha = 8.0"), "from another recipe ([lora] alpha 4.0 -> 8.0)"),
    "lora dropout": (("alpha = 4.0", "alpha = 4.0, dropout = 0.1"), "from another recipe ([lora] dropout 0.0 -> 0.1)"),
    "lora r": (("r = 2", "r = 4"), "from another recipe ([lora] r 2 -> 4)"),
    "data kwargs": (("n = 64", "n = 128"), "from another recipe ([data] n 64 -> 128)"),
    "model kwargs": (('mlp_factory" }', 'mlp_factory", hidden = 16 }'),
                     "from another recipe ([model] hidden (unset) -> 16)"),
    "seed": (("progress = false", "progress = false, seed = 1"), "from another recipe ([train] seed 0 -> 1)"),
    "lr": (("lr = 0.01", "lr = 0.02"), "with other settings (lr 0.01 -> 0.02); they change the run's trajectory"),
    "batch": (("batch_size = 8", "batch_size = 16"), "with other settings (batch_size 8 -> 16)"),
    "schedule": (("lr = 0.01", "lr = 0.01, schedule = 'constant', warmup_steps = 1"),
                 "with other settings (warmup_steps 0 -> 1; schedule 'cosine' -> 'constant')"),
    "fp settings": (("lr = 0.01", "lr = 0.01, max_grad_norm = 2.0, optimizer = 'sgd'"),
                    "with other settings (max_grad_norm 1.0 -> 2.0; optimizer 'adamw' -> 'sgd')"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CHANGED))
def test_resume_refuses_a_changed_recipe_and_changes_nothing(tmp_path, capsys, trained, case):
    (old, new), message = CHANGED[case]
    out = fresh_copy(trained, tmp_path)
    before = snapshot(out)
    assert old in TOML
    code = main(["train", write(tmp_path, out, TOML.replace(old, new)), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"resume: {out / 'checkpoints' / 'step-00000004'} was trained {message}" in err
    assert "train into another out_dir, or start afresh with overwrite (lorakit train --overwrite" in err
    assert err.count("\n") == 2 and snapshot(out) == before


def test_resume_may_train_longer_and_change_what_learns_nothing(tmp_path, capsys, trained):
    out = fresh_copy(trained, tmp_path)
    old = "max_steps = 4, batch_size = 8, lr = 0.01, save_every = 2, log_every = 1, progress = false"
    new = "max_steps = 6, batch_size = 8, lr = 0.01, save_every = 3, log_every = 2, progress = true, keep_last = 1, " \
          "eval_every = 5, desc = 'again', device = 'cpu'"  # fmt: skip
    text = TOML.replace(old, new)
    assert text != TOML
    with pytest.warns(UserWarning, match=r"other settings than it was trained with \(max_steps 4 -> 6\)"):
        assert main(["train", write(tmp_path, out, text), "--resume"]) == 0
    assert "trained 6 steps on 64 examples" in capsys.readouterr().out
    assert metric_steps(out) == [1, 2, 3, 4, 6]  # every 2nd step now, and the last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006"]


def test_resume_below_the_checkpoints_step_is_refused(tmp_path, capsys, trained):
    out = fresh_copy(trained, tmp_path)
    before = snapshot(out)
    code = main(["train", write(tmp_path, out, TOML.replace("max_steps = 4", "max_steps = 2")), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and snapshot(out) == before
    assert f"resume: the newest checkpoint {out / 'checkpoints' / 'step-00000004'} is at step 4, beyond max_steps " \
           "= 2; resume with max_steps >= 4 (training longer is allowed)" in err  # fmt: skip


def test_each_checkpoint_records_the_recipe(trained):
    meta = json.loads((trained / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert meta["examples"] == 64
    assert meta["record"]["model"] == {"factory": "tests.models:mlp_factory"}
    assert meta["record"]["data"] == {"factory": "tests.models:toy_data", "n": 64}
    assert meta["record"]["lora"]["alpha"] == 4.0 and meta["record"]["lora"]["dropout"] == 0.0
    assert meta["record"]["train"] == {"seed": 0}


# ------------------------------------------------------------------------------ YAML by YAML 1.2's rules
YAML = """out_dir: {out}
model: {{factory: "tests.models:mlp_factory"}}
data: {{factory: "tests.models:toy_data", n: 64}}
lora: {{r: 2, alpha: 4.0, target_modules: [fc1, fc2]}}
train: {{max_steps: 2, batch_size: 8, progress: false}}
"""
BAD_YAML = {
    "octal": (("r: 2", "r: 010"), "run.yaml:4:11: 010: an integer with a leading zero is ambiguous (octal to YAML "
                                  "1.1, decimal to YAML 1.2); allowed: 10 (decimal), or 0o10 (octal)"),
    "base 60": (("max_steps: 2", "max_steps: 1:30"), "[train] max_steps = '1:30' (str): expected an integer >= 1"),
    "repeated key": (("r: 2", "r: 2, r: 4"), "run.yaml:4:14: duplicate key 'r' (first at line 4); each key may "
                                             "appear once in a table"),
    "repeated section": (("progress: false}}", "progress: false}}\ntrain: {{max_steps: 3}}"),
                         "run.yaml:6:1: duplicate key 'train' (first at line 5)"),
    "yes is a string": (("r: 2", "r: 2, use_rslora: yes"),
                        "[lora] use_rslora = 'yes' (str): expected true or false (a boolean, not a string)"),
    "key not a string": (("n: 64", "n: 64, 3: x"), "run.yaml:3:49: key 3 (int) is not a string"),
    "syntax": (("[fc1, fc2]", "[fc1, fc2"), "run.yaml:4:51: not valid YAML: while parsing a flow sequence: "
                                            "expected ',' or ']', but got '}'"),
    "unclosed quote": (("progress: false", 'progress: "false'), "run.yaml:6:1: not valid YAML: while scanning a "
                                                                "quoted scalar: found unexpected end of stream"),
    "no max_steps": (("max_steps: 2, ", ""), "[train] max_steps is missing; allowed: an integer >= 1"),
    "python tag": (("n: 64", "n: !!python/object:os.system 64"),
                   "run.yaml:3:45: not valid YAML: could not determine a constructor for the tag "
                   "'tag:yaml.org,2002:python/object:os.system'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_yaml_quirks_and_errors_are_one_line_naming_the_place(tmp_path, capsys, case):
    (old, new), message = BAD_YAML[case]
    assert old in YAML
    code = main(["train", write(tmp_path, tmp_path / "out", YAML.replace(old, new, 1), "run.yaml")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 2, err
    assert not (tmp_path / "out").exists()


def test_yaml_numbers_follow_yaml_1_2(tmp_path):
    text = YAML.replace("max_steps: 2", "max_steps: 0x10, lr: 1e-3, weight_decay: 0.5e-2, seed: 0o17, save_every: +3")
    cfg = read_config(write(tmp_path, tmp_path / "out", text, "run.yaml"))
    train = cfg["train"]
    assert (train["max_steps"], train["lr"], train["weight_decay"], train["seed"], train["save_every"]) == \
        (16, 0.001, 0.005, 15, 3)  # fmt: skip
    assert isinstance(train["lr"], float) and cfg["lora"]["target_modules"] == ["fc1", "fc2"]
    merged = "a: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}"  # a merged key may be overridden: not a repeated key
    assert load_yaml(tmp_path / "m.yaml", merged) == {"a": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}


# ------------------------------------------------------------------------------ out_dir before anything runs
def test_a_batch_larger_than_the_data_is_refused_before_out_dir_is_made(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", write(tmp_path, out, TOML.replace("batch_size = 8", "batch_size = 1000"))])
    err = capsys.readouterr().err
    assert code == 2
    assert "[train] batch_size = 1000 needs 1000 examples per step, and the data holds 64; allowed: at most 64" in err
    assert not out.exists()
    assert main(["train", write(tmp_path, out)]) == 0, "the corrected rerun is not blocked"


def test_an_empty_metrics_file_is_no_earlier_run_but_recorded_steps_are(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert main(["train", write(tmp_path, out)]) == 0
    assert metric_steps(out) == [1, 2, 3, 4]
    shutil.rmtree(out / "checkpoints")  # a run killed before its first checkpoint: its metrics still count
    assert main(["train", write(tmp_path, out)]) == 2
    assert f"out_dir {str(out)!r} holds an earlier run (metrics.jsonl); resume it" in capsys.readouterr().err
    assert main(["train", write(tmp_path, out), "--resume"]) == 0
    assert metric_steps(out) == [1, 2, 3, 4]


BAD_LAYOUT = {
    "checkpoints is a file": ("checkpoints", "{out}/checkpoints is not a folder (a run keeps its checkpoints there); "
                                             "remove it, or train into another out_dir"),
    "metrics is a folder": ("metrics.jsonl/", "{out}/metrics.jsonl is not a file (a run keeps its metrics.jsonl "
                                              "there); remove it"),
    "adapter is a file": ("adapter", "{out}/adapter is a file, where the run writes its adapter folder; remove it, "
                                     "or choose another out_dir"),
    "out_dir is a file": ("", "out_dir '{out}' is a file; allowed: a folder, existing or to be created"),
    "out_dir under a file": ("/sub", "out_dir '{out}/sub': {out} is a file, not a folder; allowed: a path under a "
                                     "folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LAYOUT))
@pytest.mark.parametrize("flag", ["", "--resume"])
def test_an_out_dir_that_cannot_hold_a_run_is_refused_before_training(tmp_path, capsys, case, flag):
    name, message = BAD_LAYOUT[case]
    out = tmp_path / "out"
    if name.startswith("/"):  # out_dir below a file
        out.write_text("a file")
        target = Path(f"{out}{name}")
    else:
        target = out
        out.parent.mkdir(exist_ok=True)
        if name:
            out.mkdir()
        bad = out / name.rstrip("/") if name else out
        bad.mkdir() if name.endswith("/") else bad.write_text("not a run's")
    before = snapshot(tmp_path)
    code = main(["train", write(tmp_path, target), *([flag] if flag else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.format(out=out) in err and err.count("\n") == 2
    assert snapshot(tmp_path) == {**before, "run.toml": (tmp_path / "run.toml").read_bytes()}, "nothing was written"


def test_overwrite_replaces_a_checkpoints_file_and_an_adapter_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("x")
    (out / "adapter").write_text("x")
    assert main(["train", write(tmp_path, out), "--overwrite"]) == 0
    assert (out / "checkpoints" / "step-00000004").is_dir() and (out / "adapter" / "adapter_config.json").is_file()
