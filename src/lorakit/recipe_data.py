"""The ``[data]`` section of a recipe: training examples, an optional held-out split, and the loss::

    [data]
    kind = "chat"                # one JSON object per line: {"messages": [{"role", "content"}, ...]}
    path = "train.jsonl"         #   or {"prompt", "completion"}; loss on the assistant's tokens only
    seq = 512                    # tokens per example (longer ones are cut, with a warning)
    packing = false              # true: lay examples end to end in rows of seq tokens, each
                                 #   attending only to itself (transformers' packed position ids)
    eval_fraction = 0.1          # hold out this share of the examples (drawn by the recipe's seed),
    # eval_path = "eval.jsonl"   #   or evaluate on another file of the same kind
    eval_batch = 8               # examples per evaluation forward

    # kind = "jsonl"             # one {"text": "..."} per line, cut into rows of seq tokens
    # kind = "text"              # files = "corpus/*.txt", cut into rows of seq tokens
    # factory = "mypkg.data:build"   # "module:callable" -> (collate, num_examples, loss_fn)

With a held-out split the run reports ``eval_loss`` (mean next-token cross-entropy per loss-bearing
token, nats) and ``eval_ppl`` (its exponential) before training, every ``[train] eval_every``
steps, and at the end. ``chat`` rows are rendered by ``lorakit.chat_data``; they need a transformers
causal LM (``model(input_ids=..., labels=...).loss``).
"""

from __future__ import annotations

import glob
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .chat_data import IGNORE, collate_rows, encode, jsonl_rows, pack
from .devices import move_to
from .errors import is_whole
from .recipe_files import RecipeError, check_keys, check_type
from .recipe_models import call_factory, resolve_factory

BUILT_IN = ("chat", "jsonl", "text")


@dataclass
class RecipeData:
    """What a recipe trains on: ``collate(indices)`` → batch, ``loss_fn(model, batch)`` → loss, and
    ``evaluate(model)`` → ``{"eval_loss", "eval_ppl"}`` when the section holds out examples."""

    collate: Callable[[Any], Any]
    num_examples: int
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    eval_examples: int = 0
    packed_from: int = 0  # with packing: the examples laid into the num_examples rows


def _factory_data(spec: dict[str, Any], tokenizer: Any) -> RecipeData:
    ref = spec["factory"]
    factory = resolve_factory("data", ref)
    kwargs = {k: v for k, v in spec.items() if k != "factory"}
    try:
        takes_tokenizer = "tokenizer" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_tokenizer = False
    if takes_tokenizer:
        if "tokenizer" in kwargs:
            raise RecipeError("[data]: 'tokenizer' is not a key: the model's tokenizer is passed to the factory")
        kwargs["tokenizer"] = tokenizer
    built = call_factory("data", ref, factory, kwargs)
    if not (isinstance(built, tuple) and len(built) == 3 and callable(built[0]) and callable(built[2])
            and isinstance(built[1], numbers.Integral) and built[1] > 0):  # fmt: skip
        raise RecipeError(f"[data] factory {ref!r} returned {type(built).__name__}; expected "
                          "(collate, num_examples, loss_fn) with a positive num_examples")  # fmt: skip
    return RecipeData(built[0], int(built[1]), built[2])


def _check_vocab(ids: list[int], tokenizer: Any, vocab_size: int | None) -> None:
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        source = "the tokenizer" if tokenizer is not None else "bytes, ids 0-255"
        raise RecipeError(f"[data]: token id {max(ids)} ({source}) does not fit the model's vocabulary of {vocab_size}")


def _text_rows(spec: dict[str, Any], tokenizer: Any, vocab_size: int | None) -> torch.Tensor:
    """``[n, seq]`` token rows cut from the section's text."""
    if spec["kind"] == "jsonl":
        path = _file(spec, "path")
        texts = []
        for line_no, row in jsonl_rows(path):
            if not isinstance(row.get("text"), str):
                raise RecipeError(f"{path}, line {line_no}: expected an object with a string field 'text'")
            texts.append(row["text"])
        if not texts:
            raise RecipeError(f"{path}: no rows")
    else:
        files = sorted(glob.glob(spec.get("files", "")))
        if not files:
            raise RecipeError(f"[data] files = {spec.get('files')!r} matches no file")
        texts = [Path(f).read_text(errors="replace") for f in files]
    joined = "\n\n".join(texts)
    ids = tokenizer(joined)["input_ids"] if tokenizer is not None else list(joined.encode())
    _check_vocab(ids, tokenizer, vocab_size)
    seq = int(spec.get("seq", 128))
    n = (len(ids) - 1) // seq
    if n < 1:
        raise RecipeError(f"[data]: {len(ids)} tokens do not fill one sequence of {seq}")
    return torch.tensor(ids[: n * seq], dtype=torch.long).reshape(n, seq)


def _file(spec: dict[str, Any], key: str) -> Path:
    path = Path(spec.get(key, ""))
    if not path.is_file():
        raise RecipeError(f"[data] {key} = {str(path)!r}: no such file")
    return path


