"""Odd models: each either works exactly (adapter forward, merge, unmerge, unload) or is refused
at inject with one error naming the module and the fix, the model left exactly as it was.

Refused: quantized or computed weights a merge cannot write into (bitsandbytes 8-bit,
parametrizations such as weight_norm, old-style weight_norm), subclasses with their own forward,
weights on the meta device. Working: a Linear without bias, a weight kept as a buffer, a weight shared
by two Linears, one module at two paths, ModuleList/ModuleDict/Sequential children, half-precision
bases, a dropout adapter on an eval-mode model, a transformers model whose output head is tied to
its input embedding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import randomize_adapters
from .models import _llama_config, token_batch
from .tolerance import assert_close


# ---------------------------------------------------------------------------------------- helpers
def snapshot(model: nn.Module) -> dict:
    """Everything a failed inject must leave as it was: module types at every path, the state
    dict (keys, and values bitwise), requires_grad and training flags, attributes lorakit keeps."""
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        state[key] = (value.shape, value.dtype, value.device.type, None if value.is_meta else value.detach().clone())
    return {
        "types": [(p, type(m)) for p, m in model.named_modules(remove_duplicate=False)],
        "ids": [(p, id(m)) for p, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "training": [(p, m.training) for p, m in model.named_modules(remove_duplicate=False)],
        "state": state,
        "configs": dict(lk.adapter_configs(model)),
        "active": lk.active_adapter(model),
        "save_pretrained": model.__dict__.get("save_pretrained"),
    }


def assert_unchanged(before: dict, model: nn.Module, rounding: float = 0.0) -> None:
    """``model`` matches ``before``; tensor values bitwise, or (``rounding`` > 0) to within that
    many units of their last place (for weights unmerged and merged again)."""
    after = snapshot(model)
    for key in ("types", "ids", "params", "training", "configs", "active", "save_pretrained"):
        assert after[key] == before[key], f"{key} changed"
    assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
    for key, (shape, dtype, device, value) in before["state"].items():
        now = after["state"][key]
        assert (now[0], now[1], now[2]) == (shape, dtype, device), key
        if value is not None and rounding == 0.0:
            assert torch.equal(now[3], value), f"{key} changed"
        elif value is not None:
            ulp = torch.finfo(value.dtype).eps * value.abs().clamp_min(torch.finfo(value.dtype).tiny)
            assert ((now[3] - value).abs() <= rounding * ulp).all(), f"{key} changed beyond rounding"


def single(module: nn.Module, name: str = "fc") -> nn.Module:
    root = nn.Module()
    root.add_module(name, module)
    return root


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not x Wᵀ + b: merging ΔW into W would not match."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class NormedEmbedding(nn.Embedding):
    """An embedding that normalizes its rows (as bitsandbytes' StableEmbedding does)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(super().forward(ids), dim=-1)


def _weight_as_buffer() -> nn.Module:
    linear = nn.Linear(8, 4)
    weight = linear.weight.detach().clone()
    del linear.weight
    linear.register_buffer("weight", weight)
    return single(linear)


def _old_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return single(nn.utils.weight_norm(nn.Linear(8, 4)))


def _linear8bit() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    return single(bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False).to("cpu"))


def _one_8bit_among_dense() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    root = nn.Module()
    root.dense = nn.Linear(16, 16)
    root.int8 = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False).to("cpu")
    return root


