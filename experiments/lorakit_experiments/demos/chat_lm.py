"""Instruction tuning of a chat language model, shared by the real-model demos.

An example is the chat-formatted instruction followed by the answer and ``<|im_end|>``; the loss
is next-token cross-entropy on the answer tokens only (prompt positions carry label -100).
Generation is greedy, batched with left padding, through ``model.generate`` (KV cache).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IGNORE = -100


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """Token ids of the chat prompt for ``instruction``, ending where the assistant's answer starts."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def example(tokenizer, instruction: str, answer: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one training example: the answer and the end-of-turn token are
    learned, the prompt is not."""
    prompt = prompt_ids(tokenizer, instruction)
    target = tokenizer(answer.strip() + tokenizer.eos_token, add_special_tokens=False).input_ids
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


@dataclass
class TrainStats:
    steps: int
    examples: int
    tokens: int
    seconds: float
    median_step_s: float
    losses: list[float]
    checkpoint: str


def train(
    model: nn.Module,
    examples: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    out_dir: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool = True,
    adapter: str = "default",
) -> TrainStats:
    """Train what ``model`` leaves trainable through :class:`lorakit.Trainer` (AdamW, 10% warmup,
    cosine decay, clipping at 1.0); the final checkpoint is written to ``out_dir/checkpoints``."""
    from lorakit import Trainer, TrainerConfig

    config = TrainerConfig(
        out_dir=out_dir, max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
        schedule="cosine", max_grad_norm=1.0, log_every=5, seed=seed, progress=progress, desc=desc, keep_last=1,
        adapter=adapter, overwrite=True,  # a demo owns its folder
    )  # fmt: skip
    tokens = 0

    def collate_indices(idx: list[int]) -> dict[str, torch.Tensor]:
        nonlocal tokens
        batch = collate([examples[i] for i in idx], pad_id)
        tokens += int(batch["attention_mask"].sum())
        return batch

    trainer = Trainer(model, lm_loss, collate_indices, len(examples), config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    return TrainStats(
        steps=trainer.step, examples=trainer.step * batch_size, tokens=tokens, seconds=seconds,
        median_step_s=statistics.median(trainer.step_seconds), losses=trainer.losses,
        checkpoint=str(trainer.complete_checkpoints()[0]),
    )  # fmt: skip


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
    adapters: Sequence[str | None] | None = None,
    sort_by_length: bool = True,
) -> list[list[int]]:
    """The greedy tokens generated for tokenized prompts (at most ``max_new_tokens`` each; end-of-turn
    and the padding after it included), batched by similar length (less padding), returned in the
    prompts' order (``sort_by_length=False``: batches in the given order). With ``adapters``, prompt
    ``k`` runs adapter ``adapters[k]`` (None: the base model), mixed freely within each batch."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from lorakit import route

    model.eval()
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k])) if sort_by_length else list(range(len(prompts)))
    out: list[list[int]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[k]) for k in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, k in enumerate(chunk):  # left padding: every row's answer starts at column `width`
            ids[row, width - len(prompts[k]) :] = torch.tensor(prompts[k])
            mask[row, width - len(prompts[k]) :] = 1
        routing = route(model, [adapters[k] for k in chunk]) if adapters is not None else nullcontext()
        with routing:
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        for row, k in enumerate(chunk):
            out[k] = generated[row, width:].tolist()
    return out


def decode(tokenizer, ids: list[int]) -> str:
    """Generated tokens as text, without special tokens."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate(model: nn.Module, tokenizer, prompts: Sequence[list[int]], **kwargs: Any) -> list[str]:
    """Greedy answers for tokenized prompts, decoded without special tokens (``generate_ids``'
    arguments)."""
    return [decode(tokenizer, ids) for ids in generate_ids(model, tokenizer, prompts, **kwargs)]
