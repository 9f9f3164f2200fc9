"""The rank-r products of a LoRA linear step, each with a BLAS form and a oneDNN form.

With ``x ∈ R^{N×in}``, ``g ∈ R^{N×out}``, factors ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` and ``r`` small::

    shrink          t  = x Aᵀ          [N, r]      (forward)
    widen(t, B, b)  C  = t Bᵀ + b      [N, out]    (forward: the frozen GEMM then sums x W0ᵀ onto C)
    grad_b          G  = gᵀ t          [out, r]    (∂L/∂B)
    project         u  = g B           [N, r]      (backward)
    grad_a          G  = uᵀ x          [r, in]     (∂L/∂A)
    widen(u, Aᵀ)    C  = u A           [N, in]     (backward: g W0 is summed onto C for ∂L/∂x)

Each is a GEMM with one dimension equal to ``r``: little arithmetic per byte, so the cost is the
kernel's handling of a skinny shape, not the flops. On CPUs where Intel MKL takes its generic
path (measured on an AMD EPYC with AVX-512, 2 threads, N=1024, r=8), oneDNN runs them 1.4-2.6x
faster than MKL per layer (``benchmarks/results/low_rank_ops.md``). oneDNN builds a kernel per
shape (about 0.5 ms, cached), and its call overhead loses below a few hundred rows, so it is used
only for products with at least :data:`ONEDNN_MIN_ROWS` rows; decode-sized calls stay on BLAS.

The frozen layer's own GEMMs are never moved: the base output is computed exactly as the base
layer computes it (a fresh adapter leaves a model's output bitwise unchanged).

Backends: ``"auto"`` (oneDNN for large float32 CPU products when torch ships it, else BLAS),
``"blas"`` (torch's matmul everywhere), ``"onednn"`` (as auto; an error where oneDNN is missing).
Both forms compute the same products; they differ only in rounding (summation order).
"""

from __future__ import annotations

import functools

import torch

#: below this many rows (N) the oneDNN call costs more than it saves (measured crossover ≈ 200)
ONEDNN_MIN_ROWS = 256
BACKENDS = ("auto", "blas", "onednn")

_backend = "auto"


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel (x86 and ARM CPU wheels do)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def set_low_rank_backend(name: str) -> str:
    """Choose how LoRA's rank-r products run on the CPU; returns the previous choice.

    ``"auto"`` (the default): oneDNN for float32 CPU products of at least ``ONEDNN_MIN_ROWS`` rows,
    BLAS otherwise. ``"blas"``: torch's matmul (MKL/OpenBLAS) always. ``"onednn"``: as auto, but
    an error here when this torch build lacks oneDNN. The choice changes rounding only.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"low-rank backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "onednn" and not onednn_available():
        raise RuntimeError("low-rank backend 'onednn': this torch build has no oneDNN linear kernel (use 'auto')")
    previous, _backend = _backend, name
    return previous


def low_rank_backend() -> str:
    return _backend


def _use_onednn(rows: int, *tensors: torch.Tensor) -> bool:
    if rows < ONEDNN_MIN_ROWS or _backend == "blas":
        return False
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
    return onednn_available()


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x wᵀ + bias`` by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def shrink(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``t = x Aᵀ`` ([N, r])."""
    if _use_onednn(x.shape[0], x, A):
        return _linear(x, A)
    return x @ A.T


def widen(t: torch.Tensor, F: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``t Fᵀ + bias`` for a factor ``F`` of shape [wide, r] (a new [N, wide] tensor): ``t Bᵀ``
    in the forward (``F = B``), ``u A`` in the backward (``F = Aᵀ``, a view)."""
    if _use_onednn(t.shape[0], t, F) and (bias is None or _use_onednn(t.shape[0], bias)):
        return _linear(t, F.contiguous(), bias)
    return t @ F.T if bias is None else torch.addmm(bias, t, F.T)


def grad_b(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``gᵀ t`` ([out, r], a transposed view), i.e. ∂L/∂B for ``y = t Bᵀ``."""
    if _use_onednn(g.shape[0], g, t):
        return _linear(t.T.contiguous(), g.T).T
    # (r × N)·(N × out), not (out × N)·(N × r): the long dimension N is then the contiguous one,
    # 2-4x faster on CPU BLAS (measured: 1.75 → 0.47 ms for N=1024, out=1536, r=8).
    return (t.T @ g).T


def project(g: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``u = g B`` ([N, r]; a transposed view on the BLAS path)."""
    if _use_onednn(g.shape[0], g, B):
        return _linear(g, B.T.contiguous())
    return (B.T @ g.T).T  # the same layout argument as grad_b


def grad_a(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``uᵀ x`` ([r, in]), i.e. ∂L/∂A for ``t = x Aᵀ`` with ``u = ∂L/∂t``."""
    if _use_onednn(x.shape[0], x, u):
        return _linear(u.T.contiguous(), x.T)
    return u.T @ x
