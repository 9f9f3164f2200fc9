"""PEFT's ``lora_bias`` (a trained bias on B) beyond the parity grid: where it is refused, and
that a refused merge leaves every layer unmerged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import Mixed, SeedMLP


def test_lora_bias_adds_the_scaled_bias_and_merges_it_into_the_base_bias():
    torch.manual_seed(0)
    model = SeedMLP().eval()
    lk.inject(model, lk.LoraConfig(r=2, alpha=6.0, target_modules=["fc3"], lora_bias=True))
    layer = model.fc3
    assert layer.lora_bias["default"].requires_grad and not layer.lora_bias["default"].any()
    with torch.no_grad():
        layer.lora_bias["default"].copy_(torch.arange(10.0))
        h = torch.randn(3, 128)
        want = layer.base_layer(h) + layer.low_rank(h, "default")
        # y = base(h) + s·(B A h + b_B) with s = 6 / 2 and B = 0: exactly 3·b_B on top of the base
        assert torch.equal(layer(h) - layer.base_layer(h), want - layer.base_layer(h))
        torch.testing.assert_close(layer(h) - layer.base_layer(h), 3 * torch.arange(10.0).expand(3, 10))
        bias = layer.base_layer.bias.clone()
        lk.merge(model)
        torch.testing.assert_close(layer.base_layer.bias, bias + 3 * torch.arange(10.0))
        lk.unmerge(model)
        torch.testing.assert_close(layer.base_layer.bias, bias)


def test_lora_bias_is_refused_on_embeddings_and_with_dora():
    torch.manual_seed(0)
    model = Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lora_bias is not supported on LoraEmbedding"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["emb", "proj"], lora_bias=True))
    assert not list(lk.lora_layers(model)) and set(model.state_dict()) == set(before)
    with pytest.raises(ValueError, match="lora_bias=True with use_dora=True is not supported"):
        lk.LoraConfig(target_modules=["proj"], lora_bias=True, use_dora=True)


def test_a_refused_merge_leaves_every_layer_unmerged():
    """fc1 can merge; fc2 has no base bias to take its lora bias: merge raises and fc1 is unmerged again."""
    torch.manual_seed(0)
    model = SeedMLP()
    model.fc2 = nn.Linear(256, 128, bias=False)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1", "fc2"], lora_bias=True))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora_B["default"].normal_()
    w1 = model.fc1.base_layer.weight.clone()
    with pytest.raises(RuntimeError, match="has a lora bias but the base layer has no bias"):
        lk.merge(model)
    assert not lk.is_merged(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, w1, rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="adapters with a lora bias cannot be mixed per row"):
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["fc1", "fc2"]), "plain")
        with lk.route(model, ["default", "plain"]):
            model(torch.randn(2, 784))
