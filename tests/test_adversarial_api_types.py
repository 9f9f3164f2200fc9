"""Wrong Python types and unknown names given to the public model functions: each raises an
``InputError`` whose one line names the function, the argument, the value and what is allowed
(``ArgumentTypeError`` is also a ``TypeError``, ``UnknownAdapterError`` also a ``KeyError``), and
the model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import SeedMLP, randomize_adapters

CFG = lk.LoraConfig(r=2, target_modules=["fc1"])
MODULE = "allowed: a torch.nn.Module instance"
CLASS_HINT = " (got the class SeedMLP itself: pass an instance, e.g. SeedMLP(...))"
NAME = "allowed: a non-empty string without '.' (an adapter name such as 'default')"


def state(model: nn.Module) -> tuple:
    """What a refused call must leave alone: module types, parameters and their flags, adapters,
    the active adapter."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        sorted(lk.adapter_configs(model)),
        lk.active_adapter(model),
        lk.is_merged(model),
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[2:] == after[2:]
    assert [(n, g) for n, _, g in before[1]] == [(n, g) for n, _, g in after[1]]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(before[1], after[1], strict=True))


def refused(call, message: str, model: nn.Module | None = None, error: type = lk.InputError) -> BaseException:
    """``call()`` raises ``error`` with exactly ``message`` and leaves ``model`` as it was."""
    before = state(model) if model is not None else None
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value) == message
    if model is not None:
        assert_same(before, state(model))
    return raised.value


def two_adapters() -> nn.Module:
    model = SeedMLP()
    lk.inject(model, CFG, name="a")
    lk.add_adapter(model, CFG, name="b")
    randomize_adapters(model)
    return model


# ------------------------------------------------------------------------------------ model argument
CALLS = {  # public function -> a call of it with model m (every other argument valid)
    "inject": lambda m: lk.inject(m, CFG),
    "add_adapter": lambda m: lk.add_adapter(m, CFG, "x"),
    "set_adapter": lambda m: lk.set_adapter(m, "a"),
    "delete_adapter": lambda m: lk.delete_adapter(m, "a"),
    "route": lambda m: lk.route(m, ["a"]).__enter__(),
    "set_trainable": lambda m: lk.set_trainable(m, ["a"]),
    "merge": lambda m: lk.merge(m),
    "unmerge": lambda m: lk.unmerge(m),
    "is_merged": lambda m: lk.is_merged(m),
    "merge_and_unload": lambda m: lk.merge_and_unload(m),
    "count_parameters": lambda m: lk.count_parameters(m),
    "disable_adapters": lambda m: lk.disable_adapters(m).__enter__(),
    "active_adapter": lambda m: lk.active_adapter(m),
    "adapter_configs": lambda m: lk.adapter_configs(m),
    "lora_layers": lambda m: lk.lora_layers(m),
    "find_targets": lambda m: lk.find_targets(m, CFG),
    "combine_adapters": lambda m: lk.combine_adapters(m, ["a", "b"], [1, 1], "c"),
    "save_adapters": lambda m: lk.save_adapters(m, "unused-folder"),
}


@pytest.mark.parametrize("function", sorted(CALLS))
@pytest.mark.parametrize("value", ["None", "class", "dict"])
def test_a_model_that_is_no_module_instance_is_named(function, value):
    model, shown, hint = {
        "None": (None, "None", ""),
        "class": (SeedMLP, repr(SeedMLP), CLASS_HINT),
        "dict": ({"fc1": 1}, "{'fc1': 1}", ""),
    }[value]
    error = refused(lambda: CALLS[function](model), f"lorakit.{function}: model = {shown}; {MODULE}{hint}",
                    error=lk.ArgumentTypeError)  # fmt: skip
    assert isinstance(error, TypeError) and isinstance(error, lk.InputError)


# ------------------------------------------------------------------------------------ config and name
@pytest.mark.parametrize("function", ["inject", "add_adapter"])
def test_a_config_that_is_no_lora_config_is_named(function):
    model = two_adapters()
    call = getattr(lk, function)
    refused(lambda: call(model, {"r": 8}, "x"),
            f"lorakit.{function}: config = {{'r': 8}}; allowed: a lorakit.LoraConfig (for a dict d: "
            "lorakit.LoraConfig(**d))", model, lk.ArgumentTypeError)  # fmt: skip
    refused(lambda: call(model, None, "x"), f"lorakit.{function}: config = None; allowed: a lorakit.LoraConfig",
            model, TypeError)  # fmt: skip


@pytest.mark.parametrize("function", ["inject", "add_adapter"])
@pytest.mark.parametrize(("name", "error"), [(5, lk.ArgumentTypeError), (None, lk.ArgumentTypeError),
                                             ("", lk.InputError), ("a.b", lk.InputError)])  # fmt: skip
def test_an_adapter_name_that_cannot_be_one_is_named(function, name, error):
    model = two_adapters()
    refused(lambda: getattr(lk, function)(model, CFG, name), f"lorakit.{function}: name = {name!r}; {NAME}", model,
            error)  # fmt: skip
    plain = SeedMLP()
    refused(lambda: getattr(lk, function)(plain, CFG, name), f"lorakit.{function}: name = {name!r}; {NAME}", plain,
            error)  # fmt: skip


