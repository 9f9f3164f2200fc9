"""Hugging Face integration: generate with unmerged and merged adapters, gradient checkpointing,
and the transformers Trainer training a lorakit-adapted model."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk

from .conftest import randomize_adapters
from .models import tiny_gpt2, tiny_llama, token_batch

pytest.importorskip("transformers")


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_same_unmerged_merged_unmerged_and_unloaded(build):
    model = build()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, scale=0.3)
    ids = token_batch(batch=2, length=5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with lk.disable_adapters(model):
            base = model.generate(ids, **kwargs)
        unmerged = model.generate(ids, **kwargs)
        lk.merge(model)
        merged = model.generate(ids, **kwargs)
        lk.unmerge(model)
        again = model.generate(ids, **kwargs)
        unloaded = lk.merge_and_unload(model).generate(ids, **kwargs)
    assert not torch.equal(base, unmerged), "the adapter should change what the model writes"
    assert torch.equal(unmerged, merged) and torch.equal(unmerged, again) and torch.equal(unmerged, unloaded)


def _adapter_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, scale=0.3)
    model.train()
    ids = token_batch(batch=2, length=9)
    want = _adapter_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # reentrant checkpointing needs an input that requires grad (the embeddings are frozen)
        model.enable_input_require_grads()
    assert model.is_gradient_checkpointing
    got = _adapter_grads(model, ids)
    assert set(got) == set(want) and len(got) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_transformers_trainer_trains_only_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    # a learnable language: every token is followed by the next one (mod 100)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = (
        torch.arange(12)[None, :] + torch.randint(0, 100, (16, 1), generator=torch.Generator().manual_seed(1))
    ) % 100
    data = [{"input_ids": row + 1, "labels": row + 1} for row in rows]
    with torch.no_grad():
        before = sum(model(input_ids=d["input_ids"][None], labels=d["labels"][None]).loss.item() for d in data)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=8, learning_rate=2e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=5, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    model.eval()
    with torch.no_grad():
        after = sum(model(input_ids=d["input_ids"][None], labels=d["labels"][None]).loss.item() for d in data)
    assert result.global_step == 60
    assert after < 0.92 * before, (before, after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"the Trainer changed frozen parameter {n}"
    lk.save_adapter(model, tmp_path / "adapter")  # the trained adapter saves as usual
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
