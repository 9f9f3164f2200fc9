"""Per-row adapters in one batch: equal to running each row alone, in inference and training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import Mixed, SeedMLP, randomize_adapters
from .models import tiny_gpt2, token_batch
from .tolerance import assert_close

# widest reductions and chained steps of the models below (Mixed: proj's 80 inputs; SeedMLP: 784;
# tiny GPT-2: 4·n_embd = 128 over 2 blocks of attention, MLP and the head)
MIXED, MLP, GPT2 = {"reduction": 80, "depth": 4}, {"reduction": 784, "depth": 4}, {"reduction": 128, "depth": 10}

ROUTE = ["b", "a", None, "c", "a", "b", "c"]


def _three_adapters(model: nn.Module, targets, dropout: float = 0.0) -> None:
    lk.inject(model, lk.LoraConfig(r=2, alpha=4.0, target_modules=targets, dropout=dropout), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=5, alpha=3.0, target_modules=targets, dropout=dropout), name="b")
    lk.add_adapter(model, lk.LoraConfig(r=3, alpha=8.0, target_modules=targets, use_rslora=True), name="c")
    randomize_adapters(model, scale=0.3)


def _alone(model: nn.Module, name: str | None, *row_inputs):
    if name is None:
        with lk.disable_adapters(model):
            return model(*row_inputs)
    lk.set_adapter(model, name)
    return model(*row_inputs)


def _rows(t: torch.Tensor, i: int) -> torch.Tensor:
    return t[i : i + 1]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mixed_batch_equals_each_row_alone_all_layer_types(dropout):
    torch.manual_seed(0)
    model = Mixed()
    _three_adapters(model, ["emb", "conv", "proj", "head"], dropout)
    model.eval()
    g = torch.Generator().manual_seed(2)
    ids, img = torch.randint(0, 20, (len(ROUTE), 5), generator=g), torch.randn(len(ROUTE), 1, 8, 8, generator=g)
    with torch.no_grad(), lk.route(model, ROUTE):
        mixed = model(ids, img)
    with torch.no_grad():
        for i, name in enumerate(ROUTE):
            assert_close(mixed[i : i + 1], _alone(model, name, _rows(ids, i), _rows(img, i)), **MIXED)


def test_mixed_batch_gpt2_conv1d_and_index_tensor():
    model = tiny_gpt2()
    _three_adapters(model, ["c_attn", "c_proj", "c_fc", "wte"])
    ids = token_batch(batch=len(ROUTE), length=6)
    order = list(lk.adapter_configs(model))
    index = torch.tensor([order.index(n) if n else -1 for n in ROUTE])
    with torch.no_grad():
        with lk.route(model, ROUTE):
            by_name = model(input_ids=ids).logits
        with lk.route(model, index):
            by_index = model(input_ids=ids).logits
        assert torch.equal(by_name, by_index)
        for i, name in enumerate(ROUTE):
            want = _alone(model, name, _rows(ids, i)).logits
            assert_close(by_name[i : i + 1], want, **GPT2)


@pytest.mark.parametrize("tokens", [1, 4])
def test_training_gradients_per_adapter_equal_training_alone(tokens):
    torch.manual_seed(0)
    model = SeedMLP()
    _three_adapters(model, ["fc1", "fc2", "fc3"])
    lk.set_trainable(model, ["a", "b", "c"])
    x, y = torch.randn(len(ROUTE), tokens, 784), torch.randint(0, 10, (len(ROUTE), tokens))
    ce = nn.CrossEntropyLoss(reduction="sum")

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ce(logits.reshape(-1, 10), target.reshape(-1))

    with lk.route(model, ROUTE):
        loss_fn(model(x), y).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert mixed, "the routed batch must produce adapter gradients"
    model.zero_grad(set_to_none=True)
    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(ROUTE) if n == name]
        lk.set_adapter(model, name)
        loss_fn(model(x[rows]), y[rows]).backward()
        for pname, p in model.named_parameters():
            if pname.endswith(f".{name}"):
                assert_close(mixed[pname], p.grad, reduction=784 * len(ROUTE) * tokens, depth=4)
        model.zero_grad(set_to_none=True)
    # rows routed to None train nothing; base weights never get gradients
    assert all("lora_" in n for n in mixed)


def test_bank_follows_adapter_changes():
    torch.manual_seed(0)
    model = SeedMLP().eval()
    _three_adapters(model, ["fc1", "fc2"])
    x = torch.randn(3, 784)
    with torch.no_grad():
        with lk.route(model, ["a", "b", "c"]):
            first = model(x)
        with torch.no_grad():
            model.fc1.lora_B["b"].mul_(2.0)  # an in-place update must invalidate the cached bank
        with lk.route(model, ["a", "b", "c"]):
            second = model(x)
        assert torch.equal(first[0], second[0]) and not torch.allclose(first[1], second[1])
        lk.add_adapter(model, lk.LoraConfig(r=7, target_modules=["fc2"]), name="d")
        model.fc2.lora_B["d"].normal_()
        with lk.route(model, ["d", "b", "c"]):
            third = model(x)
        assert_close(third[0:1], _alone(model, "d", x[0:1]), **MLP)
        with lk.route(model, ["d", "a", "d"]):  # fc1 lacks "d": its rows must get no adapter there
            fifth = model(x)
        for i, name in enumerate(["d", "a", "d"]):
            assert_close(fifth[i : i + 1], _alone(model, name, x[i : i + 1]), **MLP)
        lk.delete_adapter(model, "b")
        with lk.route(model, ["d", "a", "c"]):
            fourth = model(x)
        assert_close(fourth[1:2], _alone(model, "a", x[1:2]), **MLP)


def test_route_errors():
    model = SeedMLP()
    _three_adapters(model, ["fc1"])
    with pytest.raises(KeyError, match=r"unknown adapters \['zz'\]"), lk.route(model, ["a", "zz"]):
        pass
    with pytest.raises(ValueError, match="out of range"), lk.route(model, torch.tensor([0, 3])):
        pass
    with pytest.raises(ValueError, match="given 2 rows but a layer received a batch of 3"), lk.route(model, ["a", "b"]):
        model(torch.randn(3, 784))
    assert model.fc1.route is None, "leaving the block restores normal forwards"
    lk.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), lk.route(model, ["a"]):
        pass


def test_generate_with_beams_matches_each_prompt_alone():
    model = tiny_gpt2()
    _three_adapters(model, ["c_attn", "c_fc"])
    prompts = token_batch(batch=3, length=4)
    names = ["c", None, "a"]
    kw = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    with torch.no_grad(), lk.route(model, names):
        together = model.generate(prompts, **kw)
    for i, name in enumerate(names):
        if name is None:
            with lk.disable_adapters(model):
                alone = model.generate(prompts[i : i + 1], **kw)
        else:
            lk.set_adapter(model, name)
            alone = model.generate(prompts[i : i + 1], **kw)
        assert torch.equal(together[i : i + 1], alone), f"row {i} ({name})"


@pytest.mark.parametrize("tokens", [1, 3])  # embedding_bag expand (decode) and batched GEMM expand
def test_gathered_bank_equals_a_loop_over_rows(tokens):
    """The bank kernel against the definition: row b gets x_b A[k_b]ᵀ B[k_b], gradients too."""
    g = torch.Generator().manual_seed(0)
    n_slots, rank, n_in, n_out, rows = 5, 3, 7, 6, 9
    A = torch.randn(n_slots, rank, n_in, generator=g, requires_grad=True)
    B = torch.randn(n_slots, rank, n_out, generator=g, requires_grad=True)
    x = torch.randn(rows, tokens, n_in, generator=g)
    slots = torch.randint(0, n_slots, (rows,), generator=g)
    want = torch.stack([x[b] @ A[k].T @ B[k] for b, k in enumerate(slots.tolist())])
    want_grads = torch.autograd.grad(want.square().sum(), (A, B))
    got = lk.bank.bank_delta_gathered(x, A, B, slots)
    assert_close(got, want, reduction=n_in, depth=2)
    grads = torch.autograd.grad(got.square().sum(), (A, B))
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b, reduction=rows * tokens * max(n_in, n_out), depth=4)
    unused = sorted(set(range(n_slots)) - set(slots.tolist()))
    assert unused and all(torch.count_nonzero(gr[unused]) == 0 for gr in grads)  # unused slots: no gradient


def test_a_route_refuses_what_would_silently_change_its_rows():
    torch.manual_seed(0)
    model = SeedMLP().eval()
    lk.inject(model, lk.LoraConfig(r=2, alpha=2.0, target_modules=["fc1", "fc2"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=2, alpha=2.0, target_modules=["fc1"]), name="b")
    randomize_adapters(model)
    x = torch.randn(2, 784)
    with torch.no_grad(), lk.route(model, ["a", "b"]):
        before = model(x)
        with pytest.raises(RuntimeError, match="inside lorakit.route"):
            lk.merge(model)  # the routed rows would add ΔW on top of the merged weight
        with pytest.raises(RuntimeError, match="inside lorakit.route"):
            lk.delete_adapter(model, "b")  # its bank would keep running
        assert torch.equal(model(x), before) and not lk.is_merged(model)
    assert sorted(lk.adapter_configs(model)) == ["a", "b"]
    with pytest.raises(ValueError, match="1-D integer tensor"):
        lk.route(model, torch.tensor([True, False])).__enter__()
    with pytest.raises(TypeError, match="one adapter name per row"):
        lk.route(model, "a").__enter__()


def test_routed_training_drops_each_rows_adapter_inputs_at_its_own_rate():
    """Dropout really runs in a routed training batch, per row at the rate of that row's adapter.
    With A = B = I and x = 1 each adapter's output is its dropout mask (scaled): count its zeros."""
    n, rates = 64, {"low": 0.1, "high": 0.6, "none": 0.0}
    root = nn.Module()
    root.layer = nn.Linear(n, n)
    for i, (name, p) in enumerate(rates.items()):
        (lk.inject if i == 0 else lk.add_adapter)(
            root, lk.LoraConfig(r=n, alpha=n, target_modules=["layer"], dropout=p), name=name
        )
        with torch.no_grad():
            root.layer.lora_A[name].copy_(torch.eye(n))
            root.layer.lora_B[name].copy_(torch.eye(n))
    lk.set_trainable(root, list(rates))
    route = [name for name in rates for _ in range(200)]
    x = torch.ones(len(route), n)
    torch.manual_seed(0)
    with lk.route(root, route):
        delta = (root.layer(x) - root.layer.base_layer(x)).detach()
    for k, (name, p) in enumerate(rates.items()):
        rows = delta[200 * k : 200 * (k + 1)]
        dropped = (rows.abs() < 0.5).float().mean().item()
        assert abs(dropped - p) < 5 * (p * (1 - p) / rows.numel()) ** 0.5 + 1e-4, name
