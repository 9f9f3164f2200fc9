"""Edges of DoRA, lora biases, grouped convolutions and several active adapters: caches that must
notice every write, merges that are all or nothing, state kept straight by delete and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import InputError

from .conftest import SeedMLP, train_like
from .tolerance import assert_close


def _x(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(4, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", ["lora_B", "base_layer.weight"])
def test_dora_norm_cache_notices_data_assignment(target):
    """``p.data = t`` (torch's vector_to_parameters, lorakit's NF4 store) changes neither the tensor's
    identity nor its version counter: the kept norms must still be recomputed."""
    torch.manual_seed(0)
    model = lk.inject(nn.Sequential(nn.Linear(8, 6)).eval(), lk.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    train_like(model)
    x = _x()
    with torch.no_grad():
        model(x)
        p = dict(model.named_parameters())[f"0.{target}" + (".default" if target == "lora_B" else "")]
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(3))
        kept = model(x)
    layer = model[0]
    W0, A, B = layer.base_layer.weight, layer.lora_A["default"], layer.lora_B["default"]
    direct = torch.linalg.vector_norm(W0 + layer.scaling["default"] * B @ A, dim=1).detach()
    assert_close(layer.weight_norm("default"), direct, reduction=8, depth=3)
    assert_close(kept, model(x).detach(), reduction=8, depth=4)


def test_dora_merge_on_float64_keeps_float64_precision():
    torch.manual_seed(0)
    model = lk.inject(nn.Sequential(nn.Linear(16, 12)).double().eval(),
                      lk.LoraConfig(r=2, target_modules=["0"], use_dora=True))  # fmt: skip
    train_like(model)
    x, w0 = _x(16).double(), model[0].base_layer.weight.detach().clone()
    with torch.no_grad():
        want = model(x)
        lk.merge(model)
        assert_close(model(x), want, reduction=16, depth=6)
        lk.unmerge(model)
    assert_close(model[0].base_layer.weight, w0, reduction=16, magnitude=4 * float(w0.abs().max()), depth=4)


def _two_active(bias_on_b: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False)).eval()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]), name="a")
    if bias_on_b:
        with pytest.warns(UserWarning, match="lora_bias on a Linear without a bias"):
            lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["0"], lora_bias=True), "b")
    else:
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["0"]), "b")
    train_like(model)
    lk.set_adapter(model, ["a", "b"])
    return model


def test_a_refused_merge_inside_one_layer_merges_nothing():
    model = _two_active()
    x = _x()
    w0 = model[0].base_layer.weight.detach().clone()
    with torch.no_grad():
        want = model(x)
    with pytest.raises(RuntimeError, match="'b' has a lora bias but the base layer has no bias"):
        lk.merge(model)
    assert not lk.is_merged(model) and torch.equal(model[0].base_layer.weight, w0)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_dequantizing_merge_and_unload_merges_every_active_adapter_and_lora_bias():
    torch.manual_seed(0)
    model = lk.quantize(nn.Sequential(nn.Linear(64, 64)).eval())
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["0"], lora_bias=True), "b")
    train_like(model)
    lk.set_adapter(model, ["a", "b"])
    x = _x(64)
    with torch.no_grad():
        want = model(x)
        lk.merge_and_unload(model, dequantize=True)
        assert type(model[0]) is nn.Linear
        assert_close(model(x), want, reduction=64, depth=6)


def test_a_refused_dequantizing_merge_leaves_the_4bit_bases():
    torch.manual_seed(0)
    model = lk.quantize(nn.Sequential(nn.Linear(64, 64, bias=False)).eval())
    with pytest.warns(UserWarning, match="without a bias"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    with pytest.raises(RuntimeError, match="no bias to merge it into"):
        lk.merge_and_unload(model, dequantize=True)
    assert lk.quantization.is_linear4bit(model[0].base_layer) and not lk.is_merged(model)


def test_trainer_refuses_several_active_adapters(tmp_path):
    model = _two_active(bias_on_b=False)
    config = lk.TrainerConfig(out_dir=str(tmp_path), max_steps=1, batch_size=2)
    with pytest.raises(InputError, match=r"runs several adapters at once \(also \['b'\]"):
        lk.Trainer(model, lambda m, b: m(b).sum(), lambda rows: _x()[rows], 4, config)


def test_loading_tensors_into_a_merged_adapter_is_refused(tmp_path):
    torch.manual_seed(0)
    model = lk.inject(SeedMLP().eval(), lk.LoraConfig(r=2, target_modules=["fc1"]))
    train_like(model)
    lk.save_adapter(model, tmp_path)
    lk.merge(model)
    with pytest.raises(lk.AdapterLoadError, match="'default' is merged into the base weights"):
        lk.checkpoint.load_adapter_tensors(model, tmp_path)


def test_a_forward_hook_on_the_base_layer_sees_the_base_output():
    torch.manual_seed(0)
    for dora in (False, True):
        model = lk.inject(nn.Sequential(nn.Linear(8, 6)).eval(), lk.LoraConfig(r=2, target_modules=["0"],
                                                                                use_dora=dora))  # fmt: skip
        train_like(model)
        seen = []
        model[0].base_layer.register_forward_hook(lambda mod, i, o, seen=seen: seen.append(o))
        x = _x()
        with torch.no_grad():
            y = model(x)
            assert torch.equal(seen[0], model[0].base_layer(x)) and not torch.equal(seen[0], y)


def test_deleting_one_of_several_active_adapters_keeps_the_others_in_order():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["1"]), name="b")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["0"]), "a")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["0", "1"]), "c")
    lk.set_adapter(model, ["a", "b", "c"])
    assert lk.active_adapters(model) == ["a", "b", "c"]
    lk.delete_adapter(model, "a")
    assert lk.active_adapters(model) == ["b", "c"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_" in n
    }
    lk.delete_adapter(model, "b")
    lk.delete_adapter(model, "c")
    assert lk.active_adapters(model) == [] and type(model[0]) is nn.Linear


@pytest.mark.parametrize("name", ["eval", "train", "keys", "to", "training"])
def test_adapter_names_that_are_dict_methods_are_refused(name):
    model = SeedMLP()
    with pytest.raises(InputError, match=f"name = '{name}' is the name of a method"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1"]), name=name)
    assert not list(lk.lora_layers(model))


def test_load_errors_name_the_variant_mismatch_and_unsupported_layers(tmp_path):
    torch.manual_seed(0)
    plain = lk.inject(SeedMLP(), lk.LoraConfig(r=2, target_modules=["fc1"]))
    dora = lk.inject(copy.deepcopy(SeedMLP()), lk.LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    lk.save_adapter(dora, tmp_path / "dora")
    with pytest.raises(lk.AdapterLoadError, match=r"module 'fc1': it holds lora adapters \['default'\] and this file "
                                                  "is a dora adapter"):  # fmt: skip
        lk.load_adapter(plain, tmp_path / "dora", name="d")
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(copy.deepcopy(grouped), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    theirs.save_pretrained(tmp_path / "grouped")
    with pytest.raises(lk.AdapterLoadError, match=r"module '0': .*DoRA on a grouped convolution \(groups=2\)"):
        lk.load_adapter(copy.deepcopy(grouped), tmp_path / "grouped")
    odd = peft.get_peft_model(copy.deepcopy(grouped), peft.LoraConfig(r=4, target_modules=["0"]))
    odd.save_pretrained(tmp_path / "odd")
    config = (tmp_path / "odd" / "adapter_config.json")
    config.write_text(config.read_text().replace('"r": 4', '"r": 3'))
    with pytest.raises(lk.AdapterLoadError, match="rank 3 is not divisible by the convolution's groups=2"):
        lk.load_adapter(copy.deepcopy(grouped), tmp_path / "odd")


def test_combining_adapters_on_a_grouped_convolution_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    config = lk.LoraConfig(r=2, target_modules=["0"])
    lk.inject(model, config)
    lk.add_adapter(model, config, "other")
    for method in ("cat", "linear", "svd"):
        with pytest.raises(lk.InputError, match=r"'0' is a grouped convolution \(groups=2\)"):
            lk.combine_adapters(model, ["default", "other"], [1.0, 1.0], "mix", method=method)
    assert sorted(lk.adapter_configs(model)) == ["default", "other"]
