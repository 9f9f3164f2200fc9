"""Linear + cross-entropy in chunks of tokens, never holding the ``[tokens, vocab]`` logits.

For hidden states ``h`` (``N × d``), an output head ``W`` (``V × d``, optional bias ``b``, optional
low-rank term ``t Bᵀ`` with ``t`` ``N × r``, ``B`` ``V × r``) and labels ``y`` (``ignore_index``
skipped), with ``z = h Wᵀ + b + t Bᵀ`` computed in float32 one chunk of ``C`` rows at a time and
label smoothing ``ε``::

    loss_i = logsumexp(z_i) − (1 − ε)·z_{i, y_i} − (ε / V)·Σ_j z_ij
    ∂loss_i/∂z_i = softmax(z_i) − (1 − ε)·onehot(y_i) − ε / V

Each chunk's logits become ``∂z`` in place and turn into ``∂h = ∂z W`` and ``∂W = ∂zᵀ h``
(``∂b = Σ ∂z``) at once, so the peak holds one chunk's ``C × V`` float32 values instead of ``N × V``
logits and their gradient (8,192 tokens × 49,152 words: 1.6 GB each). For a ``"mean"`` or
``"sum"`` loss, ``∂z`` is known in the forward up to the one scalar the backward brings, so the
forward forms the gradients while each chunk's logits exist and the backward only scales them:
the head is multiplied twice per chunk, as with the full logits. ``"none"`` (one scale per row,
known only in the backward) keeps ``logsumexp(z_i)`` per row and recomputes each chunk's logits
in the backward, a third multiplication.

A frozen head (``W.requires_grad`` False) gets no gradient. A LoRA head ``W₀ + s·B A`` passes
``t = s·dropout(h) Aᵀ`` and ``B`` as the low-rank term: ``∂t = ∂z B`` and ``∂B = ∂zᵀ t`` are
rank-r products, and no ``V × d`` gradient is formed for the frozen ``W₀``; autograd carries ``∂t``
on to ``A``. (Passing the effective weight as one tensor is exact too, at the price of that
full-size gradient.) ``reduction`` is ``"mean"`` over the counted tokens (as ``F.cross_entropy``),
``"sum"`` or ``"none"``.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError

#: rows per chunk by default: 1,024 × a 49,152-word vocabulary is 200 MB of float32 logits
DEFAULT_CHUNK = 1024


def _chunk_logits(rows: slice, h: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None,
                  low: torch.Tensor | None, low_w32: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One chunk's float32 logits; ``w32`` and ``low_w32`` are the heads in float32 (cast once per pass)."""
    z = h[rows].float() @ w32.t()
    if low is not None:
        z.addmm_(low[rows].float(), low_w32.t())
    return z + bias.float() if bias is not None else z


def _float32(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.float() for t in tensors)


def _row_losses(z: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, ...]:
    """Per-row losses (0 where not kept) and log-sum-exps of one chunk's logits ``z``."""
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(1, y.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    loss = lse - (1 - smoothing) * target
    if smoothing:
        loss = loss - smoothing * z.mean(dim=-1)
    return torch.where(keep, loss, torch.zeros_like(loss)), lse


def _logit_grad_(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, row_scale: torch.Tensor,
                 smoothing: float) -> torch.Tensor:  # fmt: skip
    """``z`` turned in place into ``row_scale_i · ∂loss_i/∂z_i`` (no second chunk-sized tensor)."""
    vocab = z.shape[1]
    z.sub_(lse.unsqueeze(1)).exp_()  # softmax
    z.scatter_add_(1, y.clamp(0, vocab - 1).unsqueeze(1), torch.full_like(z[:, :1], -(1 - smoothing)))
    if smoothing:
        z.sub_(smoothing / vocab)
    return z.mul_(row_scale.unsqueeze(1))


def _first_derivative_only() -> None:
    if torch.is_grad_enabled():  # backward(create_graph=True): a gradient of the gradient was asked for
        raise RuntimeError("chunked_cross_entropy has first derivatives only: its gradients cannot be differentiated "
                           "twice (create_graph=True); use F.cross_entropy on the full logits for that")  # fmt: skip


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype | None, ...]:
    return tuple(None if t is None else t.dtype for t in tensors)