REFUSED = {
    # case: (model factory, target_modules, error type, message regex)
    "weight_norm_parametrization": (
        lambda: single(nn.utils.parametrizations.weight_norm(nn.Linear(8, 4))), ["fc"], lk.UnsupportedModuleError,
        r"module 'fc' \(.*ParametrizedLinear\) cannot take a LoRA adapter: its weight is computed by a "
        r"parametrization .*remove_parametrizations\(module, 'weight'\)",
    ),
    "weight_norm_old_style": (
        _old_weight_norm, ["fc"], lk.UnsupportedModuleError,
        r"module 'fc' .*not a parameter \(or buffer\) registered on the module.*torch.nn.utils.remove_weight_norm",
    ),
    "bitsandbytes_8bit": (
        _linear8bit, ["fc"], lk.UnsupportedModuleError,
        r"module 'fc' \(bitsandbytes.nn.modules.Linear8bitLt\) cannot take a LoRA adapter: its weight is a "
        r"bitsandbytes.nn.modules.Int8Params of dtype torch.int8.*lorakit.quantize\(model, bits=4\).*dense base",
    ),
    "all_linear_with_one_8bit_layer": (
        _one_8bit_among_dense, "all-linear", lk.UnsupportedModuleError, r"^module 'int8' \(.*Linear8bitLt\)",
    ),
    "meta_device": (
        lambda: single(nn.Linear(8, 4, device="meta")), ["fc"], lk.UnsupportedModuleError,
        r"module 'fc' .*meta device.*load the model's weights first",
    ),
    "linear_subclass_with_own_forward": (
        lambda: single(ScaledLinear(8, 4)), ["fc"], lk.UnsupportedModuleError,
        r"module 'fc' \(.*ScaledLinear\) .*subclasses torch.nn.modules.linear.Linear with its own forward.*"
        r"register_kind",
    ),
    "embedding_subclass_with_own_forward": (
        lambda: single(NormedEmbedding(10, 4), "emb"), ["emb"], lk.UnsupportedModuleError,
        r"module 'emb' \(.*NormedEmbedding\) .*own forward",
    ),
    "buffers_only": (
        lambda: _buffers_only(), "all-linear", ValueError, r"target_modules: 1 name\(s\) matched no module",
    ),
}  # fmt: skip


def _buffers_only() -> nn.Module:
    root = nn.Module()
    root.register_buffer("table", torch.arange(6.0))
    root.inner = nn.Module()
    root.inner.register_buffer("scale", torch.ones(2))
    return root


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_at_inject_with_one_clear_error_and_the_model_untouched(case):
    build, targets, error, pattern = REFUSED[case]
    torch.manual_seed(0)
    model = build()
    before = snapshot(model)
    with pytest.raises(error, match=pattern) as caught:
        lk.inject(model, lk.LoraConfig(r=2, target_modules=targets))
    assert isinstance(caught.value, ValueError), "bad input is a ValueError (lorakit.InputError)"
    assert_unchanged(before, model)


# ---------------------------------------------------------------------------------------- working cases
def merge_cycle(model: nn.Module, run, reduction: int) -> None:
    """Adapted output == merged output == unloaded output (to float tolerance), and unmerge
    restores every base weight (bitwise for float32/64 up to one rounding of W0 + ΔW)."""
    randomize_adapters(model, scale=0.3)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    deltas = [layer.delta_weight(layer.active_adapter).detach() for _, layer in lk.lora_layers(model)]
    delta = max(float(d.abs().max()) for d in deltas)
    with torch.no_grad():
        adapted = run(model)
        with lk.disable_adapters(model):
            base = run(model)
        assert not torch.allclose(adapted.float(), base.float()), "the adapter must change the output"
        lk.merge(model)
        merged = run(model)
        lk.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                # W0 + ΔW and then − ΔW, each rounded once to the weight's dtype (unit roundoff eps/2)
                bound = torch.finfo(p.dtype).eps * (weights[n].abs() + delta)
                assert ((p - weights[n]).abs() <= bound).all(), f"unmerge did not restore {n}"
        dtype = adapted.dtype
        assert_close(merged, adapted, reduction=reduction, depth=3, dtype=dtype)
        plain = lk.merge_and_unload(model)
        assert not any(isinstance(m, (lk.LoraLayer, lk.ModulesToSave)) for m in plain.modules())
        assert_close(run(plain), adapted, reduction=reduction, depth=3, dtype=dtype)


def test_linear_without_bias():
    torch.manual_seed(0)
    model = single(nn.Linear(8, 4, bias=False))
    keys = list(model.state_dict())
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc"], bias="lora_only"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.lora_A.default", "fc.lora_B.default"}
    x = torch.randn(5, 8)
    merge_cycle(model, lambda m: m.fc(x), reduction=8)
    assert list(model.state_dict()) == keys


