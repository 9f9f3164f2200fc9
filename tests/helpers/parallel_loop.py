"""A plain training loop (no lk.Trainer) over a model with adapters, data-parallel on 2 CPU
processes (gloo): wrapped by ``DistributedDataParallel`` or sharded by FSDP2's ``fully_shard``.
Each rank trains on its own half of every batch.

python -m tests.helpers.parallel_loop ddp|fsdp INIT_FILE OUT_FILE
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lorakit as lk

STEPS, BATCH = 6, 16


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(STEPS * BATCH, 16, generator=g), torch.randint(0, 4, (STEPS * BATCH,), generator=g)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int = 0, world: int = 1) -> None:
    """``STEPS`` AdamW steps; step ``s`` takes rows ``[s·BATCH, (s+1)·BATCH)``, of which this
    rank trains on its ``1/world`` share (the mean loss of its rows; DDP and FSDP average the
    ranks' gradients, so the step equals one process on the whole batch)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    share = BATCH // world
    for step in range(STEPS):
        rows = slice(step * BATCH + rank * share, step * BATCH + (rank + 1) * share)
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad()


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    def full(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: full(p).detach().clone() for n, p in inner.named_parameters() if p.requires_grad}


def run(rank: int, mode: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    model, x, y = model_and_data()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    train(model, x, y, rank, 2)
    state = trainable(model)  # a collective under FSDP: every rank gathers
    if rank == 0:
        torch.save(state, out)
    dist.barrier()  # nobody tears the group down while another rank still works
    dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads can abort a normal interpreter
    # exit ("terminate called without an active exception") after all the work is done.
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2], sys.argv[3]), nprocs=2)
