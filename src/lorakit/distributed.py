"""Data-parallel models in the trainer: DDP wrappers, compiled models, FSDP2 shards.

``lk.Trainer`` takes the model as the user runs it:

- plain, under ``torch.distributed``: the trainer averages the trainable gradients itself
  (one flattened all-reduce; frozen weights never join it);
- wrapped by ``DistributedDataParallel``: DDP has averaged them during backward, so the trainer
  does not again, and DDP's ``no_sync`` skips the all-reduce of all but the last micro-batch;
- sharded in place by FSDP2's ``fully_shard``: parameters are ``DTensor`` shards whose gradients
  FSDP has already reduce-scattered (averaged); only plain parameters beside them are averaged.

Whatever the wrapper, adapters are saved and loaded on the user's module (``unwrap``), so their
names carry no ``module.`` or ``_orig_mod.`` prefix. Sharded trainable parameters are gathered
for a save and written back shard by shard after a load (``full_trainable``): every process
takes part (the gathers are collectives), and the frozen base is never gathered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Parameter-keyed (torch's own) versus name-keyed (torch.distributed.checkpoint's full) state.
OPTIMIZER_BY_NAME = "optimizer_by_name"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under ``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if is_ddp(model):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def is_ddp(model: nn.Module) -> bool:
    """True for a ``DistributedDataParallel`` wrapper, compiled by ``torch.compile`` or not."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return torch.distributed.is_available() and isinstance(model, nn.parallel.DistributedDataParallel)


def is_sharded(t: torch.Tensor) -> bool:
    """True for a ``DTensor`` (a parameter sharded by FSDP2, or its gradient)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sync_context(model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for every micro-batch but the last (its gradients accumulate locally)."""
    if is_ddp(model) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


def average_gradients(model: nn.Module, params: list[nn.Parameter], world: int) -> None:
    """Average over the processes the gradients nobody has averaged yet: none under DDP, the
    plain (unsharded) parameters' under FSDP2, all of them otherwise; one flattened all-reduce,
    on the device the gradients live on (NCCL needs CUDA tensors, gloo takes either). A parameter
    no process computed a gradient for (an adapter a routed batch did not use) keeps ``None``, as
    in one process, so that momentum and weight decay leave it alone."""
    if world == 1 or is_ddp(model):
        return
    plain = [p for p in params if not is_sharded(p)]
    if not plain:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plain]
    device, dtype = grads[0].device, torch.promote_types(grads[0].dtype, torch.float32)
    has = torch.tensor([p.grad is not None for p in plain], dtype=dtype, device=device)
    flat = torch.cat([*(g.reshape(-1).to(dtype) for g in grads), has])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(plain, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    for p, seen in zip(plain, flat[offset:].tolist(), strict=True):
        if seen == 0:
            p.grad = None


def agree_on_loss(loss: torch.Tensor, world: int) -> tuple[float, bool]:
    """``(mean loss over the processes, whether every process's loss is finite)``: one small
    all-reduce, so that all processes skip or stop together (one process leaving a step alone
    would leave the others waiting in the gradients' collective)."""
    value = loss.detach().float()
    if world == 1:
        return float(value), bool(torch.isfinite(value))
    both = torch.stack([torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0), (~torch.isfinite(value)).float()])
    torch.distributed.all_reduce(both)
    return float(both[0]) / world, float(both[1]) == 0


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes FSDP2 shards beside plain parameters
    (torch refuses the mix): the total norm of each group, combined, clips both. Returns the norm."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded or len(sharded) == len(params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not is_sharded(p)]
    parts = [torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None]) for group in (sharded, plain)]
    norms = [n.full_tensor() if is_sharded(n) else n for n in parts]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[1].device, torch.float32) for n in norms]))
    for group in (sharded, plain):
        torch.nn.utils.clip_grads_with_norm_([p for p in group if p.grad is not None], max_norm, total)
    return total


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every process's ``obj``, by rank (a collective: every process must call it)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _sharded_trainable(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [(module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
            if p.requires_grad and is_sharded(p)]  # fmt: skip


@contextlib.contextmanager
def full_trainable(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Inside: every sharded trainable parameter of ``model`` is a plain full tensor (gathered
    from all processes; every process must enter). With ``write_back``, the values the full
    tensors hold on leaving (a load wrote them) are copied into each process's shard. The
    original parameters (the optimizer's) are back in place afterwards."""
    sharded = _sharded_trainable(model)
    if not sharded:
        yield
        return
    full = [nn.Parameter(p.full_tensor().detach().clone(), requires_grad=True) for _, _, p in sharded]
    for (module, name, _), plain in zip(sharded, full, strict=True):
        setattr(module, name, plain)
    try:
        yield
    finally:
        for module, name, original in sharded:
            setattr(module, name, original)
    if write_back:
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for (_, _, p), plain in zip(sharded, full, strict=True):
                value = plain.detach().to(device=p.device, dtype=p.dtype)
                p.copy_(distribute_tensor(value, p.device_mesh, p.placements))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to save: torch's own ``state_dict()``, or, when parameters are
    sharded, the full state keyed by parameter name (gathered: every process must call this)."""
    if not any(is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
        return {"optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {OPTIMIZER_BY_NAME: get_optimizer_state_dict(unwrap(model), optimizer, options=options)}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what ``optimizer_state`` saved, sharded or not, into this run's optimizer."""
    if OPTIMIZER_BY_NAME not in state:
        optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        _shard_plain_state(optimizer)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state[OPTIMIZER_BY_NAME],
                             options=StateDictOptions(full_state_dict=True))  # fmt: skip


def _shard_plain_state(optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint of an unsharded run resumed with FSDP2: each full state tensor of a sharded
    parameter (AdamW's moments) becomes the shard this process owns."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            from torch.distributed.tensor import distribute_tensor

            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
