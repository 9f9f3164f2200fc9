"""Combining trained adapters into a new named adapter, and the SVD view of an update.

For adapters ``k`` with updates ``ΔW_k = s_k B_k A_k`` and weights ``w_k`` the target is
``ΔW* = Σ_k w_k ΔW_k`` in every adapted layer. Methods:

* ``cat``: exact, ``A = [A_1; A_2; …]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, …]`` (rank = Σ r_k)
* ``linear``: same ranks only, ``A = Σ √(w_k s_k) A_k``, ``B = Σ √(w_k s_k) B_k`` (rank r; exact only
  when the cross terms ``B_j A_k`` vanish, hence the reported error)
* ``svd``: the best rank-``rank`` approximation of ``ΔW*`` (truncated SVD, ``B = U_r Σ_r``, ``A = V_rᵀ``)
* ``ties``: per adapter keep the ``density`` largest-magnitude entries of ``w_k ΔW_k``, elect each
  entry's sign by the sign of the sum, average the entries that agree, then truncate by SVD
* ``dare``: drop entries of each ``w_k ΔW_k`` with probability ``1 − density``, rescale the rest by
  ``1/density``, sum, then truncate by SVD

The report gives, per layer, ``‖ΔW_new − ΔW*‖_F / ‖ΔW*‖_F``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

import torch
from torch import nn

from .config import LoraConfig
from .errors import InputError
from .injection import adapter_configs, add_adapter, lora_layers
from .layers import LoraLayer, LoraParameter
from .targeting import require_module

METHODS = ("linear", "cat", "svd", "ties", "dare")


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """How many singular values hold ``energy`` (e.g. 0.9) of ``Σ σ²``."""
    s2 = singular_values.double() ** 2
    if s2.sum() == 0:
        return 0
    cumulative = torch.cumsum(s2, 0) / s2.sum()
    return int((cumulative < energy - 1e-12).sum().item()) + 1


def _matrix(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(delta.shape[0], -1).float()


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B [out, r]``, ``A [r, in]`` of the best rank-``rank`` approximation of ``delta``."""
    U, S, Vh = torch.linalg.svd(_matrix(delta), full_matrices=False)
    r = min(rank, S.numel())
    return U[:, :r] * S[:r], Vh[:r]


def _ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = []
    for d in deltas:
        k = max(1, round(density * d.numel()))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0).clamp_min(1)
    return (stacked * agree).sum(0) / count


