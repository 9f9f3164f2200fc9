"""The LoRA linear hot path: one fused forward and a hand-written backward.

For ``x ∈ R^{N×in}``, frozen ``W0`` and adapter factors ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``::

    h  = dropout(x)            (mask m, keep probability q = 1 − p; h = x ⊙ m / q)
    ts = s · h Aᵀ              [N, r]: the scale (and 1/q) on the smallest tensor on the path
    y  = x W0ᵀ + b + ts Bᵀ      one GEMM for the base, one rank-r product added into its output

Backward, given ``g = ∂L/∂y`` (no gradient is ever formed for a frozen ``W0``)::

    ∂L/∂B = gᵀ ts              [out, r]
    u     = s · g B            [N, r]
    ∂L/∂A = uᵀ h               [r, in]
    ∂L/∂x = g W0 + (u A) ⊙ m / q     (no dropout: added straight into ``g W0``)

The base GEMMs are torch's own (the same kernel as the frozen layer's, so a fresh adapter is
bitwise the base); the six rank-r products go through :mod:`lorakit.low_rank_ops`, which picks
the faster CPU kernel for skinny shapes.

Saved for backward: the input (which the base layer needs anyway), the ``[N, r]`` tensor ``ts``
and, with dropout, a one-byte mask instead of a second full-size copy of the input. Plain
autograd would also keep ``h`` and ``t`` unscaled, and add two full-size tensors in each direction.

``weight_t`` says the weight is stored ``[in, out]`` (Hugging Face ``Conv1D``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import low_rank_ops


def _base(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_t: bool) -> torch.Tensor:
    if weight_t:
        return torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return F.linear(x2, weight, bias)


#: below this many rows the rank-r term is added after the base GEMM (see ``_low_rank_first``)
LOW_RANK_FIRST_ROWS = 64


def _low_rank_first(*tensors: torch.Tensor | None) -> bool:
    """Whether the rank-r term can be formed first and the frozen GEMM accumulate onto it
    (``C ← C + x W0ᵀ``, BLAS beta = 1) instead of adding it afterwards in a second pass over the
    output. On the CPU the GEMM then runs the same kernel on the same inputs as the base layer's
    own ``addmm(bias, x, W0ᵀ)`` (which starts from the bias the same way), so with ``B = 0`` the
    output is bitwise the base's; CUDA's bias epilogue rounds differently, so not there."""
    first = next(t for t in tensors if t is not None)
    return all(t is None or (t.device.type == "cpu" and t.dtype == first.dtype) for t in tensors)


def _onto(c: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, weight_t: bool, backward: bool) -> torch.Tensor:
    """``c + x2 W0ᵀ`` (forward) or ``c + x2 W0`` (backward, ``x2`` the output gradient), summed by
    the frozen GEMM into ``c``; ``weight_t``: the weight is stored [in, out] (``Conv1D``)."""
    in_out = weight if weight_t else weight.T
    return c.addmm_(x2, in_out.T if backward else in_out)


# ------------------------------------------------------------------------------ dropout masks
# torch's bernoulli_ draws one 32-bit number per element (≈2.8 ms for 350k elements on this CPU,
# 40% of a SmolLM2 LoRA step with dropout 0.05). Here 16 random bits decide an element, cut from
# full-range 64-bit draws, four elements per draw: 7x faster. The price is that p is rounded to a
# multiple of 1/65536 (at most 7.6e-6 off), and the 1/(1-p) scale uses that same rounded p.
DROPOUT_LEVELS = 65536


def quantize_dropout(p: float) -> float:
    """The drop probability actually used: ``p`` rounded to a multiple of 1/65536."""
    return round(p * DROPOUT_LEVELS) / DROPOUT_LEVELS


def random_int16(shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform random int16s (16 independent random bits each) from the default generator."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    return words.view(torch.int16)[:n].view(shape)


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float | torch.Tensor, device=None) -> torch.Tensor:
    """Bool mask, True with probability ``1 − quantize_dropout(p)`` per element; ``p`` may be a
    tensor broadcasting against ``shape`` (a probability per row)."""
    levels = torch.round(p * DROPOUT_LEVELS) if isinstance(p, torch.Tensor) else round(p * DROPOUT_LEVELS)
    return random_int16(shape, device) >= levels - DROPOUT_LEVELS // 2


class Dropout(nn.Dropout):
    """``nn.Dropout`` (inverted, elementwise) with the fast mask above; ``p`` is quantized."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(quantize_dropout(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x.shape, self.p, x.device) / (1.0 - self.p)


