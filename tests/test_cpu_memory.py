"""lorakit.cpu_memory: glibc keeps the holes freed tensors leave in its heap resident; trimming at
block boundaries hands them back, during training steps only, and changes no number."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lorakit as lk
from lorakit import cpu_memory
from lorakit.errors import InputError

SCENARIO = """
import sys, torch
from lorakit import cpu_memory
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
big = torch.ones(4 << 20); del big                 # a 16 MiB block mapped and freed: glibc's threshold rises
before = rss()
held = [torch.ones(1 << 20) for _ in range(20)]   # twenty 4 MiB tensors, now from the heap
last = held[-1]; del held                          # all freed but the newest, which pins the heap's top
kept = (rss() - before) / 2**20
trimmed = cpu_memory.release_free_heap(0)
print(kept, (rss() - before) / 2**20, trimmed)
"""

glibc_only = pytest.mark.skipif(cpu_memory.heap_in_use() is None, reason="needs glibc >= 2.33 on Linux")


@glibc_only
def test_holes_in_the_heap_stay_resident_until_trimmed():
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True)
    kept, after, trimmed = out.stdout.split()
    assert float(kept) > 40  # nineteen freed 4 MiB tensors still resident
    assert trimmed == "True" and float(after) < 10  # only the live one (plus page-table noise)


@glibc_only
def test_heap_counts_see_a_live_tensor():
    before = cpu_memory.heap_in_use()
    t = torch.ones(8 << 20)  # 32 MiB
    assert cpu_memory.heap_in_use() - before >= 32 << 20
    assert cpu_memory.heap_free() >= 0
    del t
    assert not cpu_memory.release_free_heap(1 << 62)  # never more than that free: no trim


def _tiny():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=61)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    return model.train()


@glibc_only
@pytest.mark.parametrize("checkpointing", [False, True])
def test_blocks_trim_after_their_forward_and_backward(monkeypatch, checkpointing):
    model = _tiny()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
    if checkpointing:
        lk.enable_checkpointing(model)
    calls = []
    monkeypatch.setattr(cpu_memory, "release_free_heap", lambda min_free: calls.append(min_free) or False)
    handle = lk.trim_cpu_heap(model, min_free=5)
    assert handle.blocks == 3
    got = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert calls == [5] * 6  # after 3 forwards and 3 backwards (each after its block's recomputation)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 6  # nothing without gradients, nothing once removed


class Odd(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.inner = kind, torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.inner(x)
        return {"out": y} if self.kind == "dict" else () if self.kind == "empty" else y


@glibc_only
def test_blocks_with_mappings_or_nothing_to_return(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "release_free_heap", lambda min_free: calls.append(min_free) or False)
    model = torch.nn.ModuleList([Odd("dict"), Odd("empty")])
    lk.trim_cpu_heap(model, blocks=list(model))
    model[0](torch.ones(2, 4, requires_grad=True))["out"].sum().backward()
    assert len(calls) == 2  # after the forward and after the backward of the mapping's tensor
    assert model[1](torch.ones(2, 4)) == () and len(calls) == 3


def test_what_cannot_be_trimmed_is_refused_by_name():
    with pytest.raises(InputError, match="blocks is empty"):
        lk.trim_cpu_heap(_tiny(), blocks=[])
    with pytest.raises(InputError, match="Sequential names no repeated blocks"):
        lk.trim_cpu_heap(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model = _tiny()
    with pytest.raises(InputError, match="every entry of blocks must be one of the model's modules"):
        lk.trim_cpu_heap(model, blocks=[torch.nn.Linear(2, 2)])
    for bad in (-1, 1.5, True, "64M"):
        with pytest.raises(InputError, match="min_free"):
            lk.trim_cpu_heap(model, min_free=bad)
