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
    with (
        pytest.raises(lk.InputError, match="given 2 names but a layer received a batch of 3 rows"),
        lk.route(model, ["a", "b"]),
    ):
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


@pytest.mark.parametrize("tokens", [1, 3])  # embedding_bag shrink and expand (decode), batched GEMMs
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
    got = lk.bank.bank_delta_gathered(x, A.transpose(1, 2), B, slots)  # the bank holds A as [S, in, R]
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


# ---------------------------------------------------------------------------------------- row counts
BATCH_MISMATCH = (
    "lorakit.route was given 2 names but a layer received a batch of 4 rows (layers must see the batch dimension "
    "first, one row per name; each name covers k consecutive rows only inside model.generate(...) of the routed "
    "model, or with lorakit.route(model, names, expand=k))"
)


class SeqFirst(nn.Module):
    """A layer that sees ``[T, B, d]``: its first dimension is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x.transpose(0, 1)).transpose(0, 1)


def _two_adapters(model: nn.Module, targets) -> None:
    lk.inject(model, lk.LoraConfig(r=2, target_modules=targets), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=targets), name="b")
    randomize_adapters(model, scale=1.0)


def test_a_layer_that_sees_the_sequence_first_is_refused_not_misrouted():
    model = SeqFirst()
    _two_adapters(model, ["fc1"])
    x = torch.randn(2, 4, 8)  # B=2, T=4: fc1 receives 4 "rows"; repeating 2 names over them mixed rows up
    with torch.no_grad(), lk.route(model, ["a", "b"]), pytest.raises(lk.InputError) as raised:
        model(x)
    assert str(raised.value) == BATCH_MISMATCH
    assert model.fc1.route is None


def test_more_rows_than_names_is_refused_unless_expand_says_so():
    torch.manual_seed(0)
    model = SeedMLP().eval()
    _two_adapters(model, ["fc1", "fc2"])
    x = torch.randn(4, 784)
    with torch.no_grad(), lk.route(model, ["a", "b"]), pytest.raises(lk.InputError) as raised:
        model(x)  # used to run silently as [a, a, b, b]
    assert str(raised.value) == BATCH_MISMATCH
    with torch.no_grad():
        with lk.route(model, ["a", "b"], expand=2):
            expanded, unexpanded = model(x), model(x[:2])  # one row per name still runs
        with lk.route(model, ["a", "a", "b", "b"]):
            explicit = model(x)
        with lk.route(model, ["a", "b"]):
            plain = model(x[:2])
        with lk.route(model, ["a", "b"], expand=2), pytest.raises(lk.InputError, match="batch of 6 rows"):
            model(torch.randn(6, 784))  # expand=2 allows 2 or 4 rows, not 6
    assert torch.equal(expanded, explicit) and torch.equal(unexpanded, plain)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(lk.InputError, match=rf"lorakit.route: expand = {bad!r}; allowed: a whole number >= 1"):
            lk.route(model, ["a", "b"], expand=bad).__enter__()
    assert model.fc1.route is None


def _generate_alone(model: nn.Module, name: str | None, prompt: torch.Tensor, **kw) -> torch.Tensor:
    if name is None:
        with lk.disable_adapters(model):
            return model.generate(prompt, **kw)
    lk.set_adapter(model, name)
    return model.generate(prompt, **kw)


def test_generate_with_num_return_sequences_routes_each_prompts_sequences():
    """Sampling with top_k=1 is greedy, but expands every prompt num_return_sequences times."""
    model = tiny_gpt2()
    _three_adapters(model, ["c_attn", "c_fc"])
    prompts = token_batch(batch=3, length=4)
    names = ["c", None, "a"]
    kw = {"max_new_tokens": 5, "pad_token_id": 0}
    with torch.no_grad(), lk.route(model, names):
        together = model.generate(prompts, do_sample=True, top_k=1, num_return_sequences=2, **kw)
    assert together.shape[0] == 6 and "generate" not in model.__dict__
    with torch.no_grad():
        for i, name in enumerate(names):
            alone = _generate_alone(model, name, prompts[i : i + 1], do_sample=False, **kw)
            assert torch.equal(together[2 * i : 2 * i + 2], alone.expand(2, -1)), f"prompt {i} ({name})"


def test_generate_sampling_expands_each_prompt_to_its_own_adapter():
    """True sampling, same seed: routing 3 prompts with num_return_sequences=2 equals routing the 6
    already-expanded rows one name each (the expansion is exact, row for row)."""
    model = tiny_gpt2()
    _three_adapters(model, ["c_attn", "c_fc"])
    randomize_adapters(model, scale=1.0)
    prompts = token_batch(batch=3, length=4)
    names = ["c", None, "a"]
    kw = {"max_new_tokens": 6, "pad_token_id": 0, "do_sample": True, "top_k": 0, "temperature": 1.0}

    def sample(row_names, ids, n):
        torch.manual_seed(7)
        with torch.no_grad(), lk.route(model, row_names):
            return model.generate(ids, num_return_sequences=n, **kw)

    together = sample(names, prompts, 2)
    expanded = sample([n for n in names for _ in range(2)], prompts.repeat_interleave(2, 0), 1)
    tiled = sample(names * 2, prompts.repeat_interleave(2, 0), 1)  # rows paired with the wrong adapters
    assert torch.equal(together, expanded)
    assert not torch.equal(together, tiled)


def test_routed_sampling_equals_each_adapter_sampling_alone_under_the_same_seed():
    """True sampling: a routed batch of prompts, each row with its own adapter, draws the tokens that
    the whole batch draws with that row's adapter chosen by name (or none) under the same seed.
    (generate samples row by row from its own slice of the random stream: a row's draw depends on
    its own probabilities only, so any adapter applied to the wrong row changes that row.)"""
    model = tiny_gpt2()
    _three_adapters(model, ["c_attn", "c_fc"])
    randomize_adapters(model, scale=1.0)
    prompts = token_batch(batch=4, length=4)
    names = ["c", None, "a", "b"]
    # tiny_gpt2's logits are near zero (init std 0.02): a low temperature lets the adapters matter
    kw = {"max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": None, "do_sample": True, "top_k": 0,
          "temperature": 0.05}  # fmt: skip
    with torch.no_grad():
        torch.manual_seed(11)
        with lk.route(model, names):
            routed = model.generate(prompts, **kw)
        alone = {}
        for name in dict.fromkeys(names):
            torch.manual_seed(11)
            alone[name] = _generate_alone(model, name, prompts, **kw)
        torch.manual_seed(12)
        with lk.route(model, names):
            reseeded = model.generate(prompts, **kw)
    assert routed.shape == (4, 10) and not torch.equal(routed, reseeded)  # it samples: the seed matters
    for i, name in enumerate(names):
        assert torch.equal(routed[i], alone[name][i]), f"row {i} ({name})"
        others = [other for other in alone if other != name]
        assert any(not torch.equal(routed[i], alone[other][i]) for other in others), f"row {i}: adapters agree"


def test_generate_needs_one_prompt_per_name():
    model = tiny_gpt2()
    _three_adapters(model, ["c_attn"])
    with torch.no_grad(), lk.route(model, ["a", "b"]), pytest.raises(lk.InputError) as raised:
        model.generate(token_batch(batch=4, length=3), max_new_tokens=2, pad_token_id=0)
    assert str(raised.value) == (
        "lorakit.route was given 2 names but generate received a batch of 4 prompts; allowed: one name per prompt "
        "(generate then routes each prompt's beams and sequences itself)"
    )
    assert "generate" not in model.__dict__, "leaving the route gives the model its own generate back"
