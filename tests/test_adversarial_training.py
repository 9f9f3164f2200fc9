"""Training runs under attack, through ``lorakit train``: a run is a pure function of its recipe
(the same recipe twice, in two processes, gives the same bits), ``kill -9`` mid-checkpoint and
resume ends bit-identical to an uninterrupted run, and a resume onto another base is refused.
Three kinds of base: a factory drawing random weights, ``hf_config`` (random weights) and
``hf_pretrained`` (a tiny GPT-2 saved to a folder). Children fork from a server that imported
torch and transformers once (``tests.helpers.train_worker.Child``); their output is a file, not a
terminal, so no carriage-return progress bar may appear in it."""

from __future__ import annotations

import json
import logging
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit.cli import main
from lorakit.recipes import run

from .helpers.train_worker import Child

RECIPE = """
out_dir = "{out}"
{model}
[lora]
r = 4
alpha = 8.0
dropout = 0.1
target_modules = {targets}
[train]
max_steps = {steps}
batch_size = 8
lr = 0.01
save_every = 4
keep_last = 2
log_every = 1
seed = {seed}
"""
MODELS = {
    "seed_mlp": ('[model]\nfactory = "tests.helpers.train_worker:seed_mlp"\n'
                 '[data]\nfactory = "tests.helpers.train_worker:vectors"\nn = 128', '["fc1", "fc2", "fc3"]'),
    "hf_config": ('[model]\nhf_config = "{tmp}/tiny-gpt2/config.json"\n'
                  '[data]\nkind = "text"\nfiles = "{tmp}/corpus.txt"\nseq = 16', '["c_attn", "c_fc"]'),
    "hf_pretrained": ('[model]\nhf_pretrained = "{tmp}/tiny-gpt2"\n'
                      '[data]\nkind = "text"\nfiles = "{tmp}/corpus.txt"\nseq = 16', '["c_attn", "c_fc"]'),
}  # fmt: skip
KINDS = list(MODELS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny GPT-2 folder (config and weights) and a text corpus, shared by the recipes."""
    tmp = tmp_path_factory.mktemp("assets")
    child = Child("tiny_gpt2", [str(tmp / "tiny-gpt2")], tmp / "tiny.log")
    assert child.wait() == 0, child.output()
    (tmp / "corpus.txt").write_text(" ".join(f"word{i * 7 % 41}" for i in range(2000)))
    return tmp


def recipe(assets: Path, folder: Path, kind: str, steps: int = 24, seed: int = 0) -> Path:
    model, targets = MODELS[kind]
    text = RECIPE.format(out=folder / "out", model=model.format(tmp=assets), targets=targets, steps=steps, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.toml").write_text(text)
    return folder / "run.toml"


def train(cfg: Path, log: Path, *flags: str, env: dict[str, str] | None = None) -> Child:
    return Child("cli", ["train", str(cfg), *flags], log, env)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want) and want
    for key in want:
        assert torch.equal(got[key], want[key]), key


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def no_carriage_returns(*children: Child) -> None:
    for child in children:
        assert "\r" not in child.output(), f"a progress bar wrote carriage returns into {child.log}"


# ------------------------------------------------------------------------------ a run is a pure function
@pytest.mark.parametrize("kind", KINDS)
def test_same_recipe_twice_in_two_processes_is_bit_identical(tmp_path, assets, kind):
    cfgs = [recipe(assets, tmp_path / name, kind, steps=4, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    children = [train(cfg, cfg.parent / "log.txt") for cfg in cfgs]
    for child in children:
        assert child.wait() == 0, child.output()
    no_carriage_returns(*children)
    assert "train: step 4/4 loss" in children[0].output()  # plain periodic lines instead of a bar
    a, b, c = (adapter(cfg.parent / "out") for cfg in cfgs)
    assert_same_bits(b, a)
    assert all(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k), "[train] seed must seed the adapter's init"
    fingerprints = [json.loads((cfg.parent / "out/checkpoints/step-00000004/trainer.json").read_text())["base"]
                    for cfg in cfgs]  # fmt: skip
    assert fingerprints[0] == fingerprints[1]
    assert (fingerprints[0] != fingerprints[2]) == (kind != "hf_pretrained"), "random bases follow the seed"


def test_a_recipe_run_in_process_leaves_the_callers_generators_alone(tmp_path, assets):
    """Two calls in this process and one in a child give the same bits; torch's, Python's and
    NumPy's global generators are where the caller left them."""
    cfg = recipe(assets, tmp_path / "a", "seed_mlp", steps=4)
    child = train(recipe(assets, tmp_path / "b", "seed_mlp", steps=4), tmp_path / "b.log")
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: same kernels, same bits
    try:
        run(cfg)
        first = adapter(tmp_path / "a" / "out")
        run(cfg, overwrite=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert_same_bits(adapter(tmp_path / "a" / "out"), first)
    assert child.wait() == 0, child.output()
    assert_same_bits(adapter(tmp_path / "b" / "out"), first)


# ------------------------------------------------------------------------------ kill -9 and resume
@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_mid_checkpoint_then_resume_is_bit_identical(tmp_path, assets, kind):
    reference = train(recipe(assets, tmp_path / "reference", kind), tmp_path / "reference.log")
    cfg = recipe(assets, tmp_path / "killed", kind)
    out = cfg.parent / "out"
    ckpts = out / "checkpoints"
    children = []
    # Kill 1: while step 8's checkpoint is half written (its files written, not yet sealed).
    # Kill 2: the resumed run, while step 16's is. The pause starts only once the files are there.
    for attempt, (step, resumed_from) in enumerate([(8, None), (16, 4)]):
        notify = tmp_path / f"pause-{attempt}.txt"
        env = {"LORAKIT_TEST_PAUSE_IN_SAVE": f"60@{step}", "LORAKIT_TEST_PAUSE_NOTIFY": str(notify)}
        child = train(cfg, tmp_path / f"kill-{attempt}.log", *(["--resume"] if attempt else []), env=env)
        child.kill_when(lambda n=notify, s=step: n.exists() and n.read_text() == f"{s}\n")
        children.append(child)
        half = list(ckpts.glob(f".step-{step:08d}.tmp-*"))
        assert len(half) == 1 and (half[0] / "trainer_state.pt").is_file(), "the kill must land mid-checkpoint"
        assert not (ckpts / f"step-{step:08d}").exists()
        assert (ckpts / f"step-{step - 4:08d}").is_dir()
        assert metric_steps(out)[-1] >= step
        if resumed_from:
            assert re.search(rf"resumed from \S+step-{resumed_from:08d} \(step {resumed_from}\)", child.output())
    final = train(cfg, tmp_path / "final.log", "--resume")
    assert final.wait() == 0, final.output()
    assert reference.wait() == 0, reference.output()
    children += [final, reference]
    no_carriage_returns(*children)
    assert re.search(r"resumed from \S+step-00000012 \(step 12\)", final.output()), final.output()[-2000:]
    assert_same_bits(adapter(out), adapter(tmp_path / "reference" / "out"))
    newest = load_file(ckpts / "step-00000024" / "adapter_model.safetensors")
    assert_same_bits(newest, adapter(out))
    # one run's worth of files: each step's metrics once, the last keep_last checkpoints, no temp folders
    assert metric_steps(out) == list(range(1, 25)) == metric_steps(tmp_path / "reference" / "out")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000020", "step-00000024"]


# ------------------------------------------------------------------------------ another base
def test_resume_refuses_a_different_base(tmp_path, assets, capsys):
    """The recipe's record names a changed seed; the base's fingerprint, weights that changed under
    the same path; a refused resume changes nothing, and the unchanged base resumes."""
    from lorakit.recipes import build_model, stage_seed

    with torch.random.fork_rng():
        torch.manual_seed(stage_seed(0, "model"))
        state = {k: v.clone() for k, v in build_model({"factory": "tests.helpers.train_worker:seed_mlp"})[0]
                 .state_dict().items()}  # fmt: skip
    weights = tmp_path / "base.safetensors"
    save_file(state, str(weights))
    cfg = recipe(assets, tmp_path, "seed_mlp", steps=8)
    cfg.write_text(cfg.read_text().replace(':seed_mlp"', f':seed_mlp"\nweights = "{weights}"'))
    out = tmp_path / "out"
    assert main(["train", str(cfg)]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    cfg.write_text(cfg.read_text().replace("seed = 0", "seed = 1"))  # the seed draws the adapter's init
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "step-00000008 was trained from another recipe ([train] seed 0 -> 1)" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().replace("seed = 1", "seed = 0"))
    save_file({**state, "fc2.weight": state["fc2.weight"] + (torch.arange(256) == 0).float()}, str(weights))
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the frozen base is not the one" in err and "step-00000008 was trained on" in err
    assert "1 of 6 frozen tensors differ: fc2.base_layer.weight has other values" in err
    after = sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "metrics.jsonl").read_text()
    assert after == before, "a refused resume changes nothing"
    save_file(state, str(weights))  # the unchanged weights resume, for longer
    cfg.write_text(cfg.read_text().replace("max_steps = 8", "max_steps = 12"))
    with pytest.warns(UserWarning, match=r"other settings than it was trained with \(max_steps 8 -> 12\)"):
        assert main(["train", str(cfg), "--resume"]) == 0
    assert metric_steps(out) == list(range(1, 13))


def test_text_outside_the_models_vocabulary_is_refused(tmp_path, assets):
    """Bytes (ids up to 255) into a model with 100 tokens: a clear recipe error, not an index error
    deep inside the embedding."""
    config = json.loads((assets / "tiny-gpt2" / "config.json").read_text())
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    cfg = recipe(assets, tmp_path, "hf_config", steps=2)
    cfg.write_text(cfg.read_text().replace(str(assets / "tiny-gpt2"), str(tmp_path / "small")))
    child = train(cfg, tmp_path / "log.txt")
    assert child.wait() == 2
    assert "[data]: token id 119 (bytes, ids 0-255) does not fit the model's vocabulary of 100" in child.output()


# ------------------------------------------------------------------------------ lk.Trainer's arguments
X = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))


