"""Caches of values derived from adapter weights stay right after any optimizer's step.

A route's stacked adapter bank and DoRA's weight norms are cached and keyed on the tensors'
version counters. torch's fused optimizers write parameters without bumping those counters, so
the keys also carry the count of optimizer steps (``lorakit.optimizer_steps``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk

from .tolerance import assert_close

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adamw-loop": lambda params: torch.optim.AdamW(params, lr=0.05, foreach=False),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    lk.inject(model, lk.LoraConfig(r=2, alpha=4.0, target_modules=["0", "2"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=5, alpha=3.0, target_modules=["0", "2"]), name="b")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model


def _each_row_alone(model: nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        lk.set_adapter(model, name)
        rows.append(model(x[i : i + 1]))
    return torch.cat(rows)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model.train()
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_an_evaluation_inside_a_training_route_sees_each_step(optimizer):
    model = _model()
    lk.set_trainable(model, ["a", "b"])
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
    x, names = torch.randn(4, 16), ["a", "b", "b", "a"]
    with lk.route(model, names):
        with torch.no_grad():
            before = model.eval()(x)
        for _ in range(2):
            _step(model, opt, x)
        with torch.no_grad():
            after = model(x)
    with torch.no_grad():
        want = _each_row_alone(model, names, x)
    assert not torch.equal(before, after)
    assert_close(after, want, reduction=24, depth=3)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_new_route_after_training_sees_the_trained_weights(optimizer):
    model = _model().eval()
    x, names = torch.randn(2, 16), ["a", "b"]
    with torch.no_grad(), lk.route(model, names):
        before = model(x)
    lk.set_adapter(model, "a")  # only "a" trains
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
    _step(model, opt, torch.randn(5, 16))
    with torch.no_grad(), lk.route(model, names):
        after = model(x)
    with torch.no_grad():
        want = _each_row_alone(model, names, x)
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert_close(after, want, reduction=24, depth=3)


def test_a_route_trains_b_when_only_b_is_trainable():
    """LoRA-FA style: A frozen, B trained; the route must record a graph for B."""
    model = _model()
    lk.set_trainable(model, ["a", "b"])
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    with lk.route(model, ["a", "b"]):
        model(torch.randn(2, 16)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_dora_weight_norms_follow_each_step(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8.0, use_dora=True, target_modules=["0"]))
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(3, 16)
    model.eval()
    with torch.no_grad():
        model(x)  # fills the norm cache
    _step(model, opt, torch.randn(8, 16))
    with torch.no_grad():
        cached = model(x)
    assert_close(cached, model(x).detach(), reduction=16, depth=3)  # the grad path recomputes the norms
