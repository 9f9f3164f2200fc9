"""LoRA on bare parameters (``target_parameters``): the maths written out by hand, the nesting and
reuse of wrappers, several active adapters against PEFT, training, and every refusal.

The parity grid (``test_parity_grid.py``) runs the PEFT comparisons both ways on a Mixtral's
expert stacks, on ``[E, in, out]`` experts and on plain 2-D weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.files import AdapterLoadError
from lorakit.layers import LoraLinear, LoraParameter
from lorakit.offline import inspect_adapter

from .conftest import SeedMLP, train_like
from .models import ExpertNet, expert_net, tiny_mixtral, token_batch
from .tolerance import assert_close

MOE = ["experts.gate_up_proj", "experts.down_proj"]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _by_hand(layer: LoraParameter, name: str) -> torch.Tensor:
    """``ΔW`` from PEFT's stored layout, one expert and one rank component at a time."""
    A, B, s = layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.scaling[name]
    W = layer.weight
    if W.dim() == 2:
        return s * sum(torch.outer(B[:, k], A[k]) for k in range(A.shape[0]))
    experts = W.shape[0]
    r = A.shape[0] // experts
    delta = torch.zeros(W.shape, dtype=torch.float64)
    for e in range(experts):
        for k in range(r):
            outer = torch.outer(B[:, k * experts + e].double(), A[e * r + k].double())  # [out, in]
            delta[e] += s * (outer.T if getattr(layer.owner(), "is_transposed", False) else outer)
    return delta


@pytest.mark.parametrize("build", [tiny_mixtral, expert_net], ids=["mixtral", "transposed"])
def test_the_module_computes_with_w_plus_delta_written_out_by_hand(build):
    model = build()
    names = MOE if isinstance(model, nn.Module) and build is tiny_mixtral else ["gate", "up"]
    lk.inject(model, lk.LoraConfig(r=2, alpha=3.0, target_modules=[], target_parameters=names))
    train_like(model, seed=1)
    x = (token_batch(vocab=101),) if build is tiny_mixtral else (torch.randn(5, 8),)
    with torch.no_grad():
        want = model(*x)
        want = want.logits if hasattr(want, "logits") else want
        plain = copy.deepcopy(model)
        layers = dict(lk.lora_layers(plain))
        for layer in layers.values():
            assert isinstance(layer, LoraParameter)
            layer.weight.add_(_by_hand(layer, "default").float())
        with lk.disable_adapters(plain):
            got = plain(*x)
            got = got.logits if hasattr(got, "logits") else got
    assert len(layers) == (4 if build is tiny_mixtral else 2)
    assert_close(got, want, reduction=48, depth=8)
    assert not torch.allclose(want, (build()(*x).logits if build is tiny_mixtral else build()(*x)))


def test_a_2d_parameter_target_equals_lora_on_the_linear_layer():
    """``fc1.weight`` as a parameter target is plain LoRA on fc1: same factors, same output."""
    torch.manual_seed(0)
    base = SeedMLP((8, 6, 3))
    on_param, on_module = copy.deepcopy(base), copy.deepcopy(base)
    lk.inject(on_param, lk.LoraConfig(r=2, alpha=4.0, target_modules=[], target_parameters=["fc1.weight"]))
    lk.inject(on_module, lk.LoraConfig(r=2, alpha=4.0, target_modules=["fc1"]))
    train_like(on_param, seed=2)
    assert isinstance(on_param.fc1, LoraParameter) and isinstance(on_module.fc1, LoraLinear)
    with torch.no_grad():
        on_module.fc1.lora_A["default"].copy_(on_param.fc1.lora_A["default"])
        on_module.fc1.lora_B["default"].copy_(on_param.fc1.lora_B["default"])
    x = torch.randn(4, 8)
    assert_close(on_param(x), on_module(x), reduction=8, depth=4)


def test_wrappers_nest_in_registration_order_and_a_second_adapter_reuses_them():
    model = tiny_mixtral()
    config = lk.LoraConfig(r=2, target_modules=[], target_parameters=list(reversed(MOE)))
    lk.inject(model, config)
    lk.add_adapter(model, config, "second")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoraParameter) and experts.param_name == "down_proj"
    assert isinstance(experts.base_layer, LoraParameter) and experts.base_layer.param_name == "gate_up_proj"
    assert type(experts.base_layer.base_layer).__name__ == "MixtralExperts"
    assert sorted(experts.lora_A) == sorted(experts.base_layer.lora_A) == ["default", "second"]
    paths = [p for p, _ in lk.lora_layers(model)]
    assert "model.layers.0.mlp.experts.base_layer" in paths and len(paths) == 4


