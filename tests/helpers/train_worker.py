"""A deterministic little training run for the trainer tests (run as a separate process), and the
in-process resume check that the CPU and CUDA tests share.

python -m tests.helpers.train_worker OUT_DIR [--resume] [--world N --rank R --init FILE] [--batch B]
                                             [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit as lk
from lorakit.devices import distributed_backend


def build(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], dropout=dropout))
    return model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4
    return x, y


def trainer(out: str | Path, steps: int, dropout: float = 0.1, batch: int = 16, **cfg: Any) -> lk.Trainer:
    """The worker's run in this process: the model built fresh (seed 0), data on the CPU (the
    trainer moves each batch to its device)."""
    model = build(dropout)
    x, y = data()
    settings = {"lr": 5e-3, "warmup_steps": 3, "save_every": 4, "keep_last": 2, "progress": False, "log_every": 1}
    config = lk.TrainerConfig(out_dir=str(out), max_steps=steps, batch_size=batch, **{**settings, **cfg})
    return lk.Trainer(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                      lambda idx: (x[idx], y[idx]), len(y), config)  # fmt: skip


def resume_check(root: Path, steps: int = 8, cut: int = 4, **cfg: Any) -> dict[str, Any]:
    """Train ``steps`` steps without a break, and again with a checkpoint after ``cut`` steps
    from which a fresh model (and a disturbed RNG) resumes. Returns the uninterrupted losses, the
    resumed run's losses from step ``cut`` on, and both runs' final trainable tensors."""
    whole = trainer(root / "whole", steps, **cfg)
    whole_losses = [whole.train_step() for _ in range(steps)]
    cut_run = trainer(root / "cut", steps, **cfg)
    for _ in range(cut):
        cut_run.train_step()
    cut_run.save_checkpoint()
    del cut_run
    torch.manual_seed(12345)  # every generator (CPU and CUDA) elsewhere: resume must restore them
    resumed = trainer(root / "cut", steps, **cfg)
    assert resumed.resume() == cut
    resumed_losses = [resumed.train_step() for _ in range(steps - cut)]

    def final(t: lk.Trainer) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in t.model.named_parameters() if p.requires_grad}

    return {"whole": whole_losses, "resumed": resumed_losses, "whole_params": final(whole),
            "resumed_params": final(resumed), "trainer": resumed}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--init", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", args.rank % torch.cuda.device_count())
    if args.world > 1:
        torch.distributed.init_process_group(distributed_backend(device), init_method=f"file://{args.init}",
                                             rank=args.rank, world_size=args.world)  # fmt: skip
    t = trainer(args.out, args.steps, dropout=args.dropout, batch=args.batch, device=device)
    t.train(resume=args.resume)
    if args.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print("done", t.step, os.getpid(), flush=True)
    if args.world > 1:
        os._exit(0)  # skip C++ static destructors: gloo's threads can abort a normal exit


if __name__ == "__main__":
    main()
