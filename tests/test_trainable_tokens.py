"""Trainable tokens (``trainable_token_indices``): only the chosen rows train, a tied head follows,
the padding row keeps nn.Embedding's rule, and every refusal leaves the model as it was.

The parity grid (``test_parity_grid.py``) compares with PEFT both ways, untied and tied.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import TrainableTokens

from .models import _llama_config, tiny_llama
from .tolerance import assert_close


def _tied() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config(tie_word_embeddings=True)).eval()


class Tagger(nn.Module):
    """An embedding (with a padding row) and a linear head; no ``get_input_embeddings``."""

    def __init__(self, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6, padding_idx=padding_idx)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x)).sum(1)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)


def test_only_the_chosen_rows_train_and_the_output_reads_them():
    torch.manual_seed(0)
    model = Tagger()
    lk.inject(model, lk.LoraConfig(target_modules=[], trainable_token_indices={"emb": [0, 4, 7]}))
    assert isinstance(model.emb, TrainableTokens)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["emb.modules_to_save.default.values"]
    x = torch.tensor([[0, 4, 2, 7, 7], [1, 2, 3, 4, 0]])
    model.train()
    model(x).square().sum().backward()
    values = model.emb.modules_to_save["default"].values
    assert float(values.grad[0].abs().max()) == 0.0, "the padding row gets no gradient (nn.Embedding's rule)"
    assert float(values.grad[1:].abs().min()) > 0.0
    assert model.emb.original_module.weight.grad is None
    with torch.no_grad():
        values += 1.0  # tokens 0 (the padding row), 4 and 7
        manual = model.emb.original_module.weight.clone()
        manual[[0, 4, 7]] = values
        want = model.head(manual[x]).sum(1)
        assert torch.equal(model(x), want)
        with lk.disable_adapters(model):
            assert not torch.allclose(model(x), want)


def test_a_tied_head_reads_the_same_rows_and_merge_and_unload_writes_them_once():
    model = _tied()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 50]))
    assert isinstance(model.lm_head, TrainableTokens) and model.lm_head.tied_to == "model.embed_tokens"
    rows = model.model.embed_tokens.modules_to_save["default"]
    assert model.lm_head.modules_to_save["default"] is rows
    assert list(lk.checkpoint.adapter_state(model, "default")) == [
        *(k for k in lk.checkpoint.adapter_state(model, "default") if "lora_" in k),
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    ]
    with torch.no_grad():
        rows.values.add_(torch.randn(rows.values.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.tensor([[3, 1, 50, 2, 3]])
    with torch.no_grad():
        want = model(x).logits
        lk.merge_and_unload(model)
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight[[3, 50]], rows.values)
        got = model(x).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_a_second_adapter_has_its_own_rows_and_delete_restores_the_model():
    model = tiny_llama()
    before = _state(model)
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    lk.add_adapter(model, lk.LoraConfig(target_modules=["v_proj"], trainable_token_indices=[2, 9]), "other")
    emb = model.model.embed_tokens
    assert sorted(emb.modules_to_save) == ["default", "other"]
    with pytest.raises(lk.InputError, match="trainable tokens"):
        lk.set_adapter(model, ["default", "other"])
    lk.set_adapter(model, "other")
    assert emb.modules_to_save["other"].values.requires_grad
    assert not emb.modules_to_save["default"].values.requires_grad
    lk.delete_adapter(model, "default")
    lk.delete_adapter(model, "other")
    assert type(model.model.embed_tokens) is nn.Embedding and _unchanged(model, before)


@pytest.mark.parametrize(
    ("build", "options", "message"),
    [
        (Tagger, {"trainable_token_indices": {"emb": [3, 12]}}, r"has 12 rows; token indices \[12\] are out of range"),
        (Tagger, {"trainable_token_indices": [1]}, "has no get_input_embeddings"),
        (Tagger, {"trainable_token_indices": {"embb": [1]}}, "'embb' matches no module; nearest: emb"),
        (Tagger, {"target_modules": ["emb"], "trainable_token_indices": {"emb": [1]}}, "also carries"),
        (Tagger, {"modules_to_save": ["emb"], "trainable_token_indices": {"emb": [1]}}, "also carries"),
        (lambda: Tagger().requires_grad_(False), {"trainable_token_indices": {"emb": [1]}}, None),
    ],
    ids=["out-of-range", "list-without-input-embeddings", "typo", "lora-target", "modules-to-save", "fine"],
)
def test_bad_token_targets_are_refused_and_change_nothing(build, options, message):
    torch.manual_seed(0)
    model = build()
    before = _state(model)
    config = lk.LoraConfig(**{"target_modules": [], **options})
    if message is None:
        lk.inject(model, config)
        return
    with pytest.raises(ValueError, match=message):
        lk.inject(model, config)
    assert _unchanged(model, before) and not lk.adapter_configs(model)


def test_embeddings_that_would_not_be_exact_are_refused():
    class Scaled(nn.Embedding):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    for module, message in [(Scaled(5, 3), "its own forward"), (nn.Embedding(5, 3, max_norm=1.0), "max_norm")]:
        model = nn.Sequential(module)
        with pytest.raises(ValueError, match=message):
            lk.inject(model, lk.LoraConfig(target_modules=[], trainable_token_indices={"0": [1]}))
        assert type(model[0]) is type(module)


@pytest.mark.parametrize(
    "value", [[], [1, 1], [-1], [True], {"emb": []}, {"": [1]}, "1,2", {"emb": [1.0]}], ids=repr
)
def test_config_refuses_malformed_indices(value):
    with pytest.raises(ValueError, match="trainable_token_indices must be"):
        lk.LoraConfig(target_modules=["fc1"], trainable_token_indices=value)


def test_config_round_trip_and_save_load(tmp_path):
    config = lk.LoraConfig(target_modules=[], trainable_token_indices={"emb": [2, 5]})
    assert lk.LoraConfig.from_peft_dict(config.to_peft_dict()) == config
    torch.manual_seed(0)
    model = Tagger()
    lk.inject(model, config)
    with torch.no_grad():
        model.emb.modules_to_save["default"].values.mul_(3.0)
    lk.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = Tagger()
    lk.load_adapter(fresh, tmp_path)
    x = torch.tensor([[2, 5, 1]])
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    clone = copy.deepcopy(fresh)
    assert torch.equal(clone(x), fresh(x))


def test_the_output_head_alone_on_a_tied_model_is_not_followed_and_unloading_unties_it():
    """As PEFT: only the input embedding takes its tied head along; the head chosen alone changes
    only its own outputs, and merge_and_unload gives it its own copy (the embedding keeps W)."""
    model = _tied()
    lk.inject(model, lk.LoraConfig(target_modules=[], trainable_token_indices={"lm_head": [3]}))
    assert type(model.model.embed_tokens) is nn.Embedding and isinstance(model.lm_head, TrainableTokens)
    embedding = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].values.add_(1.0)
        x = torch.tensor([[3, 1, 2]])
        want = model(x).logits
        lk.merge_and_unload(model)
        assert torch.equal(model.model.embed_tokens.weight, embedding)
        assert not torch.equal(model.lm_head.weight, embedding)
        assert_close(model(x).logits, want, reduction=32, depth=4)


def test_tokens_with_a_parameter_target_on_the_same_embedding_or_two_names_for_it_are_refused():
    for options in ({"target_parameters": ["embed_tokens.weight"], "trainable_token_indices": [3]},
                    {"trainable_token_indices": {"embed_tokens": [3], "model.embed_tokens": [4]}}):  # fmt: skip
        model = tiny_llama()
        with pytest.raises(ValueError, match="also carries|named twice"):
            lk.inject(model, lk.LoraConfig(target_modules=[], **options))
        assert type(model.model.embed_tokens) is nn.Embedding


def test_saving_a_tokens_only_adapter_warns_that_peft_cannot_load_it(tmp_path):
    model = Tagger()
    lk.inject(model, lk.LoraConfig(target_modules=[], trainable_token_indices={"emb": [1]}))
    with pytest.warns(UserWarning, match="PEFT 0.21 refuses to load"):
        lk.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="merge_and_unload writes them"):
        lk.merge(model)


def test_a_later_adapter_cannot_train_a_token_module_in_full():
    model = Tagger()
    lk.inject(model, lk.LoraConfig(target_modules=[], trainable_token_indices={"emb": [1]}))
    before = _state(model)
    with pytest.raises(lk.InputError, match="'emb' holds adapted modules"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["head"], modules_to_save=["emb"]), "b")
    assert _unchanged(model, before) and sorted(lk.adapter_configs(model)) == ["default"]
