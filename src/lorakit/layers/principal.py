"""PiSSA and OLoRA: LoRA factors taken from W0 itself, with W0 replaced by the residual.

PiSSA (Meng et al. 2024) starts from the top ``r`` singular triplets ``W0 ≈ U_r S_r V_rᵀ``::

    A = √(S_r / s) V_rᵀ,   B = U_r √(S_r / s)          (so s · B A = U_r S_r V_rᵀ)

OLoRA (Büyükakyüz 2024) from the QR decomposition ``W0 = Q R``::

    A = R[:r],   B = Q[:, :r]

Either way the base weight becomes the residual ``W0' = W0 − s · B A`` (computed in float32, as
PEFT does), so the model's output is unchanged at the start while training moves the principal
part. Both are deterministic functions of W0 (a sign flip of a singular or Q column changes A and B
but not ``B A``), so loading a saved adapter re-runs the init on the original W0 and rebuilds the
same residual: files round-trip with PEFT both ways.

Because the base changes, such an adapter must be alone on its layers; deleting it restores W0
(``W0' + s · B0 A0`` with the initial factors), and ``converted_factors`` gives the plain LoRA
adapter of rank ``2r`` that applies to the original W0 (PEFT's
``path_initial_model_for_weight_conversion``)::

    W0' + s · B A = W0 + s · [B, −B0] [A; A0]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..config import PREFIX, LoraConfig
from ..errors import InputError
from ..targeting import is_linear4bit

if TYPE_CHECKING:
    from .base import LoraLayer

PRINCIPAL_INITS = ("pissa", "olora")


def principal_factors(W0: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` of ``init`` for a weight ``W0 [out, in]`` (float32 or float64)."""
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        root = (S[:r] / scaling).sqrt()
        return root[:, None] * Vh[:r], U[:, :r] * root
    if init == "olora":
        Q, R = torch.linalg.qr(W0)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    raise ValueError(f"unknown principal init {init!r}; allowed: {PRINCIPAL_INITS}")


def _dense(layer: LoraLayer) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (a view for Conv1D's ``[in, out]``)."""
    w = layer.base_layer.weight
    return w.T if layer.fan_in_fan_out else w


def _problem(layer: LoraLayer, name: str, init: str) -> str | None:
    if not hasattr(layer, "in_features") or type(layer).kind != "linear":
        return f"{type(layer).__name__}: PiSSA / OLoRA initialise linear layers only (as in PEFT)"
    if init == "olora" and layer.fan_in_fan_out:
        # PEFT 0.21 factors the stored [in, out] matrix: a file saved here would load wrong there
        return "OLoRA on a Conv1D ([in, out]) weight, which PEFT initialises transposed (wrong shapes); use pissa"
    if is_linear4bit(layer.base_layer):
        return "a 4-bit base: the residual W0 − s·B A would have to be quantized again; initialise on a dense base"
    if layer.r[name] > min(layer.in_features, layer.out_features):
        return f"rank {layer.r[name]} exceeds the layer's {layer.out_features}×{layer.in_features} weight"
    return sole_owner_problem(layer, name, "the residual")


def sole_owner_problem(layer: LoraLayer, name: str, change: str) -> str | None:
    """An init that rewrites the base (``change`` says how) needs the weight to itself: not tied to
    another module, and no other adapter on the layer."""
    if layer.weight_shared_with:
        return f"its weight is tied to {', '.join(layer.weight_shared_with)}, which {change} would change too"
    others = [n for n in layer.lora_A if n != name]
    if others:
        return f"the layer holds adapters {others}, whose base {change} would change; give it its own model"
    return None


@torch.no_grad()
def initialize(layer: LoraLayer, name: str, init: str) -> None:
    """Set adapter ``name``'s factors by ``init`` and replace the base weight by the residual."""
    problem = _problem(layer, name, init)
    if problem is not None:
        raise ValueError(f"init={init!r} is not possible here: {problem}")
    A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    weight = layer.base_layer.weight
    W0 = _dense(layer).to(A.dtype)
    A0, B0 = principal_factors(W0, layer.r[name], s, init)
    A.copy_(A0)
    B.copy_(B0)
    residual = W0 - s * (B0 @ A0)
    weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))
    layer.__dict__.setdefault("initial_factors", {})[name] = (A0.clone(), B0.clone())


def holds_principal(layer: LoraLayer) -> bool:
    return bool(layer.__dict__.get("initial_factors"))


@torch.no_grad()
def restore_base(layer: LoraLayer, name: str) -> None:
    """``W0 ← W0' + s · B0 A0`` when adapter ``name`` replaced the base by its residual."""
    factors = layer.__dict__.get("initial_factors", {}).pop(name, None)
    if factors is None:
        return
    A0, B0 = factors
    weight = layer.base_layer.weight
    W0 = _dense(layer).to(A0.dtype) + layer.scaling[name] * (B0 @ A0)
    weight.copy_((W0.T if layer.fan_in_fan_out else W0).to(weight.dtype))


def converted_factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``([A; A0], [B, −B0])``: adapter ``name`` as plain LoRA of rank 2r on the original W0 (None
    when it did not replace the base)."""
    factors = layer.__dict__.get("initial_factors", {}).get(name)
    if factors is None:
        return None
    A0, B0 = factors
    A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    return torch.cat([A, A0]), torch.cat([B, -B0], dim=1)


def convert_state(
    layers: Iterable[tuple[str, LoraLayer]], name: str, config: LoraConfig, state: dict[str, torch.Tensor]
) -> LoraConfig:
    """Adapter ``name`` of ``layers`` (path, layer) as plain LoRA of rank 2r on the original W0: its
    factors in ``state`` (PEFT keys) are replaced, and the config doubles every rank at the same scale."""
    if config.init == "loftq":
        raise InputError("convert_to_lora: a LoftQ adapter belongs to its own 4-bit base, which no plain LoRA file "
                         "can carry; lorakit.merge_and_unload(model, dequantize=True) is the dense model")  # fmt: skip
    if config.init not in PRINCIPAL_INITS:
        return config  # already plain LoRA on the model's own base
    if config.use_dora:
        raise InputError("convert_to_lora: a DoRA adapter's magnitudes refer to the residual base; save it as it is")
    for path, layer in layers:
        factors = converted_factors(layer, name)
        if factors is not None:
            key_a, key_b = layer.peft_keys
            state[f"{PREFIX}{path}.{key_a}"], state[f"{PREFIX}{path}.{key_b}"] = factors

    def alpha(value: float) -> float:  # s = alpha / r (rsLoRA: alpha / √r) unchanged at rank 2r
        return value * (2**0.5 if config.use_rslora else 2.0)

    return config.replace(r=2 * config.r, alpha=alpha(config.alpha), init="default",
                          rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                          alpha_pattern={k: alpha(v) for k, v in config.alpha_pattern.items()})  # fmt: skip
