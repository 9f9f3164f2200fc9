"""Property tests over random shapes, ranks, dtypes and layer types."""

from __future__ import annotations

import os
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import lorakit as lk

from .conftest import randomize_adapters
from .tolerance import assert_close

# LORAKIT_HYPOTHESIS_EXAMPLES=300 for a deeper local search; 25 keeps CI quick.
EXAMPLES = int(os.environ.get("LORAKIT_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@st.composite
def layer_and_input(draw):
    """A random supported layer inside a root module, and an input for it."""
    kind = draw(st.sampled_from(["linear", "conv1d", "embedding", "conv2d"]))
    dtype = draw(DTYPES)
    a, b = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(a, b, bias=draw(st.booleans()))
        x = torch.randn(batch, draw(st.integers(1, 3)), a, generator=g)
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(b, a)
        x = torch.randn(batch, a, generator=g)
    elif kind == "embedding":
        layer = nn.Embedding(a + 1, b)
        x = torch.randint(0, a + 1, (batch, 3), generator=g)
    else:
        k = draw(st.sampled_from([1, 3]))
        layer = nn.Conv2d(min(a, 6), min(b, 6), k, padding=k // 2)
        x = torch.randn(batch, min(a, 6), 5, 5, generator=g)
    layer = layer.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    root = nn.Module()
    root.layer = layer
    r = draw(st.integers(1, 8))
    alpha = draw(st.floats(0.5, 32.0))
    return root, x, r, alpha, dtype


# the drawn layers reduce over at most 24 inputs (Conv2d: 6 channels × 3 × 3 = 54)
REDUCTION = 54


def _same_output(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to summation order and one rounding of the merged weight (inputs, weights and
    outputs are O(1), hence the floor of 1 on the magnitude)."""
    magnitude = max(float(want.float().abs().max()), 1.0)
    assert_close(got.float(), want.float(), reduction=REDUCTION, depth=3, magnitude=magnitude, dtype=dtype)


@SETTINGS
@given(layer_and_input(), st.booleans())
def test_fresh_adapter_is_identity(case, rslora):
    root, x, r, alpha, _ = case
    before = root.layer(x)
    lk.inject(root, lk.LoraConfig(r=r, alpha=alpha, target_modules=["layer"], use_rslora=rslora))
    after = root.layer(x)
    assert after.dtype == before.dtype
    assert torch.equal(after, before)


@SETTINGS
@given(layer_and_input())
def test_merged_equals_unmerged_and_unmerge_restores(case):
    root, x, r, alpha, dtype = case
    lk.inject(root, lk.LoraConfig(r=r, alpha=alpha, target_modules=["layer"]))
    randomize_adapters(root, scale=0.1)
    root.eval()
    w0 = root.layer.base_layer.weight.detach().clone()
    delta = root.layer.delta_weight("default").detach()
    with torch.no_grad():
        unmerged = root.layer(x)
        lk.merge(root)
        merged = root.layer(x)
        lk.unmerge(root)
    _same_output(merged, unmerged, dtype)
    # W0 + ΔW − ΔW: two roundings at the size of |W0| + |ΔW|
    size = float(w0.float().abs().max() + delta.float().abs().max())
    assert_close(root.layer.base_layer.weight, w0, reduction=1, depth=2, magnitude=size)


@SETTINGS
@given(layer_and_input())
def test_save_load_round_trip_is_bit_identical(case):
    import copy

    root, x, r, alpha, _ = case
    fresh = copy.deepcopy(root)
    lk.inject(root, lk.LoraConfig(r=r, alpha=alpha, target_modules=["layer"]))
    randomize_adapters(root, scale=0.3)
    with tempfile.TemporaryDirectory() as d:
        lk.save_adapter(root, d)
        lk.load_adapter(fresh, d)
        stored = load_file(f"{d}/adapter_model.safetensors")
    assert len(stored) == 2
    for name in ("lora_A", "lora_B"):
        assert torch.equal(getattr(fresh.layer, name)["default"], getattr(root.layer, name)["default"])
    assert torch.equal(fresh.layer(x), root.layer(x))


@SETTINGS
@given(layer_and_input(), st.integers(1, 8))
def test_switching_adapters_a_b_a(case, r2):
    root, x, r, alpha, _ = case
    lk.inject(root, lk.LoraConfig(r=r, alpha=alpha, target_modules=["layer"]), name="a")
    lk.add_adapter(root, lk.LoraConfig(r=r2, alpha=alpha, target_modules=["layer"]), name="b")
    randomize_adapters(root, scale=0.3)
    out_a = root.layer(x)
    lk.set_adapter(root, "b")
    out_b = root.layer(x)
    lk.set_adapter(root, "a")
    assert torch.equal(root.layer(x), out_a)
    assert not torch.equal(out_a, out_b)


@SETTINGS
@given(layer_and_input(), st.lists(st.integers(1, 6), min_size=2, max_size=3), st.data())
def test_routed_rows_equal_each_adapter_alone(case, ranks, data):
    """Any mix of adapters (different ranks) and base rows: each row equals its adapter alone."""
    root, x, _, alpha, dtype = case
    names = [f"t{i}" for i in range(len(ranks))]
    for i, (name, r) in enumerate(zip(names, ranks, strict=True)):
        cfg = lk.LoraConfig(r=r, alpha=alpha * (i + 1), target_modules=["layer"])
        (lk.inject if i == 0 else lk.add_adapter)(root, cfg, name)
    randomize_adapters(root, scale=0.3)
    root.eval()
    route = data.draw(st.lists(st.sampled_from([*names, None]), min_size=x.shape[0], max_size=x.shape[0]))
    with torch.no_grad():
        with lk.route(root, route):
            mixed = root.layer(x)
        for i, name in enumerate(route):
            if name is None:
                with lk.disable_adapters(root):
                    alone = root.layer(x[i : i + 1])
            else:
                lk.set_adapter(root, name)
                alone = root.layer(x[i : i + 1])
            _same_output(mixed[i : i + 1], alone, dtype)
