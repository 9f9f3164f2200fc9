"""The trainer on a CUDA device: bf16 and fp16 autocast, bit-identical resume, batches moved to the
device, bitsandbytes optimizers, and two-GPU data parallelism with NCCL.

Marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda``; scripts/gpu-check.sh).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")

# ------------------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trainer_on_cuda_loss_falls_and_resume_is_bit_identical(tmp_path, precision):
    from tests.helpers.train_worker import resume_check, trainer

    amp = {} if precision == "fp32" else {precision: True}
    long = trainer(tmp_path / "long", 60, lr=2e-2, save_every=30, device="cuda", **amp)
    assert long.device.type == "cuda" and all(p.is_cuda for p in long.model.parameters())
    assert (long.scaler is not None) == (precision == "fp16")
    long.train()
    assert long.step == 60 and len(long.losses) == 60
    first, last = statistics.mean(long.losses[:5]), statistics.mean(long.losses[-5:])
    assert last < 0.85 * first, (first, last)

    run = resume_check(tmp_path / "resume", steps=8, cut=4, device="cuda", **amp)
    assert run["resumed"] == run["whole"][4:], "the resumed run must take exactly the uninterrupted steps"
    for name, want in run["whole_params"].items():
        assert torch.equal(run["resumed_params"][name], want), name
    moments = [v for s in run["trainer"].optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    assert moments and {v.device.type for v in moments} == {"cuda"}, "optimizer state follows its parameters"
    state = torch.load(tmp_path / "resume" / "cut" / "checkpoints" / "step-00000004" / "trainer_state.pt",
                       map_location="cpu", weights_only=True)  # fmt: skip
    assert state["rng"].dtype == torch.uint8 and state["rng"].device.type == "cpu"
    assert state["cuda_rng"].dtype == torch.uint8
    assert ("scaler" in state) == (precision == "fp16")


def test_trainer_moves_model_and_every_batch_to_cuda(tmp_path):
    seen = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0", "2"], dropout=0.1))
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))

    def loss_fn(m, batch):
        seen.append({batch["x"].device.type, batch["pair"][1].device.type})
        return nn.functional.cross_entropy(m(batch["x"]), batch["pair"][1])

    config = lk.TrainerConfig(out_dir=str(tmp_path), max_steps=3, batch_size=16, device="cuda", progress=False)
    trainer = lk.Trainer(model, loss_fn, lambda idx: {"x": x[idx], "pair": (idx, y[idx])}, 64, config)
    assert all(p.is_cuda for p in model.parameters())
    trainer.train()
    assert seen == [{"cuda"}] * 3


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "paged_adamw32bit"])
def test_bitsandbytes_optimizers_train_and_resume_on_cuda(tmp_path, name):
    pytest.importorskip("bitsandbytes")
    from tests.helpers.train_worker import resume_check, trainer

    long = trainer(tmp_path / "long", 60, lr=2e-2, save_every=None, device="cuda", optimizer=name)
    assert type(long.optimizer).__module__.startswith("bitsandbytes")
    long.train()
    assert statistics.mean(long.losses[-5:]) < 0.85 * statistics.mean(long.losses[:5])
    run = resume_check(tmp_path / "resume", steps=8, cut=4, device="cuda", optimizer=name)
    assert run["resumed"] == run["whole"][4:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs for two processes")
def test_ddp_two_gpus_equal_one_with_double_batch(tmp_path):
    def worker(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tests.helpers.train_worker", str(out), "--dropout", "0", "--steps", "40",
               "--device", "cuda", *extra]  # fmt: skip
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    single = worker(tmp_path / "single", "--batch", "16")
    assert single.wait(300) == 0, single.stderr.read()
    procs = [worker(tmp_path / "ddp", "--batch", "8", "--world", "2", "--rank", str(r), "--init",
                    str(tmp_path / "init")) for r in range(2)]  # fmt: skip
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read()
    a, b = (load_file(sorted((tmp_path / run / "checkpoints").glob("step-*"))[-1] / "adapter_model.safetensors")
            for run in ("single", "ddp"))  # fmt: skip
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
