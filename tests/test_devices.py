"""The device helpers on the CPU: autocast choices, batches moved with their types kept, the
collective backend, the optimizer factory, device errors, and the trainer's progress lines."""

from __future__ import annotations

import collections
import logging
import sys
import types
from typing import NamedTuple

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.devices import autocast_settings, distributed_backend, init_distributed, move_to, resolve_device
from lorakit.errors import InputError
from lorakit.optim import BNB_OPTIMIZERS, OPTIMIZERS, make_optimizer


# ------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize(
    ("device_type", "bf16", "fp16", "want"),
    [
        ("cpu", False, False, (False, torch.float32)),
        ("cpu", True, False, (True, torch.bfloat16)),
        ("cuda", False, False, (False, torch.float32)),
        ("cuda", True, False, (True, torch.bfloat16)),
        ("cuda", False, True, (True, torch.float16)),
    ],
)
def test_autocast_settings(device_type, bf16, fp16, want):
    assert autocast_settings(device_type, bf16, fp16) == want


def test_autocast_settings_errors():
    with pytest.raises(ValueError, match="CUDA only.*use bf16"):
        autocast_settings("cpu", fp16=True)
    with pytest.raises(ValueError, match="exclude each other"):
        autocast_settings("cuda", bf16=True, fp16=True)
    with pytest.raises(ValueError, match="exclude each other"):
        lk.TrainerConfig(out_dir="x", max_steps=1, bf16=True, fp16=True)


# ------------------------------------------------------------------------------ move_to
class Pair(NamedTuple):
    x: torch.Tensor
    label: str