class _Grads:
    """The inputs' gradients, accumulated chunk by chunk from ``∂z`` (float32 where summed)."""

    def __init__(self, needs: tuple[bool, ...], h: torch.Tensor, weight: torch.Tensor, low: torch.Tensor | None,
                 low_weight: torch.Tensor | None) -> None:  # fmt: skip
        need_h, need_w, need_b, need_low, need_low_w = needs[:5]
        f32 = {"dtype": torch.float32, "device": h.device}
        self.h = torch.empty(h.shape, **f32) if need_h else None
        self.w = torch.zeros(weight.shape, **f32) if need_w else None
        self.b = torch.zeros(weight.shape[0], **f32) if need_b else None
        self.low = torch.empty(low.shape, **f32) if need_low else None
        self.low_w = torch.zeros(low_weight.shape, **f32) if need_low_w else None

    def add(self, dz: torch.Tensor, rows: slice, h: torch.Tensor, w32: torch.Tensor, low: torch.Tensor | None,
            low_w32: torch.Tensor | None) -> None:  # fmt: skip
        if self.h is not None:
            torch.mm(dz, w32, out=self.h[rows])
        if self.w is not None:
            self.w.addmm_(dz.t(), h[rows].float())
        if self.b is not None:
            self.b += dz.sum(0)
        if self.low is not None:
            torch.mm(dz, low_w32, out=self.low[rows])
        if self.low_w is not None:
            self.low_w.addmm_(dz.t(), low[rows].float())

    def result(self, dtypes: tuple[torch.dtype | None, ...], scale: torch.Tensor | None = None) -> tuple[Any, ...]:
        """The gradients in their inputs' ``dtypes`` (h, weight, bias, low, low_weight), times ``scale``
        (out of place: a retained graph may run its backward again)."""
        out = []
        for grad, dtype in zip((self.h, self.w, self.b, self.low, self.low_w), dtypes, strict=True):
            if grad is not None and scale is not None:
                grad = grad * scale.float()
            out.append(grad.to(dtype) if grad is not None else None)
        return tuple(out)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row losses; the backward recomputes each chunk's logits (its rows' scales are known only then)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor | None,
                low_weight: torch.Tensor | None, labels: torch.Tensor, chunk: int, ignore_index: int,
                smoothing: float) -> torch.Tensor:  # fmt: skip
        losses = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        lse_all = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        w32, low_w32 = _float32(weight, low_weight)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            z = _chunk_logits(rows, h, w32, bias, low, low_w32)
            losses[rows], lse_all[rows] = _row_losses(z, labels[rows], labels[rows] != ignore_index, smoothing)
        ctx.save_for_backward(h, weight, bias, low, low_weight, labels, lse_all)
        ctx.chunk, ctx.ignore_index, ctx.smoothing = chunk, ignore_index, smoothing
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _first_derivative_only()
        h, weight, bias, low, low_weight, labels, lse_all = ctx.saved_tensors
        grads = _Grads(ctx.needs_input_grad, h, weight, low, low_weight)
        with torch.autocast(h.device.type, enabled=False):  # float32, as in the forward
            w32, low_w32 = _float32(weight, low_weight)
            for start in range(0, h.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                y = labels[rows]
                z = _chunk_logits(rows, h, w32, bias, low, low_w32)
                scale = grad_losses[rows].float() * (y != ctx.ignore_index)
                grads.add(_logit_grad_(z, lse_all[rows], y, scale, ctx.smoothing), rows, h, w32, low, low_w32)
        return (*grads.result(_dtypes(h, weight, bias, low, low_weight)), None, None, None, None)


class _SummedCrossEntropy(torch.autograd.Function):
    """The summed loss. Its gradient with respect to each chunk's logits is known in the forward up
    to the one scalar the backward brings, so the forward forms every input's gradient while the
    chunk's logits exist and the backward only scales them: no second pass over the head."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor | None,
                low_weight: torch.Tensor | None, labels: torch.Tensor, chunk: int, ignore_index: int,
                smoothing: float, needs: tuple[bool, ...]) -> torch.Tensor:  # fmt: skip
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grads = _Grads(needs, h, weight, low, low_weight)
        w32, low_w32 = _float32(weight, low_weight)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            y = labels[rows]
            keep = y != ignore_index
            z = _chunk_logits(rows, h, w32, bias, low, low_w32)
            losses, lse = _row_losses(z, y, keep, smoothing)
            total += losses.sum()
            if any(needs):
                grads.add(_logit_grad_(z, lse, y, keep.float(), smoothing), rows, h, w32, low, low_w32)
        ctx.grads, ctx.dtypes = grads, _dtypes(h, weight, bias, low, low_weight)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _first_derivative_only()
        return (*ctx.grads.result(ctx.dtypes, scale=grad_total), None, None, None, None, None)


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
    number = isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
    if not number or not 0 <= label_smoothing <= 1:
        raise InputError(f"chunked_cross_entropy: label_smoothing = {label_smoothing!r}; allowed: 0 to 1")
    if reduction not in ("mean", "sum", "none"):
        raise InputError(f"chunked_cross_entropy: reduction = {reduction!r}; allowed: mean, sum, none")
    if labels.dtype not in (torch.int64, torch.int32):
        raise InputError(f"chunked_cross_entropy: labels are {labels.dtype}; allowed: class indices in int64 or int32")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise InputError(f"chunked_cross_entropy: bias {tuple(bias.shape)} does not fit a vocabulary of "
                         f"{weight.shape[0]}")  # fmt: skip
    low = low_weight = None
    if low_rank is not None:
        pair = isinstance(low_rank, (tuple, list)) and len(low_rank) == 2
        if not pair or not all(isinstance(t, torch.Tensor) for t in low_rank):
            raise InputError("chunked_cross_entropy: low_rank must be a pair (t, B) with logits += t Bᵀ")
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
    args = (flat_h, weight, bias, low, low_weight, flat_y, chunk, ignore_index, float(label_smoothing))
    # float32 whatever autocast says: the logits and their exponentials are the precision-critical part
    with torch.autocast(hidden.device.type, enabled=False):
        if reduction == "none":
            return _ChunkedCrossEntropy.apply(*args).reshape(labels.shape)
        grad = torch.is_grad_enabled()
        needs = tuple(grad and t is not None and t.requires_grad for t in (flat_h, weight, bias, low, low_weight))
        total = _SummedCrossEntropy.apply(*args, needs)
    if reduction == "sum":
        return total
    # mean over the counted tokens, as F.cross_entropy; no counted token gives 0 (F.cross_entropy: nan)
    return total / (flat_y != ignore_index).sum().clamp(min=1)
