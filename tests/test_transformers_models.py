"""GPT-2, Llama and BERT built from transformers configs: inject, train a step, merge and unload."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk

from .conftest import randomize_adapters
from .models import logits, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from .tolerance import assert_close, close_tol

pytest.importorskip("transformers")

CASES = [
    (
        "gpt2",
        tiny_gpt2,
        ["c_attn", "c_proj", "c_fc"],
        2 * (4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32)),
    ),
    ("llama", tiny_llama, ["q_proj", "v_proj"], 2 * (4 * (32 + 32) + 4 * (32 + 16))),
    ("bert", tiny_bert, ["query", "value"], 2 * 2 * 4 * (32 + 32)),
]


def _loss(model, ids):
    classifier = "SequenceClassification" in type(model).__name__
    labels = torch.zeros(ids.shape[0], dtype=torch.long) if classifier else ids
    return model(input_ids=ids, labels=labels).loss


@pytest.mark.parametrize(("name", "build", "targets", "n_adapter"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("by", ["names", "all-linear"])
def test_inject_train_merge_unload(name, build, targets, n_adapter, by):
    model = build()
    ids = token_batch()
    keys = list(model.state_dict().keys())
    base_logits = logits(model, ids)
    cfg = lk.LoraConfig(r=4, alpha=8.0, target_modules=targets if by == "names" else "all-linear")
    lk.inject(model, cfg)
    counts = lk.count_parameters(model)
    if by == "names":
        assert counts.trainable == n_adapter
    else:
        head = model.get_output_embeddings()
        assert all(layer.base_layer is not head for _, layer in lk.lora_layers(model))
        assert counts.trainable > 0
    torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=0)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, ids).backward()
        opt.step()
    model.eval()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)

    tuned = logits(model, ids)
    assert not torch.allclose(tuned, base_logits)
    plain = lk.merge_and_unload(model)
    assert list(plain.state_dict().keys()) == keys
    assert_close(logits(plain, ids), tuned, reduction=128, depth=10)


def test_gpt2_generate_with_adapter():
    """Greedy ``generate`` (KV cache) with an adapter is the argmax loop written out here, without a
    cache; merged and unloaded it gives the same tokens; and they are not the base model's."""
    model = tiny_gpt2()
    ids = token_batch(batch=2, length=4)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        base = model.generate(ids, **kw)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(model, scale=0.5)
    with torch.no_grad():
        out = model.generate(ids, **kw)
        seq = ids
        for _ in range(kw["max_new_tokens"]):
            last = model(input_ids=seq).logits[:, -1]
            top = last.topk(2, dim=-1).values
            # the argmax is decided by more than the rounding that separates a cached from an uncached
            # (or a merged from an unmerged) evaluation, so the tokens must agree exactly
            noise = close_tol(torch.float32, reduction=128, magnitude=float(last.abs().max()), depth=10)
            assert (top[:, 0] - top[:, 1] > 2 * noise).all()
            seq = torch.cat([seq, last.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert (out[:, ids.shape[1] :] != base[:, ids.shape[1] :]).any(), "the adapter changes the greedy tokens"
    plain = lk.merge_and_unload(model)
    assert not list(lk.lora_layers(plain))
    with torch.no_grad():
        assert torch.equal(plain.generate(ids, **kw), out)
