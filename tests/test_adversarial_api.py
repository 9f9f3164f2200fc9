"""Bad input to the family, soft-prompt and combine calls (issue #16): each is an ``InputError``
whose one line names the input, the bad value and what is allowed, and the model is left exactly
as it was. The command-line cases are in test_adversarial_cli.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.combine import combine_adapters
from lorakit.errors import InputError
from lorakit.family import (
    BottleneckConfig,
    SelectiveConfig,
    inject_bottleneck,
    load_bottleneck,
    load_selected,
    save_bottleneck,
    save_selected,
    select_trainable,
)
from lorakit.files import AdapterLoadError
from lorakit.soft_prompts import PrefixTuningConfig, PromptTuningConfig, SoftPromptModel

from .conftest import SeedMLP, randomize_adapters
from .tolerance import assert_close


def state(model: nn.Module) -> tuple:
    """Everything a refused call must leave alone: module types, parameters, their flags, adapters."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        sorted(model.__dict__.get("lorakit_configs", {})),
        sorted(k for k in model.__dict__ if k.startswith("lorakit_")),
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[2:] == after[2:]
    assert [(n, g) for n, _, g in before[1]] == [(n, g) for n, _, g in after[1]]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(before[1], after[1], strict=True))


def assert_refused(call, fragment: str, model: nn.Module | None = None, error: type = InputError) -> None:
    before = state(model) if model is not None else None
    with pytest.raises(error) as raised:
        call()
    assert fragment in str(raised.value), str(raised.value)
    assert "\n" not in str(raised.value)
    if model is not None:
        assert_same(before, state(model))