def test_a_weight_kept_as_a_buffer():
    torch.manual_seed(0)
    model = _weight_as_buffer()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc"]))
    x = torch.randn(5, 8)
    merge_cycle(model, lambda m: m.fc(x), reduction=8)
    assert "weight" in dict(model.fc.named_buffers())


class TwoUses(nn.Module):
    """``a`` and ``b`` both run; built with either a shared weight or one shared module."""

    def __init__(self, share: str) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        if share == "module":
            self.b = self.a
        else:
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=-1)


def test_a_weight_shared_by_two_linears_is_untied_by_merge_and_tied_again_by_unmerge():
    torch.manual_seed(0)
    model = TwoUses("weight")
    shared = model.a.weight
    with pytest.warns(UserWarning, match=r"a\.weight is also b\.weight \(tied weights\).*own copy"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["a"]))
    randomize_adapters(model, scale=0.3)
    x = torch.randn(3, 6)
    with torch.no_grad():
        b_before = model.b(x)
        adapted = model(x)
        lk.merge(model)
        assert model.a.base_layer.weight is not shared and model.b.weight is shared
        assert torch.equal(model.b(x), b_before), "merging into a must not change b"
        assert_close(model(x), adapted, reduction=6, depth=3)
        lk.unmerge(model)
        assert model.a.base_layer.weight is shared, "unmerge ties the weights again (exactly)"
        assert torch.equal(model(x), adapted)
    merge_cycle(model, lambda m: m(x), reduction=6)
    assert model.b.weight is shared and model.a.weight is not shared


def test_one_module_at_two_paths_is_adapted_at_both():
    torch.manual_seed(0)
    model = TwoUses("module")
    linear = model.a
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["a"]))
    assert isinstance(model.a, lk.LoraLinear) and model.b is model.a, "the shared module is wrapped at both paths"
    x = torch.randn(3, 6)
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out[:, :6], out[:, 6:])
    merge_cycle(model, lambda m: m(x), reduction=6)
    assert model.a is linear and model.b is linear


def test_delete_of_the_last_adapter_unwraps_a_shared_module_everywhere():
    model = TwoUses("module")
    linear = model.a
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["a"]))
    lk.delete_adapter(model, "default")
    assert model.a is linear and model.b is linear


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.heads = nn.ModuleDict({"cls": nn.Linear(6, 3), "aux": nn.Linear(6, 2)})
        self.seq = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.seq(self.blocks[1](torch.tanh(self.blocks[0](x))))
        return torch.cat([self.heads["cls"](h), self.heads["aux"](h)], dim=-1)


def test_children_of_module_list_dict_and_sequential():
    torch.manual_seed(0)
    model = Containers()
    keys = list(model.state_dict())
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["blocks.1", "heads.cls", "seq.2"]))
    assert [p for p, _ in lk.lora_layers(model)] == ["blocks.1", "heads.cls", "seq.2"]
    assert isinstance(model.blocks[1], lk.LoraLinear) and isinstance(model.heads["cls"], lk.LoraLinear)
    assert isinstance(model.seq[2], lk.LoraLinear) and type(model.blocks[0]) is nn.Linear
    x = torch.randn(4, 6)
    merge_cycle(model, lambda m: m(x), reduction=6)
    assert list(model.state_dict()) == keys and type(model.heads["cls"]) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_base_in_another_dtype(dtype):
    torch.manual_seed(0)
    model = single(nn.Linear(16, 8).to(dtype))
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["fc"]))
    factor = model.fc.lora_A["default"].dtype
    assert factor == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(5, 16, dtype=dtype)
    assert model.fc(x).dtype == dtype
    merge_cycle(model, lambda m: m.fc(x), reduction=16)
    assert model.fc.weight.dtype == dtype


