"""Combining adapters (cat, linear, svd, ties, dare) and the SVD view of updates."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit as lk
from lorakit.combine import combine_adapters, effective_rank, singular_values
from lorakit.errors import InputError

from .conftest import Mixed, SeedMLP, randomize_adapters
from .models import tiny_gpt2
from .tolerance import assert_close, close_tol


def _two(model, targets, r1=2, r2=3):
    lk.inject(model, lk.LoraConfig(r=r1, alpha=4.0, target_modules=targets), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=r2, alpha=3.0, target_modules=targets), name="b")
    randomize_adapters(model, scale=0.2)


def _weighted_sum(layer, wa, wb):
    return wa * layer.delta_weight("a") + wb * layer.delta_weight("b")


@pytest.mark.parametrize("build", [SeedMLP, tiny_gpt2, Mixed], ids=["mlp", "gpt2-conv1d", "emb-conv2d"])
def test_cat_and_full_rank_svd_are_exact(build):
    model = build()
    targets = {"SeedMLP": ["fc1", "fc2"], "GPT2LMHeadModel": ["c_attn", "c_fc"], "Mixed": ["emb", "conv", "proj"]}
    _two(model, targets[type(model).__name__])
    errors = combine_adapters(model, ["a", "b"], [0.7, -0.4], "cat", method="cat")
    svd_errors = combine_adapters(model, ["a", "b"], [0.7, -0.4], "svd5", method="svd", rank=5)  # rank 2 + 3
    assert set(errors) == set(svd_errors) == {p for p, _ in lk.lora_layers(model)}
    for path, layer in lk.lora_layers(model):
        want = _weighted_sum(layer, 0.7, -0.4).detach()
        assert layer.r["cat"] == 5 and layer.r["svd5"] == min(5, *_matrix(want).shape)  # conv: 4 output channels
        cat = {"reduction": 16, "magnitude": float(want.abs().max()), "depth": 2}
        assert_close(layer.delta_weight("cat").detach(), want, **cat)
        # the SVD's rounding scales with the largest singular value, the size of its reconstruction's terms
        svd = {"reduction": max(_matrix(want).shape), "magnitude": _spectral_norm(want), "depth": 3}
        assert_close(layer.delta_weight("svd5").detach(), want, **svd)
        # the reported errors are rounding: below what the entrywise tolerances allow the whole matrix
        assert errors[path] <= _relative_bound(want, **cat), path
        assert svd_errors[path] <= _relative_bound(want, **svd), path


def _matrix(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(delta.shape[0], -1)


def _spectral_norm(delta: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(_matrix(delta).double(), ord=2))


def _relative_bound(want: torch.Tensor, **tolerance: float) -> float:
    """The largest ‖got − want‖ / ‖want‖ (Frobenius) when every entry is within ``close_tol``."""
    return close_tol(torch.float32, **tolerance) * math.sqrt(want.numel()) / float(want.norm())


def test_truncated_svd_error_is_the_tail_energy():
    model = SeedMLP()
    _two(model, ["fc1"], r1=4, r2=4)
    errors = combine_adapters(model, ["a", "b"], [1.0, 1.0], "low", method="svd", rank=3)
    s = singular_values(_weighted_sum(model.fc1, 1.0, 1.0).detach())
    tail = float(torch.sqrt((s[3:] ** 2).sum()) / torch.sqrt((s**2).sum()))
    assert errors["fc1"] == pytest.approx(tail, rel=1e-3)
    assert model.fc1.r["low"] == 3
    target = _weighted_sum(model.fc1, 1.0, 1.0).detach()
    got = model.fc1.delta_weight("low").detach()
    assert_close(got, _best_rank(target, 3), reduction=max(target.shape), magnitude=_spectral_norm(target), depth=3)


def _best_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a matrix (Eckart–Young), computed here in float64."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).float()


def _ties_by_hand(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES written out: keep each update's top ``density`` fraction by magnitude (topk), elect the
    sign of the kept sum per entry, average the kept entries that carry the elected sign."""
    kept = []
    for d in deltas:
        k = max(1, round(density * d.numel()))
        mask = torch.zeros(d.numel(), dtype=torch.bool)
        mask[d.abs().flatten().topk(k).indices] = True
        kept.append(d * mask.view_as(d))
    elected = torch.sign(sum(kept))
    agree = [(torch.sign(t) == elected) & (t != 0) for t in kept]
    total = sum(t * a for t, a in zip(kept, agree, strict=True))
    count = sum(a.int() for a in agree)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def _relative_error(got: torch.Tensor, target: torch.Tensor) -> float:
    return float((got.double() - target.double()).norm() / target.double().norm())


