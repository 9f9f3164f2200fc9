"""Checkpoints travel both ways between lorakit and Hugging Face PEFT 0.21, with equal outputs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import SeedMLP
from .models import logits, tiny_gpt2, tiny_llama, tiny_llama_classifier, token_batch
from .tolerance import assert_close

peft = pytest.importorskip("peft")


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    options: dict  # LoraConfig fields (lorakit spelling)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return SeedMLP().eval()


CASES = [
    Case(
        "mlp",
        _mlp,
        lambda: torch.randn(4, 784, generator=torch.Generator().manual_seed(0)),
        {"r": 4, "alpha": 4.0, "target_modules": ["fc1", "fc2", "fc3"]},
    ),
    Case(
        "mlp-rslora-patterns-save",
        _mlp,
        lambda: torch.randn(4, 784, generator=torch.Generator().manual_seed(0)),
        {
            "r": 4,
            "alpha": 8.0,
            "target_modules": ["fc1", "fc2"],
            "use_rslora": True,
            "rank_pattern": {"fc2": 2},
            "alpha_pattern": {"fc1": 3.0},
            "modules_to_save": ["fc3"],
        },
    ),
    Case(
        "gpt2-conv1d",
        tiny_gpt2,
        token_batch,
        {"r": 4, "alpha": 8.0, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    ),
    Case(
        "gpt2-bias",
        tiny_gpt2,
        token_batch,
        {"r": 2, "alpha": 2.0, "target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "lora_only"},
    ),
    Case("llama-qv", tiny_llama, token_batch, {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]}),
    Case(
        "llama-all-linear-rank-pattern",
        tiny_llama,
        token_batch,
        {"r": 4, "alpha": 8.0, "target_modules": "all-linear", "rank_pattern": {"mlp.down_proj": 6}},
    ),
    Case(
        "llama-embedding",
        tiny_llama,
        token_batch,
        {"r": 4, "alpha": 4.0, "target_modules": ["embed_tokens", "q_proj"]},
    ),
    Case(
        "llama-layers-to-transform",
        tiny_llama,
        token_batch,
        {
            "r": 4,
            "alpha": 4.0,
            "target_modules": ["q_proj", "o_proj"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
        },
    ),
    Case(
        "llama-classifier-modules-to-save",
        tiny_llama_classifier,
        token_batch,
        {
            "r": 4,
            "alpha": 4.0,
            "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": ["score"],
            "use_rslora": True,
        },
    ),
]

PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return logits(model, x) if x.dtype == torch.long else model(x).detach()


def _same(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> None:
    """Equal up to summation order: the MLP cases reduce over 784 inputs in 3 layers; the tiny
    transformers over at most 4·hidden = 128 in 2 blocks of attention, MLP and a head."""
    assert_close(got, want, reduction=128 if x.dtype == torch.long else 784, depth=10)


def _randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or (p.requires_grad and name.endswith("bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lorakit_to_peft(case: Case, tmp_path):
    base = case.build()
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(**case.options))
    _randomize(ours)
    x = case.inputs()
    want = _run(ours, x)
    assert not torch.allclose(want, _run(base, x)), "the adapter must change the output for the test to mean much"
    lk.save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _same(_run(theirs, x), want, x)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_to_lorakit(case: Case, tmp_path):
    base = case.build()
    options = {PEFT_NAMES.get(k, k): v for k, v in case.options.items()}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options)).eval()
    _randomize(theirs)
    x = case.inputs()
    want = _run(theirs, x)
    theirs.save_pretrained(tmp_path)

    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path)
    ours.eval()
    _same(_run(ours, x), want, x)
    # same set of adapted modules, and the same trainable parameter count
    peft_paths = {
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert {p for p, _ in lk.lora_layers(ours)} == peft_paths
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert lk.count_parameters(ours).trainable == peft_trainable


def test_peft_named_adapter_subfolder(tmp_path):
    """PEFT writes a non-default adapter to <dir>/<name>/; that folder loads directly."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"]), adapter_name="x")
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ids = token_batch()
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path / "x", name="x")
    _same(logits(ours, ids), logits(theirs, ids), ids)