class Encoding:
    """Stands in for Hugging Face's BatchEncoding: a ``.to(device)`` that moves its tensors."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def to(self, device, non_blocking: bool = False) -> Encoding:
        return Encoding(self.ids.to(device, non_blocking=non_blocking))


class OldEncoding(Encoding):
    def to(self, device) -> OldEncoding:  # no non_blocking argument
        return OldEncoding(self.ids.to(device))


def _nested() -> dict:
    t = torch.arange(6.0).reshape(2, 3)
    return {
        "plain": t,
        "list": [t, 3, "text", None],
        "tuple": (t, (t, 1.5)),
        "named": Pair(t, "cat"),
        "ordered": collections.OrderedDict(a=t, b=[t]),
        "default": collections.defaultdict(list, {"k": t}),
        "encoding": Encoding(t),
        "old_encoding": OldEncoding(t),
        "size": torch.Size([2, 3]),
        "other": object,
    }


def test_move_to_meta_keeps_every_type_and_moves_every_tensor():
    batch = _nested()
    out = move_to(batch, "meta")
    assert type(out) is dict and list(out) == list(batch)
    assert out["plain"].device.type == "meta" and out["plain"].shape == (2, 3)
    assert type(out["list"]) is list and out["list"][0].is_meta and out["list"][1:] == [3, "text", None]
    assert type(out["tuple"]) is tuple and out["tuple"][0].is_meta and out["tuple"][1][0].is_meta
    assert out["tuple"][1][1] == 1.5
    assert type(out["named"]) is Pair and out["named"].x.is_meta and out["named"].label == "cat"
    assert type(out["ordered"]) is collections.OrderedDict and out["ordered"]["a"].is_meta
    assert out["ordered"]["b"][0].is_meta
    assert type(out["default"]) is collections.defaultdict and out["default"]["k"].is_meta
    assert out["default"].default_factory is list
    assert type(out["encoding"]) is Encoding and out["encoding"].ids.is_meta
    assert type(out["old_encoding"]) is OldEncoding and out["old_encoding"].ids.is_meta
    assert out["size"] == torch.Size([2, 3]) and type(out["size"]) is torch.Size
    assert out["other"] is object
    # the input is left as it was
    assert batch["plain"].device.type == "cpu" and batch["named"].x.device.type == "cpu"


def test_move_to_the_same_device_copies_nothing():
    batch = _nested()
    out = move_to(batch, torch.device("cpu"))
    assert out["plain"] is batch["plain"] and out["list"][0] is batch["list"][0]
    assert out["named"].x is batch["named"].x


@pytest.mark.parametrize("device", ["banana", "cuda:x", "", 3.5])
def test_move_to_an_unknown_device_names_it(device):
    with pytest.raises(InputError) as err:
        move_to({"x": torch.zeros(2)}, device)
    assert str(err.value).startswith(f"device {device!r} is not a device torch knows ('cpu', 'cuda', 'cuda:1'...)")


def test_training_refuses_the_meta_device():
    with pytest.raises(InputError, match=r"device 'meta': the meta device holds no data and cannot train; use 'cpu'"):
        resolve_device("meta")
    with pytest.raises(InputError, match=r"TrainerConfig.device 'meta': the meta device holds no data"):
        lk.TrainerConfig(out_dir="x", max_steps=1, device="meta")


def test_move_to_hugging_face_batch_encoding():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    out = move_to(enc, "meta")
    assert isinstance(out, transformers.BatchEncoding) and out["input_ids"].is_meta


# ------------------------------------------------------------------------------ distributed
@pytest.mark.parametrize(
    ("device", "backend"),
    [("cpu", "gloo"), ("cuda", "nccl"), ("cuda:1", "nccl"), (torch.device("cuda", 0), "nccl"), ("meta", "gloo")],
)
def test_distributed_backend(device, backend):
    assert distributed_backend(device) == backend


def test_init_distributed_alone_joins_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == torch.device("cpu")
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


# ------------------------------------------------------------------------------ devices
def test_resolve_device_follows_the_model_or_checks_the_request(monkeypatch):
    assert resolve_device(None, nn.Linear(2, 2)) == torch.device("cpu")
    assert resolve_device(None, nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert resolve_device(None, nn.ReLU()) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda' asks for CUDA, but .*use device='cpu'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        lk.TrainerConfig(out_dir="x", max_steps=1, device="gpu0")


def _tiny_trainer(tmp_path, **cfg) -> lk.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(64, 4)
    config = lk.TrainerConfig(out_dir=str(tmp_path), max_steps=4, batch_size=8, **{"progress": False, **cfg})
    return lk.Trainer(model, lambda m, b: m(b).pow(2).mean(), lambda idx: x[idx], 64, config)


def test_trainer_device_errors_on_cpu(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="fp16 .*CUDA only"):
        _tiny_trainer(tmp_path, fp16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="asks for CUDA"):
        _tiny_trainer(tmp_path, device="cuda")


# ------------------------------------------------------------------------------ optimizers
def test_optimizer_factory_by_name():
    p = nn.Parameter(torch.zeros(3))
    adamw = make_optimizer([p], "adamw", lr=0.1, weight_decay=0.01)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 0.1
    assert adamw.defaults["weight_decay"] == 0.01
    sgd = make_optimizer([{"params": [p]}], "sgd", lr=0.2, momentum=0.9)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert set(OPTIMIZERS) >= {"adamw", "sgd", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit"}
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; choose one of adamw, sgd.*optimizer_factory"):
        make_optimizer([p], "lion")
    with pytest.raises(ValueError, match="unknown optimizer"):
        lk.TrainerConfig(out_dir="x", max_steps=1, optimizer="lion")


@pytest.mark.parametrize("name", BNB_OPTIMIZERS)
def test_bitsandbytes_optimizers_need_cuda(name):
    with pytest.raises(ValueError, match=rf"'{name}' .*runs on CUDA only.*parameters are on cpu.*optimizer='adamw'"):
        make_optimizer([nn.Parameter(torch.zeros(3))], name)


def test_trainer_optimizer_by_name_and_by_factory(tmp_path):
    assert type(_tiny_trainer(tmp_path, optimizer="sgd").optimizer) is torch.optim.SGD
    seen = {}

    def factory(params, config):
        seen["n"], seen["lr"] = len(params), config.lr
        return torch.optim.RMSprop(params, lr=config.lr)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(64, 4)
    config = lk.TrainerConfig(out_dir=str(tmp_path / "f"), max_steps=3, batch_size=8, lr=0.01, progress=False)
    trainer = lk.Trainer(model, lambda m, b: m(b).pow(2).mean(), lambda idx: x[idx], 64, config,
                         optimizer_factory=factory)  # fmt: skip
    assert type(trainer.optimizer) is torch.optim.RMSprop and seen == {"n": 2, "lr": 0.01}
    assert trainer.train()["step"] == 3
    assert trainer.resume() == 3  # the factory's optimizer state round-trips through the checkpoint


# ------------------------------------------------------------------------------ progress
def test_progress_without_a_terminal_is_log_lines_not_tqdm(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # importing tqdm would now fail
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False, write=lambda s: None))
    trainer = _tiny_trainer(tmp_path, progress=True, log_every=2, desc="tiny")
    with caplog.at_level(logging.INFO, logger="lorakit.trainer"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.trainer"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("tiny: step 2/4 loss ") and "examples/s" in lines[0]
    assert lines[1].startswith("tiny: step 4/4 loss ")


def test_progress_on_a_terminal_is_a_tqdm_bar(tmp_path, monkeypatch, caplog):
    bars = []

    class FakeBar:
        def __init__(self, **kw):
            self.kw, self.updates, self.closed = kw, 0, False
            bars.append(self)

        def update(self, n):
            self.updates += n

        def set_postfix(self, **kw):
            self.postfix = kw

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=FakeBar))
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True, write=lambda s: None))
    trainer = _tiny_trainer(tmp_path, progress=True, log_every=1)
    with caplog.at_level(logging.INFO, logger="lorakit.trainer"):
        trainer.train()
    assert len(bars) == 1 and bars[0].updates == 4 and bars[0].closed and "ex_per_s" in bars[0].postfix
    assert not [r for r in caplog.records if r.name == "lorakit.trainer"]


def test_no_progress_is_silent(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lorakit.trainer"):
        _tiny_trainer(tmp_path, progress=False, log_every=1).train()
    assert not [r for r in caplog.records if r.name == "lorakit.trainer"]


def test_init_distributed_names_a_bad_device():
    from lorakit.devices import init_distributed

    with pytest.raises(lk.InputError, match="'banana' is not a device"):
        init_distributed("banana")