def test_several_active_adapters_sum_as_in_peft():
    peft = pytest.importorskip("peft")
    base = expert_net()
    options = {"r": 2, "target_modules": [], "target_parameters": ["gate", "up"]}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(lora_alpha=4, **options))
    theirs.add_adapter("other", peft.LoraConfig(lora_alpha=3, init_lora_weights=False, **options))
    train_like(theirs, seed=3)
    theirs.base_model.set_adapter(["default", "other"])
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(alpha=4.0, **options))
    lk.add_adapter(ours, lk.LoraConfig(alpha=3.0, **options), "other")
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if ".lora_" in key:
                ours.get_parameter(key.removeprefix("base_model.model.").removesuffix(".weight")).copy_(p)
    lk.set_adapter(ours, ["default", "other"])
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = theirs(x)
        assert_close(ours(x), want, reduction=12, depth=8)
        lk.set_adapter(ours, "other")
        assert not torch.allclose(ours(x), want)


def test_training_moves_only_the_adapters_and_delete_restores_the_model():
    model = expert_net()
    before = _state(model)
    lk.inject(model, lk.LoraConfig(r=2, alpha=2.0, target_modules=["proj"], target_parameters=["gate", "up"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{f}.default" for m in ("proj", "experts", "experts.base_layer") for f in "AB"}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9
    assert all(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    lk.delete_adapter(model, "default")
    assert isinstance(model, ExpertNet) and type(model.experts).__name__ == "TransposedExperts"
    assert {k: torch.equal(v, before[k]) for k, v in model.state_dict().items()} == dict.fromkeys(before, True)


def _trained_experts(seed: int) -> nn.Module:
    model = expert_net()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=[], target_parameters=["gate", "up"]))
    train_like(model, seed=seed)
    return model


def test_merge_and_unload_gives_the_plain_module_back_with_the_merged_weights():
    model = _trained_experts(seed=4)
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
        lk.merge_and_unload(model)
        assert type(model.experts).__name__ == "TransposedExperts"
        assert_close(model(x), want, reduction=12, depth=8)


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dropout": 0.1}, "needs dropout=0"),
        ({"use_dora": True}, "use_dora=True"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"init": "pissa"}, "init='pissa'"),
        ({"target_parameters": "gate"}, "must be a list of parameter names"),
        ({"target_parameters": ["gate", ""]}, "must be a list of parameter names"),
    ],
)
def test_config_refuses_what_a_parameter_adapter_cannot_do(options, message):
    with pytest.raises(ValueError, match=message):
        lk.LoraConfig(**{"target_parameters": ["gate"], **options})


@pytest.mark.parametrize(
    ("build", "options", "message"),
    [
        (expert_net, {"target_parameters": ["gaet"]}, r"'gaet': nearest parameters: experts\.gate"),
        (expert_net, {"target_parameters": ["gate", "nothing_here"]}, "'nothing_here'"),
        (expert_net, {"target_parameters": ["proj.bias"]}, r"has shape \(6,\); only 2-D and 3-D"),
        (expert_net, {"target_modules": ["proj"], "target_parameters": ["proj.weight"]}, "also be targeted"),
        (lambda: nn.Sequential(nn.Linear(2, 2)).requires_grad_(False), {"target_parameters": ["0.weight"]}, None),
    ],
    ids=["typo", "one-of-two", "1-d", "also-a-module-target", "fine"],
)
def test_inject_refuses_bad_parameter_targets_and_changes_nothing(build, options, message):
    model = build()
    before = _state(model)
    config = lk.LoraConfig(**{"target_modules": [], **options})
    if message is None:
        lk.inject(model, config)
        assert isinstance(model[0], LoraParameter)
        return
    with pytest.raises(ValueError, match=message):
        lk.inject(model, config)
    assert not list(lk.lora_layers(model)) and lk.adapter_configs(model) == {}
    assert {k: torch.equal(v, before[k]) for k, v in model.state_dict().items()} == dict.fromkeys(before, True)


