"""inject / add / set / delete / disable adapters, target matching and parameter counts."""

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import Mixed, SeedMLP, randomize_adapters
from .tolerance import assert_close


def test_seed_mlp_counts(mlp):
    assert lk.count_parameters(mlp).base == 235_146
    lk.inject(mlp, lk.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2", "fc3"]))
    c = lk.count_parameters(mlp)
    assert c.trainable == 6_248
    assert c.base == 235_146
    assert c.total == 235_146 + 6_248
    assert round(c.trainable_percent, 2) == 2.66
    assert all(not p.requires_grad for n, p in mlp.named_parameters() if "lora_" not in n)


def test_transformer_example_512x64_r8():
    root = nn.Module()
    root.proj = nn.Linear(512, 64, bias=False)
    lk.inject(root, lk.LoraConfig(r=8, alpha=8, target_modules=["proj"]))
    c = lk.count_parameters(root)
    assert (c.trainable, c.base) == (4_608, 32_768)
    assert round(100 * (1 - c.trainable / c.base)) == 86


def test_fresh_adapter_is_bitwise_identity(mixed, mixed_inputs):
    before = mixed(*mixed_inputs)
    lk.inject(mixed, lk.LoraConfig(r=3, target_modules=["emb", "conv", "proj"]))
    assert torch.equal(mixed(*mixed_inputs), before)


def test_unmatched_target_lists_nearest_names(mlp):
    with pytest.raises(ValueError) as err:
        lk.inject(mlp, lk.LoraConfig(target_modules=["fc1", "fc_2"]))
    msg = str(err.value)
    assert "'fc_2'" in msg and "fc2" in msg and "'fc1'" not in msg.split("\n")[1]
    assert list(lk.lora_layers(mlp)) == [], "a failed inject must leave the model untouched"


def test_regex_targets_and_no_match_regex(mlp):
    lk.inject(mlp, lk.LoraConfig(target_modules=r"fc[12]"))
    assert [p for p, _ in lk.lora_layers(mlp)] == ["fc1", "fc2"]
    with pytest.raises(ValueError, match="matched no module"):
        lk.inject(SeedMLP(), lk.LoraConfig(target_modules=r"attn\..*"))


def test_suffix_matching_is_whole_segments():
    root = nn.Module()
    root.xfc = nn.Linear(2, 2)
    root.block = nn.Module()
    root.block.fc = nn.Linear(2, 2)
    lk.inject(root, lk.LoraConfig(target_modules=["fc"]))
    assert [p for p, _ in lk.lora_layers(root)] == ["block.fc"]


def test_all_linear_skips_output_head_and_non_linear(mixed):
    mixed.lm_head = mixed.head  # a model that names its output head lm_head
    del mixed.head
    mixed.forward = lambda ids, img: None
    lk.inject(mixed, lk.LoraConfig(target_modules="all-linear"))
    assert [p for p, _ in lk.lora_layers(mixed)] == ["proj"]


def test_exclude_and_layers_to_transform():
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for _ in range(4):
        block = nn.Module()
        block.q, block.v = nn.Linear(4, 4), nn.Linear(4, 4)
        model.model.layers.append(block)
    cfg = lk.LoraConfig(target_modules=["q", "v"], layers_to_transform=[1, 3], exclude_modules=["layers.3.v"])
    lk.inject(model, cfg)
    assert [p for p, _ in lk.lora_layers(model)] == [
        "model.layers.1.q",
        "model.layers.1.v",
        "model.layers.3.q",
    ]


def test_rank_pattern_gives_per_module_ranks(mlp):
    lk.inject(
        mlp,
        lk.LoraConfig(r=4, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 8}),
    )
    assert mlp.fc1.r["default"] == 4 and mlp.fc2.r["default"] == 2
    assert mlp.fc1.scaling["default"] == 2.0 and mlp.fc2.scaling["default"] == 4.0


def test_bias_modes(mlp):
    lk.inject(mlp, lk.LoraConfig(target_modules=["fc1"], bias="lora_only"))
    grads = {n for n, p in mlp.named_parameters() if p.requires_grad}
    assert grads == {"fc1.lora_A.default", "fc1.lora_B.default", "fc1.base_layer.bias"}
    other = SeedMLP()
    lk.inject(other, lk.LoraConfig(target_modules=["fc1"], bias="all"))
    grads = {n for n, p in other.named_parameters() if p.requires_grad}
    assert grads == {
        "fc1.lora_A.default",
        "fc1.lora_B.default",
        "fc1.base_layer.bias",
        "fc2.bias",
        "fc3.bias",
    }