def _dare(deltas: list[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d in deltas:
        keep = torch.rand(d.shape, generator=generator) < density
        out += d * keep / density
    return out


def _weights(weights: Sequence[float], count: int) -> list[float]:
    """One finite number per source (a tensor or array is read as its numbers)."""
    if hasattr(weights, "tolist") and not isinstance(weights, (list, tuple)):  # a tensor or a numpy array
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != count:
        shown = len(weights) if isinstance(weights, Sequence) and not isinstance(weights, str) else repr(weights)
        raise InputError(f"weights: {shown} given for {count} sources; allowed: one finite number per source")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise InputError(f"weights[{i}] = {w!r}; allowed: a finite number (negative subtracts the adapter)")
    return [float(w) for w in weights]


def combine_adapters(
    model: nn.Module,
    sources: Sequence[str],
    weights: Sequence[float],
    name: str,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Add adapter ``name`` combining ``sources`` with ``weights``; returns the relative
    reconstruction error of ``Σ w_k ΔW_k`` per layer (0 for ``cat``).

    ``weights`` are finite numbers (negative ones subtract an adapter); ``rank`` (svd, ties, dare;
    default: the largest source rank) and ``density`` (ties, dare; default 0.5) apply only to the
    methods that use them. A source absent from a layer adds nothing there: the new adapter adapts
    the union of the sources' layers. Every argument is checked before the model changes.
    """
    require_module(model, "lorakit.combine_adapters")
    configs = adapter_configs(model)
    if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
        raise InputError(f"sources = {sources!r}; allowed: a non-empty list of adapter names among {sorted(configs)}")
    if any(not isinstance(s, str) for s in sources):
        raise InputError(f"sources = {list(sources)!r}; allowed: adapter names (strings) among {sorted(configs)}")
    repeated = sorted({s for s in sources if list(sources).count(s) > 1})
    if repeated:
        raise InputError(f"sources = {list(sources)!r} names {repeated[0]!r} more than once; allowed: each adapter "
                         "once (give it a larger weight instead)")  # fmt: skip
    missing = [s for s in sources if s not in configs]
    if missing:
        raise InputError(f"sources: unknown adapters {missing}; the model holds {sorted(configs) or 'no adapters'}")
    on_weights = sorted({s for _, layer in lora_layers(model) if isinstance(layer, LoraParameter)
                         for s in sources if s in layer.lora_A})  # fmt: skip
    if on_weights:
        raise InputError(f"sources: {on_weights} adapt parameters or nn.MultiheadAttention (target_parameters), "
                         "whose factor layouts combine_adapters does not rebuild (PEFT refuses them too)")  # fmt: skip
    if method not in METHODS:
        raise InputError(f"method = {method!r}; allowed: {', '.join(METHODS)}")
    weights = _weights(weights, len(sources))
    if not isinstance(name, str) or not name or "." in name:
        raise InputError(f"name = {name!r}; allowed: a non-empty string without '.'")
    if name in configs:
        raise InputError(f"name = {name!r} is taken; allowed: a name other than {sorted(configs)}")
    if rank is not None:
        if method in ("cat", "linear"):
            raise InputError(f"rank = {rank!r} with method {method!r}; allowed: None (cat's rank is the sum of the "
                             "sources' ranks, linear's their common rank)")  # fmt: skip
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise InputError(f"rank = {rank!r}; allowed: None (the largest source rank) or a whole number >= 1")
    if density is not None:
        if method not in ("ties", "dare"):
            raise InputError(f"density = {density!r} with method {method!r}; allowed: None (only ties and dare "
                             "use density)")  # fmt: skip
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise InputError(f"density = {density!r}; allowed: a number in (0, 1]")
    dora = sorted(s for s in sources if configs[s].use_dora)
    if dora:
        raise InputError(f"sources {dora} are DoRA adapters: their magnitudes rescale the whole weight, so ΔW does not "
                         "add up across adapters; combine plain LoRA adapters only")  # fmt: skip
    biased = sorted(s for s in sources if configs[s].lora_bias)
    if biased:
        raise InputError(f"sources {biased} have lora biases, which a combined adapter (factors only) cannot hold; "
                         "combine adapters without lora_bias")  # fmt: skip
    density = 0.5 if density is None else float(density)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"seed = {seed!r}; allowed: an integer")
    generator = torch.Generator().manual_seed(seed)

    plans: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # path -> (A, B, target ΔW)
    for path, layer in lora_layers(model):
        present = [(s, w) for s, w in zip(sources, weights, strict=True) if s in layer.lora_A]
        if not present:
            continue
        if getattr(layer.base_layer, "groups", 1) > 1:
            raise InputError(f"layer {path!r} is a grouped convolution (groups={layer.base_layer.groups}): its B is "
                             "grouped like the base, which a combined B cannot be; leave such layers out")  # fmt: skip
        with torch.no_grad():
            deltas = [w * _factor_delta(layer, s) for s, w in present]
            target = torch.stack(deltas).sum(0)
            A, B = _factors(layer, present, deltas, target, method, rank, density, generator)
        plans[path] = (A, B, target)

    if not plans:
        raise InputError(f"sources {list(sources)} adapt no layer of this model")
    ranks = {p: int(a.shape[0]) for p, (a, _, _) in plans.items()}
    base_rank = max(ranks.values())
    pattern = "|".join(re.escape(p) for p in plans)
    config = LoraConfig(
        r=base_rank,
        alpha=float(base_rank),
        target_modules=pattern,
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != base_rank},
        alpha_pattern={re.escape(p): float(r) for p, r in ranks.items() if r != base_rank},
    )  # fmt: skip  (alpha = r per layer: scale 1, B carries the magnitudes)
    add_adapter(model, config, name)
    errors = {}
    for path, layer in lora_layers(model):
        if path not in plans:
            continue
        A, B, target = plans[path]
        with torch.no_grad():
            layer.lora_A[name].copy_(A.reshape(layer.lora_A[name].shape))
            layer.lora_B[name].copy_(B.reshape(layer.lora_B[name].shape))
            got = _factor_delta(layer, name)
        errors[path] = float((got - target).norm() / target.norm().clamp_min(1e-12))
    return errors


def _factor_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """ΔW of adapter ``name`` as ``B A`` (the factors' layout, whatever the base stores)."""
    return layer.factor_delta(layer.lora_A[name], layer.lora_B[name], layer.scaling[name])


def _factors(layer, present, deltas, target, method, rank, density, generator):
    if method == "cat":
        A = torch.cat([layer.lora_A[s].detach().reshape(layer.r[s], -1) for s, _ in present])
        B = torch.cat([layer.lora_B[s].detach().reshape(layer.lora_B[s].shape[0], -1) * (w * layer.scaling[s])
                       for s, w in present], dim=1)  # fmt: skip
        return A, B
    if method == "linear":
        rs = {layer.r[s] for s, _ in present}
        if len(rs) != 1:
            raise InputError(f"method='linear' needs equal ranks; layer has ranks {sorted(rs)}; allowed for unequal "
                             "ranks: cat, svd, ties, dare")  # fmt: skip
        A = sum(math.sqrt(abs(w) * layer.scaling[s]) * layer.lora_A[s].detach() for s, w in present)
        B = sum(math.copysign(math.sqrt(abs(w) * layer.scaling[s]), w) * layer.lora_B[s].detach() for s, w in present)
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    r = rank or max(layer.r[s] for s, _ in present)
    if method == "ties":
        target = _ties(deltas, density)
    elif method == "dare":
        target = _dare(deltas, density, generator)
    B, A = _truncate(target, r)
    return A, B


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of an update (any layout; matrices of conv kernels are flattened)."""
    return torch.linalg.svdvals(_matrix(delta))