def test_a_parameter_of_the_model_itself_and_different_sets_per_adapter_are_refused():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, 3))

    with pytest.raises(ValueError, match="registered on the model itself"):
        lk.inject(Root(), lk.LoraConfig(target_modules=[], target_parameters=["scale"]))
    model = expert_net()
    lk.inject(model, lk.LoraConfig(target_modules=[], target_parameters=["gate", "up"]))
    with pytest.raises(ValueError, match="must all target the same parameters"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=[], target_parameters=["gate"]), "other")
    with pytest.raises(ValueError, match="also be targeted"):  # a module target on a module with parameter adapters
        lk.add_adapter(model, lk.LoraConfig(target_modules=["experts"]), "third")
    assert sorted(lk.adapter_configs(model)) == ["default"]


def test_route_combine_and_file_tools_refuse_parameter_adapters(tmp_path):
    model = expert_net()
    options = {"r": 2, "target_modules": [], "target_parameters": ["gate", "up"]}
    lk.inject(model, lk.LoraConfig(**options))
    lk.add_adapter(model, lk.LoraConfig(**options), "other")
    x = torch.randn(2, 8)
    with pytest.raises(NotImplementedError, match="adapters on parameter targets cannot be mixed per row"):  # noqa: SIM117
        with lk.route(model, ["default", "other"]):
            model(x)
    with lk.route(model, ["other", "other"]), torch.no_grad():  # one adapter for every row: the exact path
        routed = model(x)
    lk.set_adapter(model, "other")
    with torch.no_grad():
        assert torch.equal(routed, model(x))
    with pytest.raises(lk.InputError, match="adapt parameters or nn.MultiheadAttention"):
        lk.combine_adapters(model, ["default", "other"], [0.5, 0.5], "mix")
    lk.save_adapter(model, tmp_path)
    with pytest.raises(AdapterLoadError, match=r"an adapter on parameters \(target_parameters\)"):
        inspect_adapter(tmp_path)


def test_loading_into_a_model_without_those_parameters_is_refused_and_changes_nothing(tmp_path):
    source = expert_net()
    lk.inject(source, lk.LoraConfig(r=2, target_modules=[], target_parameters=["gate", "up"]))
    lk.save_adapter(source, tmp_path)
    other = SeedMLP((8, 6, 4))
    before = _state(other)
    with pytest.raises(AdapterLoadError, match="'gate': nearest parameters"):
        lk.load_adapter(other, tmp_path)
    assert not list(lk.lora_layers(other))
    assert {k: torch.equal(v, before[k]) for k, v in other.state_dict().items()} == dict.fromkeys(before, True)


def test_peft_config_round_trip_keeps_the_parameter_targets():
    config = lk.LoraConfig(r=2, target_modules=[], target_parameters=MOE)
    data = config.to_peft_dict()
    assert data["target_parameters"] == MOE and data["target_modules"] == []
    assert lk.LoraConfig.from_peft_dict(data) == config
    assert lk.LoraConfig.from_peft_dict({**data, "target_modules": None}).target_modules == []
    with pytest.raises(ValueError, match="target_parameters"):
        lk.LoraConfig.from_peft_dict({**data, "target_parameters": "experts"})


def test_tied_weights_an_mha_out_proj_and_modules_to_save_overlaps_are_refused():
    from transformers import LlamaForCausalLM

    from .models import _llama_config

    torch.manual_seed(0)
    tied = LlamaForCausalLM(_llama_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"'weight' is also lm_head\.weight \(tied weights\)"):
        lk.inject(tied, lk.LoraConfig(target_modules=[], target_parameters=["embed_tokens.weight"]))
    attention = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
    with pytest.raises(ValueError, match="output projection of an nn.MultiheadAttention"):
        lk.inject(attention, lk.LoraConfig(target_modules=[], target_parameters=["attn.out_proj.weight"]))
    moe = tiny_mixtral()
    with pytest.raises(lk.InputError, match="either trained in full or adapted"):
        lk.inject(moe, lk.LoraConfig(target_modules=[], modules_to_save=["mlp"], target_parameters=MOE[:1]))
    for model in (tied, attention, moe):
        assert not list(lk.lora_layers(model)) and not lk.adapter_configs(model)


def test_a_model_moved_to_bfloat16_after_injection_adds_in_float32():
    model = _trained_experts(seed=6)
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
        model.to(torch.bfloat16)
        got = model(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want, reduction=12, depth=8, dtype=torch.bfloat16)