def test_modules_to_save_trains_a_copy(mixed, mixed_inputs):
    base_out = mixed(*mixed_inputs)
    lk.inject(mixed, lk.LoraConfig(target_modules=["proj"], modules_to_save=["head"]))
    assert isinstance(mixed.head, lk.ModulesToSave)
    trainable = {n for n, p in mixed.named_parameters() if p.requires_grad}
    assert trainable == {
        "proj.lora_A.default",
        "proj.lora_B.default",
        "head.modules_to_save.default.weight",
        "head.modules_to_save.default.bias",
    }
    with torch.no_grad():
        mixed.head.modules_to_save["default"].bias.add_(1.0)
    assert_close(mixed(*mixed_inputs), base_out + 1.0, reduction=80, depth=4)
    with lk.disable_adapters(mixed):
        assert torch.equal(mixed(*mixed_inputs), base_out)
    assert mixed.head.weight is mixed.head.modules_to_save["default"].weight


def test_modules_to_save_unknown_name(mlp):
    with pytest.raises(ValueError, match=r"modules_to_save: 'haed'"):
        lk.inject(mlp, lk.LoraConfig(target_modules=["fc1"], modules_to_save=["haed"]))


def test_switch_adapters_and_training_flags(mlp):
    x = torch.randn(4, 784)
    base = mlp(x)
    lk.inject(mlp, lk.LoraConfig(r=2, target_modules=["fc1", "fc2"]), name="a")
    randomize_adapters(mlp, seed=1)
    out_a = mlp(x)
    lk.add_adapter(mlp, lk.LoraConfig(r=3, target_modules=["fc2", "fc3"]), name="b")
    assert lk.active_adapter(mlp) == "a"
    assert torch.equal(mlp(x), out_a), "adding an adapter must not change the active one's output"
    with torch.no_grad():
        mlp.fc3.lora_B["b"].normal_()
    lk.set_adapter(mlp, "b")
    out_b = mlp(x)
    assert not torch.allclose(out_b, out_a)
    trainable = {n for n, p in mlp.named_parameters() if p.requires_grad}
    assert trainable == {"fc2.lora_A.b", "fc2.lora_B.b", "fc3.lora_A.b", "fc3.lora_B.b"}
    lk.set_adapter(mlp, "a")
    assert torch.equal(mlp(x), out_a)
    with lk.disable_adapters(mlp):
        assert torch.equal(mlp(x), base)
    assert torch.equal(mlp(x), out_a)
    with pytest.raises(KeyError, match=r"'c'.*\['a', 'b'\]"):
        lk.set_adapter(mlp, "c")
    lk.delete_adapter(mlp, "a")
    assert isinstance(mlp.fc1, nn.Linear) and lk.active_adapter(mlp) == "b"
    assert torch.equal(mlp(x), out_b)
    lk.delete_adapter(mlp, "b")
    assert list(lk.lora_layers(mlp)) == [] and lk.adapter_configs(mlp) == {}
    assert torch.equal(mlp(x), base)