# ----------------------------------------------------------------------------------------- configs
CONFIG_CASES = {  # (class, keyword arguments) -> message fragment
    "selective mode": (SelectiveConfig, {"mode": "lora"}, "SelectiveConfig.mode = 'lora'; allowed: bias, modules"),
    "selective modules missing": (SelectiveConfig, {"mode": "modules"}, "modules = None with mode='modules'"),
    "selective modules empty name": (SelectiveConfig, {"mode": "modules", "modules": [""]}, "modules = ['']; allowed"),
    "selective modules number": (SelectiveConfig, {"mode": "modules", "modules": [3]}, "modules = [3]; allowed"),
    "selective head number": (SelectiveConfig, {"mode": "head", "head": 3}, "head = 3; allowed: a module name"),
    "selective head missing": (SelectiveConfig, {"mode": "head"}, "head is required with mode='head'"),
    "selective layers negative": (SelectiveConfig, {"layers": [-1]}, "layers = [-1]; allowed: a list of layer"),
    "selective layers boolean": (SelectiveConfig, {"layers": [True]}, "layers = [True]; allowed"),
    "selective layers empty": (SelectiveConfig, {"layers": []}, "layers = []; allowed"),
    "selective layers string": (SelectiveConfig, {"layers": "0"}, "layers = '0'; allowed"),
    "selective layers_pattern empty": (SelectiveConfig, {"layers_pattern": ""}, "layers_pattern = ''; allowed"),
    "selective modules unused": (SelectiveConfig, {"modules": ["fc1"]}, "modules = ['fc1'] is not used with mode="),
    "selective layers unused": (SelectiveConfig, {"mode": "head", "head": "fc3", "layers": [0]}, "is not used"),
    "bottleneck zero": (BottleneckConfig, {"target_modules": ["fc1"], "bottleneck": 0}, "bottleneck = 0; allowed"),
    "bottleneck negative": (BottleneckConfig, {"target_modules": ["fc1"], "bottleneck": -2}, "bottleneck = -2"),
    "bottleneck fraction": (BottleneckConfig, {"target_modules": ["fc1"], "bottleneck": 2.5}, "bottleneck = 2.5"),
    "bottleneck boolean": (BottleneckConfig, {"target_modules": ["fc1"], "bottleneck": True}, "bottleneck = True"),
    "bottleneck string": (BottleneckConfig, {"target_modules": ["fc1"], "bottleneck": "4"}, "bottleneck = '4'"),
    "bottleneck no targets": (BottleneckConfig, {"target_modules": []}, "target_modules is required"),
    "bottleneck empty target": (BottleneckConfig, {"target_modules": [""]}, "target_modules = ['']; allowed"),
    "bottleneck nonlinearity": (BottleneckConfig, {"target_modules": ["fc1"], "nonlinearity": "swish"},
                                "nonlinearity = 'swish'; allowed: relu, gelu, tanh"),
    "prompt tokens zero": (PromptTuningConfig, {"num_virtual_tokens": 0}, "num_virtual_tokens = 0; allowed: a whole"),
    "prompt tokens negative": (PromptTuningConfig, {"num_virtual_tokens": -3}, "num_virtual_tokens = -3; allowed"),
    "prompt tokens fraction": (PromptTuningConfig, {"num_virtual_tokens": 2.5}, "num_virtual_tokens = 2.5"),
    "prompt tokens string": (PromptTuningConfig, {"num_virtual_tokens": "5"}, "num_virtual_tokens = '5'"),
    "prompt tokens boolean": (PromptTuningConfig, {"num_virtual_tokens": True}, "num_virtual_tokens = True"),
    "prompt init": (PromptTuningConfig, {"init": "zeros"}, "init = 'zeros'; allowed: vocab, text, random"),
    "prompt text without text": (PromptTuningConfig, {"init": "text"}, "init_text = None with init='text'"),
    "prompt text unused": (PromptTuningConfig, {"init_text": "hi"}, "init_text = 'hi' is not used with init='vocab'"),
    "prefix tokens zero": (PrefixTuningConfig, {"num_virtual_tokens": 0}, "num_virtual_tokens = 0; allowed"),
    "prefix projection string": (PrefixTuningConfig, {"projection": "yes"}, "projection = 'yes'; allowed: True"),
    "prefix hidden zero": (PrefixTuningConfig, {"projection": True, "projection_hidden": 0}, "hidden = 0; allowed"),
    "prefix hidden unused": (PrefixTuningConfig, {"projection_hidden": 8}, "is not used without projection"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_configs_refuse_bad_values(case):
    cls, kwargs, fragment = CONFIG_CASES[case]
    with pytest.raises(InputError) as raised:
        cls(**kwargs)
    message = str(raised.value)
    assert message.startswith(f"{cls.__name__}.") and fragment in message and "\n" not in message, message


# ------------------------------------------------------------------------------- family on a model
class WithAct(SeedMLP):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()  # a module without weights


FAMILY_CASES = {  # call on a fresh WithAct -> message fragment
    "select: config a dict": (lambda m: select_trainable(m, {"mode": "bias"}), "config = dict; allowed"),
    "select: no such module": (lambda m: select_trainable(m, SelectiveConfig(mode="modules", modules=["fc9"])),
                               "SelectiveConfig.modules: ['fc9'] match no module of the model (nearest: fc1, fc2, fc3)"),  # noqa: E501
    "select: one name of two unknown": (lambda m: select_trainable(m, SelectiveConfig(mode="modules",
                                                                                      modules=["fc1", "fc9"])),
                                        "['fc9'] match no module"),
    "select: no such head": (lambda m: select_trainable(m, SelectiveConfig(mode="head", head="lm_head")),
                             "SelectiveConfig.head: ['lm_head'] match no module"),
    "select: no such layer": (lambda m: select_trainable(m, SelectiveConfig(layers=[7])), "layers [7] not found"),
    "bottleneck: config a dict": (lambda m: inject_bottleneck(m, {"target_modules": ["fc1"]}), "config = dict"),
    "bottleneck: no such module": (lambda m: inject_bottleneck(m, BottleneckConfig(target_modules=["fc9"])),
                                   "target_modules: ['fc9'] match no module"),
    "bottleneck: one name of two unknown": (lambda m: inject_bottleneck(m, BottleneckConfig(["fc1", "fc9"])),
                                            "['fc9'] match no module"),
    "bottleneck: module without weights": (lambda m: inject_bottleneck(m, BottleneckConfig(["fc1", "act"])),
                                           "'act' (ReLU) has no weights; allowed: a Linear"),
    "save_selected: nothing selected": (lambda m: save_selected(m, "unused"), "no selective tuning"),
    "save_bottleneck: no adapters": (lambda m: save_bottleneck(m, "unused"), "no bottleneck adapters"),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_calls_refuse_and_leave_the_model(case):
    call, fragment = FAMILY_CASES[case]
    model = WithAct()
    assert_refused(lambda: call(model), fragment, model)


def test_bottleneck_twice_is_refused():
    model = inject_bottleneck(SeedMLP(), BottleneckConfig(["fc1"]))
    assert_refused(lambda: inject_bottleneck(model, BottleneckConfig(["fc2"])), "already has bottleneck", model)


BAD_SAVED = {  # (file, text) written over a good save -> fragment; loading must leave the model
    "bottleneck width zero": ("bottleneck_config.json", '{"target_modules": ["fc1"], "bottleneck": 0}',
                              "bottleneck_config.json: BottleneckConfig.bottleneck = 0; allowed"),
    "bottleneck unknown key": ("bottleneck_config.json", '{"target_modules": ["fc1"], "width": 3}',
                               "unknown keys ['width']; allowed: ['target_modules', 'bottleneck', 'nonlinearity']"),
    "bottleneck JSON array": ("bottleneck_config.json", "[1]", "the JSON is a list; allowed: an object"),
    "bottleneck not JSON": ("bottleneck_config.json", "{target", "not a valid JSON config (JSONDecodeError"),
    "bottleneck other width": ("bottleneck_config.json", '{"target_modules": ["fc1"], "bottleneck": 8}',
                               "adapter tensors do not match the model: ['fc1.down.bias (4,) != (8,)'"),
    "bottleneck other module": ("bottleneck_config.json", '{"target_modules": ["fc9"], "bottleneck": 4}',
                                "['fc9'] match no module"),
    "bottleneck no weights": ("adapter_model.safetensors", None, "no adapter_model.safetensors here"),
    "selective mode": ("selective_config.json", '{"mode": "everything"}', "SelectiveConfig.mode = 'everything'"),
    "selective other module": ("selective_config.json", '{"mode": "modules", "modules": ["fc1"]}',
                               "unexpected key fc2.bias; unexpected key fc2.weight; missing key fc1.bias"),
}


@pytest.mark.parametrize("case", list(BAD_SAVED))
def test_loading_a_bad_family_folder_leaves_the_model(case, tmp_path):
    name, text, fragment = BAD_SAVED[case]
    source = SeedMLP()
    if name.startswith("selective"):
        select_trainable(source, SelectiveConfig(mode="modules", modules=["fc2"]))
        save_selected(source, tmp_path)
    else:
        save_bottleneck(inject_bottleneck(source, BottleneckConfig(["fc1"], bottleneck=4)), tmp_path)
    if text is None:
        (tmp_path / name).unlink()
    else:
        (tmp_path / name).write_text(text)
    load = load_selected if name.startswith("selective") else load_bottleneck
    target = SeedMLP()
    assert_refused(lambda: load(target, tmp_path), fragment, target, AdapterLoadError)


# ------------------------------------------------------------------------------------ soft prompts
class Tok:
    def __call__(self, text, add_special_tokens=False):
        return type("E", (), {"input_ids": [] if text == "<nothing>" else [3, 4]})()


def _gpt2():
    pytest.importorskip("transformers")
    from .models import tiny_gpt2

    return tiny_gpt2()


SOFT_CASES = {  # call on a fresh tiny GPT-2 -> message fragment
    "not a Hugging Face model": (lambda m: SoftPromptModel(SeedMLP(), PromptTuningConfig(4)), "model = SeedMLP"),
    "config a dict": (lambda m: SoftPromptModel(m, {"num_virtual_tokens": 4}), "config = dict; allowed: Prompt"),
    "seed a string": (lambda m: SoftPromptModel(m, PromptTuningConfig(4), seed="0"), "seed = '0'; allowed"),
    "text init without tokenizer": (lambda m: SoftPromptModel(m, PromptTuningConfig(4, "text", "hi")),
                                    "tokenizer = None with init='text'"),
    "text that gives no tokens": (lambda m: SoftPromptModel(m, PromptTuningConfig(4, "text", "<nothing>"), Tok()),
                                  "init_text = '<nothing>' gives no tokens"),
}


@pytest.mark.parametrize("case", list(SOFT_CASES))
def test_soft_prompt_model_refuses_and_leaves_the_model(case):
    call, fragment = SOFT_CASES[case]
    model = _gpt2()
    assert_refused(lambda: call(model), fragment, model)


SOFT_FILES = {  # adapter_config.json text (None: no file) -> fragment
    "no config": (None, "no adapter_config.json here"),
    "JSON array": ("[]", "the JSON is a list; allowed: an object"),
    "not JSON": ("{", "cannot read the config"),
    "tokens zero": ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}', "num_virtual_tokens = 0; allowed"),
    "tokens missing": ('{"peft_type": "PREFIX_TUNING"}', "num_virtual_tokens = None; allowed"),
    "a LoRA adapter": ('{"peft_type": "LORA", "num_virtual_tokens": 4}', "peft_type 'LORA' is not a soft prompt"),
    "other token count": ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}', "has shape (4, 32), this model"),
}


@pytest.mark.parametrize("case", list(SOFT_FILES))
def test_loading_a_bad_soft_prompt_leaves_the_model(case, tmp_path):
    text, fragment = SOFT_FILES[case]
    SoftPromptModel(_gpt2(), PromptTuningConfig(4)).save(tmp_path)
    if text is None:
        (tmp_path / "adapter_config.json").unlink()
    else:
        (tmp_path / "adapter_config.json").write_text(text)
    model = _gpt2()
    assert_refused(lambda: SoftPromptModel.load(model, tmp_path), fragment, model, AdapterLoadError)


# ----------------------------------------------------------------------------------------- combine
def two_adapters(r2: int = 3, targets_b: tuple[str, ...] = ("fc1", "fc2")) -> SeedMLP:
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4.0, target_modules=["fc1", "fc2"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=r2, alpha=3.0, target_modules=list(targets_b)), name="b")
    randomize_adapters(model, scale=0.2)
    return model