def _dropout_mask(x2: torch.Tensor, p: float) -> torch.Tensor:
    return keep_mask(x2.shape, p, x2.device)


def _add_low_rank(y: torch.Tensor, t: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale · t Bᵀ`` in place (the scale rides on the GEMM's alpha); with a half-precision
    base the product is formed in the adapter's dtype and cast once."""
    if y.dtype == t.dtype:
        return y.addmm_(t, B.T, alpha=scale)
    return y.add_((t @ B.T).mul_(scale).to(y.dtype))


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float,
    weight_t: bool,
    for_backward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward maths; returns ``(y, x2, ts, mask)``, the last three for the backward (``ts``
    is scaled only ``for_backward``)."""
    x2 = x.reshape(-1, x.shape[-1])
    mask = _dropout_mask(x2, p) if p > 0 else None
    h = x2 if mask is None else x2 * mask
    t = low_rank_ops.shrink(h.to(A.dtype), A)
    # s and the dropout's 1/q ride on the [N, r] product, the smallest tensor on the path (p = 0: q = 1)
    scale = scaling / (1.0 - p)
    if x2.shape[0] >= LOW_RANK_FIRST_ROWS and _low_rank_first(x2, weight, bias, A):
        y = _onto(low_rank_ops.widen(t.mul_(scale), B, bias), x2, weight, weight_t, backward=False)
    else:  # a few rows (decode): the second pass over the output is cheap, two fewer ops are not
        y = _add_low_rank(_base(x2, weight, bias, weight_t), t, B, scale)
        if for_backward:
            t.mul_(scale)  # after its use: the backward takes the scaled product
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])), x2, t, mask


class LoraLinearFunction(torch.autograd.Function):
    """``y = x W0ᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with the backward above."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float,
        p: float,
        weight_t: bool,
    ) -> torch.Tensor:
        y, x2, ts, mask = _forward(x, weight, bias, A, B, scaling, p, weight_t)
        ctx.save_for_backward(x2, weight, A, B, ts, mask)
        ctx.scaling, ctx.p, ctx.weight_t = scaling, p, weight_t
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, A, B, ts, mask = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        ga = g if g.dtype == A.dtype else g.to(A.dtype)

        grad_B = low_rank_ops.grad_b(ts, ga) if need_bb else None  # gᵀ (s·t)
        u = None
        if need_a or need_x:  # u = (s/q) · g B: ∂L/∂t with the dropout's 1/q folded in
            u = low_rank_ops.project(ga, B).mul_(ctx.scaling / (1.0 - ctx.p))
        grad_A = None
        if need_a:
            grad_A = low_rank_ops.grad_a(u, (x2 if mask is None else x2 * mask).to(A.dtype))
        grad_x = None
        if need_x:
            if _low_rank_first(g, weight, u):
                low = low_rank_ops.widen(u, A.T)
                grad_x = _onto(low if mask is None else low.mul_(mask), g, weight, ctx.weight_t, backward=True)
            else:
                grad_x = g @ (weight.T if ctx.weight_t else weight)
                low = u @ A
                grad_x.add_((low if mask is None else low.mul_(mask)).to(grad_x.dtype))
            grad_x = grad_x.reshape(ctx.in_shape)
        grad_w = None
        if need_w:  # only when the caller unfroze W0 on purpose
            grad_w = x2.T @ g if ctx.weight_t else g.T @ x2
        grad_bias = g.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    weight_t: bool = False,
) -> torch.Tensor:
    """LoRA linear forward. Under autograd it runs :class:`LoraLinearFunction`; in inference it
    adds the rank-r term into the base output in place (no second full-size tensor)."""
    dropout = quantize_dropout(dropout)  # what the mask draws (see keep_mask)
    needs_graph = x.requires_grad or A.requires_grad or B.requires_grad or weight.requires_grad
    if torch.is_grad_enabled() and (needs_graph or (bias is not None and bias.requires_grad)):
        return LoraLinearFunction.apply(x, weight, bias, A, B, scaling, dropout, weight_t)
    return _forward(x, weight, bias, A, B, scaling, dropout, weight_t, for_backward=False)[0]


def accumulate(out: torch.Tensor, delta: torch.Tensor, in_place: bool = True) -> torch.Tensor:
    """``out + delta`` in ``out``'s dtype. In inference it adds in place (no second full-size
    tensor) unless ``in_place`` is False (someone else holds ``out``, e.g. a forward hook); under
    autograd it stays out of place so the graph never sees a mutated tensor."""
    if in_place and not torch.is_grad_enabled() and not out.requires_grad:
        return out.add_(delta)
    return out + delta.to(out.dtype)
