"""Adapter banks: all adapters of one layer stacked into one tensor per factor.

For adapters ``k = 0..n-1`` of ranks ``r_k`` and scales ``s_k`` the bank holds::

    A_bank[k] = pad(A_k) ∈ R^{R×in},   B_bank[k] = s_k · pad(B_k) ∈ R^{out×R},   R = max r_k

zero-padded on the rank axis, plus one all-zero slot ``n`` for rows that use no adapter. Padding
and the zero slot contribute exactly nothing, so adapters of different ranks and alphas mix freely.
``routing.py`` explains how a batch uses it.

A bank of linear adapters is applied to rows ``x_b`` by gathering (BGMV-style)::

    t_b = x_b A[k_b]ᵀ   (shrink to rank R),    y_b = t_b B[k_b]   (expand)

``benchmarks/bank_strategies.py`` measures the alternative that needs no gather, one GEMM against
every slot's ``A`` with the other slots' columns masked to zero: on CPU it loses at every size
measured (0.02-0.76x), since it does ``S`` times the arithmetic.
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .functional import keep_mask

if TYPE_CHECKING:
    from .layers import LoraLayer


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad)


_VERSION = attrgetter("_version")


def _factors(layer: LoraLayer) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    names = list(layer.lora_A._parameters)
    return names, list(layer.lora_A._parameters.values()), list(layer.lora_B._parameters.values())


def stack_bank(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ``layer``'s adapters (differentiably) into ``(A_bank, B_bank, dropout_p)`` in the
    layer's bank layout (``layer.bank_layout``)."""
    names, a_params, b_params = _factors(layer)
    rank = max(layer.r.values())
    a = [_pad(p, 0, rank) for p in a_params]
    b = [_pad(p * layer.scaling[n], 1, rank) for n, p in zip(names, b_params, strict=True)]
    a.append(torch.zeros_like(a[0]))
    b.append(torch.zeros_like(b[0]))
    drop = [m.p if isinstance(m, nn.Dropout) else 0.0 for m in layer.lora_dropout.values()] + [0.0]
    A, B = layer.bank_layout(torch.stack(a), torch.stack(b))
    return A, B, torch.tensor(drop, dtype=A.dtype, device=A.device)


def inference_bank(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bank for forwards without autograd, cached on the layer and rebuilt only when an
    adapter was added, deleted, replaced or changed in place (tensor version counters)."""
    names, a_params, b_params = _factors(layer)
    params = a_params + b_params
    # map() with C-level getters: this check runs for every layer each time a route is entered.
    key = (tuple(names), tuple(map(id, params)), tuple(map(_VERSION, params)), tuple(layer.scaling.values()))
    cache = layer.__dict__.get("_bank_cache")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, stack_bank(layer))
        layer.__dict__["_bank_cache"] = cache
    return cache[1]


def row_slots(layer: LoraLayer, batch: int) -> torch.Tensor:
    """The bank slot of every row; a route given per prompt is repeated for expanded batches
    (beam search and sampling in ``generate`` repeat each row contiguously)."""
    slots = layer.routing
    assert slots is not None
    if batch == slots.shape[0]:
        return slots
    if batch % slots.shape[0] == 0:
        return slots.repeat_interleave(batch // slots.shape[0])
    raise ValueError(
        f"lorakit.route was given {slots.shape[0]} rows but a layer received a batch of {batch}; "
        "route one adapter name per row of the input"
    )


def routed_input_dropout(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row inverted dropout with keep probability ``keep[b]`` (1 where a row has none)."""
    shape = (h.shape[0],) + (1,) * (h.dim() - 1)
    keep = keep.reshape(shape)
    return h * keep_mask(h.shape, 1.0 - keep, h.device) / keep


def bank_delta_gathered(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
    bags: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Each row's own factors gathered from the banks (``A [S, R, in]``, ``B [S, R, out]``), then a
    batched shrink and expand. With one token per row the expand is a weighted ``embedding_bag``
    over the rows ``k_b·R + j`` of the flattened ``B`` bank (``bags``: those rows and offsets)."""
    t = torch.bmm(x, A.index_select(0, slots).transpose(1, 2))  # shrink: [b, L, R]
    if x.shape[1] != 1:
        return torch.bmm(t, B.index_select(0, slots))  # expand: [b, L, out]
    rows, offsets = bags if bags is not None else bag_indices(slots, A.shape[1])
    flat = B.reshape(-1, B.shape[2])
    return F.embedding_bag(rows, flat, offsets, mode="sum", per_sample_weights=t.reshape(-1)).unsqueeze(1)


def bag_indices(slots: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``k_b·R + j`` of a flattened ``[S·R, out]`` bank, and each row's bag offset."""
    rows = (slots.unsqueeze(1) * rank + torch.arange(rank, device=slots.device)).reshape(-1)
    return rows, torch.arange(0, slots.shape[0] * rank, rank, device=slots.device)