# ------------------------------------------------------------------------------------ unknown adapters
@pytest.mark.parametrize("function", ["set_adapter", "delete_adapter"])
def test_an_unknown_adapter_is_an_input_error_and_a_key_error(function):
    model = two_adapters()
    message = f"lorakit.{function}: name = 'zz' is no adapter of this model; allowed: ['a', 'b']"
    error = refused(lambda: getattr(lk, function)(model, "zz"), message, model, lk.UnknownAdapterError)
    assert isinstance(error, KeyError) and isinstance(error, lk.InputError) and isinstance(error, ValueError)
    try:  # callers written against KeyError keep working
        getattr(lk, function)(model, "zz")
    except KeyError as caught:
        assert str(caught) == message  # not quoted, as KeyError would print it
    refused(lambda: getattr(lk, function)(SeedMLP(), "zz"),
            f"lorakit.{function}: name = 'zz' is no adapter of this model; allowed: none (the model holds no "
            "adapters)", error=KeyError)  # fmt: skip


def test_delete_adapter_with_a_name_that_is_no_string():
    model = two_adapters()
    refused(lambda: lk.delete_adapter(model, 5),
            "lorakit.delete_adapter: name = 5; allowed: an adapter name (a string) among ['a', 'b']", model,
            lk.ArgumentTypeError)  # fmt: skip


def test_route_and_set_trainable_name_their_bad_arguments():
    model = two_adapters()
    rows = "allowed: a list with one adapter name (or None) per row, or a 1-D integer tensor of positions"
    refused(lambda: lk.route(model, None).__enter__(), f"lorakit.route: adapters = None; {rows}", model, TypeError)
    refused(lambda: lk.route(model, 5).__enter__(), f"lorakit.route: adapters = 5; {rows}", model, TypeError)
    refused(lambda: lk.route(model, ["a", 3]).__enter__(), f"lorakit.route: adapters holds 3; {rows}", model,
            lk.ArgumentTypeError)  # fmt: skip
    refused(lambda: lk.route(model, []).__enter__(), f"lorakit.route: adapters = [] (no rows); {rows}, at least "
            "one row", model)  # fmt: skip
    error = refused(lambda: lk.route(model, ["a", "zz"]).__enter__(),
                    "lorakit.route: adapters names unknown adapters ['zz']; allowed: ['a', 'b'] or None", model,
                    KeyError)  # fmt: skip
    assert isinstance(error, lk.UnknownAdapterError)
    # a string used to be read as the names 'a' and 'b'
    refused(lambda: lk.set_trainable(model, "ab"),
            "lorakit.set_trainable: adapters = 'ab'; allowed: a list of adapter names among ['a', 'b']", model,
            TypeError)  # fmt: skip
    refused(lambda: lk.set_trainable(model, ["a", "zz"]),
            "lorakit.set_trainable: adapters names unknown adapters ['zz']; allowed: ['a', 'b']", model,
            lk.UnknownAdapterError)  # fmt: skip
    assert all(layer.route is None for _, layer in lk.lora_layers(model))


# ------------------------------------------------------------------------------------ combine, merge, save
@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_combine_refuses_a_repeated_source(method):
    model = two_adapters()
    refused(lambda: lk.combine_adapters(model, ["a", "b", "a"], [1, 1, 1], "c", method=method),
            "sources = ['a', 'b', 'a'] names 'a' more than once; allowed: each adapter once (give it a larger weight "
            "instead)", model)  # fmt: skip


def test_merge_and_unload_names_bad_options():
    model = two_adapters()
    refused(lambda: lk.merge_and_unload(model, dequantize="yes"),
            "lorakit.merge_and_unload: dequantize = 'yes'; allowed: True or False", model, TypeError)  # fmt: skip
    refused(lambda: lk.merge_and_unload(model, dtype=torch.int8),
            "lorakit.merge_and_unload: dtype = torch.int8; allowed: a floating-point torch.dtype such as "
            "torch.float32 or torch.bfloat16", model, lk.ArgumentTypeError)  # fmt: skip


def test_save_adapters_names_bad_arguments(tmp_path):
    model = two_adapters()
    refused(lambda: lk.save_adapters(model, None),
            "lorakit.save_adapters: directory = None; allowed: a folder path (str or os.PathLike)",
            error=TypeError)  # fmt: skip
    refused(lambda: lk.save_adapters(model, tmp_path, names=5),
            "lorakit.save_adapters: names = 5; allowed: None (every adapter), an adapter name or a list of them, "
            "among ['a', 'b']", error=lk.ArgumentTypeError)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_register_kind_names_bad_arguments():
    refused(lambda: lk.register_kind(nn.Linear, callable),
            f"lorakit.register_kind: cls = {nn.Linear!r}; allowed: a subclass of lorakit.LoraLayer",
            error=lk.ArgumentTypeError)  # fmt: skip
    refused(lambda: lk.register_kind(lk.LoraLinear, None),
            "lorakit.register_kind: accepts = None; allowed: a callable (module) -> bool", error=TypeError)  # fmt: skip


def test_adapter_files_name_bad_models_and_names(tmp_path):
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(target_modules=["fc1"]))
    lk.save_adapter(model, tmp_path / "a")
    with pytest.raises(lk.ArgumentTypeError, match=r"lorakit.load_adapter: model = None"):
        lk.load_adapter(None, tmp_path / "a")
    with pytest.raises(lk.ArgumentTypeError, match=r"lorakit.load_adapter: name = 5"):
        lk.load_adapter(SeedMLP(), tmp_path / "a", name=5)
    with pytest.raises(lk.ArgumentTypeError, match=r"lorakit.save_adapter: model = <class"):
        lk.save_adapter(SeedMLP, tmp_path / "b")
    with pytest.raises(lk.UnknownAdapterError, match=r"name = 'zz' is no adapter of this model"):
        lk.save_adapter(model, tmp_path / "b", name="zz")
    assert not (tmp_path / "b").exists()
