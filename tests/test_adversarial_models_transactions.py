"""Calls that fail or are refused change nothing: inject/add_adapter are transactions (checked
first, rolled back on any later failure), and adapters cannot be changed inside
``disable_adapters`` (merge_and_unload there used to drop the adapter) or by a list of names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import randomize_adapters
from .test_adversarial_models import assert_unchanged, snapshot
from .tolerance import assert_close


# ---------------------------------------------------------------------------------------- failures change nothing
class Stack(nn.Module):
    """fc1 → norm → fc2 → fc3, with a head for modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc3(self.fc2(self.norm(self.fc1(x)))))


def _holding_adapter_a() -> nn.Module:
    torch.manual_seed(0)
    model = Stack().train()
    model.fc2.requires_grad_(False)  # a flag of the user's own, which a failed call must keep
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]), name="a")
    randomize_adapters(model)
    return model


def _bad_rank(config: lk.LoraConfig) -> lk.LoraConfig:
    config.rank_pattern["fc2"] = 0  # the dict is mutable after validation
    return config


FAILURES = {
    # case: (model with or without adapters, the failing call, error type, message regex)
    "target that cannot be adapted in the middle": (
        lambda: Stack(), lambda m: lk.inject(m, lk.LoraConfig(target_modules=["fc1", "norm", "fc2"])),
        lk.UnsupportedModuleError, r"^module 'norm' is a torch.nn.modules.normalization.LayerNorm, which LoRA cannot",
    ),
    "rank 0 for one module via rank_pattern": (
        lambda: Stack(), lambda m: lk.inject(m, _bad_rank(lk.LoraConfig(r=4, target_modules=["fc1", "fc2", "fc3"],
                                                                         rank_pattern={"fc2": 2}))),
        lk.InputError, r"^module 'fc2': rank 0 \(from r or rank_pattern\) must be an integer >= 1$",
    ),
    "modules_to_save that matches nothing": (
        lambda: Stack(), lambda m: lk.inject(m, lk.LoraConfig(target_modules=["fc1"], modules_to_save=["haed"])),
        lk.InputError, r"modules_to_save: 'haed' matches no module; nearest existing names: \['head'\]",
    ),
    "duplicate adapter name": (
        _holding_adapter_a, lambda m: lk.add_adapter(m, lk.LoraConfig(target_modules=["fc3"]), name="a"),
        lk.InputError, r"already holds an adapter named 'a'",
    ),
    "inject while another adapter is merged": (
        lambda: lk.merge(_holding_adapter_a().eval()), lambda m: lk.inject(m, lk.LoraConfig(target_modules=["fc3"]),
                                                                          name="b"),
        RuntimeError, r"adapter 'a' is merged into the base weights; call lorakit.unmerge\(model\) before switching",
    ),
    "unsupported target beside existing adapters": (
        _holding_adapter_a, lambda m: lk.add_adapter(m, lk.LoraConfig(target_modules=["fc1", "norm"]), name="b"),
        lk.UnsupportedModuleError, r"module 'norm'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failed_inject_leaves_the_model_exactly_as_it_was(case):
    build, call, error, pattern = FAILURES[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        call(model)
    assert_unchanged(before, model)


@pytest.mark.parametrize("fail_at", ["second layer", "modules_to_save copy"])
def test_a_failure_while_applying_is_rolled_back(monkeypatch, fail_at):
    """Past the checks (e.g. out of memory while allocating factors): everything is undone."""
    model = _holding_adapter_a()
    before = snapshot(model)
    calls = []

    def failing(original):
        def wrapper(self, *args, **kwargs):
            calls.append(args[0])
            if fail_at == "modules_to_save copy" or len(calls) == 2:
                raise MemoryError("simulated")
            return original(self, *args, **kwargs)

        return wrapper

    holder = lk.ModulesToSave if fail_at == "modules_to_save copy" else lk.LoraLayer
    monkeypatch.setattr(holder, "add_adapter", failing(holder.add_adapter))
    config = lk.LoraConfig(r=2, target_modules=["fc1", "fc3"], modules_to_save=["head"], bias="all")
    with pytest.raises(MemoryError, match="simulated"):
        lk.add_adapter(model, config, name="b")
    assert calls and set(calls) == {"b"}
    assert_unchanged(before, model)


# ---------------------------------------------------------------------------------------- disable_adapters, set_adapter
@pytest.mark.parametrize(
    ("what", "call"),
    [
        ("lorakit.merge_and_unload", lambda m: lk.merge_and_unload(m)),
        ("lorakit.merge", lambda m: lk.merge(m)),
        ("lorakit.unmerge", lambda m: lk.unmerge(m)),
        ("deleting adapter 'a'", lambda m: lk.delete_adapter(m, "a")),
        ("adding adapter 'c'", lambda m: lk.add_adapter(m, lk.LoraConfig(target_modules=["fc3"]), name="c")),
        (r"lorakit.set_adapter\(model, 'b'\)", lambda m: lk.set_adapter(m, "b")),
    ],
)
@pytest.mark.parametrize("merged", [False, True])
def test_changing_adapters_inside_disable_adapters_is_refused(what, call, merged):
    """merge_and_unload inside the block used to drop the adapter; unmerge was undone on exit."""
    model = _holding_adapter_a().eval()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["fc2"]), name="b")
    x = torch.randn(3, 8)
    with torch.no_grad():
        adapted = model(x)
    if merged:
        lk.merge(model)
    before = snapshot(model)
    with lk.disable_adapters(model), torch.no_grad():
        base = model(x)
        with pytest.raises(RuntimeError, match=rf"^{what} inside lorakit.disable_adapters\(model\) is not supported"):
            call(model)
        assert torch.equal(model(x), base)
    # A merged adapter is unmerged for the block and merged again after it: W0 + ΔW − ΔW + ΔW.
    assert_unchanged(before, model, rounding=4.0 if merged else 0.0)
    with torch.no_grad():
        plain = lk.merge_and_unload(model)  # outside the block: merged as if never disabled
        assert_close(plain(x), adapted, reduction=8, depth=6)


def test_merge_and_unload_inside_a_route_is_refused():
    torch.manual_seed(0)
    model = lk.inject(Stack().eval(), lk.LoraConfig(r=2, target_modules=["fc1", "fc2"]), name="a")
    with lk.route(model, ["a", None]), pytest.raises(RuntimeError, match="inside lorakit.route"):
        lk.merge_and_unload(model)
    assert isinstance(model.fc1, lk.LoraLinear) and lk.active_adapter(model) == "a"


@pytest.mark.parametrize("names", [["b", "b"], [], None, 3, ["a", 3], {"a"}])
def test_set_adapter_takes_a_name_or_a_list_of_distinct_names(names):
    model = _holding_adapter_a()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["fc3"]), name="b")
    with pytest.raises(lk.InputError, match=r"set_adapter: name = .*allowed: an adapter name or a non-empty list"):
        lk.set_adapter(model, names)
    assert lk.active_adapters(model) == ["a"]
    with pytest.raises(lk.InputError, match=r"\['a'\] use DoRA, modules_to_save or trainable"):  # a trains a copy
        lk.set_adapter(model, ("b", "a"))
    assert lk.active_adapters(model) == ["a"]
