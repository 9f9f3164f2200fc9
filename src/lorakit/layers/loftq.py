"""LoftQ (Li et al. 2023): quantize the base and start the adapter from what quantization lost.

QLoRA starts from ``q(W)`` with ``B = 0``, so the model begins off by the quantization error. LoftQ
alternates, for ``t = 1 … T``::

    Q_t = q(W − s · B_{t−1} A_{t−1})          (4-bit NF4 with double quantization, blocks of 64)
    s · B_t A_t = best rank-r approximation of W − deq(Q_t)      (truncated SVD, as PiSSA splits it)

from ``B_0 A_0 = 0``, and keeps ``Q_T`` as the (4-bit) base with ``A_T, B_T`` as the adapter's start:
``deq(Q_T) + s · B_T A_T`` is closer to ``W`` than ``deq(q(W))`` alone. The base layer of the wrapper
becomes an ``NF4Linear``; the dense weight is released (deleting the adapter leaves the 4-bit base).
Everything is a deterministic function of ``W`` (computed in float64), so loading a saved LoftQ
adapter into the dense model runs this again and rebuilds the same 4-bit base before the trained
factors are copied in; the file records a digest of every base, and a rebuild that differs (another
machine rounding a weight on a code boundary the other way) is refused rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
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
        return f"{type(layer.base_layer).__name__}: LoftQ initialises nn.Linear layers only"
    if is_linear4bit(layer.base_layer):
        return ("the base is 4-bit already; LoftQ starts from the dense weights (load the dense model: lorakit "
                "rebuilds the same 4-bit base)")  # fmt: skip
    if type(layer.base_layer) is not nn.Linear:
        return f"the base is a {type(layer.base_layer).__name__}, not an nn.Linear"
    if layer.r[name] > min(layer.in_features, layer.out_features):
        return f"rank {layer.r[name]} exceeds the layer's {layer.out_features}×{layer.in_features} weight"
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
    # float64 throughout: the SVD's rounding then stays far below the float32 the quantizer reads, so
    # another thread count or CPU rebuilds the same 4-bit codes (checked on load by base_digest).
    W = linear.weight.detach().to(torch.float64)
    low_rank = torch.zeros_like(W)
    for _ in range(iterations):
        base = _quantized(linear, (W - low_rank).to(linear.weight.dtype))
        A0, B0 = principal_factors(W - base.dequantize(torch.float64), r, s, "pissa")
        low_rank = s * (B0 @ A0)
    A.copy_(A0)
    B.copy_(B0)
    base.requires_grad_(False)
    layer.base_layer = base
    layer.fused = False  # the fused dense kernel no longer applies: the 4-bit base runs itself
    layer.__dict__["loftq_adapter"] = name


def base_digest(layer: LoraLayer) -> str:
    """SHA-256 of a LoftQ base's 4-bit codes and block statistics (what a rebuild must reproduce)."""
    digest = hashlib.sha256()
    for name in ("weight", "absmax", "absmax2", "code2", "offset"):
        tensor = getattr(layer.base_layer, name, None)
        if isinstance(tensor, torch.Tensor):
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def loftq_layers(layers: Iterable[tuple[str, LoraLayer]], name: str) -> dict[str, LoraLayer]:
    """path → layer, for the layers whose base adapter ``name`` quantized by LoftQ."""
    return {path: layer for path, layer in layers if layer.__dict__.get("loftq_adapter") == name}


#: the weights' ``__metadata__`` key: JSON {path: base_digest} of adapter's LoftQ bases when saved
BASES_KEY = "lorakit.loftq_bases"


def recorded_bases(layers: Iterable[tuple[str, LoraLayer]], name: str) -> dict[str, str]:
    """The metadata to save with adapter ``name`` (empty when it quantized no base)."""
    bases = {path: base_digest(layer) for path, layer in loftq_layers(layers, name).items()}
    return {BASES_KEY: json.dumps(bases, sort_keys=True)} if bases else {}


def check_rebuilt(layers: Iterable[tuple[str, LoraLayer]], name: str, metadata: dict[str, str]) -> None:
    """``ValueError`` unless the bases just rebuilt for adapter ``name`` are the ones it was saved with."""
    rebuilt = {path: base_digest(layer) for path, layer in loftq_layers(layers, name).items()}
    if not rebuilt:
        return
    if BASES_KEY not in metadata:
        raise ValueError("the file does not record the 4-bit bases its LoftQ adapter was trained on, so a rebuild "
                         "cannot be checked; save it again with lorakit")  # fmt: skip
    saved = json.loads(metadata[BASES_KEY])
    differ = sorted(p for p in rebuilt if saved.get(p) != rebuilt[p])
    if differ or set(saved) != set(rebuilt):
        raise ValueError(f"the 4-bit bases LoftQ rebuilt here differ from those the adapter was trained on "
                         f"({(differ or sorted(set(saved) ^ set(rebuilt)))[:3]}, ...): the trained factors belong to "
                         "the others; on the training machine, lorakit.merge_and_unload(model, dequantize=True) "
                         "gives a dense model that loads anywhere")  # fmt: skip
