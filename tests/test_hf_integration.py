"""Hugging Face integration: generate with unmerged and merged adapters, gradient checkpointing,
the transformers Trainer training a lorakit-adapted model, and ``model.save_pretrained`` saving the
adapter (never a checkpoint that a plain ``from_pretrained`` would silently misread)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import lorakit as lk
from lorakit.pretrained import AdapterSavePretrained

from .conftest import randomize_adapters
from .models import tiny_gpt2, tiny_llama, token_batch
from .tolerance import assert_close

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
        assert_close(got[name], want[name], reduction=1024, depth=10, msg=name)


@pytest.mark.parametrize("chunked", [False, True], ids=["own-loss", "chunked-loss"])
def test_transformers_trainer_trains_only_the_adapter(tmp_path, chunked):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    if chunked:  # the Trainer keeps the dataset columns the forward's signature names
        lk.use_chunked_loss(model, chunk=5)
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


# ---------------------------------------------------------------------------------------- save_pretrained
def _from_folder(tmp_path):
    """A tiny Llama saved to ``tmp_path/base`` and loaded from there (so it knows its origin)."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()


def test_save_pretrained_of_an_injected_model_writes_the_adapter_that_from_pretrained_loads(tmp_path, caplog):
    """It used to write the wrapped state dict, which a plain from_pretrained read as a model with
    q_proj/v_proj re-initialised at random (only a load-report line said so)."""
    from transformers import AutoModelForCausalLM

    model = _from_folder(tmp_path)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.3)
    with caplog.at_level(logging.WARNING, logger="lorakit.pretrained"):
        model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "saved only the adapter (default) in PEFT's format" in caplog.text
    assert "lorakit.merge_and_unload(model).save_pretrained(dir)" in caplog.text
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        # transformers finds adapter_config.json: it loads the base named there and the adapter on it (peft)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert any("lora_A" in n for n, _ in loaded.named_parameters()), "loaded with the adapter"
        assert_close(loaded(input_ids=ids).logits, want, reduction=48, depth=13)
        fresh = lk.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "out")
        assert torch.equal(fresh(input_ids=ids).logits, want)


def test_save_pretrained_lays_out_several_adapters_as_peft_and_comes_back_with_the_last(tmp_path):
    model = _from_folder(tmp_path)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["v_proj"]), name="other")
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").is_file()  # "default" at the top, as PEFT
    assert (tmp_path / "out" / "other" / "adapter_model.safetensors").is_file()
    lk.delete_adapter(model, "default")
    assert isinstance(model.__dict__["save_pretrained"], AdapterSavePretrained)
    lk.delete_adapter(model, "other")
    assert "save_pretrained" not in model.__dict__, "with no adapter left, transformers' own method is back"
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file() and (tmp_path / "plain" / "model.safetensors").is_file()


def test_merge_and_unload_then_save_pretrained_gives_the_whole_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _from_folder(tmp_path)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.3)
    plain = lk.merge_and_unload(model)
    plain.save_pretrained(tmp_path / "merged")
    ids = token_batch()
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert torch.equal(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_saves_its_own_adapter(tmp_path, how):
    model = _from_folder(tmp_path)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    if how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        other = torch.load(tmp_path / "model.pt", weights_only=False)
    assert other.save_pretrained.model is other
    randomize_adapters(other, scale=0.3)  # the copy's adapter differs from the original's
    other.save_pretrained(tmp_path / "out")
    fresh = lk.load_adapter(_from_folder(tmp_path / "again"), tmp_path / "out")
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, other(input_ids=ids).logits)
        assert not torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_transformers_trainer_checkpoints_hold_the_adapter(tmp_path):
    """Trainer calls save_pretrained(dir, state_dict=..., is_main_process=...): the checkpoint holds
    the adapter in PEFT's format, never a full-model file that loads wrong. (Resuming such a
    checkpoint with transformers' Trainer is refused by transformers: it finds no model file.)"""
    from transformers import Trainer, TrainingArguments

    model = _from_folder(tmp_path)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = token_batch(batch=8, length=6)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="steps", save_steps=2, disable_tqdm=True, logging_steps=100, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, folder
        assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}, folder
    fresh = lk.load_adapter(_from_folder(tmp_path / "again"), tmp_path / "final")
    ids = token_batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
