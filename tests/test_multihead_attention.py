"""LoRA on ``nn.MultiheadAttention``: the attention computed with both adapted weights written out by
hand, PEFT's keys and shapes both ways, PEFT 0.21's doubled out_proj delta pinned down, merging,
several adapters, training, and the refusals (out_proj alone, separate q/k/v sizes, DoRA, lora_bias).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraMultiheadAttention

from .conftest import train_like
from .tolerance import assert_close


class Attender(nn.Module):
    def __init__(self, batch_first: bool = True, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.attn(x, x, x, key_padding_mask=mask, need_weights=False)
        return self.head(out.mean(1 if self.attn.batch_first else 0))


def _model(**kw) -> Attender:
    torch.manual_seed(0)
    return Attender(**kw).eval()


def _inputs(batch_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True  # a padded row: key_padding_mask passes through to the attention
    return (x if batch_first else x.transpose(0, 1)), mask


def _by_hand(model: Attender, name: str = "default", out_factor: float = 1.0) -> Attender:
    """A plain copy whose weights hold W + s·B·A (the out_proj term times ``out_factor``)."""
    layer = model.attn
    assert isinstance(layer, LoraMultiheadAttention)
    plain = copy.deepcopy(model)
    lk.merge_and_unload(plain)  # only to get the plain structure back; its weights are overwritten below
    s = layer.scaling[name]
    with torch.no_grad():
        w_in = layer.base_layer.in_proj_weight + s * layer.lora_B[name] @ layer.lora_A[name]
        w_out = layer.base_layer.out_proj.weight + out_factor * s * layer.lora_out_B[name] @ layer.lora_out_A[name]
        plain.attn.in_proj_weight.copy_(w_in)
        plain.attn.out_proj.weight.copy_(w_out)
    return plain


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_attention_runs_with_both_adapted_weights(batch_first):
    model = _model(batch_first=batch_first)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4.0, target_modules=["attn"]))
    assert isinstance(model.attn, LoraMultiheadAttention)
    x, mask = _inputs(batch_first)
    with torch.no_grad():
        # (the reference frozen too: nn.MultiheadAttention picks its kernel path by requires_grad)
        reference = _model(batch_first=batch_first).requires_grad_(False)
        assert torch.equal(model(x, mask), reference(x, mask)), "fresh adapter == base"
        train_like(model, seed=2)
        want = _by_hand(model)(x, mask)
        assert_close(model(x, mask), want, reduction=8, depth=8)
        model.train()  # the slow path (the fast path only runs in eval without grad)
        assert_close(model(x, mask), want, reduction=8, depth=8)


def test_keys_shapes_counts_and_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = _model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"]))
    train_like(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="PEFT 0.21 adds its out_proj ΔW twice"):
        lk.load_adapter(ours, tmp_path / "peft")
    assert lk.count_parameters(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    x, mask = _inputs()
    with torch.no_grad():
        theirs.eval()
        # PEFT 0.21 applies the out_proj term twice (huggingface/peft#3774): its output is the doubled one
        doubled = 2.0 if peft.__version__.startswith("0.21") else 1.0
        assert_close(theirs(x, mask), _by_hand(ours, out_factor=doubled)(x, mask), reduction=8, depth=8)
        with pytest.warns(UserWarning, match="PEFT 0.21"):
            lk.save_adapter(ours, tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert torch.equal(back(x, mask), theirs(x, mask)), "the file round-trips exactly"
        # the in_proj part alone (out_proj factors at zero) is the same in both
        for model in (ours.attn, back.base_model.model.attn.base_layer.out_proj):
            (model.lora_out_B["default"] if model is ours.attn else model.lora_B["default"].weight).zero_()
        assert_close(back(x, mask), ours(x, mask), reduction=8, depth=8)


def test_merge_unmerge_unload_and_several_adapters():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = lk.LoraConfig(r=2, alpha=2.0, target_modules=["attn", "head"])
    lk.inject(model, config)
    lk.add_adapter(model, config, "other")
    train_like(model, seed=4)
    x, mask = _inputs()
    with torch.no_grad():
        lk.set_adapter(model, ["default", "other"])
        both = model(x, mask)
        lk.merge(model)
        assert_close(model(x, mask), both, reduction=8, depth=8)
        lk.unmerge(model)
        for key, value in model.state_dict().items():
            if key.replace("base_layer.", "") in before and "lora" not in key:
                assert_close(value, before[key.replace("base_layer.", "")], reduction=8, depth=4)
        lk.set_adapter(model, "default")
        one = model(x, mask)
        assert not torch.allclose(one, both)
        lk.merge_and_unload(model)
        assert type(model.attn) is nn.MultiheadAttention and set(model.state_dict()) == set(before)
        assert_close(model(x, mask), one, reduction=8, depth=8)


def test_training_reaches_both_projections():
    model = _model()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["attn"]))
    model.train()
    x, mask = _inputs()
    model(x, mask).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == {f"attn.lora_{f}.default" for f in ("A", "B", "out_A", "out_B")}
    assert all(float(grads[f"attn.lora_{f}.default"].abs().max()) > 0 for f in ("B", "out_B"))


def test_refusals_and_the_dropout_warning():
    model = _model()
    with pytest.raises(lk.UnsupportedModuleError, match="never run; target the attention module 'attn'"):
        lk.inject(model, lk.LoraConfig(target_modules=["attn.out_proj"]))
    assert lk.find_targets(model, lk.LoraConfig(target_modules="all-linear")) == ["head"]  # not attn.out_proj
    with pytest.raises(lk.UnsupportedModuleError, match="query, key and value sizes differ"):
        lk.inject(_model(kdim=4), lk.LoraConfig(target_modules=["attn"]))
    with pytest.raises(lk.UnsupportedModuleError, match="MultiheadAttention"):
        lk.inject(_model(), lk.LoraConfig(target_modules=["attn"], use_dora=True))
    plain = _model()
    with pytest.raises(ValueError, match="lora_bias is not supported on nn.MultiheadAttention"):
        lk.inject(plain, lk.LoraConfig(target_modules=["attn"], lora_bias=True))
    assert type(plain.attn) is nn.MultiheadAttention and not lk.adapter_configs(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.inject(_model(), lk.LoraConfig(target_modules=["attn"], dropout=0.1))
    assert any("does not apply to nn.MultiheadAttention" in str(w.message) for w in caught)


@pytest.mark.parametrize("stack", [False, True], ids=["layer", "encoder"])
def test_torch_fused_encoder_path_does_not_skip_the_adapters(stack):
    """In eval, nn.TransformerEncoderLayer may hand its submodules' weights to one fused kernel (and
    nn.TransformerEncoder pack a padded batch as a nested tensor): with adapters it must not."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = (nn.TransformerEncoder(layer, 2, enable_nested_tensor=True) if stack else layer).eval()
    base = copy.deepcopy(model).requires_grad_(False)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["self_attn", "linear1"]))
    train_like(model, seed=5)
    x, mask = _inputs()
    with torch.no_grad():
        evaluated = model(x, src_key_padding_mask=mask)
        model.train()
        trained = model(x, src_key_padding_mask=mask)
        model.eval()
        assert_close(evaluated, trained, reduction=16, depth=8)
        assert not torch.allclose(evaluated, base(x, src_key_padding_mask=mask))
    lk.delete_adapter(model, "default")  # the fused path is allowed again, as before
    layers = model.layers if stack else [model]
    assert all(not lay._forward_pre_hooks for lay in layers)
    assert not stack or model.use_nested_tensor == base.use_nested_tensor


def test_loraplus_puts_both_b_factors_in_the_fast_group():
    model = _model()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["attn"]))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in lk.loraplus_groups(model, lr=1e-3, ratio=8)}
    layer = model.attn
    assert {id(layer.lora_B["default"]), id(layer.lora_out_B["default"])} <= groups["loraplus_B"]
    assert {id(layer.lora_A["default"]), id(layer.lora_out_A["default"])} <= groups["loraplus_A"]


def test_a_layer_injected_alone_refuses_the_nested_input_of_its_encoder():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).eval()
    lk.inject(encoder.layers[0], lk.LoraConfig(r=2, target_modules=["linear1"]))
    x, mask = _inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="set that encoder's use_nested_tensor = False"):
        encoder(x, src_key_padding_mask=mask)
    encoder.use_nested_tensor = False
    with torch.no_grad():
        encoder(x, src_key_padding_mask=mask)
