"""Selective tuning and sequential bottleneck adapters: same calls, honest limits."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.family import (
    BottleneckConfig,
    SelectiveConfig,
    inject_bottleneck,
    load_bottleneck,
    load_selected,
    merge_bottleneck,
    save_bottleneck,
    save_selected,
    select_trainable,
)

from .conftest import SeedMLP


def test_bitfit_and_head_only_counts():
    model = SeedMLP()
    names = select_trainable(model, SelectiveConfig(mode="bias"))
    assert names == ["fc1.bias", "fc2.bias", "fc3.bias"]
    assert lk.count_parameters(model).trainable == 256 + 128 + 10
    select_trainable(model, SelectiveConfig(mode="head", head="fc3"))
    assert lk.count_parameters(model).trainable == 128 * 10 + 10
    with pytest.raises(ValueError, match="'fc9'"):
        select_trainable(model, SelectiveConfig(mode="head", head="fc9"))


def test_selective_save_load(tmp_path):
    model = SeedMLP()
    select_trainable(model, SelectiveConfig(mode="modules", modules=["fc2"]))
    with torch.no_grad():
        model.fc2.weight.add_(1.0)
    save_selected(model, tmp_path)
    other = SeedMLP()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc2")}, strict=False)
    load_selected(other, tmp_path)
    x = torch.randn(3, 784)
    assert torch.equal(other(x), model(x))
    assert json.loads((tmp_path / "selective_config.json").read_text())["mode"] == "modules"


def test_bottleneck_starts_as_identity_trains_only_itself_and_refuses_merge(tmp_path):
    torch.manual_seed(0)
    model = SeedMLP()
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    before = model(x)
    inject_bottleneck(model, BottleneckConfig(target_modules=["fc1", "fc2"], bottleneck=16))
    assert torch.equal(model(x), before)
    counts = lk.count_parameters(model)
    assert counts.trainable == (256 * 16 + 16 + 16 * 256 + 256) + (128 * 16 + 16 + 16 * 128 + 128) == 12_704
    assert counts.base == 235_146
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model(x), before)
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_bottleneck(model)
    save_bottleneck(model, tmp_path)
    torch.manual_seed(0)
    other = load_bottleneck(SeedMLP(), tmp_path)
    assert torch.equal(other(x), model(x))


def test_selective_numbered_layers():
    from .models import tiny_gpt2

    model = tiny_gpt2()
    n_layers = model.config.n_layer
    last = n_layers - 1
    names = select_trainable(model, SelectiveConfig(mode="layers", layers=[last]))
    assert names and all(n.startswith(f"transformer.h.{last}.") for n in names)
    per_layer = sum(p.numel() for p in model.transformer.h[last].parameters())
    assert lk.count_parameters(model).trainable == per_layer
    # layers narrow bias and modules too
    names = select_trainable(model, SelectiveConfig(mode="bias", layers=[0]))
    assert names and all(n.startswith("transformer.h.0.") and n.endswith("bias") for n in names)
    names = select_trainable(model, SelectiveConfig(mode="modules", modules=["c_attn"], layers=[0, last]))
    assert sorted({n.split(".")[2] for n in names}) == sorted({"0", str(last)})
    assert all(".c_attn." in n for n in names)
    with pytest.raises(ValueError, match=rf"layers \[7\] not found.*\[0, .*{last}\]"):
        select_trainable(model, SelectiveConfig(mode="layers", layers=[7, 0]))
    with pytest.raises(ValueError, match="layer indices"):
        SelectiveConfig(mode="layers", layers=["h.0"])
    with pytest.raises(ValueError, match=r"layers = None with mode='layers'; allowed: layer indices.*\(required\)"):
        SelectiveConfig(mode="layers")
