"""Layer kinds: one registered class per kind defines ΔW and the forward, and everything that
needs ΔW (merge, offline merge, combine, the routing bank) uses that one definition; a new kind
is one class plus a registration. Routing state belongs to the route, so threads do not mix."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer, LoraLinear, layer_class, register_kind, unregister_kind, wrap_module
from lorakit.offline import AdaptedMatrix

from .conftest import Mixed, SeedMLP, randomize_adapters
from .tolerance import assert_close


class InOut(nn.Module):
    """A linear layer no built-in kind wraps: it stores its weight ``[in, out]`` (y = x W)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class LoraInOut(LoraLinear):
    """LoRA on ``InOut``: the linear maths, with ΔW transposed into the ``[in, out]`` weight."""

    kind = "inout"

    def __init__(self, base_layer: InOut) -> None:
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out, self.fused = True, False
        self.in_features, self.out_features = base_layer.weight.shape


class TwoInOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = InOut(6, 5), InOut(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_an_unknown_module_type_names_itself_and_the_registered_wrappers():
    with pytest.raises(TypeError, match=r"InOut.*LoraLinear"):
        wrap_module(InOut(3, 2), "x")


def test_a_new_kind_is_one_class_and_a_registration():
    register_kind(LoraInOut, lambda m: isinstance(m, InOut))
    try:
        torch.manual_seed(0)
        model = TwoInOut()
        lk.inject(model, lk.LoraConfig(r=2, alpha=2.0, target_modules=["a", "b"]))
        randomize_adapters(model, scale=0.5)
        assert layer_class("inout") is LoraInOut
        x = torch.randn(4, 6)
        with torch.no_grad():
            adapted = model(x)
            assert model.a.delta_weight("default").shape == model.a.base_layer.weight.shape == (6, 5)
            lk.merge(model)  # uses the kind's ΔW: the merged base must compute the adapted model
            merged = model(x)
            lk.unmerge(model)
        assert_close(merged, adapted, reduction=6, depth=4)
        with lk.disable_adapters(model), torch.no_grad():
            assert not torch.allclose(model(x), adapted)
    finally:
        unregister_kind(LoraInOut)
    with pytest.raises(KeyError, match="inout"):
        layer_class("inout")


@pytest.mark.parametrize("path", ["emb", "conv", "proj"])
def test_offline_and_layer_delta_are_the_same_definition(path):
    torch.manual_seed(0)
    model = Mixed()
    lk.inject(model, lk.LoraConfig(r=3, alpha=6.0, target_modules=["emb", "conv", "proj"]))
    randomize_adapters(model)
    layer = model.get_submodule(path)
    matrix = AdaptedMatrix(path, layer.kind, 3, layer.scaling["default"], layer.lora_A["default"].detach(),
                           layer.lora_B["default"].detach())  # fmt: skip
    # The same function computes both, so they agree bitwise.
    assert torch.equal(matrix.delta(), layer.delta_weight("default").detach())
    assert matrix.delta().shape == layer.base_layer.weight.shape


def _routed_outputs(seed: int, rows: list[str | None], steps: int, barrier: threading.Barrier, out: dict) -> None:
    torch.manual_seed(seed)
    model = SeedMLP().eval()
    lk.inject(model, lk.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2", "fc3"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=2, alpha=8.0, target_modules=["fc1", "fc3"]), name="b")
    randomize_adapters(model, scale=0.2, seed=seed)
    x = torch.randn(len(rows), 784, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = torch.cat([_alone(model, name, x[i : i + 1]) for i, name in enumerate(rows)])
    barrier.wait()  # both threads route at the same time from here on
    # Row-by-row and batched GEMMs round differently: allow a few ulps per reduction step of
    # each of the 3 layers; a row run with another model's or another row's adapter is off by ~0.1.
    tol = 16 * torch.finfo(torch.float32).eps * 784**0.5 * max(1.0, float(expected.abs().max()))
    worst = 0.0
    with torch.no_grad():
        for _ in range(steps):
            with lk.route(model, rows):
                got = model(x)
            worst = max(worst, float((got - expected).abs().max()))
    out[seed] = (worst / tol, model.fc1.route)


def _alone(model: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    if name is None:
        with lk.disable_adapters(model):
            return model(x)
    lk.set_adapter(model, name)
    return model(x)


def test_two_threads_routing_two_models_never_interfere():
    barrier, out = threading.Barrier(2), {}
    routes = {1: ["a", "b", None, "b", "a"], 2: [None, "a", "a", "b", "b", "b", None]}
    threads = [threading.Thread(target=_routed_outputs, args=(seed, rows, 40, barrier, out)) for seed, rows in
               routes.items()]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == {1, 2}
    for seed, (worst, left_over) in out.items():
        assert worst < 1, f"model {seed}: routed rows differ from the rows run alone by {worst:.1f}x the tolerance"
        assert left_over is None, "leaving the route removes its state"
