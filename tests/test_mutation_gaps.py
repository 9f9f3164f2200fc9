"""Tests that close gaps the mutation check (scripts/mutation_check.py) found: plausible bugs that
the rest of the suite let through. Each test names the mutant it kills."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit import planner

from .conftest import randomize_adapters
from .models import tiny_llama
from .tolerance import assert_close


def test_conv2d_merge_equals_forward_when_the_scale_is_not_one():
    """conv-delta-unscaled: the other conv tests use s = alpha / r = 1, where ΔW without its scale
    is still right. Here s = 3: the adapter's forward, the merged weight and the merged layer agree."""
    torch.manual_seed(0)
    root = nn.Module()
    root.conv = nn.Conv2d(3, 5, 3, padding=1)
    lk.inject(root, lk.LoraConfig(r=2, alpha=6.0, target_modules=["conv"]))
    randomize_adapters(root, scale=0.3)
    layer = root.conv
    assert layer.scaling["default"] == 3.0
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = layer(x)
        B, A = layer.lora_B["default"][:, :, 0, 0], layer.lora_A["default"]
        by_hand = 3.0 * torch.einsum("or,rihw->oihw", B, A)  # ΔW = s · Σ_k B[o, k] A[k, i, h, w]
        assert_close(layer.delta_weight("default"), by_hand, reduction=2)
        want = F.conv2d(x, layer.base_layer.weight + by_hand, layer.base_layer.bias, padding=1)
        assert_close(adapted, want, reduction=3 * 3 * 3, depth=2)
        lk.merge(root)
        assert_close(root.conv(x), adapted, reduction=3 * 3 * 3, depth=2)


def test_planner_adapter_bytes_match_a_real_lora_training_step():
    """planner-adapter-no-gradient: the LoRA estimate's adapter bytes (fp32 weight, gradient and two
    AdamW moments per adapter parameter) equal the tensors that exist after one training step."""
    model = tiny_llama().train()
    targets = ["q_proj", "v_proj"]
    est = lk.estimate_memory(config=model.config.to_dict(), method="lora", r=4, targets=targets)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable)
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in trainable)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert est.trainable == sum(p.numel() for p in trainable)
    assert est.adapter == weights + grads + moments


@pytest.mark.parametrize(("double_quant", "kind"), [(True, "nf4-dq"), (False, "nf4")])
def test_planner_nf4_dq_bytes_equal_what_quantize_stores(double_quant, kind):
    """planner-nf4-dq-bytes: the planner's bytes per NF4 weight equal what lorakit.quantize stores
    per weight (codes, absmax and, with double quantization, the second-level absmax; the fixed
    256-entry code table and offset are not per weight). 1024² weights: whole blocks at both levels."""
    pytest.importorskip("bitsandbytes")
    root = nn.Module()
    root.proj = nn.Linear(1024, 1024, bias=False)
    lk.quantize(root, double_quant=double_quant)
    layer = root.proj
    stored = layer.weight.numel() * layer.weight.element_size() + layer.absmax.numel() * layer.absmax.element_size()
    if double_quant:
        stored += layer.absmax2.numel() * layer.absmax2.element_size()
    assert stored / (1024 * 1024) == pytest.approx(planner.BYTES[kind], rel=1e-12)
