"""The hand-written LoRA backward against plain autograd on the same maths."""

from __future__ import annotations

import pytest
import torch

import lorakit.functional as fn

from .tolerance import assert_close

# the longest reduction in these maths: n_out (=40) in the input gradient; three chained steps
_REDUCTION, _DEPTH = 40, 3


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert_close(got, want, reduction=_REDUCTION, depth=_DEPTH)


def _reference(x, weight, bias, A, B, s, weight_t, mask=None, p=0.0):
    w = weight.T if weight_t else weight
    y = torch.nn.functional.linear(x, w, bias)
    h = x if mask is None else x * mask / (1 - p)
    delta = torch.nn.functional.linear(torch.nn.functional.linear(h.to(A.dtype), A) * s, B)
    return y + delta.to(y.dtype)


def _tensors(dtype, weight_t, bias_grad, n_in=24, n_out=40, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, n_in, generator=g).to(dtype).requires_grad_(True)
    shape = (n_in, n_out) if weight_t else (n_out, n_in)
    weight = torch.randn(shape, generator=g).to(dtype) * 0.2
    bias = (torch.randn(n_out, generator=g).to(dtype)).requires_grad_(bias_grad)
    A = (torch.randn(r, n_in, generator=g) * 0.3).requires_grad_(True)
    B = (torch.randn(n_out, r, generator=g) * 0.3).requires_grad_(True)
    return x, weight, bias, A, B


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g)


@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_grad", [False, True])
def test_gradients_equal_autograd(weight_t, dtype, bias_grad):
    x, w, b, A, B = _tensors(dtype, weight_t, bias_grad)
    ours = fn.LoraLinearFunction.apply(x, w, b, A, B, 1.75, 0.0, weight_t)
    ref = _reference(x, w, b, A, B, 1.75, weight_t)
    _close(ours, ref)
    for got, want in zip(_grads(ours, [x, b, A, B]), _grads(ref, [x, b, A, B]), strict=True):
        assert got.dtype == want.dtype
        _close(got, want)


@pytest.mark.parametrize("weight_t", [False, True])
def test_gradients_with_dropout_use_the_same_mask(weight_t, monkeypatch):
    x, w, b, A, B = _tensors(torch.float32, weight_t, False)
    mask = torch.rand(x.reshape(-1, x.shape[-1]).shape, generator=torch.Generator().manual_seed(3)) > 0.3
    monkeypatch.setattr(fn, "_dropout_mask", lambda x2, p: mask)
    ours = fn.LoraLinearFunction.apply(x, w, b, A, B, 0.5, 0.3, weight_t)
    ref = _reference(x, w, b, A, B, 0.5, weight_t, mask.reshape(x.shape), 0.3)
    _close(ours, ref)
    for got, want in zip(_grads(ours, [x, A, B]), _grads(ref, [x, A, B]), strict=True):
        _close(got, want)


def test_gradcheck_float64():
    x, w, b, A, B = (t.double().detach().requires_grad_(t.requires_grad) for t in _tensors(torch.float32, False, True))
    w.requires_grad_(True)  # also check the (rarely used) weight gradient
    assert torch.autograd.gradcheck(
        lambda *a: fn.LoraLinearFunction.apply(*a, 0.7, 0.0, False), (x, w, b, A, B), eps=1e-6, atol=1e-5
    )


def _products_with(shape: list[int], run) -> int:
    """How many matrix products ``run()`` launches with an operand of ``shape``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    kernels = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul")
    return sum(1 for e in prof.events() if e.name in kernels and shape in [list(s) for s in e.input_shapes])


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_no_input_gradient_is_computed_when_not_needed(x_needs_grad):
    x, w, b, A, B = _tensors(torch.float32, False, False)
    x = x.detach().requires_grad_(x_needs_grad)
    out = fn.LoraLinearFunction.apply(x, w, b, A, B, 1.0, 0.0, False)
    ref = _reference(x, w, b, A, B, 1.0, False)
    wanted = [x, A, B] if x_needs_grad else [A, B]
    grads: list[tuple[torch.Tensor, ...]] = []
    uses_w0 = _products_with(list(w.shape), lambda: grads.append(torch.autograd.grad(out.sum(), wanted)))
    for got, want in zip(grads[0], torch.autograd.grad(ref.sum(), wanted), strict=True):
        _close(got, want)
    # the full-size product g·W0 (the costly one) runs only when the input needs a gradient
    assert (uses_w0 > 0) == x_needs_grad


def test_inference_path_matches_and_adds_in_place():
    x, w, b, A, B = _tensors(torch.float32, False, False)
    with torch.no_grad():
        out = fn.lora_linear(x, w, b, A, B, 2.0)
        ref = _reference(x, w, b, A, B, 2.0, False)
    _close(out, ref)
    assert not out.requires_grad


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_fast_dropout_mask_has_the_rate_and_is_reproducible(p):
    n = 1_000_003  # not a multiple of 4: the last 64-bit draw is cut
    torch.manual_seed(0)
    mask = fn.keep_mask((n,), p)
    q = fn.quantize_dropout(p)
    assert abs(q - p) <= 0.5 / fn.DROPOUT_LEVELS
    dropped = 1.0 - mask.float().mean().item()
    assert abs(dropped - q) < 5 * (q * (1 - q) / n) ** 0.5  # within 5 standard errors
    torch.manual_seed(0)
    assert torch.equal(fn.keep_mask((n,), p), mask)  # the default generator drives it
    # neighbours (which share a 64-bit draw) are independent: P(both kept) = (1-q)^2
    both = (mask[:-1:2] & mask[1::2]).float().mean().item()
    assert abs(both - (1 - q) ** 2) < 5 * ((1 - q) ** 2 / (n / 2)) ** 0.5


def test_random_int16_uses_every_bit():
    torch.manual_seed(1)
    r = fn.random_int16((4, 100_000)).to(torch.int32) & 0xFFFF
    for bit in range(16):  # each bit set half the time, in every position of the 64-bit draw
        share = ((r >> bit) & 1).float().mean(1)
        assert torch.all((share - 0.5).abs() < 0.01), (bit, share)


def test_dropout_module_is_unbiased_and_per_row_rates():
    torch.manual_seed(2)
    drop = fn.Dropout(0.3).train()
    x = torch.ones(2000, 500)
    y = drop(x)
    values = y.unique()
    assert len(values) == 2 and values[0] == 0 and abs(values[1].item() - 1.0 / (1 - drop.p)) < 1e-6
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)
    rows = fn.keep_mask((3, 200_000), torch.tensor([[0.0], [0.25], [1.0]]))
    rates = 1 - rows.float().mean(1)
    assert rates[0] == 0 and rates[2] == 1 and abs(rates[1] - 0.25) < 0.005
