"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) on linear, embedding and
convolution layers: the LoRA layers of this package plus a trained magnitude ``m`` per output feature.

The adapted weight is a direction, ``W0 + ΔW`` (``ΔW = s · B A`` exactly as in LoRA), rescaled to
the magnitude ``m``::

    W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖        (‖·‖: the norm of each output feature's weights)

``m`` starts at ``‖W0 + ΔW‖``, so a fresh adapter leaves the layer unchanged. The norm is a
constant for the gradient (the paper's section 4.3; PEFT does the same). With ``f = m / ‖W0 + ΔW‖``
and bias ``b``, the layer computes, without forming ``W'``::

    y = f ⊙ (W0 x + s · B A x) + b  =  z + (f − 1) ⊙ (z − b)     z: the LoRA output W0 x + b + s · B A x
                                                            (f per output feature / channel)
    y = f ⊙ (W0[ids] + s · (B A)ᵀ[ids])                      embedding (f per embedding dimension)

and, with input dropout ``d`` in training, PEFT's form ``y = W0 x + b + (f − 1) ⊙ W0 d(x) + f ⊙ s · B A d(x)``.

The norm never forms ``W0 + ΔW`` (PEFT builds that ``[out, in]`` matrix every step). Row by row::

    ‖W0_o + s (B A)_o‖² = ‖W0_o‖² + 2 s ⟨B_o, (W0 Aᵀ)_o⟩ + s² B_o (A Aᵀ) B_oᵀ

which costs one product of ``W0`` with the ``r`` rows of ``A``. Rows whose terms cancel (the sum
under 1% of its positive parts, so rounding would show) are recomputed directly.

Merging writes ``W'`` into the base weight (it adds ``(f − 1) ⊙ W0 + f ⊙ ΔW``); unmerging restores
``W0 = W' / f − ΔW`` with the ``f`` of that merge. Checkpoints hold ``m`` under PEFT's key
``lora_magnitude_vector`` (shape ``[out]``; ``[1, out, 1…]`` for convolutions; ``[dim]`` for embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..functional import lora_linear
from ..optimizer_steps import steps_taken
from ..quantization import dequantize_weight
from ..targeting import is_linear4bit
from .base import LoraLayer, accumulate
from .conv import LoraConv, LoraConv1d, LoraConv2d, LoraConv3d
from .embedding import LoraEmbedding
from .linear import LoraLinear, is_linear
from .registry import register_kind

MAGNITUDE_KEY = "lora_magnitude_vector"
#: a row's squared norm below this fraction of its positive terms is recomputed directly
CANCELLATION = 0.01


@torch.no_grad()
def row_norms(
    W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, own: torch.Tensor | None = None
) -> torch.Tensor:
    """``‖W0_o + s · (B A)_o‖`` for every row ``o`` of ``W0 [rows, cols]`` (``A [r, cols]``,
    ``B [rows, r]``), computed in the factors' dtype without forming ``B A`` (``own``: the known
    ``‖W0_o‖²``, which a frozen base keeps from step to step)."""
    W0 = W0.to(A.dtype)
    if own is None:
        own = squared_row_norms(W0)
    W0A = (A @ W0.T).T if _transposed_view(W0) else W0 @ A.T
    cross = W0A.mul_(B).sum(1) if W0A.is_contiguous() else (W0A * B).sum(1)
    quad = (B @ (A @ A.T)).mul_(B).sum(1)
    positive = own + scaling * scaling * quad
    squared = positive + 2 * scaling * cross
    rows = (squared < CANCELLATION * positive).nonzero().flatten()
    if rows.numel():
        squared[rows] = torch.linalg.vector_norm(W0[rows] + scaling * (B[rows] @ A), dim=1).square()
    return squared.clamp_min_(0).sqrt_()


def squared_row_norms(W0: torch.Tensor) -> torch.Tensor:
    """``‖W0_o‖²`` for every row of ``W0`` (read in storage order when ``W0`` is a transposed view)."""
    if _transposed_view(W0):
        return torch.linalg.vector_norm(W0.T, dim=0).square()
    return torch.linalg.vector_norm(W0, dim=1).square()


def _transposed_view(W0: torch.Tensor) -> bool:
    """A transposed view of a contiguous matrix (Conv1D's and embeddings' weights): read it in storage order."""
    return W0.T.is_contiguous() and not W0.is_contiguous()


def _state_key(*tensors: torch.Tensor) -> tuple | None:
    """What identifies the current values of ``tensors``: identity, version (in-place writes), data
    pointer (``.data =`` assignments), device and the optimizer steps taken (fused optimizers write
    without bumping versions); None for inference tensors, which keep no version."""
    try:
        return (steps_taken(), *((id(t), t._version, t.data_ptr(), t.device) for t in tensors))
    except RuntimeError:
        return None


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    """Merging computes in float32, or float64 for a float64 base: never below the adapter's precision."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class _Rescale(torch.autograd.Function):
    """``y = c + z ⊙ f`` (``f``, ``c`` broadcast over ``z``) in one pass; keeps ``z`` for ``∂L/∂f``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, f: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(z, f)
        ctx.has_c = c is not None
        return torch.addcmul(c, z, f) if c is not None else z * f

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, f = ctx.saved_tensors
        need_z, need_f, need_c = ctx.needs_input_grad
        grad_f = (g * z).sum_to_size(f.shape) if need_f else None
        grad_c = g.sum_to_size(f.shape) if need_c and ctx.has_c else None
        return (g * f if need_z else None), grad_f, grad_c


def rescale(z: torch.Tensor, f: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """``c + z ⊙ f``: in place without autograd, else one fused pass that keeps only ``z``."""
    if not torch.is_grad_enabled():
        z.mul_(f)
        return z if c is None else z.add_(c)
    return _Rescale.apply(z, f, c)


class DoraLayer(LoraLayer):
    """What the DoRA kinds share: the magnitudes, the norm, the forward and merging. A kind adds
    the shapes (``magnitude_shape``, ``weight_layout``), its matrices (``norm_operands``), and
    where it can, a faster ``undropped`` (the LoRA output ``W0 x + b + s · B A x``)."""

    variant = "dora"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude = nn.ParameterDict()

    # ------------------------------------------------------------------ per kind
    def magnitude_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def weight_layout(self, f: torch.Tensor) -> torch.Tensor:
        """``f`` shaped to scale the base weight's output features in its own layout."""
        raise NotImplementedError

    def norm_operands(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W0, A, B)`` as matrices whose rows are the output features ``f`` scales."""
        raise NotImplementedError

    def undropped(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The LoRA output ``W0 x + b + s · B A x`` (no dropout)."""
        out = self.base_layer(x, *args, **kwargs)
        return accumulate(out, self.low_rank(x, name), self.owns_output())

    def input_dropout(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout[name](x)

    def dense_weight(self) -> torch.Tensor:
        """``W0`` in the base weight's layout (a 4-bit weight dequantized)."""
        return self.base_layer.weight

    def output_bias(self) -> torch.Tensor | None:
        """The base bias, shaped to add to the layer's output (None without one)."""
        return getattr(self.base_layer, "bias", None)

    # ------------------------------------------------------------------ shared
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(name), MAGNITUDE_KEY: self.lora_magnitude[name]}

    def param_shapes(self, r: int, lora_bias: bool = False) -> dict[str, tuple[int, ...]]:
        return {**super().param_shapes(r, lora_bias), MAGNITUDE_KEY: self.magnitude_shape()}

    def add_lora_bias(self, name: str) -> None:
        raise ValueError("lora_bias with DoRA is not supported (as in PEFT)")

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        super().add_adapter(name, r, scaling, dropout, init)
        norm = self.weight_norm(name)
        self.lora_magnitude[name] = nn.Parameter(norm.reshape(self.magnitude_shape()).clone())

    def forget_adapter(self, name: str) -> None:
        super().forget_adapter(name)
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        self.__dict__.get("dora_merged", {}).pop(name, None)

    def weight_norm(self, name: str) -> torch.Tensor:
        """``‖W0 + ΔW‖`` per output feature (no gradient), in the magnitude's shape. Kept while no
        gradient is recorded and neither the factors nor the base weight change (generation calls a
        layer once per token)."""
        state = None if torch.is_grad_enabled() else _state_key(self.lora_A[name], self.lora_B[name],
                                                                 self.base_layer.weight)  # fmt: skip
        key = None if state is None else (name, self.scaling[name], state)
        cached = self.__dict__.get("dora_norm_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        W0, A2, B2 = self.norm_operands(name)
        own = self.own_norms(W0, A2.dtype)
        norm = row_norms(W0, A2, B2, self.scaling[name], own).reshape(self.magnitude_shape())
        if key is not None:
            self.__dict__["dora_norm_cache"] = (key, norm)
        return norm

    def own_norms(self, W0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``‖W0_o‖²`` per output feature in ``dtype``, kept while the base weight is unchanged (it
        is frozen while the adapter trains: the same tensor at the same version)."""
        state = _state_key(self.base_layer.weight)
        if state is None:
            return squared_row_norms(W0.to(dtype))
        key = (state, dtype)
        cached = self.__dict__.get("dora_own_norms")
        if cached is None or cached[0] != key:
            cached = self.__dict__["dora_own_norms"] = (key, squared_row_norms(W0.to(dtype)))
        return cached[1]

    def scale(self, name: str) -> torch.Tensor:
        """``f = m / ‖W0 + ΔW‖`` (the gradient reaches ``m`` only)."""
        return self.lora_magnitude[name] / self.weight_norm(name)

    def without_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = self.output_bias()
        return out if bias is None else out - bias

    def forward_with(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        f = self.scale(name)
        h = self.input_dropout(name, x)
        if h is x:  # no dropout (or eval): y = f ⊙ (z − b) + b = f ⊙ z + (1 − f) ⊙ b, z the LoRA output
            z = self.undropped(name, x, args, kwargs)
            bias = self.output_bias()
            if z.dtype != f.dtype:  # a half-precision base: rescale in the adapter's precision, round once
                return accumulate(z, (f - 1) * self.without_bias(z).to(f.dtype))
            # f = 1 (a fresh adapter) gives z · 1 + 0 = z, the base output, bitwise.
            return rescale(z, f, None if bias is None else (1 - f) * bias)
        out = self.base_layer(x, *args, **kwargs)
        dropped = self.without_bias(self.base_layer(h, *args, **kwargs))
        return accumulate(out, (f - 1) * dropped.to(f.dtype) + f * self.low_rank(h, name), self.owns_output())

    def bank_delta(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError(
            "per-row routing of DoRA adapters is not supported (each adapter rescales the whole weight); "
            "run one DoRA adapter per batch with lorakit.set_adapter"
        )

    def merge_delta(self, name: str) -> torch.Tensor:
        if self.merged_adapters:
            raise RuntimeError(
                f"adapter {self.merged_adapters[0]!r} is merged into this layer already; a DoRA adapter rescales "
                "the whole weight, so it merges alone: unmerge first"
            )
        W0 = self.dense_weight()
        work = _work_dtype(W0)
        W0, delta = W0.to(work), self.delta_weight(name).detach().to(work)
        f = self.scale(name).detach()
        self.__dict__.setdefault("dora_merged", {})[name] = f
        fw = self.weight_layout(f).to(work)
        return (fw - 1) * W0 + fw * delta

    def unmerge_delta(self, name: str) -> torch.Tensor:
        W = self.dense_weight()
        work = _work_dtype(W)
        fw = self.weight_layout(self.__dict__["dora_merged"].pop(name)).to(work)
        W = W.to(work)
        return W - (W / fw - self.delta_weight(name).detach().to(work))


class DoraLinear(DoraLayer, LoraLinear):
    """DoRA on ``nn.Linear``, ``Conv1D`` and 4-bit linear layers; ``m`` has one entry per output."""

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def weight_layout(self, f: torch.Tensor) -> torch.Tensor:
        return f.reshape(1, -1) if self.fan_in_fan_out else f.reshape(-1, 1)

    def dense_weight(self) -> torch.Tensor:
        return dequantize_weight(self.base_layer) if is_linear4bit(self.base_layer) else self.base_layer.weight

    def norm_operands(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        W0 = self.dense_weight()
        return (W0.T if self.fan_in_fan_out else W0), self.lora_A[name], self.lora_B[name]

    def undropped(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        base = self.base_layer
        fused = self.fused and not args and not kwargs and not torch.is_autocast_enabled(x.device.type)
        if fused and not base._forward_hooks and not base._forward_pre_hooks:
            A, B = self.lora_A[name], self.lora_B[name]
            return lora_linear(x, base.weight, base.bias, A, B, self.scaling[name], 0.0, self.fan_in_fan_out)
        return super().undropped(name, x, args, kwargs)


class DoraConv(DoraLayer, LoraConv):
    """DoRA on N-d convolutions (groups 1); ``m`` has PEFT's shape ``[1, out, 1…]``."""

    @classmethod
    def base_problem(cls, module: nn.Module) -> str | None:
        if isinstance(module, cls.base_type) and module.groups != 1:
            return f"DoRA on a grouped convolution (groups={module.groups}) is not supported (plain LoRA is)"
        return super().base_problem(module)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_channels, *(1,) * self.dims)

    def weight_layout(self, f: torch.Tensor) -> torch.Tensor:
        return f.reshape(-1, *(1,) * (self.dims + 1))

    def output_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        return None if bias is None else bias.reshape(1, -1, *(1,) * self.dims)

    def norm_operands(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        A, B = self.lora_A[name], self.lora_B[name]
        return self.base_layer.weight.flatten(1), A.flatten(1), B.flatten(1)


class DoraEmbedding(DoraLayer, LoraEmbedding):
    """DoRA on ``nn.Embedding``; ``m`` has one entry per embedding dimension (PEFT's choice: the
    norm runs over the vocabulary, a column of the ``[num, dim]`` table)."""

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.embedding_dim,)

    def weight_layout(self, f: torch.Tensor) -> torch.Tensor:
        return f.reshape(1, -1)

    def output_bias(self) -> torch.Tensor | None:
        return None

    def input_dropout(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x  # token ids: no dropout (as for LoRA on embeddings)

    def norm_operands(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.base_layer.weight.T, self.lora_A[name], self.lora_B[name]


register_kind(DoraLinear, is_linear)


class DoraConv1d(DoraConv, LoraConv1d):
    """DoRA on ``nn.Conv1d``."""


class DoraConv2d(DoraConv, LoraConv2d):
    """DoRA on ``nn.Conv2d``."""


class DoraConv3d(DoraConv, LoraConv3d):
    """DoRA on ``nn.Conv3d``."""


for _cls in (DoraConv1d, DoraConv2d, DoraConv3d):
    register_kind(_cls, lambda module, t=_cls.base_type: isinstance(module, t))
register_kind(DoraEmbedding, lambda module: isinstance(module, nn.Embedding))
