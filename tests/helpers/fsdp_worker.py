"""FSDP2 (``fully_shard``) over a model with adapters: frozen and trainable parameters mixed.

python -m tests.helpers.fsdp_worker INIT_FILE OUT_FILE   (spawns 2 gloo processes on CPU)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lorakit as lk


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def train(model, x, y, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def run(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    model, x, y = model_and_data()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    train(model, x, y)  # every rank sees the same batch: averaged gradients = the single-process ones
    full = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(full, out)
    dist.barrier()  # nobody tears the group down while another rank still works
    dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads can abort a normal interpreter
    # exit ("terminate called without an active exception") after all the work is done.
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