def _chat_examples(path: Path, tokenizer: Any, vocab_size: int | None, seq: int) -> list[tuple[list[int], list[int]]]:
    examples, cut, dropped = [], 0, 0
    for line_no, row in jsonl_rows(path):
        ids, labels = encode(row, tokenizer, f"{path}, line {line_no}")
        _check_vocab(ids, tokenizer, vocab_size)
        if len(ids) > seq:
            cut += 1
            ids, labels = ids[:seq], labels[:seq]
        if all(label == IGNORE for label in labels[1:]):  # the first label is never predicted
            dropped += 1
            continue
        examples.append((ids, labels))
    said = ([f"{cut} example(s) longer than seq = {seq} tokens were cut to it"] if cut else []) + (
        [f"{dropped} example(s) without an answer token (after any cut) were left out"] if dropped else [])  # fmt: skip
    if said:
        warnings.warn(f"{path}: {'; '.join(said)}", UserWarning, stacklevel=3)
    if not examples:
        raise RecipeError(f"{path}: no example with an answer token within seq = {seq}")
    return examples


def _split(n: int, fraction: float | None) -> tuple[list[int], list[int]]:
    """Training and held-out indices; the held-out ones drawn by torch's generator (the data stage's seed)."""
    if not fraction:
        return list(range(n)), []
    held = max(1, round(fraction * n))
    if held >= n:
        raise RecipeError(f"[data] eval_fraction = {fraction} of {n} examples leaves none to train on")
    chosen = set(torch.randperm(n)[:held].tolist())
    return [i for i in range(n) if i not in chosen], sorted(chosen)


def _evaluator(
    collate: Callable[[list[int]], Any], count: int, batch: int, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    tokens: Callable[[Any], int],
) -> Callable[[nn.Module], dict[str, float]]:  # fmt: skip
    """Mean loss per loss-bearing token over ``count`` held-out examples, in eval mode, no gradients."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        total, seen = 0.0, 0
        try:
            with torch.no_grad():
                for start in range(0, count, batch):
                    b = collate(list(range(start, min(start + batch, count))))
                    n = tokens(b)
                    total += float(loss_fn(model, move_to(b, device))) * n
                    seen += n
        finally:
            model.train(was_training)
        mean = total / max(seen, 1)
        return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 700.0))}

    return evaluate


def _check_common(spec: dict[str, Any], kind: str) -> None:
    keys = {"kind", "seq", "eval_fraction", "eval_batch"} | ({"path", "files"} if kind != "chat" else
                                                              {"path", "packing", "eval_path"})  # fmt: skip
    check_keys("data", spec, keys)
    for key in ("path", "files", "eval_path"):
        check_type("data", spec, key, "a path string", lambda v: isinstance(v, str))
    check_type("data", spec, "seq", "an integer >= 1", lambda v: is_whole(v, 1))
    check_type("data", spec, "eval_batch", "an integer >= 1", lambda v: is_whole(v, 1))
    check_type("data", spec, "packing", "true or false", lambda v: isinstance(v, bool))
    check_type("data", spec, "eval_fraction", "a number between 0 and 1 (exclusive)",
               lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1)  # fmt: skip
    if "eval_fraction" in spec and "eval_path" in spec:
        raise RecipeError("[data] eval_fraction and eval_path both given; allowed: one way to hold out examples")


def build_data(spec: dict[str, Any], tokenizer: Any, vocab_size: int | None = None) -> RecipeData:
    """The data section's examples and loss; token ids are checked against ``vocab_size`` (the
    model's input embedding) when given."""
    if "factory" in spec:
        return _factory_data(spec, tokenizer)
    kind = spec.get("kind")
    if kind not in BUILT_IN:
        raise RecipeError(f"[data] kind = {kind!r}; known: {', '.join(BUILT_IN)} (or name a factory = "
                          "'module:callable')")  # fmt: skip
    _check_common(spec, kind)
    eval_batch = int(spec.get("eval_batch", 8))
    if kind != "chat":
        rows = _text_rows(spec, tokenizer, vocab_size)
        train, held = _split(len(rows), spec.get("eval_fraction"))
        train_rows, held_rows = rows[train], rows[held]

        def text_loss(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
            return m(input_ids=b, labels=b).loss

        evaluate = None
        if held:
            evaluate = _evaluator(lambda idx: held_rows[idx], len(held), eval_batch, text_loss,
                                  lambda b: b.shape[0] * (b.shape[1] - 1))  # fmt: skip
        return RecipeData(lambda idx: train_rows[idx], len(train), text_loss, evaluate, len(held))
    seq = int(spec.get("seq", 512))
    examples = _chat_examples(_file(spec, "path"), tokenizer, vocab_size, seq)
    train, held = _split(len(examples), spec.get("eval_fraction"))
    held_examples = [examples[i] for i in held]
    if "eval_path" in spec:
        held_examples = _chat_examples(_file(spec, "eval_path"), tokenizer, vocab_size, seq)
    rows: list[tuple[list[int], ...]] = [examples[i] for i in train]
    packed_from = len(rows) if spec.get("packing") else 0
    if packed_from:
        rows = pack(rows, seq)  # type: ignore[assignment, arg-type]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)

    def chat_loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        # no KV cache in training: transformers would build one, and a cache turns off its packed masks
        return m(**b, use_cache=False).loss

    def collate(idx: Any) -> dict[str, torch.Tensor]:
        return collate_rows([rows[i] for i in torch.as_tensor(idx).reshape(-1).tolist()], pad)

    evaluate = None
    if held_examples:
        evaluate = _evaluator(lambda idx: collate_rows([held_examples[i] for i in idx], pad), len(held_examples),
                              eval_batch, chat_loss, lambda b: int((b["labels"][:, 1:] != IGNORE).sum()))  # fmt: skip
    return RecipeData(collate, len(rows), chat_loss, evaluate, len(held_examples), packed_from)
