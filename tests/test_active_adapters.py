"""Several active adapters at once (PEFT's ``set_adapter([a, b])``): outputs summed, all trained,
merged together; equal to PEFT on the same saved adapters."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk

from .conftest import SeedMLP
from .tolerance import assert_close

peft = pytest.importorskip("peft")


def _two_adapters() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    base = SeedMLP().eval()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4.0, target_modules=["fc1", "fc2"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=3, alpha=3.0, target_modules=["fc2", "fc3"], lora_bias=True), "b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return base, model


def test_active_adapters_sum_train_and_merge_together():
    _, model = _two_adapters()
    x = torch.randn(4, 784, generator=torch.Generator().manual_seed(2))
    lk.set_adapter(model, ["a", "b"])
    assert lk.active_adapters(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora_" in n}
    with torch.no_grad():
        both = model(x)
        h1 = torch.relu(model.fc1(x))  # written out: each layer adds every active adapter present on it
        fc2 = model.fc2.base_layer(h1) + model.fc2.low_rank(h1, "a") + model.fc2.low_rank(h1, "b")
        fc3 = model.fc3.base_layer(torch.relu(fc2)) + model.fc3.low_rank(torch.relu(fc2), "b")
        assert_close(both, fc3, reduction=784, depth=4)
        lk.merge(model)
        assert model.fc2.merged_adapters == ["a", "b"]
        assert_close(model(x), both, reduction=784, depth=6)
        lk.unmerge(model)
        lk.set_adapter(model, "a")  # back to one: b no longer runs
        assert model.fc2.also_active == () and lk.active_adapters(model) == ["a"]
    assert not model.fc3.lora_B["b"].requires_grad


def test_active_adapters_equal_peft(tmp_path):
    base, model = _two_adapters()
    for name in ("a", "b"):
        lk.save_adapter(model, tmp_path / name, name=name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.base_model.set_adapter(["a", "b"])
    theirs.eval()
    lk.set_adapter(model, ["a", "b"])
    x = torch.randn(4, 784, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(model(x), theirs(x), reduction=784, depth=6)


def test_bad_lists_are_refused_by_name():
    _, model = _two_adapters()
    with pytest.raises(lk.InputError, match="non-empty list of distinct names"):
        lk.set_adapter(model, ["a", "a"])
    with pytest.raises(lk.InputError, match="non-empty list"):
        lk.set_adapter(model, [])
    with pytest.raises(KeyError, match="'c'"):
        lk.set_adapter(model, ["a", "c"])
    assert lk.active_adapters(model) == ["a"]
    other = SeedMLP()
    lk.inject(other, lk.LoraConfig(r=2, target_modules=["fc1"]), name="a")
    lk.add_adapter(other, lk.LoraConfig(r=2, target_modules=["fc2"], use_dora=True), "d")
    with pytest.raises(lk.InputError, match=r"\['d'\] use DoRA, modules_to_save or trainable tokens"):
        lk.set_adapter(other, ["a", "d"])
    assert lk.active_adapters(other) == ["a"]