@pytest.mark.parametrize("kind", ["conv2d", "linear_4bit"])
def test_a_dropout_adapter_added_to_an_eval_model_does_not_drop(kind):
    """The dropout module is created in the layer's own mode (it used to start in train mode,
    so an eval-mode model dropped inputs of layers that take the unfused path)."""
    torch.manual_seed(0)
    if kind == "conv2d":
        model, x = single(nn.Conv2d(2, 4, 3, padding=1)).eval(), torch.randn(2, 2, 6, 6)
    else:
        pytest.importorskip("bitsandbytes")
        model, x = lk.quantize(single(nn.Linear(64, 32))).eval(), torch.randn(3, 64)
    lk.inject(model, lk.LoraConfig(r=2, dropout=0.5, target_modules=["fc"]))
    randomize_adapters(model, scale=0.3)
    assert not model.fc.lora_dropout["default"].training
    with torch.no_grad():
        first, second = model.fc(x), model.fc(x)
        layer = model.fc
        want = layer.base_layer(x) + layer.adapter_delta(x, "default")
    assert torch.equal(first, second)
    assert_close(first, want, reduction=64, depth=2)
    model.train()
    assert model.fc.lora_dropout["default"].training


@pytest.mark.parametrize(("target", "other"), [("lm_head", "model.embed_tokens"), ("embed_tokens", "lm_head")])
def test_tied_embeddings_merge_into_one_side_only(target, other, tmp_path):
    """tie_word_embeddings=True: lm_head and embed_tokens hold one tensor. Merging used to add ΔW
    to both; now the merged module gets its own copy, unmerge ties them again (bitwise), and
    merge_and_unload leaves a model that saves and loads as it computes."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config(tie_word_embeddings=True)).eval()
    shared, w0 = model.lm_head.weight, model.lm_head.weight.detach().clone()
    assert shared is model.model.embed_tokens.weight
    path = "lm_head" if target == "lm_head" else "model.embed_tokens"
    with pytest.warns(UserWarning, match=rf"^{path}\.weight is also {other}\.weight \(tied weights\)"):
        lk.inject(model, lk.LoraConfig(r=4, target_modules=[target]))
    randomize_adapters(model, scale=0.3)
    ids = token_batch()
    # 2 decoder layers of 6 chained reductions (q/k/v, scores, values, o; gate/up, down) plus the head
    close = {"reduction": 48, "depth": 13}
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        lk.merge(model)
        assert model.get_submodule(other).weight is shared and torch.equal(shared, w0), "the other side keeps W0"
        assert_close(model(input_ids=ids).logits, adapted, **close)
        lk.unmerge(model)
        assert model.get_submodule(path).base_layer.weight is shared, "unmerge ties the two again"
        assert torch.equal(shared, w0) and torch.equal(model(input_ids=ids).logits, adapted)
        plain = lk.merge_and_unload(model)
        assert plain.get_submodule(other).weight is shared and torch.equal(shared, w0)
        assert plain.get_submodule(path).weight is not shared
        assert_close(plain(input_ids=ids).logits, adapted, **close)
        assert plain.config.tie_word_embeddings is False, "saving must keep both weights"
        plain.save_pretrained(tmp_path)
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_subclass_refused_for_its_own_forward_can_be_registered_by_its_owner():
    """The fix the error names: a wrapper class that vouches for the subclass."""

    class TrustedLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # same maths, e.g. logging around it
            return super().forward(x)

    class LoraTrusted(lk.LoraLinear):
        @classmethod
        def base_problem(cls, module: nn.Module) -> str | None:
            return None

    torch.manual_seed(0)
    with pytest.raises(lk.UnsupportedModuleError, match="own forward"):
        lk.inject(single(TrustedLinear(8, 4)), lk.LoraConfig(r=2, target_modules=["fc"]))
    lk.register_kind(LoraTrusted, lambda m: isinstance(m, TrustedLinear))
    try:
        model = lk.inject(single(TrustedLinear(8, 4)), lk.LoraConfig(r=2, target_modules=["fc"]))
        assert type(model.fc) is LoraTrusted
        x = torch.randn(5, 8)
        merge_cycle(model, lambda m: m.fc(x), reduction=8)
    finally:
        lk.layers.unregister_kind(LoraTrusted)
