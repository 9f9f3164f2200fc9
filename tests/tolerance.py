"""Float tolerances derived from dtype, magnitude and reduction length, not from one CPU.

Two correct evaluations of the same expression differ when their kernels sum in different orders
(AVX2 vs AVX-512/AMX, MKL vs oneDNN, blocked vs plain loops). Summing ``k`` terms in floating
point commits a rounding error of at most ``k·u·Σ|terms|`` (u = eps/2, the unit roundoff), and in
practice one that grows like ``√k·u·Σ|terms|`` (the errors are near-independent). Two such
evaluations can therefore differ by about ``2·√k·u·S``, where ``S`` bounds the sum of the absolute
values of the terms: for ``y = x @ W`` that is ``max |x| · max |W| · k``, or more simply the size of
the largest output times a safety factor when nothing cancels.

Half-precision types (bfloat16, float16) accumulate in float32 on every CPU and GPU kernel we
use, so their sums add float32 error, and what dominates is rounding each stored intermediate to
the half type: about one ulp of the value per chained step. ``close_tol`` returns the sum of both
terms, with a safety factor of 8 on the √k model (large enough for every kernel family we have
seen) and 2 ulps per stored step, and ``assert_close`` uses it. Keep ``rtol=0, atol=0``
(bitwise) only for promises that are bitwise: a fresh adapter equals the base, save → load round
trips, resume == uninterrupted.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0


def close_tol(dtype: torch.dtype, reduction: int, magnitude: float, *, depth: int = 1) -> float:
    """Absolute tolerance for two evaluations, with different summation orders, of an expression
    made of ``depth`` chained reductions of at most ``reduction`` terms each, whose terms have
    absolute sums of about ``magnitude``."""
    eps = torch.finfo(dtype).eps
    accumulate = min(eps, torch.finfo(torch.float32).eps)  # half types sum in float32
    per_step = SAFETY * accumulate * (math.sqrt(max(reduction, 1)) + 2.0) + 2.0 * eps
    return depth * per_step * max(float(magnitude), 1e-30)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    reduction: int,
    magnitude: float | None = None,
    depth: int = 1,
    dtype: torch.dtype | None = None,
    msg: str | None = None,
) -> None:
    """``actual`` equals ``expected`` up to summation order (see the module docstring).

    ``magnitude`` defaults to the largest |expected| (right when the sums do not cancel); pass the
    size of the terms' absolute sum where they do. ``dtype`` defaults to the lower precision of
    the two tensors: the one whose rounding dominates.
    """
    if dtype is None:
        dtype = actual.dtype if torch.finfo(actual.dtype).eps >= torch.finfo(expected.dtype).eps else expected.dtype
    if magnitude is None:
        magnitude = float(expected.detach().abs().max()) if expected.numel() else 0.0
    tol = close_tol(dtype, reduction, magnitude, depth=depth)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=tol, msg=msg)
