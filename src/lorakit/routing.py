"""Many adapters in one batch: every row of the batch runs its own adapter.

Each LoRA layer stacks its adapters into a bank (one tensor per factor, the scale folded into B,
ranks zero-padded to the largest, and one all-zero slot for rows that use no adapter)::

    A_bank ∈ R^{S×R×in},  B_bank ∈ R^{S×out×R},   B_bank[k] = s_k · pad(B_k)

and a batch whose row ``b`` uses slot ``k_b`` computes, with one gather and two batched GEMMs
(BGMV-style: "shrink" to rank R, then "expand")::

    y_b = base(x_b) + (x_b A_bank[k_b]ᵀ) B_bank[k_b]ᵀ

There is no Python loop over adapters in ``forward``. Zero padding and the zero slot contribute
exactly nothing, so adapters of different ranks and alphas mix freely. Under autograd the bank is
stacked from the adapters' own parameters on every forward, so each row's loss reaches only its own
adapter; in inference the bank is cached until an adapter changes (added, deleted, or written to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .bank import inference_bank
from .injection import adapter_configs, lora_layers, wrapper_list
from .layers import LoraLayer, ModulesToSave

Routing = Sequence[str | None] | torch.Tensor


@contextlib.contextmanager
def route(model: nn.Module, adapters: Routing) -> Iterator[nn.Module]:
    """Within the block, row ``b`` of every batch runs adapter ``adapters[b]`` (None: base only).

    ``adapters`` is a list of adapter names (or None), or an integer tensor of positions in
    ``lorakit.adapter_configs(model)`` order (-1: base only). Works in training (each row's loss
    updates only its own adapter; see ``set_trainable``) and in inference, including
    ``generate`` with beams or sampling (rows are expanded as generate expands them).
    """
    configs = adapter_configs(model)
    order = list(configs)
    if isinstance(adapters, torch.Tensor):
        if adapters.dim() != 1 or adapters.dtype.is_floating_point:
            raise ValueError(
                f"a routing tensor must be a 1-D integer tensor, got {tuple(adapters.shape)} {adapters.dtype}"
            )
        bad = [int(i) for i in adapters.tolist() if not -1 <= int(i) < len(order)]
        if bad:
            raise ValueError(f"routing indices {bad} are out of range: the model holds {len(order)} adapters {order}")
        names: list[str | None] = [order[i] if i >= 0 else None for i in adapters.tolist()]
    else:
        names = list(adapters)
        unknown = sorted({n for n in names if n is not None and n not in configs})
        if unknown:
            raise KeyError(f"route names unknown adapters {unknown}; the model holds {order or 'no adapters'}")
    if not names:
        raise ValueError("route needs at least one row")
    wrappers = wrapper_list(model)
    if any(isinstance(m, ModulesToSave) for m in wrappers):
        raise NotImplementedError(
            "per-row routing does not support modules_to_save (a fully trained module per adapter); "
            "use set_adapter for such adapters"
        )
    layers = [m for m in wrappers if isinstance(m, LoraLayer)]
    merged = [layer for layer in layers if layer.merged_adapters]
    if merged:
        raise RuntimeError("an adapter is merged into the base weights: call lorakit.unmerge(model) before routing")
    state = ("routing", "route_bank", "route_trains", "active_adapter", "adapters_disabled")
    # Plain attributes: saved and restored through __dict__ (nn.Module.__setattr__ is slow).
    previous = [{a: layer.__dict__[a] for a in state} for layer in layers]
    position = {n: i for i, n in enumerate(order)}
    rows = torch.tensor([position[n] if n is not None else len(order) for n in names])
    used = set(names)
    shared: dict = {}
    try:
        for layer in layers:
            present = used.intersection(layer.lora_A._parameters)
            # Every row of this layer runs the same adapter, or none: the single-adapter path is
            # exact and cheaper than a gather.
            if not present:
                layer.adapters_disabled = True
                continue
            if len(used) == 1:
                layer.active_adapter = next(iter(present))
                continue
            # Layers holding the same adapters share one slot tensor (and its cached indices).
            device = layer.base_layer.weight.device
            key = (tuple(layer.lora_A._parameters), device)
            if key not in shared:
                shared[key] = _slot_table(layer, order)[rows].to(device)
            layer.routing = shared[key]
            layer.route_prepare(shared)
            # Captured once here, so a forward does no per-adapter Python work.
            layer.route_trains = any(p.requires_grad for p in layer.lora_A._parameters.values())
            layer.route_bank = None if layer.route_trains else inference_bank(layer)
        yield model
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.__dict__.update(old)


def _slot_table(layer: LoraLayer, order: list[str]) -> torch.Tensor:
    """Model adapter position → this layer's bank slot (the zero slot for adapters the layer
    lacks, and for position ``len(order)`` = no adapter). Cached per layer."""
    key = (tuple(order), tuple(layer.lora_A._parameters))
    cached = layer.__dict__.get("_slot_table")
    if cached is None or cached[0] != key:
        slot = {n: i for i, n in enumerate(layer.lora_A._parameters)}
        zero = len(slot)
        cached = (key, torch.tensor([slot.get(n, zero) for n in order] + [zero]))
        layer.__dict__["_slot_table"] = cached
    return cached[1]


def set_trainable(model: nn.Module, adapters: Sequence[str]) -> None:
    """Make exactly these adapters trainable (e.g. all adapters of a mixed-batch training run);
    ``set_adapter`` makes only the active one trainable."""
    configs = adapter_configs(model)
    unknown = sorted(set(adapters) - set(configs))
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; the model holds {sorted(configs)}")
    wanted = set(adapters)
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            layer.lora_A[name].requires_grad_(name in wanted)
            layer.lora_B[name].requires_grad_(name in wanted)
