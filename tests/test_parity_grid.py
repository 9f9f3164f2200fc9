"""The parity grid: lorakit against PEFT 0.21, both ways, over models with every layer kind
(Linear, Conv1D, Embedding, Conv1d/2d/3d, grouped Conv2d) × variant (LoRA, DoRA) × options.

For every configuration: a fresh adapter equals the base (bitwise), disabled equals the base
(bitwise), outputs and gradients equal PEFT's on the same weights, merge equals the unmerged output
(a grouped convolution refuses to merge, as PEFT does), unmerge restores W0, merge_and_unload
leaves the base's keys, a lorakit save loads into PEFT and a PEFT save loads into lorakit with the
same output, and the trainable counts agree. Tolerances: ``tests/tolerance.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.dora import DoraLayer, row_norms

from .conftest import Mixed, SeedMLP
from .models import _llama_config, expert_net, tiny_gpt2, tiny_llama, tiny_mixtral, token_batch
from .tolerance import assert_close

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


def _special_tokens() -> tuple:
    """A batch in which the trainable tokens occur (first column, some rows twice)."""
    ids = token_batch()
    ids[:, 0] = torch.tensor([1, 5, 100])
    ids[0, 3], ids[2, 5] = 7, 9
    return (ids,)


def _tied_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config(tie_word_embeddings=True)).eval()


def _expert_inputs() -> tuple:
    return (torch.randn(5, 8, generator=torch.Generator().manual_seed(3)),)


class Convs(nn.Module):
    """Conv1d (strided), Conv3d (padded), a grouped Conv2d and a head: the convolution kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, stride=2)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2, padding=1)
        self.head = nn.Linear(6 + 4 + 8, 5)

    def forward(self, x1: torch.Tensor, x3: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        pooled = [self.c1(x1).mean(-1), self.c3(x3).mean((-3, -2, -1)), self.grouped(x2).mean((-2, -1))]
        return self.head(torch.tanh(torch.cat(pooled, 1)))


def _convs() -> nn.Module:
    torch.manual_seed(0)
    return Convs().eval()


def _conv_inputs() -> tuple:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 3, 16, generator=g), torch.randn(2, 2, 4, 6, 6, generator=g),
            torch.randn(2, 4, 8, 8, generator=g))  # fmt: skip


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
    Case("conv1d-conv3d", _convs, _conv_inputs, {"r": 4, "alpha": 8.0, "target_modules": ["c1", "c3", "head"]}, 54),
    Case("conv-grouped", _convs, _conv_inputs, {"r": 4, "alpha": 4.0, "target_modules": ["grouped", "head"]}, 36),
    Case("mlp-lora-bias", _mlp, _image, {"r": 4, "alpha": 8.0, "target_modules": ["fc1", "fc2"], "lora_bias": True},
         784),
    Case("convs-lora-bias", _convs, _conv_inputs,
         {"r": 2, "alpha": 4.0, "target_modules": ["c1", "c3", "grouped", "head"], "lora_bias": True}, 54),
    # target_parameters: stacked expert weights [E, out, in] (nested wrappers, a rank and alpha per parameter)
    Case("mixtral-expert-parameters", tiny_mixtral, _tokens,
         {"r": 2, "alpha": 4.0, "target_modules": ["q_proj"], "rank_pattern": {"down_proj": 3},
          "alpha_pattern": {"experts.down_proj": 5.0},
          "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}, 48),
    Case("transposed-expert-parameters", expert_net, _expert_inputs,
         {"r": 2, "alpha": 4.0, "target_modules": [], "target_parameters": ["gate", "experts.up"]}, 12),
    # trainable_token_indices: chosen embedding rows trained in full (a tied head follows them)
    Case("llama-trainable-tokens", tiny_llama, _special_tokens,
         {"r": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"], "trainable_token_indices": [1, 5, 7]}, 128),
    Case("tied-llama-trainable-tokens", _tied_llama, _special_tokens,
         {"r": 2, "alpha": 4.0, "target_modules": ["o_proj"], "trainable_token_indices": {"embed_tokens": [0, 9, 100]}},
         128),
    Case("mlp-weight-parameters", _mlp, _image,
         {"r": 3, "alpha": 6.0, "target_modules": ["fc3"], "target_parameters": ["fc1.weight", "fc2.weight"]}, 784),
]
VARIANTS = ("lora", "dora")
# fmt: on
# DoRA takes neither grouped convolutions nor lora_bias nor parameter targets (neither does PEFT's)
GRID = [(c, v) for c in CASES for v in VARIANTS
        if not (v == "dora" and ("grouped" in c.id or "bias" in c.id or "parameters" in c.id))]  # fmt: skip
IDS = [f"{c.id}-{v}" for c, v in GRID]
PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _peft_config(options: dict, variant: str) -> peft.LoraConfig:
    return peft.LoraConfig(use_dora=variant == "dora", **{PEFT_NAMES.get(k, k): v for k, v in options.items()})


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
            elif "lora_" in name or "trainable_tokens" in name or name.endswith(".values") or (
                biases and p.requires_grad and name.endswith("bias")):  # fmt: skip
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _same(got: torch.Tensor, want: torch.Tensor, case: Case, what: str) -> None:
    # Norms, the rank-r path and the layers chain several reductions: depth 12 over the longest one.
    assert_close(got, want, reduction=case.reduction, depth=12, msg=lambda m: f"{case.id} {what}: {m}")


def _ours(case: Case, variant: str) -> tuple[nn.Module, nn.Module]:
    base = case.build()
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(use_dora=variant == "dora", **case.options))
    return base, ours.eval()


@pytest.mark.parametrize(("case", "variant"), GRID, ids=IDS)
def test_fresh_and_disabled_equal_the_base_bitwise(case: Case, variant: str):
    base, ours = _ours(case, variant)
    x = case.inputs()
    with torch.no_grad():
        want = _run(base, x)
        assert torch.equal(_run(ours, x), want), "a fresh adapter (ΔW = 0; DoRA: m = ‖W0‖) must not change the output"
        _train_like(ours, seed=1, biases=False)  # a trained bias stays when the adapter is disabled
        changed = _run(ours, x)
        with lk.disable_adapters(ours):
            assert torch.equal(_run(ours, x), want)
    assert not torch.allclose(changed, want), "the trained adapter must change the output for the test to mean much"


@pytest.mark.parametrize(("case", "variant"), GRID, ids=IDS)
def test_lorakit_save_loads_into_peft_with_the_same_output(case: Case, variant: str, tmp_path):
    base, ours = _ours(case, variant)
    _train_like(ours, seed=2)
    x = case.inputs()
    with torch.no_grad():
        want = _run(ours, x)
    lk.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert any(isinstance(m, peft.tuners.lora.dora.DoraLinearLayer) for m in theirs.modules()) == (variant == "dora")
    with torch.no_grad():
        _same(_run(theirs, x), want, case, "PEFT loading lorakit's save")


@pytest.mark.parametrize(("case", "variant"), GRID, ids=IDS)
def test_peft_save_loads_into_lorakit_with_the_same_output_and_counts(case: Case, variant: str, tmp_path):
    base = case.build()
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(case.options, variant)).eval()
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
    assert {f"{p}.lora_magnitude_vector" for p, _ in lk.lora_layers(ours) if variant == "dora"} == mags
    adapted = {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {p for p, _ in lk.lora_layers(ours)} == {n.removeprefix("base_model.model.") for n in adapted}


@pytest.mark.parametrize(("case", "variant"), GRID, ids=IDS)
def test_gradients_equal_peft(case: Case, variant: str):
    """One backward in training mode (dropout off: its masks are random) gives PEFT's gradients
    for A, B and the magnitude, whose norm is a constant for the gradient in both."""
    base = case.build()
    for module in base.modules():  # the model's own dropout too (GPT-2's), so that both runs see one function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    options = {**case.options, "dropout": 0.0}
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(options, variant))
    _train_like(theirs, seed=4)
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(use_dora=variant == "dora", **options))
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


