"""The rank-r products' fast CPU path (oneDNN) and the low-rank-first GEMM against the reference.

Each kernel family sums in its own order, so results are compared with tolerances derived from
dtype, magnitude and reduction length, except where the promise is bitwise: a fresh adapter
(B = 0) leaves the base output unchanged whatever kernel forms the rank-r term.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
import lorakit.functional as fn
from lorakit import low_rank_ops as ops

from .tolerance import assert_close

ROWS = ops.ONEDNN_MIN_ROWS + 44  # enough rows for the oneDNN path
BACKENDS = ["blas", pytest.param("onednn", marks=pytest.mark.skipif(not ops.onednn_available(), reason="no oneDNN"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = ops.set_low_rank_backend(request.param)
    yield request.param
    ops.set_low_rank_backend(previous)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _kernels(run) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.name for e in prof.events()}


def test_each_product_equals_the_float64_reference(backend):
    n, d_in, d_out, r = ROWS, 96, 80, 6
    x, g = _randn(n, d_in, seed=0), _randn(n, d_out, seed=1)
    A, B = _randn(r, d_in, seed=2), _randn(d_out, r, seed=3)
    t, u, bias = _randn(n, r, seed=4), _randn(n, r, seed=5), _randn(d_out, seed=6)
    d = {k: v.double() for k, v in dict(x=x, g=g, A=A, B=B, t=t, u=u, bias=bias).items()}
    cases = {  # got, float64 reference, reduction length
        "shrink": (ops.shrink(x, A), d["x"] @ d["A"].T, d_in),
        "widen": (ops.widen(t, B), d["t"] @ d["B"].T, r),
        "widen+bias": (ops.widen(t, B, bias), d["t"] @ d["B"].T + d["bias"], r),
        "widen(u, Aᵀ)": (ops.widen(u, A.T), d["u"] @ d["A"], r),
        "grad_b": (ops.grad_b(t, g), d["g"].T @ d["t"], n),
        "project": (ops.project(g, B), d["g"] @ d["B"], d_out),
        "grad_a": (ops.grad_a(u, x), d["u"].T @ d["x"], n),
    }
    for name, (got, want, k) in cases.items():
        assert got.shape == want.shape and got.dtype == torch.float32, name
        # terms ~N(0,1)·N(0,1): their absolute sum is about 0.64·k
        assert_close(got, want, reduction=k, magnitude=0.64 * k + 1, msg=name)


def test_the_fast_kernel_runs_only_for_large_float32_cpu_products():
    if not ops.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    previous = ops.set_low_rank_backend("auto")
    try:
        A = _randn(4, 32, seed=0)
        big, small = _randn(ROWS, 32, seed=1), _randn(ops.ONEDNN_MIN_ROWS - 1, 32, seed=2)
        assert "mkldnn::_linear_pointwise" in _kernels(lambda: ops.shrink(big, A))
        assert "mkldnn::_linear_pointwise" not in _kernels(lambda: ops.shrink(small, A))  # decode-sized: BLAS
        assert "mkldnn::_linear_pointwise" not in _kernels(lambda: ops.shrink(big.double(), A.double()))
        ops.set_low_rank_backend("blas")
        assert "mkldnn::_linear_pointwise" not in _kernels(lambda: ops.shrink(big, A))
    finally:
        ops.set_low_rank_backend(previous)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="low-rank backend 'mkl'.*auto, blas, onednn"):
        ops.set_low_rank_backend("mkl")
    assert ops.low_rank_backend() == "auto"


def _layer_tensors(weight_t: bool, with_bias: bool, n_in: int = 48, n_out: int = 40, r: int = 5):
    x = _randn(4, ROWS // 4 + 1, n_in, seed=10).requires_grad_(True)
    weight = _randn(*((n_in, n_out) if weight_t else (n_out, n_in)), seed=11, scale=0.2)
    bias = _randn(n_out, seed=12) if with_bias else None
    A = _randn(r, n_in, seed=13, scale=0.3).requires_grad_(True)
    B = _randn(n_out, r, seed=14, scale=0.3).requires_grad_(True)
    return x, weight, bias, A, B


def _reference(x, weight, bias, A, B, s, weight_t, mask=None, p=0.0):
    """Plain autograd in float64 on the same maths."""
    x, weight, A, B = x.double(), weight.double(), A.double(), B.double()
    y = nn.functional.linear(x, weight.T if weight_t else weight, None if bias is None else bias.double())
    h = x if mask is None else x * mask / (1 - p)
    return y + nn.functional.linear(nn.functional.linear(h, A) * s, B)


@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_fused_layer_forward_and_gradients_match_autograd(backend, weight_t, with_bias, p, monkeypatch):
    x, w, b, A, B = _layer_tensors(weight_t, with_bias)
    mask = None
    if p:
        flat = torch.rand(x.reshape(-1, x.shape[-1]).shape, generator=torch.Generator().manual_seed(3)) > p
        monkeypatch.setattr(fn, "_dropout_mask", lambda x2, q: flat)
        mask = flat.reshape(x.shape)
    ours = fn.LoraLinearFunction.apply(x, w, b, A, B, 1.5, p, weight_t)
    ref = _reference(x, w, b, A, B, 1.5, weight_t, mask, p)
    n_in, n_out = x.shape[-1], ref.shape[-1]
    assert_close(ours, ref, reduction=n_in, depth=3, dtype=torch.float32)
    g = _randn(*ours.shape, seed=20)
    got = torch.autograd.grad(ours, [x, A, B], g)
    want = torch.autograd.grad(ref, [x, A, B], g.double())
    # ∂L/∂x sums over n_out; ∂L/∂A and ∂L/∂B over every row: magnitude from the terms' absolute sums
    for name, a, e, k in zip(("x", "A", "B"), got, want, (n_out, x[..., 0].numel(), x[..., 0].numel()), strict=True):
        scale = float(e.abs().max()) + 1.0
        assert_close(a, e, reduction=k, magnitude=scale * k**0.5, depth=3, dtype=torch.float32, msg=name)


class _Conv1D(nn.Module):
    """Hugging Face's Conv1D layout: weight [in, out], ``addmm(bias, x, weight)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_randn(n_in, n_out, seed=30, scale=0.2))
        self.bias = nn.Parameter(_randn(n_out, seed=31))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
def test_a_fresh_adapter_is_bitwise_the_base_on_the_fast_path(backend, kind):
    """The rank-r term is formed first and the frozen GEMM sums onto it (BLAS beta = 1): with
    B = 0 that is the base layer's own kernel on the same inputs, so the output is bitwise equal."""
    torch.manual_seed(0)
    if kind == "conv1d":
        pytest.importorskip("transformers")
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(72, 56)
    else:
        base = nn.Linear(56, 72, bias=kind == "linear")
    model = nn.Sequential(base)
    x = _randn(3, ROWS // 3 + 1, 56, seed=40)
    with torch.no_grad():
        want = model(x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    model.train()
    assert torch.equal(model(x.requires_grad_(True)), want)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), want)


@pytest.mark.parametrize("bias", [True, False])
def test_a_fresh_adapter_is_bitwise_the_base_for_a_non_contiguous_batch(bias):
    """torch's linear sums a non-contiguous 3-D batch with a bias as matmul + bias, not one addmm."""
    torch.manual_seed(0)
    base = nn.Linear(256, 64, bias=bias)
    model = nn.Sequential(base)
    x = _randn(8, 40, 256, seed=50).transpose(0, 1)  # [40, 8, 256], not contiguous
    with torch.no_grad():
        want = model(x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), want)
    assert torch.equal(model.train()(x.requires_grad_(True)), want)
