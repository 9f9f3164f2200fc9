"""Adapter folders built to break the loader: every one gives one clear ``AdapterLoadError`` (the
exact type, a message naming the file, key, shape or value) and leaves the model exactly as it was
(same modules, same tensors, same ``requires_grad``, no adapter added), whether the model is plain
or already holds another adapter."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
import lorakit.checkpoint

from .conftest import SeedMLP, randomize_adapters

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
A1, B3 = "base_model.model.fc1.lora_A.weight", "base_model.model.fc3.lora_B.weight"


def _good(folder: Path) -> Path:
    torch.manual_seed(0)
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2", "fc3"]))
    randomize_adapters(model)
    lk.save_adapter(model, folder)
    return folder


# ---------------------------------------------------------------------------------------- mutations
def config_set(**changes):
    def mutate(folder: Path) -> None:
        data = json.loads((folder / CONFIG).read_text())
        data.update(changes)
        (folder / CONFIG).write_text(json.dumps(data))
        _reseal(folder)  # a consistent pair: the checks below are about the values, not a torn save

    return mutate


def config_text(text: str):
    def mutate(folder: Path) -> None:
        (folder / CONFIG).write_text(text)

    return mutate


def _reseal(folder: Path) -> None:
    """Rewrite the weights so that they record the current config (as a save would)."""
    from lorakit.files import config_digest

    digest = config_digest(json.loads((folder / CONFIG).read_text()))
    tensors = load_file(folder / WEIGHTS)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt", "lorakit.config_sha256": digest})


def tensors_edit(edit):
    def mutate(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        meta = {"format": "pt"}  # no lorakit key: as PEFT writes it
        save_file(tensors, folder / WEIGHTS, metadata=meta)

    return mutate


def _split(folder: Path) -> tuple[dict, bytes]:
    data = (folder / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def raw_header(make):
    """Replace the safetensors header by ``make(header_dict) -> bytes`` (a forged header)."""

    def mutate(folder: Path) -> None:
        header, body = _split(folder)
        text = make(header)
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + body)

    return mutate


def raw_bytes(make):
    def mutate(folder: Path) -> None:
        (folder / WEIGHTS).write_bytes(make((folder / WEIGHTS).read_bytes()))

    return mutate


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _offsets_beyond(h: dict) -> bytes:
    h[A1]["data_offsets"][1] += 10**6
    return json.dumps(h).encode()


def _duplicate(h: dict) -> bytes:
    text = json.dumps(h)
    entry = json.dumps({A1: {**h[A1], "shape": list(reversed(h[A1]["shape"]))}})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode()


def _metadata_number(h: dict) -> bytes:
    h["__metadata__"]["format"] = 5
    return json.dumps(h).encode()


def _symlink_to(target: str):
    def mutate(folder: Path) -> None:
        (folder / WEIGHTS).unlink()
        if target == "fifo":
            os.mkfifo(folder / "pipe")
        elif target == "dir":
            (folder / "elsewhere").mkdir()
        os.symlink({"fifo": "pipe", "dir": "elsewhere"}.get(target, target), folder / WEIGHTS)

    return mutate


def _only_weights_of_another_save(folder: Path) -> None:
    other = folder.parent / "other"
    config_set(lora_alpha=16)(folder)  # this folder's config now differs ...
    (folder / WEIGHTS).unlink()
    _good(other)  # ... from the one these weights were saved with
    (folder / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())


def _saved_module_of_wrong_shape(folder: Path) -> None:
    tensors = {k: v for k, v in load_file(folder / WEIGHTS).items() if ".fc3." not in k}
    tensors |= {"base_model.model.fc3.weight": torch.zeros(10, 127), "base_model.model.fc3.bias": torch.zeros(10)}
    save_file(tensors, folder / WEIGHTS)
    config_set(target_modules=["fc1", "fc2"], modules_to_save=["fc3"])(folder)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('LORAKIT_EVIL_MARKER', '/tmp/lorakit-evil')}",))


def _pickle_instead(folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))


CASES = {
    # the config file
    "config-is-a-list": (config_text("[1, 2]"), "adapter config must be a JSON object {...}, got a list"),
    "config-is-a-number": (config_text("5"), "adapter config must be a JSON object {...}, got a number"),
    "config-not-json": (config_text("{not json"), "not valid JSON"),
    "config-empty": (config_text(""), "not valid JSON"),
    "config-10000-deep": (config_text(_deep(10_000)), "JSON nested too deeply"),
    "config-deep-value": (config_text('{"target_modules": ' + _deep(10_000) + "}"), "JSON nested too deeply"),
    "config-too-large": (config_text(" " * (17 << 20) + "{}"), "too large for an adapter config"),
    "bool-as-string": (config_set(use_rslora="false"), "'use_rslora' must be true or false, got 'false' (string)"),
    "bool-as-no": (config_set(fan_in_fan_out="no"), "'fan_in_fan_out' must be true or false, got 'no'"),
    "r-null": (config_set(r=None), "'r' must be an integer >= 1, got None (null)"),
    "r-string": (config_set(r="4"), "'r' must be an integer >= 1, got '4' (string)"),
    "r-fraction": (config_set(r=2.5), "'r' must be an integer >= 1, got 2.5 (number)"),
    "rank-pattern-list": (config_set(rank_pattern=[1]), "'rank_pattern' must be an object {regex: rank}, got [1]"),
    "alpha-pattern-string": (config_set(alpha_pattern={"fc1": "a"}), "alpha_pattern['fc1'] must be a finite number"),
    "target-modules-number": (config_set(target_modules=5), "'target_modules' must be a list of module names"),
    "peft-type-prefix": (config_set(peft_type="PREFIX_TUNING"), "peft_type='PREFIX_TUNING'; lorakit reads only"),
    # a plain LoRA folder whose config says DoRA lacks the magnitudes DoRA needs
    "dora-without-magnitudes": (config_set(use_dora=True), "missing key base_model.model.fc1.lora_magnitude_vector"),
    "huge-r": (config_set(r=10**6), f"shape mismatch for {A1}: model expects (1000000, 784), file has (4, 784)"),
    "huge-rank-pattern": (config_set(rank_pattern={"fc2": 10**6}), "model expects (1000000, 256), file has (4, 256)"),
    "modules-to-save-missing": (config_set(modules_to_save=["head"]), "modules_to_save: 'head' matches no module"),
    "config-is-a-folder": (lambda f: ((f / CONFIG).unlink(), (f / CONFIG).mkdir()), "the config is a folder"),
    "config-broken-link": (lambda f: ((f / CONFIG).unlink(), os.symlink("gone.json", f / CONFIG)), "broken symbolic"),
    # the weights file
    "empty-folder": (lambda f: [p.unlink() for p in f.iterdir()], "no adapter_config.json here"),
    "pickle-only": (_pickle_instead, "never loads pickle files"),
    "weights-empty": (raw_bytes(lambda d: b""), "shorter than the 8-byte header length"),
    "truncated": (raw_bytes(lambda d: d[:-100]), "not a readable safetensors file"),
    "header-length-huge": (raw_bytes(lambda d: struct.pack("<Q", 2**62) + d[8:]), "header length"),
    "header-bad-json": (raw_header(lambda h: b"{nope" + b" " * 20), "not a readable safetensors file"),
    "header-a-list": (raw_header(lambda h: b"[1, 2, 3]"), "the header is not a JSON object"),
    "header-10000-deep": (raw_header(lambda h: _deep(10_000).encode()), "header JSON nested too deeply"),
    "header-offsets-beyond-file": (raw_header(_offsets_beyond), "not a readable safetensors file"),
    "header-duplicate-key": (raw_header(_duplicate), f"the header lists ['{A1}'] twice"),
    "metadata-not-string": (raw_header(_metadata_number), "not a readable safetensors file"),
    "nan-factor": (tensors_edit(lambda t: t[A1].__setitem__((0, 0), float("nan"))), f"NaN or infinite values in {A1}"),
    "inf-factor": (tensors_edit(lambda t: t[B3].__setitem__((1, 1), float("inf"))), f"NaN or infinite values in {B3}"),
    "int-factor": (tensors_edit(_set(A1, torch.ones(4, 784, dtype=torch.int64))), f"{A1} (I64)"),
    "bool-factor": (tensors_edit(_set(A1, torch.ones(4, 784, dtype=torch.bool))), f"{A1} (BOOL)"),
    "a-without-b": (tensors_edit(lambda t: t.pop(B3)), f"missing key {B3} (expected shape (10, 4))"),
    "module-model-lacks": (
        tensors_edit(_set("base_model.model.fc9.lora_A.weight", torch.zeros(4, 3))),
        "unexpected key base_model.model.fc9.lora_A.weight (shape (4, 3))",
    ),
    "unknown-lora-key": (
        tensors_edit(_set("base_model.model.fc1.lora_magnitude_vector", torch.ones(256))),
        "unexpected key base_model.model.fc1.lora_magnitude_vector",
    ),
    "weights-broken-link": (_symlink_to("nowhere.safetensors"), "the weights file is a broken symbolic link"),
    "weights-link-to-folder": (_symlink_to("dir"), "the weights file is a folder"),
    "weights-link-to-fifo": (_symlink_to("fifo"), "the weights file is not a regular file"),
    "torn-pair": (_only_weights_of_another_save, "torn save: adapter_model.safetensors was saved with a different"),
    "saved-module-wrong-shape": (  # found only once the adapter exists: it must be taken out again
        _saved_module_of_wrong_shape,
        "shape mismatch for base_model.model.fc3.weight: model expects (10, 128), file has (10, 127)",
    ),
}


def snapshot(model: torch.nn.Module) -> tuple:
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.shape, p.device) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
        dict(lk.adapter_configs(model)),
    )


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert after[2].keys() == before[2].keys()
    assert all(v.is_meta or torch.equal(v, before[2][k]) for k, v in after[2].items())


@pytest.fixture(params=["plain", "holding-an-adapter"])
def model(request) -> torch.nn.Module:
    torch.manual_seed(1)
    model = SeedMLP()
    if request.param != "plain":
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc2"]), name="first")
        randomize_adapters(model)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_bad_folder_is_one_clear_error_and_the_model_is_unchanged(tmp_path, model, case, monkeypatch):
    mutate, fragment = CASES[case]
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("LORAKIT_EVIL_MARKER", str(marker))
    folder = _good(tmp_path / "adapter")
    mutate(folder)
    if case.startswith("huge"):  # refused on shapes: nothing may be allocated for it

        def no_allocation(*a, **k):
            raise AssertionError("add_adapter was called")

        monkeypatch.setattr(lorakit.checkpoint, "add_adapter", no_allocation)
    before = snapshot(model)
    with pytest.raises(lk.AdapterLoadError) as err:
        lk.load_adapter(model, folder)
    assert type(err.value) is lk.AdapterLoadError
    assert fragment in str(err.value)
    assert len(str(err.value)) < 2_000
    assert_unchanged(model, before)
    assert not marker.exists(), "the pickle was unpickled"


def test_pickle_beside_safetensors_is_never_opened(tmp_path, monkeypatch):
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("LORAKIT_EVIL_MARKER", str(marker))
    folder = _good(tmp_path / "adapter")
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    lk.load_adapter(SeedMLP(), folder)
    assert not marker.exists()


def test_symlinked_weights_file_loads_as_in_the_hub_cache(tmp_path):
    folder = _good(tmp_path / "adapter")
    (tmp_path / "blob").write_bytes((folder / WEIGHTS).read_bytes())
    (folder / WEIGHTS).unlink()
    os.symlink(tmp_path / "blob", folder / WEIGHTS)
    model = lk.load_adapter(SeedMLP(), folder)
    assert lk.active_adapter(model) == "default"


def test_meta_device_model_is_refused(tmp_path):
    folder = _good(tmp_path / "adapter")
    with torch.device("meta"):
        model = SeedMLP()
    before = snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match="weights are on the meta device .*fc1.weight.*load its weights"):
        lk.load_adapter(model, folder)
    assert_unchanged(model, before)


def test_meta_device_model_is_refused_when_resuming_into_an_adapter(tmp_path):
    folder = _good(tmp_path / "adapter")
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2", "fc3"]))
    model.to("meta")  # e.g. offloaded
    with pytest.raises(lk.AdapterLoadError, match=f"{A1}: the model's tensor is on the meta device"):
        lorakit.checkpoint.load_adapter_tensors(model, folder)
