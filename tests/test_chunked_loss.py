"""Chunked linear + cross-entropy: equal to full logits + ``F.cross_entropy`` (loss and gradients),
for odd chunk sizes, masked labels, label smoothing, biases, frozen, tied and LoRA heads, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.chunked_loss import chunked_cross_entropy
from lorakit.errors import InputError

from .tolerance import assert_close

N, D, V = 37, 16, 53


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / 4).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) / 4).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return h, w, b, y


def _reference(h, w, y, b=None, **kwargs):
    logits = F.linear(h.float(), w.float(), b.float() if b is not None else None)
    return F.cross_entropy(logits, y, **kwargs)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_equal_the_full_logits(chunk, smoothing, with_bias):
    h, w, b, y = _inputs()
    b = b if with_bias else None
    loss = chunked_cross_entropy(h, w, y, b, chunk=chunk, label_smoothing=smoothing)
    ref = _reference(h, w, y, b, label_smoothing=smoothing)
    assert_close(loss, ref, reduction=V, magnitude=ref.detach().abs())
    for got, want in zip(_grads(loss, h, w, b), _grads(ref, h, w, b), strict=True):
        assert_close(got, want, reduction=V, depth=2)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_other_reductions(reduction):
    h, w, _, y = _inputs(seed=1)
    loss = chunked_cross_entropy(h, w, y, chunk=7, reduction=reduction)
    ref = _reference(h, w, y, reduction=reduction)
    assert loss.shape == ref.shape
    assert_close(loss, ref, reduction=V * (N if reduction == "sum" else 1))
    if reduction == "none":
        assert torch.equal(loss[y == -100], torch.zeros(int((y == -100).sum())))


def test_a_frozen_head_gets_no_gradient_and_a_tied_one_accumulates_both_uses():
    h, w, _, y = _inputs(seed=2)
    frozen = w.detach()
    loss = chunked_cross_entropy(h, frozen, y, chunk=8)
    (grad_h,) = torch.autograd.grad(loss, [h])
    assert_close(grad_h, torch.autograd.grad(_reference(h, frozen, y), [h])[0], reduction=V, depth=2)
    # tied: the same parameter embeds the tokens and scores them
    emb = torch.nn.Embedding(V, D)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    chunked = chunked_cross_entropy(torch.tanh(emb(ids)), emb.weight, y, chunk=6)
    ref = _reference(torch.tanh(emb(ids)), emb.weight, y)
    (g1,), (g2,) = torch.autograd.grad(chunked, [emb.weight]), torch.autograd.grad(ref, [emb.weight])
    assert_close(g1, g2, reduction=V, depth=3)


def test_a_lora_head_passes_its_effective_weight_and_its_factors_get_gradients():
    h, w, _, y = _inputs(seed=4)
    w0 = w.detach()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, D, generator=g).requires_grad_(), torch.randn(V, 4, generator=g).requires_grad_()
    chunked = chunked_cross_entropy(h, w0 + 0.5 * b @ a, y, chunk=9)
    ref = _reference(h, w0 + 0.5 * b @ a, y)
    for got, want in zip(torch.autograd.grad(chunked, [a, b, h]), torch.autograd.grad(ref, [a, b, h]), strict=True):
        assert_close(got, want, reduction=V * 4, depth=3)


def test_bf16_inputs_compute_in_float32_and_return_bf16_gradients():
    h, w, b, y = _inputs(dtype=torch.bfloat16, seed=6)
    loss = chunked_cross_entropy(h, w, y, b, chunk=10)
    ref = _reference(h, w, y, b)  # the same bf16 values, float32 logits
    assert loss.dtype == torch.float32
    assert_close(loss, ref, reduction=V, magnitude=ref.detach().abs())
    got, want = _grads(loss, h, w, b), _grads(ref, h, w, b)
    assert [t.dtype for t in got] == [torch.bfloat16] * 3
    for x, r in zip(got, want, strict=True):
        assert_close(x.float(), r.float(), reduction=V, depth=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_under_autocast_the_loss_still_computes_in_float32(reduction):
    h, w, b, y = _inputs(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, y, b, chunk=9, reduction=reduction)
    ref = F.cross_entropy(h @ w.T + b, y, reduction=reduction)  # float32 throughout
    assert loss.dtype == torch.float32
    assert_close(loss, ref, reduction=V, magnitude=ref.detach().abs().max(), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward run under autocast too
        got = _grads(loss.sum(), h, w, b)
    for x, r in zip(got, _grads(ref.sum(), h, w, b), strict=True):
        assert_close(x, r, reduction=V, depth=2, dtype=torch.float32)


def test_no_token_sized_logits_are_kept_for_the_backward():
    h, w, _, y = _inputs(seed=7)
    big = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        big.append(t.numel() >= N * V // 2)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(h, w, y, chunk=4)
    assert big and not any(big)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _reference(h, w, y)
    assert any(big)  # the reference keeps logits of N × V: the check would see them


def test_all_tokens_ignored_and_bad_input():
    h, w, _, y = _inputs(seed=8)
    assert chunked_cross_entropy(h, w, torch.full_like(y, -100)).item() == 0.0  # F.cross_entropy: nan
    with pytest.raises(InputError, match=r"label 53 is outside the vocabulary of 53"):
        chunked_cross_entropy(h, w, torch.full_like(y, V))
    with pytest.raises(InputError, match=r"hidden \(37, 16\) and labels \(36,\) differ"):
        chunked_cross_entropy(h, w, y[:-1])
    with pytest.raises(InputError, match=r"weight \(53, 15\) does not map width 16"):
        chunked_cross_entropy(h, w[:, :-1], y)
    with pytest.raises(InputError, match="chunk = 0"):
        chunked_cross_entropy(h, w, y, chunk=0)


def _tiny(kind: str, tied: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                          tie_word_embeddings=tied)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(("kind", "tied", "train_head"), [("llama", False, False), ("llama", True, False),
                                                          ("llama", False, True), ("gpt2", True, False)])  # fmt: skip
def test_use_chunked_loss_gives_the_models_own_loss_and_gradients(kind, tied, train_head):
    import lorakit as lk

    model = _tiny(kind, tied)
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", modules_to_save=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.get_output_embeddings().weight.requires_grad_(train_head)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt that carries no loss
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0  # right padding
    labels[2, 12:] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(2)  # the same dropout masks (GPT-2) in both forwards
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    want = torch.autograd.grad(plain.loss, params)
    assert lk.use_chunked_loss(model, chunk=5) is model
    torch.manual_seed(2)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert_close(out.loss, plain.loss, reduction=101, magnitude=plain.loss.detach().abs(), depth=3)
    for got, ref in zip(torch.autograd.grad(out.loss, params), want, strict=True):
        assert_close(got, ref, reduction=101, depth=4)
    # Hugging Face Trainer's gradient accumulation: summed, then divided by its item count
    torch.manual_seed(2)
    summed = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=7).loss
    assert_close(summed * 7, out.loss.detach() * int((labels[:, 1:] != -100).sum()), reduction=101 * 30, depth=3)
    assert model(input_ids=ids).logits.shape == (3, 17, 101)  # without labels: the original forward
    lk.use_chunked_loss(model, chunk=None)
    assert model(input_ids=ids, labels=labels).logits is not None


def _loss_and_grads(model, ids, labels, params):
    torch.manual_seed(2)  # the same dropout masks in both forwards
    out = model(input_ids=ids, labels=labels)
    return out, torch.autograd.grad(out.loss, params)


def _chunked_equals_own(model, ids) -> None:
    """The model with the chunked loss gives its own loss and gradients (chunks of 4 rows)."""
    import lorakit as lk

    params = [p for p in model.parameters() if p.requires_grad]
    plain, want = _loss_and_grads(model, ids, ids, params)
    lk.use_chunked_loss(model, chunk=4)
    out, got = _loss_and_grads(model, ids, ids, params)
    assert_close(out.loss, plain.loss, reduction=101, magnitude=plain.loss.detach().abs(), depth=3)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, reduction=101, depth=4)


@pytest.mark.parametrize(("tied", "dropout", "lora_bias"), [(False, 0.0, False), (True, 0.0, False),
                                                             (False, 0.1, True)])  # fmt: skip
def test_a_lora_head_enters_the_chunked_loss_as_its_low_rank_term(tied, dropout, lora_bias):
    import lorakit as lk

    model = _tiny("llama", tied)
    config = lk.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], dropout=dropout, lora_bias=lora_bias)
    lk.inject(model, config)
    lk.add_adapter(model, lk.LoraConfig(r=3, target_modules=["lm_head"]), "second")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_bias" in name:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    for running in ("default", ["default", "second"]):
        lk.set_adapter(model, running)
        params = [p for p in model.parameters() if p.requires_grad]
        assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
        plain, want = _loss_and_grads(model, ids, labels, params)
        lk.use_chunked_loss(model, chunk=7)
        out, got = _loss_and_grads(model, ids, labels, params)
        lk.use_chunked_loss(model, chunk=None)
        assert out.logits is None
        assert_close(out.loss, plain.loss, reduction=101, magnitude=plain.loss.detach().abs(), depth=3)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, reduction=101, depth=4)
    with lk.disable_adapters(model):  # the head's base weight alone, no low-rank term
        plain = model(input_ids=ids, labels=labels).loss
        lk.use_chunked_loss(model, chunk=7)
        assert_close(model(input_ids=ids, labels=labels).loss, plain, reduction=101, magnitude=plain.abs(), depth=3)


def test_a_modules_to_save_head_trains_its_own_copy():
    import lorakit as lk

    model = _tiny("llama", False)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(1))
    _chunked_equals_own(model, ids)


def test_use_chunked_loss_refuses_what_it_cannot_compute():
    import lorakit as lk

    model = _tiny("llama", False)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(InputError, match="the output head is a DoraLinear on a Linear; allowed: torch.s nn.Linear"):
        lk.use_chunked_loss(model)
    with pytest.raises(InputError, match="is not a transformers causal LM"):
        lk.use_chunked_loss(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="chunk = 0"):
        lk.use_chunked_loss(_tiny("llama", False), chunk=0)


def test_lk_trainer_trains_a_chunked_loss_model_as_the_models_own_loss(tmp_path):
    import lorakit as lk

    ids = torch.randint(0, 101, (8, 15), generator=torch.Generator().manual_seed(3))
    adapters = []
    for chunked in (False, True):
        model = _tiny("llama", False)
        torch.manual_seed(0)
        lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
        if chunked:
            lk.use_chunked_loss(model, chunk=6)
        config = lk.TrainerConfig(out_dir=str(tmp_path / str(chunked)), max_steps=4, batch_size=4, lr=0.5,
                                  optimizer="sgd", progress=False)  # fmt: skip
        torch.manual_seed(1)  # the same dropout draws in both runs
        lk.Trainer(model, lambda m, b: m(input_ids=b, labels=b).loss, lambda idx: ids[idx], len(ids), config).train()
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, chunked = adapters
    for name, value in plain.items():  # four SGD steps (linear in the gradients) from the same start and data
        assert_close(chunked[name], value, reduction=101, magnitude=float(value.abs().max()), depth=8)


def test_a_head_adapter_that_runs_second_still_enters_the_loss():
    import lorakit as lk

    model = _tiny("llama", False)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["v_proj"]))
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["lm_head"]), "second")
    lk.set_adapter(model, ["default", "second"])  # the head holds only the second one
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    _chunked_equals_own(model, ids)


def test_copies_shifted_labels_and_tuples():
    import copy

    import lorakit as lk

    model = _tiny("llama", False)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    plain = model(input_ids=ids, labels=ids).loss
    lk.use_chunked_loss(model, chunk=4)
    twin = copy.deepcopy(model)  # its forward is its own, not the original's
    with torch.no_grad():
        twin.get_output_embeddings().weight.zero_()
    assert_close(twin(input_ids=ids, labels=ids).loss, torch.tensor(101.0).log(), reduction=101, depth=2)
    assert_close(model(input_ids=ids, labels=ids).loss, plain, reduction=101, magnitude=plain.abs(), depth=3)
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)  # transformers' shift_labels
    got = model(input_ids=ids, labels=ids, shift_labels=shifted).loss
    assert_close(got, plain, reduction=101, magnitude=plain.abs(), depth=3)
    assert isinstance(model(input_ids=ids, labels=ids, return_dict=False), tuple)


def test_a_trainable_token_head_and_second_derivatives_are_refused():
    import lorakit as lk

    model = _tiny("llama", True)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    with pytest.raises(InputError, match="the output head is a TrainableTokens"):
        lk.use_chunked_loss(model)
    h, w, b, y = _inputs(seed=9)
    for reduction in ("mean", "none"):
        loss = chunked_cross_entropy(h, w, y, b, chunk=7, reduction=reduction).sum()
        with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
            torch.autograd.grad(loss, h, create_graph=True)


def test_bad_chunked_loss_inputs_are_named():
    h, w, _, y = _inputs(seed=10)
    with pytest.raises(InputError, match=r"bias \(54,\) does not fit a vocabulary of 53"):
        chunked_cross_entropy(h, w, y, torch.zeros(54))
    with pytest.raises(InputError, match="low_rank must be a pair"):
        chunked_cross_entropy(h, w, y, low_rank=torch.zeros(37, 2))
    with pytest.raises(InputError, match="label_smoothing = '0.1'"):
        chunked_cross_entropy(h, w, y, label_smoothing="0.1")
    with pytest.raises(InputError, match="labels are torch.float32; allowed: class indices in int64 or int32"):
        chunked_cross_entropy(h, w, y.float())


def test_the_forward_keeps_its_signature_survives_pickling_and_restores_what_was_there():
    import functools
    import inspect
    import io

    import lorakit as lk

    model = _tiny("llama", False)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    want = model(input_ids=ids, labels=ids)
    lk.use_chunked_loss(model, chunk=4)
    # Hugging Face Trainer keeps the dataset columns the forward's signature names
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(model.forward).parameters)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded(input_ids=ids, labels=ids).logits is None  # still the chunked loss, on the loaded weights
    assert_close(loaded(input_ids=ids, labels=ids).loss, want.loss, reduction=101, depth=3)
    out = model(input_ids=ids, labels=ids, return_dict=False)
    assert out[1] is None and len(out) == len(want.to_tuple())  # the logits' place is kept
    lk.use_chunked_loss(model, chunk=None)
    seen = []
    hook = model.forward  # another library's per-instance forward (as accelerate installs)
    model.forward = functools.wraps(hook)(lambda *a, **k: seen.append(1) or hook(*a, **k))
    lk.use_chunked_loss(model, chunk=4)
    assert model(input_ids=ids).logits.shape == (2, 9, 101) and seen == [1]  # without labels: what was there
    lk.use_chunked_loss(model, chunk=None)
    model(input_ids=ids, labels=ids)
    assert seen == [1, 1]  # the earlier forward is back
    from peft import LoraConfig, get_peft_model

    with pytest.raises(InputError, match="is a PEFT wrapper; apply it to the transformers model"):
        lk.use_chunked_loss(get_peft_model(_tiny("llama", False), LoraConfig(r=2, target_modules=["q_proj"])))
