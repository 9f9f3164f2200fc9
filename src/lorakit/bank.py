"""Adapter banks: all adapters of one layer stacked into one tensor per factor.

For adapters ``k = 0..n-1`` of ranks ``r_k`` and scales ``s_k`` the bank holds::

    A_bank[k] = pad(A_k) ∈ R^{R×in},   B_bank[k] = s_k · pad(B_k) ∈ R^{out×R},   R = max r_k

zero-padded on the rank axis, plus one all-zero slot ``n`` for rows that use no adapter. Padding
and the zero slot contribute exactly nothing, so adapters of different ranks and alphas mix freely.
``routing.py`` explains how a batch uses it.

A bank of linear adapters is applied to rows ``x_b`` by gathering (BGMV-style)::

    t_b = x_b A[k_b]ᵀ   (shrink to rank R),    y_b = t_b B[k_b]   (expand)

with ``A`` stored transposed (``[S, in, R]``) so that, at decode, the shrink is a weighted sum of
rows of the flattened bank like the expand.

``benchmarks/bank_strategies.py`` measures the alternative that needs no gather, one GEMM against
every slot's ``A`` with the other slots' columns masked to zero: on CPU it loses at every size
measured (0.02-0.76x), since it does ``S`` times the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .functional import keep_mask


def bag_indices(slots: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``k_b·size + j`` (``j < size``) of a bank flattened to ``[S·size, ...]``, and each row's
    bag offset: the ``embedding_bag`` arguments that make row ``b`` read slot ``k_b``."""
    rows = (slots.unsqueeze(1) * size + torch.arange(size, device=slots.device)).reshape(-1)
    return rows, torch.arange(0, slots.shape[0] * size, size, device=slots.device)



def pad_rank(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad the rank axis ``dim`` of a factor up to ``size`` (padding contributes nothing)."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad)


def stack_factors(
    a_factors: list[torch.Tensor], b_factors: list[torch.Tensor], scalings: list[float], dropout: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A_bank [S, R, ...], B_bank [S, out, R, ...], dropout_p [S])`` from each adapter's factors
    (``A_k [r_k, ...]``, ``B_k [out, r_k, ...]``), ranks zero-padded to the largest, ``s_k`` folded
    into ``B_k``, and the all-zero slot ``S - 1`` appended. Differentiable."""
    rank = max(a.shape[0] for a in a_factors)
    a = [pad_rank(f, 0, rank) for f in a_factors]
    b = [pad_rank(f * s, 1, rank) for f, s in zip(b_factors, scalings, strict=True)]
    a.append(torch.zeros_like(a[0]))
    b.append(torch.zeros_like(b[0]))
    A = torch.stack(a)
    return A, torch.stack(b), torch.tensor([*dropout, 0.0], dtype=A.dtype, device=A.device)


def routed_input_dropout(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row inverted dropout with keep probability ``keep[b]`` (1 where a row has none)."""
    shape = (h.shape[0],) + (1,) * (h.dim() - 1)
    keep = keep.reshape(shape)
    return h * keep_mask(h.shape, 1.0 - keep, h.device) / keep


def bank_delta_gathered(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
    bags: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] = bag_indices,
) -> torch.Tensor:  # fmt: skip
    """Row ``b``'s own factors from the banks (``A [S, in, R]``, stored transposed; ``B [S, R, out]``).

    Several tokens per row: each row's factors gathered, then a batched shrink and expand. One token
    per row (decode): no gathered copy at all; both products are weighted ``embedding_bag`` sums
    over the flattened banks, the row's input weighting rows ``k_b·in + i`` of ``A`` ([S·in, R])
    and then ``t_b`` weighting rows ``k_b·R + j`` of ``B``, so each row reads its slot's factors
    once and writes nothing else. ``bags(slots, size)`` gives those rows and offsets (cached by a
    route)."""
    if x.shape[1] != 1:
        t = torch.bmm(x, A.index_select(0, slots))  # shrink: [b, L, R]
        return torch.bmm(t, B.index_select(0, slots))  # expand: [b, L, out]
    n_in, rank = A.shape[1], A.shape[2]
    rows, offsets = bags(slots, n_in)
    t = F.embedding_bag(rows, A.reshape(-1, rank), offsets, mode="sum", per_sample_weights=x.reshape(-1))
    rows, offsets = bags(slots, rank)
    flat = B.reshape(-1, B.shape[2])
    return F.embedding_bag(rows, flat, offsets, mode="sum", per_sample_weights=t.reshape(-1)).unsqueeze(1)
