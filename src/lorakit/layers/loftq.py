"""LoftQ (Li et al. 2023): quantize the base and start the adapter from what quantization lost.

QLoRA starts from ``q(W)`` with ``B = 0``, so the model begins off by the quantization error. LoftQ
alternates, for ``t = 1 … T``::

    Q_t = q(W − s · B_{t−1} A_{t−1})          (4-bit NF4 with double quantization, blocks of 64)
    s · B_t A_t = best rank-r approximation of W − deq(Q_t)      (truncated SVD, as PiSSA splits it)

from ``B_0 A_0 = 0``, and keeps ``Q_T`` as the (4-bit) base with ``A_T, B_T`` as the adapter's start:
``deq(Q_T) + s · B_T A_T`` is closer to ``W`` than ``deq(q(W))`` alone. The base layer of the wrapper
becomes an ``NF4Linear``; the dense weight is released. Everything is a deterministic function of
``W``, so loading a saved LoftQ adapter into the dense model runs this again and rebuilds the same
4-bit base before the trained factors are copied in. (A different CPU's SVD kernel may round a
weight that sits on a code boundary to the neighbouring code.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..quantization import NF4Linear
from ..targeting import is_linear4bit
from .principal import principal_factors, sole_owner_problem

if TYPE_CHECKING:
    from .base import LoraLayer


def _problem(layer: LoraLayer, name: str) -> str | None:
    if type(layer).kind != "linear" or layer.fan_in_fan_out:
        return f"{type(layer).__name__}: LoftQ initialises nn.Linear layers only"
    if is_linear4bit(layer.base_layer):
        return ("the base is 4-bit already; LoftQ starts from the dense weights (load the dense model: lorakit "
                "rebuilds the same 4-bit base)")  # fmt: skip
    if type(layer.base_layer) is not nn.Linear:
        return f"the base is a {type(layer.base_layer).__name__}, not an nn.Linear"
    return sole_owner_problem(layer, name, "quantizing it")


def _quantized(linear: nn.Linear, weight: torch.Tensor) -> NF4Linear:
    """``linear`` with ``weight`` in its place, quantized (NF4, double quantization, blocks of 64)."""
    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    dense.bias = linear.bias
    dense.train(linear.training)
    compute = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
    return NF4Linear(dense, "nf4", True, compute)


@torch.no_grad()
def initialize(layer: LoraLayer, name: str, iterations: int) -> None:
    """Quantize ``layer``'s base by LoftQ and set adapter ``name``'s factors (``iterations`` >= 1)."""
    problem = _problem(layer, name)
    if problem is not None:
        raise ValueError(f"init='loftq' is not possible here: {problem}")
    A, B, s, r = layer.lora_A[name], layer.lora_B[name], layer.scaling[name], layer.r[name]
    linear = layer.base_layer
    W = linear.weight.detach().to(A.dtype)
    low_rank = torch.zeros_like(W)
    for _ in range(iterations):
        base = _quantized(linear, W - low_rank)
        A0, B0 = principal_factors(W - base.dequantize(W.dtype), r, s, "pissa")
        low_rank = s * (B0 @ A0)
    A.copy_(A0)
    B.copy_(B0)
    base.requires_grad_(False)
    layer.base_layer = base
    layer.fused = False  # the fused dense kernel no longer applies: the 4-bit base runs itself