def test_duplicate_and_bad_names(mlp):
    lk.inject(mlp, lk.LoraConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        lk.inject(mlp, lk.LoraConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="adapter name"):
        lk.add_adapter(mlp, lk.LoraConfig(target_modules=["fc1"]), name="a.b")


def test_training_step_changes_only_adapter(mlp):
    lk.inject(mlp, lk.LoraConfig(r=4, target_modules=["fc1", "fc2", "fc3"]))
    frozen = {n: p.detach().clone() for n, p in mlp.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in mlp.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
    for n, p in mlp.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    assert mlp.fc1.lora_B["default"].abs().sum() > 0


def test_merge_unmerge_and_state(mlp):
    lk.inject(mlp, lk.LoraConfig(r=4, target_modules=["fc1", "fc2", "fc3"]))
    randomize_adapters(mlp)
    x = torch.randn(8, 784)
    w0 = mlp.fc1.base_layer.weight.detach().clone()
    want = mlp(x)
    lk.merge(mlp)
    mlp.eval()
    assert lk.is_merged(mlp)
    assert_close(mlp(x), want, reduction=784, depth=4)
    with pytest.raises(RuntimeError, match="already merged"):
        lk.merge(mlp)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        mlp.train()(x)
    with torch.no_grad():
        assert_close(mlp(x), want, reduction=784, depth=4)
    mlp.eval()
    lk.unmerge(mlp)
    assert_close(mlp.fc1.base_layer.weight, w0, reduction=8, depth=2)
    assert_close(mlp(x), want, reduction=784, depth=4)


def test_disable_while_merged_restores_merge(mlp):
    lk.inject(mlp, lk.LoraConfig(target_modules=["fc1"]))
    randomize_adapters(mlp)
    x = torch.randn(2, 784)
    with lk.disable_adapters(mlp):
        base = mlp(x)
    lk.merge(mlp)
    mlp.eval()
    with lk.disable_adapters(mlp), torch.no_grad():
        torch.testing.assert_close(mlp(x), base)
    assert lk.is_merged(mlp)


def test_switching_while_merged_is_refused(mlp):
    lk.inject(mlp, lk.LoraConfig(target_modules=["fc1"]), name="a")
    lk.add_adapter(mlp, lk.LoraConfig(target_modules=["fc1"]), name="b")
    lk.merge(mlp)
    with pytest.raises(RuntimeError, match="unmerge"):
        lk.set_adapter(mlp, "b")
    with pytest.raises(RuntimeError, match="unmerge"):
        lk.delete_adapter(mlp, "a")


def test_merge_and_unload_gives_plain_model(mixed, mixed_inputs):
    keys = list(mixed.state_dict().keys())
    lk.inject(mixed, lk.LoraConfig(target_modules=["emb", "conv", "proj"], modules_to_save=["head"]))
    randomize_adapters(mixed)
    with torch.no_grad():
        mixed.head.modules_to_save["default"].weight.mul_(2)
    want = mixed(*mixed_inputs)
    plain = lk.merge_and_unload(mixed).eval()
    assert list(plain.state_dict().keys()) == keys
    assert not any(isinstance(m, (lk.LoraLayer, lk.ModulesToSave)) for m in plain.modules())
    assert_close(plain(*mixed_inputs), want, reduction=80, depth=4)


def test_state_dict_round_trip_of_injected_model(mixed, mixed_inputs):
    lk.inject(mixed, lk.LoraConfig(target_modules=["emb", "conv", "proj"]))
    randomize_adapters(mixed)
    other = Mixed()
    lk.inject(other, lk.LoraConfig(target_modules=["emb", "conv", "proj"]))
    other.load_state_dict(mixed.state_dict())
    assert torch.equal(other(*mixed_inputs), mixed(*mixed_inputs))


def _has_cpp_compiler() -> bool:
    import shutil

    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(not _has_cpp_compiler(),
                                                                   reason="inductor on CPU needs a C++ compiler"))],
)  # fmt: skip
def test_torch_compile_gives_the_eager_outputs_and_gradients(mlp, backend):
    """``torch.compile`` (its default backend, inductor, where the machine has a compiler) traces an
    injected model in one graph; outputs and every adapter's gradient equal eager mode's."""
    lk.inject(mlp, lk.LoraConfig(r=4, target_modules=["fc1", "fc2", "fc3"]))
    randomize_adapters(mlp)
    x = torch.randn(4, 784)
    trainable = {n: p for n, p in mlp.named_parameters() if p.requires_grad}
    want = mlp(x)
    want.square().sum().backward()
    eager = {n: p.grad.clone() for n, p in trainable.items()}
    mlp.zero_grad(set_to_none=True)
    compiled = torch.compile(mlp, backend=backend, fullgraph=True)
    got = compiled(x)
    assert_close(got, want, reduction=784, depth=3)
    got.square().sum().backward()
    assert set(eager) == {n for n, p in trainable.items() if p.grad is not None} and len(eager) == 6
    for name, grad in eager.items():  # backward: the forward's three layers again, and the batch sum
        assert_close(trainable[name].grad, grad, reduction=784, depth=7, msg=name)
        assert grad.abs().max() > 0, name
