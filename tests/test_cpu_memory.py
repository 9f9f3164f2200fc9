"""lorakit.cpu_memory: with the threshold fixed, memory freed between live tensors goes back to the
system (glibc); without it, glibc keeps it (the allocation-history effect the module describes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lorakit as lk
from lorakit import cpu_memory, devices
from lorakit.errors import InputError

SCENARIO = """
import sys, torch
from lorakit import cpu_memory
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "1": assert cpu_memory.return_freed_memory()
big = torch.ones(4 << 20); del big                 # a 16 MiB block mapped and freed: glibc's threshold rises
before = rss()
held = [torch.ones(1 << 20) for _ in range(20)]   # twenty 4 MiB tensors
last = held[-1]; del held                          # all freed but the newest
print((rss() - before) / 2**20)
"""

glibc_only = pytest.mark.skipif(cpu_memory.heap_in_use() is None, reason="needs glibc >= 2.33 on Linux")


def _retained_mib(fixed: bool) -> float:
    out = subprocess.run([sys.executable, "-c", SCENARIO, str(int(fixed))], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_tensors_leave_the_resident_set_once_the_threshold_is_fixed():
    assert _retained_mib(fixed=False) > 40  # glibc's rising threshold: 19 freed tensors' pages kept
    assert _retained_mib(fixed=True) < 10  # only the live 4 MiB tensor (plus page-table noise)


@glibc_only
def test_heap_in_use_counts_live_tensors():
    before = cpu_memory.heap_in_use()
    t = torch.ones(8 << 20)  # 32 MiB
    assert cpu_memory.heap_in_use() - before >= 32 << 20
    del t


def test_bad_thresholds_are_refused():
    for bad in (0, -1, 64 << 20, 1.5, True, "1M"):
        with pytest.raises(InputError, match="min_bytes"):
            cpu_memory.return_freed_memory(bad)


def test_training_on_cpu_fixes_the_threshold(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(devices, "return_freed_memory", lambda: calls.append(1) or True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    config = lk.TrainerConfig(out_dir=str(tmp_path), max_steps=1, batch_size=2, progress=False)
    lk.Trainer(model, lambda m, b: m(b).sum(), lambda idx: torch.ones(len(idx), 4), 4, config)
    assert calls == [1]
    assert devices.prepare_device(torch.nn.Linear(2, 2), None) == torch.device("cpu") and calls == [1, 1]
