"""DoRA beyond the parity grid (``test_parity_grid.py``): the norm's expansion and its guard against
cancellation, QDoRA on 4-bit bases, the inference norm cache, and what DoRA refuses."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.layers.dora import row_norms

from .conftest import SeedMLP, train_like
from .tolerance import assert_close, close_tol


def _image() -> torch.Tensor:
    return torch.randn(4, 784, generator=torch.Generator().manual_seed(0))


def test_row_norms_equal_the_direct_norm_including_cancelling_rows():
    """The expanded norm equals ‖W0 + s·B A‖ row by row, also where ΔW cancels most of W0 (those
    rows are recomputed directly: the expansion would lose the digits the cancellation removed)."""
    g = torch.Generator().manual_seed(0)
    W0, A, B = torch.randn(64, 96, generator=g), torch.randn(4, 96, generator=g), torch.randn(64, 4, generator=g)
    s = 0.7
    direct = torch.linalg.vector_norm((W0.double() + s * B.double() @ A.double()), dim=1)
    tol = close_tol(torch.float32, reduction=96, magnitude=float(direct.max()), depth=3)
    torch.testing.assert_close(row_norms(W0, A, B, s).double(), direct, rtol=0, atol=tol)
    # rows 0-9: W0 = −ΔW + a tiny remainder (1e-4 of the row): a relative error of the expansion would be ~1e3·eps
    W1 = W0.clone()
    W1[:10] = -s * (B[:10] @ A) + 1e-4 * torch.randn(10, 96, generator=g)
    direct = torch.linalg.vector_norm(W1.double() + s * B.double() @ A.double(), dim=1)
    got = row_norms(W1, A, B, s).double()
    assert ((got - direct).abs() / direct).max() < 1e-3  # a remainder of 1e-4 in float32 keeps ~3 digits


def test_qdora_on_a_4bit_base_equals_dora_on_its_dequantized_weights():
    """DoRA on an NF4 base is DoRA on the dense weights the 4-bit codes stand for: the same
    outputs, gradients and merged weights as on an nn.Linear holding the dequantized weight."""
    torch.manual_seed(0)
    dense = SeedMLP().eval()
    q = lk.quantize(copy.deepcopy(dense))
    for name in ("fc1", "fc2", "fc3"):
        getattr(dense, name).weight.data = lk.quantization.dequantize_weight(getattr(q, name))
    config = lk.LoraConfig(r=4, alpha=8.0, target_modules=["fc1", "fc2"], use_dora=True)
    lk.inject(dense, config)
    lk.inject(q, config)
    train_like(dense, seed=6, spread=0.3)
    with torch.no_grad():
        for (_, a), (_, b) in zip(dense.named_parameters(), q.named_parameters(), strict=True):
            if a.requires_grad:
                b.copy_(a)
    x = _image()
    q.train()
    dense.train()
    got, want = q(x), dense(x)
    assert_close(got, want, reduction=784, depth=12)
    got.square().mean().backward()
    want.square().mean().backward()
    for (n, a), (_, b) in zip(dense.named_parameters(), q.named_parameters(), strict=True):
        if a.requires_grad:
            assert_close(b.grad, a.grad, reduction=784, depth=12, msg=lambda s, n=n: f"{n}: {s}")


def test_dora_refuses_routing_combining_and_offline_merges(tmp_path):
    torch.manual_seed(0)
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1"], use_dora=True), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["fc1"], use_dora=True), "b")
    x = torch.randn(2, 784)
    with pytest.raises(NotImplementedError, match="dora adapters cannot be mixed per row"), lk.route(model, ["a", "b"]):
        model(x)
    with pytest.raises(lk.InputError, match="DoRA adapters"):
        lk.combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")
    lk.save_adapter(model, tmp_path / "a", name="a")
    from lorakit.offline import inspect_adapter

    with pytest.raises(lk.AdapterLoadError, match="DoRA adapter"):
        inspect_adapter(tmp_path / "a")


def test_the_norm_kept_for_inference_follows_changes_to_factors_and_base():
    """Without autograd the norm ‖W0 + ΔW‖ is kept between calls (generation); an in-place change of
    A, B or W0 (an optimizer step, a loaded checkpoint) must be seen by the next call."""
    torch.manual_seed(0)
    model = SeedMLP().eval()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8.0, target_modules=["fc1", "fc2"], use_dora=True))
    x = _image()
    for change in ("lora_A", "lora_B", "base_layer.weight"):
        with torch.no_grad():
            model(x)  # keeps the norm
            for name, p in model.named_parameters():
                if name.startswith("fc1.") and change in name:
                    p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            kept = model(x)
        fresh = model(x).detach()  # with autograd: the norm computed afresh (W0's own row norms are kept too)
        assert_close(kept, fresh, reduction=784, depth=4, msg=lambda m, c=change: f"after changing {c}: {m}")
        layer = model.fc1
        W0, A, B = layer.base_layer.weight, layer.lora_A["default"], layer.lora_B["default"]
        direct = torch.linalg.vector_norm(W0 + layer.scaling["default"] * B @ A, dim=1).detach()
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                assert_close(layer.weight_norm("default"), direct, reduction=784, depth=3)
