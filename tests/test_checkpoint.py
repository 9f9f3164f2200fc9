"""Saving and loading adapters: format, round trips, and every way a file can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk

from .conftest import Mixed, SeedMLP, randomize_adapters


def _trained_mlp(**cfg) -> SeedMLP:
    torch.manual_seed(0)
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2", "fc3"], **cfg))
    randomize_adapters(model)
    return model


def test_file_holds_only_adapter_tensors(tmp_path):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 6_248
    assert set(tensors) == {f"base_model.model.fc{i}.lora_{ab}.weight" for i in (1, 2, 3) for ab in "AB"}
    assert tensors["base_model.model.fc1.lora_A.weight"].shape == (4, 784)
    assert tensors["base_model.model.fc1.lora_B.weight"].shape == (256, 4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["fc1", "fc2", "fc3"]
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 6_248 * 4 < size < 6_248 * 4 + 2_000
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"


def test_round_trip_into_plain_model_is_bit_identical(tmp_path):
    model = _trained_mlp(bias="lora_only", modules_to_save=None)
    with torch.no_grad():
        model.fc2.base_layer.bias.add_(0.5)
    lk.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = SeedMLP()  # same base weights (same seed), except the trained bias
    lk.load_adapter(fresh, tmp_path)
    for (pa, a), (pb, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert pa == pb and torch.equal(a, b), pa
    x = torch.randn(3, 784)
    assert torch.equal(model(x), fresh(x))


def test_load_as_second_adapter_keeps_first(tmp_path):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path / "a")
    x = torch.randn(3, 784)
    out = model(x)
    torch.manual_seed(0)
    other = SeedMLP()
    lk.inject(other, lk.LoraConfig(r=2, target_modules=["fc2"]), name="first")
    lk.load_adapter(other, tmp_path / "a", name="loaded")
    assert lk.active_adapter(other) == "loaded"
    assert torch.equal(other(x), out)
    lk.set_adapter(other, "first")
    assert torch.equal(other.fc1(x), other.fc1.base_layer(x))  # 'first' does not touch fc1


def test_all_linear_is_saved_as_explicit_names(tmp_path):
    model = Mixed()
    lk.inject(model, lk.LoraConfig(target_modules="all-linear", exclude_modules=["head"]))
    lk.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["proj"]


def test_mismatch_lists_every_bad_key(tmp_path):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.fc3.lora_B.weight"]
    tensors["base_model.model.fc9.lora_A.weight"] = torch.zeros(4, 3)
    tensors["base_model.model.fc1.lora_A.weight"] = torch.zeros(4, 783)
    save_file(tensors, path)
    fresh = SeedMLP()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(lk.AdapterLoadError) as err:
        lk.load_adapter(fresh, tmp_path)
    msg = str(err.value)
    assert "missing key base_model.model.fc3.lora_B.weight (expected shape (10, 4))" in msg
    assert "unexpected key base_model.model.fc9.lora_A.weight" in msg
    assert "shape mismatch for base_model.model.fc1.lora_A.weight: model expects (4, 784), file has (4, 783)" in msg
    # nothing changed: no wrappers left, same tensors, same trainability
    assert list(lk.lora_layers(fresh)) == [] and lk.adapter_configs(fresh) == {}
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert all(p.requires_grad for p in fresh.parameters())


def test_pickle_is_refused(tmp_path):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(lk.AdapterLoadError, match="never loads pickle"):
        lk.load_adapter(SeedMLP(), tmp_path)


@pytest.mark.parametrize("cut", [0, 7, 200, -100])
def test_truncated_file_is_a_clear_error(tmp_path, cut):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(lk.AdapterLoadError, match="truncated or corrupted"):
        lk.load_adapter(SeedMLP(), tmp_path)


def test_bad_config_files(tmp_path):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text("{not json")
    with pytest.raises(lk.AdapterLoadError, match="not valid JSON"):
        lk.load_adapter(SeedMLP(), tmp_path)
    cfg_path.write_text(json.dumps({"peft_type": "LORA", "r": 0, "target_modules": ["fc1"]}))
    with pytest.raises(lk.AdapterLoadError, match="r must be an integer"):
        lk.load_adapter(SeedMLP(), tmp_path)
    with pytest.raises(lk.AdapterLoadError, match="no adapter_config.json"):
        lk.load_adapter(SeedMLP(), tmp_path / "nowhere")


def test_adapter_for_another_model(tmp_path):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    with pytest.raises(lk.AdapterLoadError, match="does not fit this model"):
        lk.load_adapter(Mixed(), tmp_path)
