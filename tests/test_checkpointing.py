"""lk.enable_checkpointing: recomputing blocks gives the same loss and gradients (LoRA dropout
included), keep=("attention",) stores the attention kernels' outputs instead of running them again
in the backward, and what cannot work is refused or reported."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit as lk
from lorakit.checkpointing import is_checkpointing
from lorakit.errors import InputError

transformers = pytest.importorskip("transformers")


class CountAttention(TorchDispatchMode):
    """Counts the fused attention kernels' forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.calls += "scaled_dot_product" in name and "backward" not in name
        return func(*args, **(kwargs or {}))


def _model(attn: str = "sdpa", layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=61)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.train()


def _step(model: nn.Module, ids: torch.Tensor, mode: TorchDispatchMode | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)  # the same dropout masks for every run
    loss = model(input_ids=ids, labels=ids).loss
    if mode is None:
        return loss, torch.autograd.grad(loss, params)
    with mode:
        return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("keep", [None, "attention", ("attention",)])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(keep):
    model = _model()
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    loss, grads = _step(model, ids)
    assert lk.enable_checkpointing(model, keep) is model and is_checkpointing(model)
    again, regrads = _step(model, ids)
    # the recomputation is the same arithmetic on the same inputs, with the same dropout draws
    assert torch.equal(again, loss)
    assert all(torch.equal(a, b) for a, b in zip(regrads, grads, strict=True))
    lk.disable_checkpointing(model)
    assert not is_checkpointing(model)


def test_keeping_the_attention_skips_its_recomputation():
    model = _model(layers=3)
    ids = torch.randint(0, 61, (1, 17), generator=torch.Generator().manual_seed(1))
    counts = {}
    for keep in (None, "attention"):
        lk.enable_checkpointing(model, keep)
        counter = CountAttention()
        _step(model, ids, counter)  # counts only inside the backward
        counts[keep] = counter.calls
        lk.disable_checkpointing(model)
    assert counts == {None: 3, "attention": 0}


def test_keeping_attention_that_is_not_fused_is_reported():
    model = _model(attn="eager", layers=3)
    lk.enable_checkpointing(model, "attention")
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"keep=\('attention',\): nothing was kept"):
        _step(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _step(model, ids)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + torch.tanh(self.inner(x))


def test_named_blocks_of_any_model_are_checkpointed_and_put_back():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["inner"], dropout=0.2))
    x = torch.randn(5, 8)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        torch.manual_seed(3)
        return torch.autograd.grad(model(x).square().sum(), params)

    want = grads()
    lk.enable_checkpointing(model, blocks=[model[0], model[1]])
    model[0].calls = 0
    got = grads()
    assert model[0].calls == 2  # the forward and its recomputation in the backward
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with torch.no_grad():
        model(x)
    assert model[0].calls == 3  # no checkpoint without gradients
    lk.disable_checkpointing(model)
    assert "forward" not in model[0].__dict__
    model[0].calls = 0
    grads()
    assert model[0].calls == 1


def test_a_deep_copy_checkpoints_its_own_blocks():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    lk.enable_checkpointing(model, blocks=list(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].inner.weight.zero_()
    x = torch.randn(3, 8)
    twin(x).sum().backward()
    assert twin[0].inner.weight.grad is not None and model[0].inner.weight.grad is None
    assert not torch.equal(twin(x), model(x))


def test_a_cache_asked_for_while_training_is_refused_and_pickles_carry_the_checkpoint():
    import io

    model = _model()
    model.config.use_cache = False
    lk.enable_checkpointing(model, keep="attention", blocks=model.model.layers)
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(1))
    with pytest.raises(InputError, match="asked to fill a key/value cache while training"):
        model(input_ids=ids, labels=ids, use_cache=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert is_checkpointing(loaded) and torch.equal(_step(loaded, ids)[0], _step(model, ids)[0])


def test_what_cannot_be_checkpointed_is_refused_by_name():
    with pytest.raises(InputError, match="fills a key/value cache in its forward"):
        lk.enable_checkpointing(_model(), blocks=_model().model.layers)
    with pytest.raises(InputError, match="keep = 5; allowed: None, a name or a list"):
        lk.enable_checkpointing(_model(), keep=5)
    with pytest.raises(InputError, match=r"keep = \['attention'\] is unknown"):
        lk.enable_checkpointing(_model(), keep=[["attention"]])
    model = nn.Sequential(Block())
    with pytest.raises(InputError, match="blocks must be a non-empty list"):
        lk.enable_checkpointing(model, blocks=model[0])
    with pytest.raises(InputError, match=r"keep = 'activations' is unknown; allowed: \['attention'\]"):
        lk.enable_checkpointing(_model(), keep="activations")
    with pytest.raises(InputError, match="Sequential is not a transformers model; name the modules"):
        lk.enable_checkpointing(model)
    with pytest.raises(InputError, match="a Block in blocks is not part of the model"):
        lk.enable_checkpointing(model, blocks=[Block()])
    with pytest.raises(InputError, match="blocks must be a non-empty list"):
        lk.enable_checkpointing(model, blocks=[])
