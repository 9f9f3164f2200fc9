"""Linear + cross-entropy in chunks of tokens, never holding the ``[tokens, vocab]`` logits.

For hidden states ``h`` (``N × d``), an output head ``W`` (``V × d``, optional bias ``b``, optional
low-rank term ``t Bᵀ`` with ``t`` ``N × r``, ``B`` ``V × r``) and labels ``y`` (``ignore_index``
skipped), with ``z = h Wᵀ + b + t Bᵀ`` computed in float32 one chunk of ``C`` rows at a time and
label smoothing ``ε``::

    loss_i = logsumexp(z_i) − (1 − ε)·z_{i, y_i} − (ε / V)·Σ_j z_ij
    ∂loss_i/∂z_i = softmax(z_i) − (1 − ε)·onehot(y_i) − ε / V

The forward keeps per row only ``logsumexp(z_i)``; the backward recomputes each chunk's logits and
turns them into ``∂h = ∂z W`` and ``∂W = ∂zᵀ h`` (``∂b = Σ ∂z``) at once, so the peak holds one
chunk's ``C × V`` float32 values instead of ``N × V`` logits and their gradient (8,192 tokens ×
49,152 words: 1.6 GB each). A frozen head (``W.requires_grad`` False) gets no gradient. A LoRA
head ``W₀ + s·B A`` passes ``t = s·dropout(h) Aᵀ`` and ``B`` as the low-rank term: the backward
gives ``∂t = ∂z B`` and ``∂B = ∂zᵀ t`` (rank-r products) and never forms a ``V × d`` gradient for
the frozen ``W₀``; autograd carries ``∂t`` on to ``A``. (Passing the effective weight as one
tensor is exact too, at the price of that full-size gradient.) ``reduction`` is ``"mean"`` over
the counted tokens (as ``F.cross_entropy``),
``"sum"`` or ``"none"``.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError

#: rows per chunk by default: 1,024 × a 49,152-word vocabulary is 200 MB of float32 logits
DEFAULT_CHUNK = 1024


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor | None,
                  low_weight: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    z = h.float() @ weight.float().t()
    if low is not None:
        z.addmm_(low.float(), low_weight.float().t())
    return z + bias.float() if bias is not None else z


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor | None,
                low_weight: torch.Tensor | None, labels: torch.Tensor, chunk: int, ignore_index: int,
                smoothing: float) -> torch.Tensor:  # fmt: skip
        losses = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        lse_all = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        vocab = weight.shape[0]
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            z = _chunk_logits(h[rows], weight, bias, None if low is None else low[rows], low_weight)
            lse = torch.logsumexp(z, dim=-1)
            y = labels[rows]
            keep = y != ignore_index
            target = z.gather(1, y.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
            loss = lse - (1 - smoothing) * target
            if smoothing:
                loss = loss - smoothing * z.mean(dim=-1)
            losses[rows] = torch.where(keep, loss, torch.zeros_like(loss))
            lse_all[rows] = lse
        ctx.save_for_backward(h, weight, bias, low, low_weight, labels, lse_all)
        ctx.chunk, ctx.ignore_index, ctx.smoothing = chunk, ignore_index, smoothing
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, bias, low, low_weight, labels, lse_all = ctx.saved_tensors
        need_h, need_w, need_b, need_low, need_low_w = ctx.needs_input_grad[:5]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        grad_low = torch.empty_like(low) if need_low else None
        grad_low_w = torch.zeros(low_weight.shape, dtype=torch.float32, device=h.device) if need_low_w else None
        vocab = weight.shape[0]
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            y = labels[rows]
            keep = y != ctx.ignore_index
            low_rows = None if low is None else low[rows]
            dz = torch.exp(_chunk_logits(h[rows], weight, bias, low_rows, low_weight) - lse_all[rows].unsqueeze(1))
            dz.scatter_add_(1, y.clamp(0, vocab - 1).unsqueeze(1),
                            torch.full_like(y, -(1 - ctx.smoothing), dtype=dz.dtype).unsqueeze(1))  # fmt: skip
            if ctx.smoothing:
                dz -= ctx.smoothing / vocab
            dz *= (grad_losses[rows].float() * keep).unsqueeze(1)
            if grad_h is not None:
                grad_h[rows] = (dz @ weight.float()).to(h.dtype)
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h[rows].float())
            if grad_b is not None:
                grad_b += dz.sum(0)
            if grad_low is not None:
                grad_low[rows] = (dz @ low_weight.float()).to(low.dtype)
            if grad_low_w is not None:
                grad_low_w.addmm_(dz.t(), low_rows.float())
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        grad_low_w = grad_low_w.to(low_weight.dtype) if grad_low_w is not None else None
        return grad_h, grad_w, grad_b, grad_low, grad_low_w, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None, *,
    chunk: int = DEFAULT_CHUNK, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """``F.cross_entropy(hidden @ weight.T + bias + t @ B.T, labels)`` without the logits (module
    docstring); ``low_rank = (t, B)`` is optional. ``hidden``: ``[..., d]``; ``t``: ``[..., r]``;
    ``labels``: the leading shape of ``hidden`` (already shifted for a causal LM). The loss is float32."""
    if hidden.shape[:-1] != labels.shape:
        raise InputError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                         "differ before the last dimension")  # fmt: skip
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise InputError(f"chunked_cross_entropy: weight {tuple(weight.shape)} does not map width "
                         f"{hidden.shape[-1]} to a vocabulary")  # fmt: skip
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"chunked_cross_entropy: chunk = {chunk!r}; allowed: an integer >= 1 (rows per chunk)")
    if not 0.0 <= label_smoothing <= 1.0:
        raise InputError(f"chunked_cross_entropy: label_smoothing = {label_smoothing!r}; allowed: 0 to 1")
    if reduction not in ("mean", "sum", "none"):
        raise InputError(f"chunked_cross_entropy: reduction = {reduction!r}; allowed: mean, sum, none")
    low = low_weight = None
    if low_rank is not None:
        low, low_weight = low_rank
        fits = low_weight.dim() == 2 and low_weight.shape == (weight.shape[0], low.shape[-1])
        if low.shape[:-1] != hidden.shape[:-1] or not fits:
            raise InputError(f"chunked_cross_entropy: low_rank t {tuple(low.shape)} and B {tuple(low_weight.shape)} "
                             f"do not fit hidden {tuple(hidden.shape)} and a vocabulary of {weight.shape[0]} "
                             "(t: [..., r] like hidden; B: [vocab, r])")  # fmt: skip
        low = low.reshape(-1, low.shape[-1])
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    bad = flat_y[(flat_y != ignore_index) & ((flat_y < 0) | (flat_y >= weight.shape[0]))]
    if bad.numel():
        raise InputError(f"chunked_cross_entropy: label {int(bad[0])} is outside the vocabulary of {weight.shape[0]} "
                         f"(and is not ignore_index {ignore_index})")  # fmt: skip
    losses = _ChunkedCrossEntropy.apply(flat_h, weight, bias, low, low_weight, flat_y, chunk, ignore_index,
                                        float(label_smoothing))  # fmt: skip
    if reduction == "none":
        return losses.reshape(labels.shape)
    if reduction == "sum":
        return losses.sum()
    # mean over the counted tokens, as F.cross_entropy; no counted token gives 0 (F.cross_entropy: nan)
    return losses.sum() / (flat_y != ignore_index).sum().clamp(min=1)
