"""More adapter folders and arguments built to break lorakit: PEFT LoRA variants and unknown config
keys, one kind of adapter saved over another, loose arguments, symbolic link loops. Each is one
clear error naming the problem, and nothing changes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
import lorakit.peft_keys
from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.errors import InputError
from lorakit.family import (
    BottleneckConfig,
    SelectiveConfig,
    inject_bottleneck,
    save_bottleneck,
    save_selected,
    select_trainable,
)
from lorakit.files import AdapterLoadError, save_tensors
from lorakit.offline import inspect_adapter
from lorakit.peft_keys import KNOWN_PEFT_KEYS, UNSUPPORTED_PEFT_KEYS

from .conftest import SeedMLP, randomize_adapters

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
BASE = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc1"]}


def _adapted() -> torch.nn.Module:
    torch.manual_seed(0)
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
    randomize_adapters(model)
    return model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ PEFT LoRA variants
VARIANT_VALUES = {
    "velora_config": {"num_groups": 2}, "alora_invocation_tokens": [5, 6],
    "monteclora_config": {"n_samples": 4}, "use_bdlora": {"nblocks": 2}, "arrow_config": {"top_k": 2},
    "kasa_config": {"diag": True}, "layer_replication": [[0, 1]],
    "use_qalora": True,
    "megatron_config": {"tensor_model_parallel_size": 2}, "ensure_weight_tying": True,
}  # fmt: skip


def test_every_refused_key_has_a_test_value():
    assert set(VARIANT_VALUES) == set(UNSUPPORTED_PEFT_KEYS)


@pytest.mark.parametrize("key", sorted(VARIANT_VALUES))
def test_peft_lora_variants_are_refused_by_name(tmp_path, key):
    with pytest.raises(ValueError) as err:
        LoraConfig.from_peft_dict({**BASE, key: VARIANT_VALUES[key]})
    assert f"adapter config sets {key}=" in str(err.value)
    assert "which lorakit does not support" in str(err.value)
    assert UNSUPPORTED_PEFT_KEYS[key] in str(err.value)
    # through load_adapter: one AdapterLoadError naming the file and the key; the model unchanged
    lk.save_adapter(_adapted(), tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**data, key: VARIANT_VALUES[key]}))
    model = SeedMLP()
    before = _state(model)
    with pytest.raises(AdapterLoadError, match=f"{CONFIG}: adapter config sets {key}="):
        lk.load_adapter(model, tmp_path)
    assert lk.adapter_configs(model) == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and set(before) == set(
        model.state_dict()
    )


@pytest.mark.parametrize("key", sorted(VARIANT_VALUES))
def test_peft_lora_variants_left_at_their_default_load(key):
    empty = {"use_qalora": False, "ensure_weight_tying": False}
    assert LoraConfig.from_peft_dict({**BASE, key: empty.get(key)}).r == 2


@pytest.mark.parametrize("value", [1, "yes", [0], {"a": 1}, True, 0.5])
def test_unknown_key_with_a_value_is_refused(value):
    with pytest.raises(ValueError) as err:
        LoraConfig.from_peft_dict({**BASE, "use_fancy_lora": value})
    assert str(err.value) == (
        f"adapter config sets unknown key 'use_fancy_lora'={value!r}: lorakit does not know what it does; "
        "refusing rather than loading it as plain LoRA"
    )


@pytest.mark.parametrize("value", [None, False, [], {}, ""])
def test_unknown_empty_key_loads_with_one_warning(value, caplog, monkeypatch):
    monkeypatch.setattr(lorakit.peft_keys, "_warned_keys", set())
    with caplog.at_level(logging.WARNING, logger="lorakit.config"):
        for _ in range(3):
            assert LoraConfig.from_peft_dict({**BASE, "quiet_key": value}).r == 2
    warned = [r.getMessage() for r in caplog.records if "quiet_key" in r.getMessage()]
    assert warned == [f"lorakit: adapter config key 'quiet_key' (= {value!r}) is unknown; ignored"]


def test_a_config_peft_writes_loads_without_a_warning(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert set(data) <= KNOWN_PEFT_KEYS | set(UNSUPPORTED_PEFT_KEYS)
    with caplog.at_level(logging.WARNING, logger="lorakit.config"):
        assert LoraConfig.from_peft_dict(data).target_modules == ["fc1"]
    assert not [r for r in caplog.records if r.name.startswith("lorakit")]  # (importing peft may log its own)


# ------------------------------------------------------------------------ one kind over another
def _bottleneck_model() -> torch.nn.Module:
    model = SeedMLP()
    inject_bottleneck(model, BottleneckConfig(target_modules=["fc1"], bottleneck=2))
    return model


def _selective_model() -> torch.nn.Module:
    model = SeedMLP()
    select_trainable(model, SelectiveConfig(mode="bias"))
    return model


SAVES = {
    "LoRA": lambda folder: lk.save_adapter(_adapted(), folder),
    "bottleneck": lambda folder: save_bottleneck(_bottleneck_model(), folder),
    "selective": lambda folder: save_selected(_selective_model(), folder),
}
CONFIGS = {"LoRA": CONFIG, "bottleneck": "bottleneck_config.json", "selective": "selective_config.json"}


@pytest.mark.parametrize("first", sorted(SAVES))
@pytest.mark.parametrize("second", sorted(SAVES))
def test_one_kind_of_adapter_is_never_saved_over_another(tmp_path, first, second):
    SAVES[first](tmp_path)
    before = _files(tmp_path)
    if first == second:  # the same kind replaces its own pair
        SAVES[second](tmp_path)
        assert set(_files(tmp_path)) == set(before)
        return
    with pytest.raises(InputError) as err:
        SAVES[second](tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: holds {CONFIGS[first]} (a {first if first != 'LoRA' else 'LORA'} adapter); saving a {second} "
        f"adapter here would overwrite its {WEIGHTS} and leave {CONFIGS[first]} beside weights that are not its "
        "own; choose another folder"
    )
    assert _files(tmp_path) == before


def test_lora_is_not_saved_over_a_soft_prompt(tmp_path):
    (tmp_path / CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    before = _files(tmp_path)
    with pytest.raises(InputError, match=r"holds adapter_config.json \(a PROMPT_TUNING adapter\); saving a LoRA"):
        lk.save_adapter(_adapted(), tmp_path)
    assert _files(tmp_path) == before


def test_a_lora_config_beside_weights_without_factors_is_refused(tmp_path, capsys):
    lk.save_adapter(_adapted(), tmp_path)  # then another kind's weights, as an older lorakit would have left
    other = {"fc1.down.weight": torch.zeros(2, 16), "fc1.up.weight": torch.zeros(16, 2)}
    (tmp_path / WEIGHTS).write_bytes(save_tensors(other))
    want = (
        f"{tmp_path}: {CONFIG} is a LoRA config, but {WEIGHTS} holds no LoRA factor (no lora_A/lora_B tensor) for "
        "any module it targets (['fc1', 'fc2']): these weights are not this adapter's (another kind of adapter "
        "saved into the folder?)"
    )
    model = SeedMLP()
    with pytest.raises(AdapterLoadError) as err:
        lk.load_adapter(model, tmp_path)
    assert str(err.value) == want
    assert lk.adapter_configs(model) == {}
    with pytest.raises(AdapterLoadError) as err:
        inspect_adapter(tmp_path)
    assert str(err.value) == want
    assert main(["inspect", str(tmp_path)]) != 0
    assert "holds no LoRA factor" in capsys.readouterr().err


# ------------------------------------------------------------------------------ loose arguments
def test_an_empty_folder_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _adapted()
    with pytest.raises(InputError) as err:
        lk.save_adapter(model, "")
    assert str(err.value) == "directory = '': name the folder to save into (an empty path is refused)"
    with pytest.raises(InputError, match="an empty path is refused"):
        save_bottleneck(_bottleneck_model(), "")
    assert os.listdir(tmp_path) == []
    lk.save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterLoadError, match=r"^adapter = '': name an adapter folder or hub id"):
        lk.load_adapter(SeedMLP(), "")


@pytest.mark.parametrize("activate", ["no", 0, 1, None, "False"])
def test_activate_must_be_a_bool(tmp_path, activate):
    lk.save_adapter(_adapted(), tmp_path)
    model = SeedMLP()
    with pytest.raises(InputError) as err:
        lk.load_adapter(model, tmp_path, activate=activate)
    assert str(err.value) == f"activate = {activate!r}; allowed: True or False"
    assert lk.adapter_configs(model) == {}


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_a_symbolic_link_loop_is_called_one(tmp_path, name):
    lk.save_adapter(_adapted(), tmp_path)
    (tmp_path / name).unlink()
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    os.symlink("loop_a", tmp_path / name)
    what = "config" if name == CONFIG else "weights file"
    with pytest.raises(AdapterLoadError) as err:
        lk.load_adapter(SeedMLP(), tmp_path)
    assert str(err.value) == f"{tmp_path / name}: the {what} is a symbolic link loop (to loop_a)"


def test_saved_weights_are_canonical_and_still_load(tmp_path):
    model = _adapted()
    lk.save_adapter(model, tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length]
    assert length % 8 == 0
    parsed = json.loads(header)
    assert list(parsed) == sorted(parsed) and list(parsed["__metadata__"]) == sorted(parsed["__metadata__"])
    assert header.rstrip(b" ") == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    tensors = load_file(tmp_path / WEIGHTS)
    assert torch.equal(tensors["base_model.model.fc1.lora_A.weight"], model.fc1.lora_A["default"])
