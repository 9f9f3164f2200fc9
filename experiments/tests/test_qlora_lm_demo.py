"""Smoke run of the QLoRA-vs-LoRA language-model demo on real BBC News text."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")


@pytest.mark.usefixtures("bbc_news")
def test_quick_run_writes_results(tmp_path):
    assert main(["demo", "qlora-lm", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["lora"]["trainable_parameters"] == r["qlora"]["trainable_parameters"] > 0
    assert 4.1 < r["qlora"]["bits_per_weight"] < 4.3
    assert r["qlora"]["quantized_linear_bytes"] < r["qlora"]["fp32_linear_bytes"] / 7
    for name in ("base", "lora", "qlora"):
        assert 0 < r[name]["sports_valid_bpb"] < 8.5  # a byte-level model: at most 8 bits per byte at random
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
