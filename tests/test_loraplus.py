"""LoRA+ parameter groups: PEFT's grouping and learning rates, usable by any torch optimizer and by
lk.Trainer (whose scheduler scales every group)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk

from .conftest import Mixed

peft = pytest.importorskip("peft")


def _models():
    torch.manual_seed(0)
    base = Mixed()
    options = {"r": 2, "target_modules": ["emb", "conv", "proj"], "modules_to_save": ["head"]}
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(alpha=4.0, bias="lora_only", use_dora=True, **options))
    theirs = peft.get_peft_model(copy.deepcopy(base),
                                 peft.LoraConfig(lora_alpha=4, bias="lora_only", use_dora=True, **options))  # fmt: skip
    return ours, theirs


def _key(name: str) -> str:
    """A parameter's name without PEFT's prefix and adapter names, in lorakit's spelling."""
    name = name.removeprefix("base_model.model.").replace(".default", "").replace("lora_embedding_", "lora_")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude").replace(".weight", "") if "lora_" in name \
        else name  # fmt: skip


def test_groups_give_every_parameter_peft_loraplus_learning_rate_and_decay():
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs = _models()
    want = {}
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0,
                                    loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-5)  # fmt: skip
    names = {id(p): n for n, p in theirs.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            want[_key(names[id(p)])] = (group["lr"], group["weight_decay"])
    groups = lk.loraplus_groups(ours, lr=1e-3, ratio=8.0, embedding_lr=1e-5, weight_decay=0.1)
    names = {id(p): n for n, p in ours.named_parameters()}
    got = {_key(names[id(p)]): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert set(got) == set(want)
    assert got == want
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in ours.parameters() if p.requires_grad)


def test_trainer_steps_with_loraplus_groups(tmp_path):
    ours, _ = _models()
    x = (torch.randint(0, 20, (8, 5)), torch.randn(8, 1, 8, 8))
    y = torch.randint(0, 3, (8,))
    config = lk.TrainerConfig(out_dir=str(tmp_path), max_steps=2, batch_size=4, lr=1e-2, warmup_steps=1,
                              save_every=None, log_every=1)  # fmt: skip
    trainer = lk.Trainer(ours, lambda m, b: torch.nn.functional.cross_entropy(m(*b[0]), b[1]),
                         lambda rows: ((x[0][rows], x[1][rows]), y[rows]), 8, config,
                         optimizer_factory=lk.loraplus(ours, ratio=4.0))  # fmt: skip
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["loraplus_B"] == 4 * lrs["loraplus_A"]  # the scheduler scales every group alike
    trainer.train()
    assert trainer.step == 2
    with pytest.raises(lk.InputError, match="ratio = 0; allowed: a finite number > 0"):
        lk.loraplus_groups(ours, lr=1e-3, ratio=0)
