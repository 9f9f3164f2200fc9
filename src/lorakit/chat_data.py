"""Instruction and chat examples for causal language models: token ids and labels, with the loss
on the assistant's tokens only.

A row is ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion":
...}`` (a user turn and the assistant's answer). A conversation is rendered with the tokenizer's
chat template and cut at each assistant turn::

    prompt_k = render(messages[:a_k], add_generation_prompt=True)   # what the model sees
    full_k   = render(messages[:a_k + 1])                           # ... and what it must write

``full_k[len(prompt_k):]`` (the answer and the template's end-of-turn marker) carries the loss;
everything between two answers (system, user, tool turns, the template's headers, BOS; for a
conversation that opens with the assistant, what precedes its text) is context
with label -100. The whole text is tokenized at once and a token carries loss when its characters
overlap an answer (fast tokenizers' offsets), so SentencePiece-style tokenizers see the ids they
see at inference; a slow tokenizer tokenizes piece by piece. A template that rewrites earlier turns
(``full_{k-1}`` not a prefix of ``prompt_k``, e.g. one that drops past reasoning) is refused, naming
the row: its masks could not be right. Without a tokenizer (byte-level models) only
``prompt``/``completion`` rows work: bytes of the prompt, then of the completion.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .recipe_files import RecipeError

IGNORE = -100


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; a line that is not a JSON
    object is a ``RecipeError`` naming it."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecipeError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise RecipeError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The row's conversation; every key of a message is kept (a template may read ``tool_calls``,
    ``name``, ...), ``role`` must be a string and ``content`` a string (or null beside other keys)."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecipeError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str) or (m.get("content") is None
                                                                                        and len(m) > 2))  # fmt: skip
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and content_ok):
                raise RecipeError(f"{where}: messages[{i}] must be an object with a string 'role' and a string "
                                  "'content' (null only beside other keys such as tool_calls)")  # fmt: skip
        if not any(m["role"] == "assistant" for m in messages):
            raise RecipeError(f"{where}: no assistant message, so nothing to learn; roles: "
                              f"{sorted({m['role'] for m in messages})}")  # fmt: skip
        return [dict(m) for m in messages]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    raise RecipeError(f"{where}: expected 'messages' (a list of role/content objects) or string 'prompt' and "
                      f"'completion'; keys: {sorted(row)}")  # fmt: skip


def _pieces(tokenizer: Any, messages: list[dict[str, Any]], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, carries loss)`` pieces, in order."""

    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as err:  # templates raise on conversations they do not accept
            raise RecipeError(f"{where}: the chat template refuses this conversation ({type(err).__name__}: "
                              f"{err})") from None  # fmt: skip

    pieces, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        full = render(messages[: k + 1], False)
        prompt = render(messages[:k], True) if k else _opening_header(render, m, full, where)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise RecipeError(f"{where}: the chat template renders earlier turns differently once message {k} is "
                              "added, so the assistant's tokens cannot be told apart; use a template that only "
                              "appends")  # fmt: skip
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = render(messages, False)
    if not rest.startswith(done):
        raise RecipeError(f"{where}: the chat template renders the whole conversation differently from its turns")
    pieces.append((rest[len(done) :], False))
    return [(text, loss) for text, loss in pieces if text]


def _tokenize(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids of the whole text, tokenized at once as at inference over a conversation; a token carries
    loss when it overlaps an answer piece (by the fast tokenizer's character offsets). A tokenizer
    without offsets tokenizes piece by piece."""
    if not getattr(tokenizer, "is_fast", False):
        tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in pieces]
        ids = [t for piece in tokens for t in piece]
        return ids, [t if loss else IGNORE for piece, (_, loss) in zip(tokens, pieces, strict=True) for t in piece]
    spans, at = [], 0
    for text, loss in pieces:
        if loss:
            spans.append((at, at + len(text)))
        at += len(text)
    encoded = tokenizer("".join(text for text, _ in pieces), add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    hits = [any(s < b and (e > a or (e == s and s >= a)) for a, b in spans) for s, e in encoded["offset_mapping"]]
    return ids, [t if hit else IGNORE for t, hit in zip(ids, hits, strict=True)]


#: stands in for an opening assistant turn's text while its header is found
SENTINEL = "\x00lorakit-answer\x00"


def _opening_header(render: Callable[[list[dict[str, Any]], bool], str], message: dict[str, Any], full: str,
                    where: str) -> str:  # fmt: skip
    """What a conversation that opens with the assistant renders before the answer (BOS, a default
    system prompt, the turn's header). transformers refuses to render an empty conversation, so the
    turn is rendered with a sentinel for its text, and the header is what precedes the sentinel."""
    probe = render([{**message, "content": SENTINEL}], False)
    header = probe[: probe.find(SENTINEL)] if SENTINEL in probe else None
    if header is None or not full.startswith(header):
        raise RecipeError(f"{where}: the template does not show the opening assistant turn's text as given, so its "
                          "header cannot be told apart from the answer; start with a user or system turn")  # fmt: skip
    return header


def encode(row: dict[str, Any], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """``(input ids, labels)`` of one row: labels equal the ids on the assistant's tokens, -100 elsewhere."""
    messages = _messages(row, where)
    if tokenizer is None:
        if "messages" in row:
            raise RecipeError(f"{where}: 'messages' rows need a tokenizer with a chat template; the model has no "
                              "tokenizer (bytes): use prompt/completion rows")  # fmt: skip
        prompt, answer = list(messages[0]["content"].encode()), list(messages[1]["content"].encode())
        return prompt + answer, [IGNORE] * len(prompt) + answer
    if not getattr(tokenizer, "chat_template", None):
        if "messages" in row:
            raise RecipeError(f"{where}: the tokenizer has no chat template to render 'messages' with")
        eos = getattr(tokenizer, "eos_token", None) or ""
        pieces = [(messages[0]["content"], False), (messages[1]["content"] + eos, True)]
    else:
        pieces = _pieces(tokenizer, messages, where)
    return _tokenize(tokenizer, pieces)


def pack(examples: list[tuple[list[int], list[int]]], seq: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Examples laid end to end in rows of at most ``seq`` tokens, in order, an example never split:
    ``(ids, labels, position ids)`` per row, positions restarting at 0 for each example, which is how
    transformers tells packed examples apart (each attends only to itself)."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for ids, labels in examples:
        if not rows or len(rows[-1][0]) + len(ids) > seq:
            rows.append(([], [], []))
        rows[-1][0].extend(ids)
        # as unpacked: an example's first token is predicted from nothing, so it carries no loss
        rows[-1][1].extend([IGNORE, *labels[1:]])
        rows[-1][2].extend(range(len(ids)))
    return rows


def collate_rows(rows: list[tuple[list[int], ...]], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch. Unpacked rows ``(ids, labels)`` get an attention mask; packed rows
    ``(ids, labels, positions)`` get position ids (the padding is a segment of its own) and no mask,
    so the attention stays within each example."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    batch = {"input_ids": ids, "labels": labels}
    if len(rows[0]) == 3:
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, _, pos) in enumerate(rows):
            positions[i, : len(pos)] = torch.tensor(pos)
            positions[i, len(pos) :] = torch.arange(width - len(pos))
        batch["position_ids"] = positions
    else:
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            mask[i, : len(row[0])] = 1
        batch["attention_mask"] = mask
    for i, row in enumerate(rows):
        ids[i, : len(row[0])] = torch.tensor(row[0])
        labels[i, : len(row[1])] = torch.tensor(row[1])
    return batch
