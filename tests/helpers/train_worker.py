"""A deterministic little training run for the trainer tests (run as a separate process).

python -m tests.helpers.train_worker OUT_DIR [--resume] [--world N --rank R --init FILE] [--batch B]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import lorakit as lk


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
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank,
                                             world_size=args.world)  # fmt: skip
    model = build(args.dropout)
    x, y = data()
    cfg = lk.TrainerConfig(out_dir=args.out, max_steps=args.steps, batch_size=args.batch, lr=5e-3, warmup_steps=3,
                           save_every=4, keep_last=2, progress=False, log_every=1)  # fmt: skip
    trainer = lk.Trainer(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                         lambda idx: (x[idx], y[idx]), len(y), cfg)  # fmt: skip
    trainer.train(resume=args.resume)
    if args.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print("done", trainer.step, os.getpid(), flush=True)
    if args.world > 1:
        os._exit(0)  # skip C++ static destructors: gloo's threads can abort a normal exit


if __name__ == "__main__":
    main()