COMBINE_CASES = {  # keyword arguments over (["a", "b"], [1.0, 1.0], "new") -> fragment
    "sources a string": ({"sources": "ab"}, "sources = 'ab'; allowed: a non-empty list of adapter names among ['a'"),
    "sources empty": ({"sources": [], "weights": []}, "sources = []; allowed"),
    "sources not names": ({"sources": [1, 2]}, "sources = [1, 2]; allowed: adapter names"),
    "unknown source": ({"sources": ["a", "zz"]}, "sources: unknown adapters ['zz']; the model holds ['a', 'b']"),
    "weights too few": ({"weights": [1.0]}, "weights: 1 given for 2 sources; allowed: one finite number per source"),
    "weights NaN": ({"weights": [1.0, float("nan")]}, "weights[1] = nan; allowed: a finite number"),
    "weights infinite": ({"weights": [float("-inf"), 1.0]}, "weights[0] = -inf; allowed"),
    "weights strings": ({"weights": ["1", "1"]}, "weights[0] = '1'; allowed"),
    "weights booleans": ({"weights": [True, 1.0]}, "weights[0] = True; allowed"),
    "weights a number": ({"weights": 1.0}, "weights: 1.0 given for 2 sources"),
    "method unknown": ({"method": "ties_svd"}, "method = 'ties_svd'; allowed: linear, cat, svd, ties, dare"),
    "rank zero": ({"rank": 0}, "rank = 0; allowed: None (the largest source rank) or a whole number >= 1"),
    "rank negative": ({"rank": -1}, "rank = -1; allowed"),
    "rank fraction": ({"rank": 2.5}, "rank = 2.5; allowed"),
    "rank with cat": ({"method": "cat", "rank": 3}, "rank = 3 with method 'cat'; allowed: None"),
    "density zero": ({"method": "ties", "density": 0}, "density = 0; allowed: a number in (0, 1]"),
    "density above one": ({"method": "dare", "density": 1.5}, "density = 1.5; allowed"),
    "density NaN": ({"method": "ties", "density": float("nan")}, "density = nan; allowed"),
    "density with svd": ({"method": "svd", "density": 0.3}, "density = 0.3 with method 'svd'; allowed: None"),
    "name taken": ({"name": "a"}, "name = 'a' is taken; allowed: a name other than ['a', 'b']"),
    "name empty": ({"name": ""}, "name = ''; allowed: a non-empty string without '.'"),
    "name with a dot": ({"name": "x.y"}, "name = 'x.y'; allowed"),
    "seed a string": ({"method": "dare", "seed": "1"}, "seed = '1'; allowed: an integer"),
    "linear with unequal ranks": ({"method": "linear"}, "method='linear' needs equal ranks; layer has ranks [2, 3]"),
}


@pytest.mark.parametrize("case", list(COMBINE_CASES))
def test_combine_refuses_and_leaves_the_model(case):
    kwargs, fragment = COMBINE_CASES[case]
    model = two_adapters()
    call = {"sources": ["a", "b"], "weights": [1.0, 1.0], "name": "new", **kwargs}
    assert_refused(lambda: combine_adapters(model, **call), fragment, model)


def test_combine_over_different_targets_adapts_their_union():
    model = two_adapters(r2=2, targets_b=("fc2", "fc3"))
    errors = combine_adapters(model, ["a", "b"], [0.5, -2.0], "u", method="cat")
    assert sorted(errors) == ["fc1", "fc2", "fc3"] and max(errors.values()) < 1e-5
    for path, want in {"fc1": [("a", 0.5)], "fc2": [("a", 0.5), ("b", -2.0)], "fc3": [("b", -2.0)]}.items():
        layer = model.get_submodule(path)
        expected = sum(w * layer.scaling[s] * layer.lora_B[s] @ layer.lora_A[s] for s, w in want)
        assert_close(layer.delta_weight("u"), expected, reduction=16, depth=2)
    assert json.dumps(sorted(lk.adapter_configs(model))) == '["a", "b", "u"]'
