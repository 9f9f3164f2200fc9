"""Each LoRA layer type against its formula, in several dtypes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.layers import LoraConv2d, LoraEmbedding, LoraLinear

from .conftest import randomize_adapters
from .tolerance import assert_close


def _single(module: nn.Module, r: int = 3, alpha: float = 6.0, **kw) -> nn.Module:
    root = nn.Module()
    root.layer = module
    lk.inject(root, lk.LoraConfig(r=r, alpha=alpha, target_modules=["layer"], **kw))
    return root


def test_linear_matches_formula():
    torch.manual_seed(0)
    root = _single(nn.Linear(7, 5), r=3, alpha=6.0)
    randomize_adapters(root)
    layer = root.layer
    assert isinstance(layer, LoraLinear)
    x = torch.randn(4, 2, 7)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    want = F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + 2.0 * (x @ A.T @ B.T)
    assert_close(layer(x), want, reduction=7, depth=3)


def test_embedding_matches_formula_and_padding_idx():
    torch.manual_seed(0)
    root = _single(nn.Embedding(11, 6, padding_idx=2), r=2, alpha=4.0)
    randomize_adapters(root)
    layer = root.layer
    assert isinstance(layer, LoraEmbedding)
    ids = torch.tensor([[0, 2, 5], [10, 2, 1]])
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    want = layer.base_layer.weight[ids] + 2.0 * (A.T[ids] @ B.T)
    assert_close(layer(ids), want, reduction=2, depth=2)
    layer(ids).sum().backward()
    assert torch.all(A.grad[:, 2] == 0), "padding_idx row must get no gradient, as in the base embedding"


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv2d_matches_merged_weight(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation)
    root = _single(conv, r=2, alpha=2.0)
    randomize_adapters(root)
    layer = root.layer
    assert isinstance(layer, LoraConv2d)
    x = torch.randn(2, 3, 9, 9)
    w = layer.base_layer.weight + layer.delta_weight("default")
    want = F.conv2d(x, w, layer.base_layer.bias, stride, padding, dilation)
    assert_close(layer(x), want, reduction=3 * 3 * 3, depth=2)


def test_grouped_conv_rank_not_divisible_and_dora_are_clear_errors():
    root = nn.Module()
    root.dw = nn.Conv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="rank 6 is not divisible by the convolution's groups=4"):
        lk.inject(root, lk.LoraConfig(r=6, target_modules=["dw"]))
    assert isinstance(root.dw, nn.Conv2d), "a failed inject must leave the model untouched"
    with pytest.raises(TypeError, match=r"DoRA on a grouped convolution \(groups=4\)"):
        lk.inject(root, lk.LoraConfig(r=4, target_modules=["dw"], use_dora=True))
    assert isinstance(root.dw, nn.Conv2d) and not any(p.requires_grad is False for p in root.parameters())


def test_unsupported_type_names_the_type():
    root = nn.Module()
    root.norm = nn.LayerNorm(4)
    with pytest.raises(TypeError, match=r"'norm'.*LayerNorm"):
        lk.inject(root, lk.LoraConfig(target_modules=["norm"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters(dtype):
    torch.manual_seed(0)
    root = _single(nn.Linear(8, 4).to(dtype))
    randomize_adapters(root)
    layer = root.layer
    assert layer.lora_A["default"].dtype == torch.float32
    x = torch.randn(3, 8, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    want = layer.base_layer(x).float() + layer.scaling["default"] * (
        x.float() @ layer.lora_A["default"].T @ layer.lora_B["default"].T
    )
    assert_close(y.float(), want, reduction=8, depth=3, dtype=dtype)
    y.float().sum().backward()
    assert layer.lora_A["default"].grad.dtype == torch.float32
    assert layer.base_layer.weight.grad is None


def test_merge_half_precision_rounds_once():
    torch.manual_seed(0)
    root = _single(nn.Linear(64, 64).to(torch.bfloat16))
    randomize_adapters(root, scale=0.05)
    layer = root.layer
    w0 = layer.base_layer.weight.detach().clone()
    want = (w0.float() + layer.delta_weight("default").detach()).to(torch.bfloat16)
    lk.merge(root)
    assert torch.equal(layer.base_layer.weight, want)


def test_dropout_only_on_adapter_path_and_only_in_training():
    torch.manual_seed(0)
    root = _single(nn.Linear(16, 16), dropout=0.5)
    randomize_adapters(root)
    x = torch.randn(32, 16)
    root.eval()
    a, b = root.layer(x), root.layer(x)
    assert torch.equal(a, b)
    root.train()
    c = root.layer(x)
    assert not torch.allclose(a, c)
    with lk.disable_adapters(root):
        assert torch.equal(root.layer(x), root.layer.base_layer(x))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_dropout_drops_the_configured_fraction_of_adapter_inputs(p):
    """With A = B = I and x = 1 the adapter's output is dropout(x) itself: count its zeros."""
    n = 64
    root = _single(nn.Linear(n, n), r=n, alpha=n, dropout=p)
    layer = root.layer
    with torch.no_grad():
        layer.lora_A["default"].copy_(torch.eye(n))
        layer.lora_B["default"].copy_(torch.eye(n))
    torch.manual_seed(0)
    x = torch.ones(1024, n)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    q = lk.functional.quantize_dropout(p)  # the rate the fast mask draws (p to 1/2^16)
    samples = delta.numel()
    dropped = (delta.abs() < 0.5).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / samples) ** 0.5 + abs(q - p)
    kept = delta[delta.abs() >= 0.5]
    assert_close(kept, torch.full_like(kept, 1 / (1 - q)), reduction=n, depth=2)  # inverted scaling


def test_wrapper_forwards_attributes_of_the_base():
    root = _single(nn.Linear(7, 5))
    assert root.layer.in_features == 7 and root.layer.out_features == 5
    assert root.layer.weight is root.layer.base_layer.weight
    assert root.layer.bias is root.layer.base_layer.bias


def test_bf16_autocast_training_step():
    torch.manual_seed(0)
    root = _single(nn.Linear(16, 8))
    randomize_adapters(root)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = root.layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), root.layer(x), reduction=16, depth=3, dtype=torch.bfloat16)
    y.float().sum().backward()
    assert root.layer.lora_A["default"].grad is not None and root.layer.lora_A["default"].grad.dtype == torch.float32


def test_forward_hooks_on_the_base_layer_still_fire():
    root = _single(nn.Linear(6, 3))
    seen = []
    root.layer.base_layer.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    root.layer(torch.randn(2, 6))
    assert seen == [torch.Size([2, 3])]
