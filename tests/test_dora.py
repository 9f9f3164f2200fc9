"""DoRA against PEFT 0.21, both ways, over a grid of models and options.

For every case: a fresh adapter equals the base (bitwise), disabled equals the base (bitwise),
outputs and gradients equal PEFT's DoRA on the same weights, merge equals the unmerged output,
unmerge restores W0, merge_and_unload leaves the base's keys, a lorakit save loads into PEFT and a
PEFT save loads into lorakit with the same output, and the trainable counts agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.dora import row_norms

from .conftest import Mixed, SeedMLP
from .models import tiny_gpt2, tiny_llama, token_batch
from .tolerance import assert_close, close_tol

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    options: dict  # LoraConfig fields, lorakit spelling
    reduction: int  # the longest sum on the way to the output, for tolerances


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    return Mixed().eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return SeedMLP().eval()


def _mixed_inputs() -> tuple:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (6, 5), generator=g), torch.randn(6, 1, 8, 8, generator=g)


def _image() -> tuple:
    return (torch.randn(4, 784, generator=torch.Generator().manual_seed(0)),)


def _tokens() -> tuple:
    return (token_batch(),)


MIXED = ["emb", "conv", "proj", "head"]
# fmt: off
CASES = [
    Case("mixed-linear-conv-embedding", _mixed, _mixed_inputs, {"r": 3, "alpha": 6.0, "target_modules": MIXED}, 80),
    Case("mixed-rslora-patterns", _mixed, _mixed_inputs,
         {"r": 4, "alpha": 4.0, "target_modules": MIXED, "use_rslora": True, "rank_pattern": {"conv": 2},
          "alpha_pattern": {"proj": 3.0}}, 80),
    Case("mlp", _mlp, _image, {"r": 4, "alpha": 8.0, "target_modules": ["fc1", "fc2", "fc3"]}, 784),
    Case("mlp-bias-lora-only", _mlp, _image, {"r": 2, "alpha": 2.0, "target_modules": ["fc1", "fc3"],
                                              "bias": "lora_only"}, 784),
    Case("gpt2-conv1d", tiny_gpt2, _tokens,
         {"r": 4, "alpha": 8.0, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}, 128),
    Case("llama-all-linear", tiny_llama, _tokens, {"r": 4, "alpha": 8.0, "target_modules": "all-linear"}, 128),
    Case("llama-embeddings-dropout", tiny_llama, _tokens,
         {"r": 2, "alpha": 4.0, "target_modules": ["embed_tokens", "q_proj", "v_proj"], "dropout": 0.1}, 128),
]
# fmt: on
IDS = [c.id for c in CASES]
PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _peft_config(options: dict) -> peft.LoraConfig:
    return peft.LoraConfig(use_dora=True, **{PEFT_NAMES.get(k, k): v for k, v in options.items()})


def _run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    out = model(*inputs) if len(inputs) > 1 or inputs[0].dtype != torch.long else model(input_ids=inputs[0])
    return out.logits if hasattr(out, "logits") else out


def _train_like(model: nn.Module, seed: int, biases: bool = True) -> None:
    """Trained-looking adapters: factors with ΔW about W0's size, magnitudes moved off their start
    (and trained biases, unless ``biases`` is False)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in name or (biases and p.requires_grad and name.endswith("bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _same(got: torch.Tensor, want: torch.Tensor, case: Case, what: str) -> None:
    # Norms, the rank-r path and the layers chain several reductions: depth 12 over the longest one.
    assert_close(got, want, reduction=case.reduction, depth=12, msg=lambda m: f"{case.id} {what}: {m}")


def _ours(case: Case) -> tuple[nn.Module, nn.Module]:
    base = case.build()
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(use_dora=True, **case.options))
    return base, ours.eval()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_and_disabled_equal_the_base_bitwise(case: Case):
    base, ours = _ours(case)
    x = case.inputs()
    with torch.no_grad():
        want = _run(base, x)
        assert torch.equal(_run(ours, x), want), "a fresh DoRA adapter (ΔW = 0, m = ‖W0‖) must not change the output"
        _train_like(ours, seed=1, biases=False)  # a trained bias stays when the adapter is disabled
        changed = _run(ours, x)
        with lk.disable_adapters(ours):
            assert torch.equal(_run(ours, x), want)
    assert not torch.allclose(changed, want), "the trained adapter must change the output for the test to mean much"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lorakit_save_loads_into_peft_with_the_same_output(case: Case, tmp_path):
    base, ours = _ours(case)
    _train_like(ours, seed=2)
    x = case.inputs()
    with torch.no_grad():
        want = _run(ours, x)
    lk.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert any(isinstance(m, peft.tuners.lora.dora.DoraLinearLayer) for m in theirs.modules())
    with torch.no_grad():
        _same(_run(theirs, x), want, case, "PEFT loading lorakit's save")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_save_loads_into_lorakit_with_the_same_output_and_counts(case: Case, tmp_path):
    base = case.build()
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(case.options)).eval()
    _train_like(theirs, seed=3)
    x = case.inputs()
    with torch.no_grad():
        want = _run(theirs, x)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path)
    ours.eval()
    with torch.no_grad():
        _same(_run(ours, x), want, case, "lorakit loading PEFT's save")
    assert lk.count_parameters(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    mags = {n.removeprefix("base_model.model.").replace(".default.weight", "")
            for n, _ in theirs.named_parameters() if "lora_magnitude_vector" in n}  # fmt: skip
    assert {f"{p}.lora_magnitude_vector" for p, _ in lk.lora_layers(ours)} == mags


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_equal_peft(case: Case):
    """One backward in training mode (dropout off: its masks are random) gives PEFT's gradients
    for A, B and the magnitude, whose norm is a constant for the gradient in both."""
    base = case.build()
    for module in base.modules():  # the model's own dropout too (GPT-2's), so that both runs see one function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    options = {**case.options, "dropout": 0.0}
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(options))
    _train_like(theirs, seed=4)
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(use_dora=True, **options))
    mine = lk.checkpoint.adapter_state(ours, "default")  # PEFT's file key -> our live tensor
    pairs = {}
    for n, p in theirs.named_parameters():
        if p.requires_grad:  # PEFT's live names hold the adapter name (and a module level for m)
            key = n.replace(".default", "")
            pairs[key.removesuffix(".weight") if "lora_magnitude_vector" in key else key] = p
    assert set(pairs) == set(mine)
    with torch.no_grad():
        for key, p in pairs.items():
            mine[key].copy_(p)
    ours.train()
    theirs.train()
    x = case.inputs()
    _run(theirs, x).square().mean().backward()
    _run(ours, x).square().mean().backward()
    for key, p in pairs.items():
        got, want = mine[key].grad, p.grad
        assert got is not None and want is not None and float(want.abs().max()) > 0, key
        _same(got, want, case, f"gradient of {key}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_and_unload(case: Case):
    base, ours = _ours(case)
    _train_like(ours, seed=5)
    x = case.inputs()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    w0 = {p: layer.base_layer.weight.detach().clone() for p, layer in lk.lora_layers(ours)}
    with torch.no_grad():
        want = _run(ours, x)
        lk.merge(ours)
        _same(_run(ours, x), want, case, "merged")
        for path, layer in lk.lora_layers(ours):
            # the merged weight is m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖: its norms are the magnitudes
            W = layer.base_layer.weight
            norms = row_norms(*layer.norm_operands(layer.active_adapter), 0.0)
            m = layer.lora_magnitude[layer.active_adapter].detach().flatten()
            assert_close(norms, m, reduction=W.numel() // norms.numel(), depth=4, msg=lambda s, p=path: f"{p}: {s}")
        lk.unmerge(ours)
        for path, layer in lk.lora_layers(ours):
            w = w0[path]
            assert_close(layer.base_layer.weight, w, reduction=8, magnitude=float(w.abs().max()) * 4, depth=4)
        _same(_run(ours, x), want, case, "unmerged")
        lk.merge_and_unload(ours)
        _same(_run(ours, x), want, case, "merged and unloaded")
    assert set(ours.state_dict()) == set(before)
    assert not list(lk.lora_layers(ours))


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
    _train_like(dense, seed=6)
    with torch.no_grad():
        for (_, a), (_, b) in zip(dense.named_parameters(), q.named_parameters(), strict=True):
            if a.requires_grad:
                b.copy_(a)
    x = _image()[0]
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
    x = _image()[0]
    for change in ("lora_A", "lora_B", "base_layer.weight"):
        with torch.no_grad():
            model(x)  # keeps the norm
            for name, p in model.named_parameters():
                if name.startswith("fc1.") and change in name:
                    p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            kept = model(x)
        fresh = model(x).detach()  # with autograd: computed afresh
        assert_close(kept, fresh, reduction=784, depth=4, msg=lambda m, c=change: f"after changing {c}: {m}")