def test_linear_is_the_product_of_the_weighted_factor_sums():
    """linear: A = Σ √(|w| s) A_k, B = Σ sign(w) √(|w| s) B_k, scale 1; its error is against Σ w ΔW_k."""
    model = SeedMLP()
    _two(model, ["fc1", "fc2"], r1=3, r2=3)
    weights = {"a": 0.5, "b": -1.5}
    errors = combine_adapters(model, ["a", "b"], list(weights.values()), "lin", method="linear")
    for path, layer in lk.lora_layers(model):
        f = {s: (abs(w) * layer.scaling[s]) ** 0.5 for s, w in weights.items()}
        A = sum(f[s] * layer.lora_A[s] for s in weights)
        B = sum(math.copysign(f[s], w) * layer.lora_B[s] for s, w in weights.items())
        assert layer.r["lin"] == 3 and layer.scaling["lin"] == 1.0
        assert_close(layer.delta_weight("lin"), (B @ A).detach(), reduction=3, depth=2)
        target = _weighted_sum(layer, 0.5, -1.5).detach()
        assert errors[path] == pytest.approx(_relative_error(layer.delta_weight("lin").detach(), target), rel=1e-4)
        assert errors[path] > 0.1  # the cross terms B_a A_b do not vanish for random factors


@pytest.mark.parametrize(("method", "density", "rank"), [("ties", 0.3, 4), ("dare", 0.5, 4), ("dare", 1.0, 6)])
def test_ties_and_dare_are_their_formulas_truncated_by_svd(method, density, rank):
    model = SeedMLP()
    _two(model, ["fc1", "fc2"], r1=3, r2=3)
    errors = combine_adapters(model, ["a", "b"], [1.0, 0.8], "m", method=method, density=density, rank=rank, seed=7)
    generator = torch.Generator().manual_seed(7)  # dare: one draw per layer and source, in model order
    for path, layer in lk.lora_layers(model):
        deltas = [1.0 * layer.delta_weight("a").detach(), 0.8 * layer.delta_weight("b").detach()]
        if method == "ties":
            merged = _ties_by_hand(deltas, density)
        else:
            merged = sum(d * (torch.rand(d.shape, generator=generator) < density) / density for d in deltas)
        want = _best_rank(merged, rank)
        got = layer.delta_weight("m").detach()
        assert layer.r["m"] == rank
        assert_close(got, want, reduction=max(got.shape), magnitude=float(merged.abs().max()) * 4, depth=3)
        target = sum(deltas)
        assert errors[path] == pytest.approx(_relative_error(got, target), rel=1e-3, abs=1e-6)
    if density == 1.0:  # dare keeping everything at rank r_a + r_b: exactly the weighted sum
        assert max(errors.values()) < 1e-5
    else:  # dropping or trimming entries changes the update: a real, not a vanishing, error
        assert min(errors.values()) > 0.05


def test_linear_needs_equal_ranks_and_known_sources():
    m2 = SeedMLP()
    _two(m2, ["fc1"], r1=2, r2=3)
    with pytest.raises(InputError, match="equal ranks"):
        combine_adapters(m2, ["a", "b"], [1, 1], "x", method="linear")
    with pytest.raises(InputError, match=r"unknown adapters \['zz'\]; the model holds \['a', 'b'\]"):
        combine_adapters(m2, ["a", "zz"], [1, 1], "y")


def test_effective_rank():
    s = torch.tensor([10.0, 1.0, 0.1])
    assert effective_rank(s, 0.9) == 1 and effective_rank(s, 0.999) == 2 and effective_rank(s, 1.0) == 3