def adapted() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    return model


def trainer(tmp_path: Path, loss_fn=lambda m, b: m(b).pow(2).mean(), model=None, **settings) -> lk.Trainer:
    config = lk.TrainerConfig(out_dir=str(tmp_path / "out"), **{"max_steps": 2, "batch_size": 8, "progress": False,
                                                               **settings})  # fmt: skip
    return lk.Trainer(model or adapted(), loss_fn, lambda idx: X[idx], 64, config)


BAD_ARGUMENTS = {
    "num_examples a string": ({"num_examples": "64"}, "Trainer: num_examples = '64' (str): expected an integer >= 1"),
    "num_examples a float": ({"num_examples": 64.0}, "Trainer: num_examples = 64.0 (float): expected an integer >= 1"),
    "num_examples a bool": ({"num_examples": True}, "Trainer: num_examples = True (bool): expected an integer >= 1"),
    "config a dict": ({"config": {"out_dir": "x", "max_steps": 2}}, "Trainer: config = {'max_steps': 2, 'out_dir': "
                      "'x'} (dict): expected a lorakit.TrainerConfig: build one with TrainerConfig(**config)"),
    "collate None": ({"collate": None}, "Trainer: collate = None (NoneType): expected a callable collate(indices) "
                     "-> batch"),
    "loss_fn a string": ({"loss_fn": "mse"}, "Trainer: loss_fn = 'mse' (str): expected a callable loss_fn(model, "
                         "batch) -> scalar loss tensor"),
    "eval_fn a dict": ({"eval_fn": {}}, "Trainer: eval_fn = {} (dict): expected a callable eval_fn(model)"),
    "model a state dict": ({"model": {"w": 1}}, "Trainer: model = {'w': 1} (dict): expected a torch.nn.Module"),
    "nothing trainable": ({"model": nn.Linear(4, 4).requires_grad_(False)},
                          "Trainer: the model has no trainable parameters (every requires_grad is False)"),
    "batch larger than the data": ({"num_examples": 6}, "TrainerConfig.batch_size = 8 needs 8 examples per step, and "
                                   "the data holds 6; allowed: at most 6"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_trainer_arguments_are_refused_at_construction(tmp_path, case):
    changes, message = BAD_ARGUMENTS[case]
    config = lk.TrainerConfig(out_dir=str(tmp_path / "out"), max_steps=2, batch_size=8, progress=False)
    args = {"model": adapted(), "loss_fn": lambda m, b: m(b).sum(), "collate": lambda idx: X[idx], "num_examples": 64,
            "config": config, **changes}  # fmt: skip
    with pytest.raises(lk.ArgumentTypeError) as caught:
        lk.Trainer(**args)
    assert str(caught.value).startswith(message), str(caught.value)
    assert isinstance(caught.value, lk.InputError) and isinstance(caught.value, TypeError)
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_is_a_file_is_refused_at_construction(tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(lk.InputError, match=r"^out_dir '.*out' is a file; allowed: a folder, existing or to be "
                       "created$"):  # fmt: skip
        trainer(tmp_path)


BAD_LOSSES = {
    "a vector": (lambda m, b: m(b).pow(2).mean(0), "got a tensor of shape [4] at step 1 (reduce it, e.g. .mean())"),
    "a float": (lambda m, b: 0.5, "got float 0.5 at step 1"),
    "None": (lambda m, b: None, "got NoneType None at step 1"),
    "detached": (lambda m, b: m(b).pow(2).mean().detach(), "got a tensor that does not require grad at step 1 "
                 "(detached, computed under torch.no_grad(), or depending on no trainable parameter)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LOSSES))
def test_a_loss_that_cannot_train_is_refused_at_the_first_step(tmp_path, case):
    loss_fn, message = BAD_LOSSES[case]
    with pytest.raises(lk.ArgumentTypeError) as caught:
        trainer(tmp_path, loss_fn).train()
    assert str(caught.value) == f"loss_fn must return a scalar tensor with a gradient; {message}"
    assert list((tmp_path / "out").iterdir()) == [], "no metrics, no checkpoint"


def test_a_model_without_an_adapter_says_what_trains(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lorakit.trainer_checks")
    trainer(tmp_path, model=nn.Sequential(nn.Linear(4, 4)))
    head = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    head[0].requires_grad_(False)
    trainer(tmp_path, model=head)
    assert [r.getMessage() for r in caplog.records] == [
        "Trainer: the model holds no lorakit adapter; training all 20 parameters (full fine-tuning)",
        "Trainer: the model holds no lorakit adapter; training 20 of 40"]  # fmt: skip


def test_a_run_whose_every_step_was_skipped_fails_naming_them(tmp_path):
    calls = {"n": 0}

    def nan_from_the_second(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return m(b).pow(2).mean() * (float("nan") if calls["n"] > 1 else 1.0)

    with pytest.raises(lk.TrainingError, match=r"^every one of the 2 steps of this run \(steps 1-2\) was skipped as "
                       r"non-finite \(on_nonfinite='skip'\): the adapter did not change"):  # fmt: skip
        trainer(tmp_path, lambda m, b: m(b).pow(2).mean() * float("nan"), on_nonfinite="skip").train()
    assert not (tmp_path / "out" / "checkpoints").exists()
    with pytest.warns(UserWarning, match=r"^lorakit: 3 of the 4 steps of this run were skipped as non-finite"):
        result = trainer(tmp_path, nan_from_the_second, on_nonfinite="skip", max_steps=4, overwrite=True).train()
    assert result["step"] == 4 and (tmp_path / "out" / "checkpoints" / "step-00000004").is_dir()


def test_a_warmup_longer_than_the_run_warns_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, warmup_steps=5).train()
    assert [str(w.message) for w in caught] == [
        "lorakit: warmup_steps = 5 exceeds max_steps = 2: the learning rate never reaches lr (it ends at 2/5 of it)"
    ]
