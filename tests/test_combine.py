"""Combining adapters (cat, linear, svd, ties, dare) and the SVD view of updates."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.combine import combine_adapters, effective_rank, singular_values

from .conftest import Mixed, SeedMLP, randomize_adapters
from .models import tiny_gpt2


def _two(model, targets, r1=2, r2=3):
    lk.inject(model, lk.LoraConfig(r=r1, alpha=4.0, target_modules=targets), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=r2, alpha=3.0, target_modules=targets), name="b")
    randomize_adapters(model, scale=0.2)


def _weighted_sum(layer, wa, wb):
    return wa * layer.delta_weight("a") + wb * layer.delta_weight("b")


@pytest.mark.parametrize("build", [SeedMLP, tiny_gpt2, Mixed], ids=["mlp", "gpt2-conv1d", "emb-conv2d"])
def test_cat_and_full_rank_svd_are_exact(build):
    model = build()
    targets = {"SeedMLP": ["fc1", "fc2"], "GPT2LMHeadModel": ["c_attn", "c_fc"], "Mixed": ["emb", "conv", "proj"]}
    _two(model, targets[type(model).__name__])
    errors = combine_adapters(model, ["a", "b"], [0.7, -0.4], "cat", method="cat")
    assert max(errors.values()) < 1e-5
    svd_errors = combine_adapters(model, ["a", "b"], [0.7, -0.4], "svd5", method="svd", rank=5)
    assert max(svd_errors.values()) < 1e-4
    for _, layer in lk.lora_layers(model):
        want = _weighted_sum(layer, 0.7, -0.4)
        torch.testing.assert_close(layer.delta_weight("cat"), want, rtol=1e-4, atol=1e-6)


def test_truncated_svd_error_is_the_tail_energy():
    model = SeedMLP()
    _two(model, ["fc1"], r1=4, r2=4)
    errors = combine_adapters(model, ["a", "b"], [1.0, 1.0], "low", method="svd", rank=3)
    s = singular_values(_weighted_sum(model.fc1, 1.0, 1.0))
    tail = float(torch.sqrt((s[3:] ** 2).sum()) / torch.sqrt((s**2).sum()))
    assert errors["fc1"] == pytest.approx(tail, rel=1e-3)
    assert model.fc1.r["low"] == 3


def test_linear_ties_dare():
    model = SeedMLP()
    _two(model, ["fc1", "fc2"], r1=3, r2=3)
    lin = combine_adapters(model, ["a", "b"], [0.5, 0.5], "lin", method="linear")
    assert all(e >= 0 for e in lin.values()) and model.fc1.r["lin"] == 3
    ties = combine_adapters(model, ["a", "b"], [1.0, 1.0], "ties", method="ties", density=0.3, rank=6)
    dare_full = combine_adapters(model, ["a", "b"], [1.0, 1.0], "dare1", method="dare", density=1.0, rank=6)
    assert max(dare_full.values()) < 1e-4  # keeping everything is the plain sum
    dare = combine_adapters(model, ["a", "b"], [1.0, 1.0], "dare", method="dare", density=0.5, rank=6, seed=1)
    assert all(0 < e < 2 for e in [*ties.values(), *dare.values()])
    with pytest.raises(ValueError, match="equal ranks"):
        m2 = SeedMLP()
        _two(m2, ["fc1"], r1=2, r2=3)
        combine_adapters(m2, ["a", "b"], [1, 1], "x", method="linear")
    with pytest.raises(KeyError, match="unknown adapters"):
        combine_adapters(model, ["a", "zz"], [1, 1], "y")


def test_effective_rank():
    s = torch.tensor([10.0, 1.0, 0.1])
    assert effective_rank(s, 0.9) == 1 and effective_rank(s, 0.999) == 2 and effective_rank(s, 1.0) == 3