@pytest.mark.parametrize(("case", "variant"), GRID, ids=IDS)
def test_merge_unmerge_and_unload(case: Case, variant: str):
    base, ours = _ours(case, variant)
    _train_like(ours, seed=5)
    x = case.inputs()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    w0 = {p: layer.weight.detach().clone() for p, layer in lk.lora_layers(ours)}
    with torch.no_grad():
        want = _run(ours, x)
        if "grouped" in str(case.options["target_modules"]):
            with pytest.raises(RuntimeError, match=r"grouped Conv2d \(groups=2\) cannot be merged"):
                lk.merge(ours)
            assert not lk.is_merged(ours)
            _same(_run(ours, x), want, case, "after the refused merge")
            return
        lk.merge(ours)
        _same(_run(ours, x), want, case, "merged")
        for path, layer in lk.lora_layers(ours):
            if not isinstance(layer, DoraLayer):
                continue
            # the merged weight is m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖: its norms are the magnitudes
            W = layer.base_layer.weight
            norms = row_norms(*layer.norm_operands(layer.active_adapter), 0.0)
            m = layer.lora_magnitude[layer.active_adapter].detach().flatten().abs()  # a row norm is |m|
            assert_close(norms, m, reduction=W.numel() // norms.numel(), depth=4, msg=lambda s, p=path: f"{p}: {s}")
        lk.unmerge(ours)
        for path, layer in lk.lora_layers(ours):
            w = w0[path]
            assert_close(layer.weight, w, reduction=8, magnitude=float(w.abs().max()) * 4, depth=4)
        _same(_run(ours, x), want, case, "unmerged")
        lk.merge_and_unload(ours)
        _same(_run(ours, x), want, case, "merged and unloaded")
    assert set(ours.state_dict()) == set(before)
    assert not list(lk.lora_layers(ours))


