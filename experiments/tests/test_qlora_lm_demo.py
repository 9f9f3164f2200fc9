"""Smoke run of the QLoRA-vs-LoRA language-model demo on real BBC News text."""

from __future__ import annotations

import json
import math

import pytest

from lorakit.cli import main

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")


def _nf4_bytes(n: int) -> int:
    """Bytes of ``n`` weights in NF4 with double quantization: 4 bits each, an 8-bit absmax per block of
    64, an fp32 absmax per 256 of those, the 256-entry fp32 code of the second level and its offset."""
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4


@pytest.mark.usefixtures("bbc_news")
def test_quick_run_writes_results(tmp_path):
    assert main(["demo", "qlora-lm", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    d, ff, layers, r_ = 256, 688, 4, 8  # the demo's byte-level Llama: hidden, MLP width, blocks; LoRA rank
    block = [(d, d)] * 4 + [(d, ff), (d, ff), (ff, d)]  # (in, out) of q, k, v, o, gate, up, down
    assert r["parameters"] == 256 * d + layers * (sum(i * o for i, o in block) + 2 * d) + d  # tied embeddings
    assert r["lora"]["trainable_parameters"] == r["qlora"]["trainable_parameters"]
    assert r["lora"]["trainable_parameters"] == layers * sum(r_ * (i + o) for i, o in block)  # all-linear, no head
    weights = layers * sum(i * o for i, o in block)
    assert r["qlora"]["fp32_linear_bytes"] == 4 * weights
    assert r["qlora"]["quantized_linear_bytes"] == layers * sum(_nf4_bytes(i * o) for i, o in block)
    assert r["qlora"]["bits_per_weight"] == pytest.approx(8 * r["qlora"]["quantized_linear_bytes"] / weights, rel=1e-12)
    # 20 pretraining steps already beat guessing bytes uniformly (8 bits per byte) by far; the fine-tuning
    # gains of 10 quick steps (about 0.004 bits) are too small to assert
    for name in ("base", "lora", "qlora"):
        assert 0 < r[name]["sports_valid_bpb"] < 8
    assert r["qlora_minus_lora_bpb"] == r["qlora"]["sports_valid_bpb"] - r["lora"]["sports_valid_bpb"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
