"""Chat and instruction data for recipes: rendering, assistant-only labels, packing, held-out evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorakit.chat_data import IGNORE, collate_rows, encode, pack
from lorakit.cli import main
from lorakit.recipe_data import build_data
from lorakit.recipes import RecipeError, run, stage_seed

from .tiny_lm import tiny_llama_folder
from .tolerance import assert_close

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Sum 2+2?"},
    {"role": "assistant", "content": "4!"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_llama_folder(path, chat=True)
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_only_the_assistant_turns_and_their_end_markers_carry_loss(tokenizer):
    ids, labels = encode({"messages": CONVERSATION}, tokenizer, "row")
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == _ids(tokenizer, whole)
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert learned == _ids(tokenizer, "Yo<|im_end|>\n4!<|im_end|>\n")
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels, strict=True))
    # the first answer starts right after the first generation prompt
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    n = len(_ids(tokenizer, prompt))
    assert labels[:n] == [IGNORE] * n and labels[n] == ids[n]


def test_an_opening_assistant_turn_learns_its_words_not_the_template_header(tokenizer):
    turns = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "Yo"}]  # fmt: skip
    ids, labels = encode({"messages": turns}, tokenizer, "row")
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert learned == _ids(tokenizer, "Hi<|im_end|>\nYo<|im_end|>\n")
    # answers that also occur in the template's own text: the header is found by position, not by search
    for first in ("assistant", "s", "<|im_start|>", ""):
        ids, labels = encode({"messages": [{"role": "assistant", "content": first}, *turns[1:]]}, tokenizer, "row")
        learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
        assert learned == _ids(tokenizer, f"{first}<|im_end|>\nYo<|im_end|>\n"), first
    template = tokenizer.chat_template
    tokenizer.chat_template = "<|im_start|>system\nYou are a bot.<|im_end|>\n" + template  # a default system prompt
    try:
        ids, labels = encode({"messages": [{"role": "assistant", "content": "You"}]}, tokenizer, "row")
        learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
        assert learned == _ids(tokenizer, "You<|im_end|>\n")
    finally:
        tokenizer.chat_template = template


def test_extra_message_keys_reach_the_template_and_its_errors_name_the_row(tokenizer):
    template = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system only first') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
        "{% if m.get('tool_calls') %}call {{ m['tool_calls'][0]['name'] }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        row = {"messages": [{"role": "user", "content": "Weather?"},
                            {"role": "assistant", "content": None, "tool_calls": [{"name": "sky"}]}]}  # fmt: skip
        ids, labels = encode(row, tokenizer, "row")
        assert [t for t, label in zip(ids, labels, strict=True) if label != IGNORE] == _ids(
            tokenizer, "call sky<|im_end|>\n")  # fmt: skip
        bad = {"messages": [*CONVERSATION[1:3], {"role": "system", "content": "late"}, CONVERSATION[4]]}
        with pytest.raises(RecipeError, match=r"d.jsonl, line 7: the chat template refuses this conversation "
                                              r"\(TemplateError: system only first\)"):  # fmt: skip
            encode(bad, tokenizer, "d.jsonl, line 7")
    finally:
        tokenizer.chat_template = template


def test_sentencepiece_style_tokenizers_get_the_ids_of_the_whole_text():
    """A Metaspace tokenizer tokenized piece by piece would put a word-start marker before every
    piece; the whole conversation is tokenized once, and the answers' tokens carry the loss."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    corpus = ["[INST] Hi there [/INST]Yo friend</s>[INST] more [/INST]Fine</s>"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", chat_template=template)
    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Yo friend"},
             {"role": "user", "content": "more"}, {"role": "assistant", "content": "Fine"}]  # fmt: skip
    ids, labels = encode({"messages": turns}, fast, "row")
    assert ids == _ids(fast, fast.apply_chat_template(turns, tokenize=False))
    pieces = fast.convert_ids_to_tokens([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
    learned = "".join(pieces).replace("▁", " ")
    # every answer character is learned (a token that merged the prompt's last word with the
    # answer's first is learned whole); the user turns are not
    assert "Yo friend</s>" in learned and "Fine</s>" in learned
    assert "Hi" not in learned and "more" not in learned


def test_prompt_completion_rows_are_one_user_and_one_assistant_turn(tokenizer):
    pair = encode({"prompt": "Hi", "completion": "Yo"}, tokenizer, "row")
    turns = encode({"messages": CONVERSATION[1:3]}, tokenizer, "row")
    assert pair == turns


def test_without_a_template_or_tokenizer_prompt_completion_still_work(tokenizer):
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        ids, labels = encode({"prompt": "Q:", "completion": "A"}, tokenizer, "row")
        assert ids == _ids(tokenizer, "Q:A</s>") and labels == [IGNORE, IGNORE, *_ids(tokenizer, "A</s>")]
        with pytest.raises(RecipeError, match="row: the tokenizer has no chat template"):
            encode({"messages": CONVERSATION}, tokenizer, "row")
    finally:
        tokenizer.chat_template = template
    ids, labels = encode({"prompt": "ab", "completion": "c"}, None, "row")
    assert ids == [97, 98, 99] and labels == [IGNORE, IGNORE, 99]
    with pytest.raises(RecipeError, match="need a tokenizer with a chat template"):
        encode({"messages": CONVERSATION}, None, "row")


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    template = tokenizer.chat_template
    # shows only the last user turn: earlier turns change as the conversation grows
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'user' or loop.index0 == messages|length - 1 or "
        "loop.index0 == messages|length - 2 %}{{ m['role'] }}:{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    try:
        with pytest.raises(RecipeError, match="data.jsonl, line 3: the chat template renders earlier turns"):
            encode({"messages": CONVERSATION}, tokenizer, "data.jsonl, line 3")
    finally:
        tokenizer.chat_template = template


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with a string 'role' and a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"no assistant message.*roles: \['user'\]"),
        ({"prompt": "hi"}, r"expected 'messages' .* keys: \['prompt'\]"),
        ({"prompt": "hi", "completion": 3}, "expected 'messages'"),
    ],
)
def test_bad_rows_are_named(tokenizer, row, message):
    with pytest.raises(RecipeError, match=message):
        encode(row, tokenizer, "row")


def test_packed_rows_compute_what_each_example_computes_alone(folder, tokenizer):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": "Hi", "completion": "Yo"}, {"messages": CONVERSATION}, {"prompt": "x" * 7, "completion": "y"}]
    examples = [encode(r, tokenizer, "row") for r in rows]
    packed = pack(examples, seq=100)  # 25 + 75 tokens, then 29
    assert len(packed) == 2 and [len(p[0]) for p in packed] == [len(examples[0][0]) + len(examples[1][0]),
                                                                len(examples[2][0])]  # fmt: skip
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=implementation).eval()
        batch = collate_rows(packed, pad_id=0)
        assert "attention_mask" not in batch and batch["position_ids"][1, len(packed[1][0])] == 0  # padding restarts
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
            start = 0
            for ids, _ in examples[:2]:
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                assert_close(logits[0, start : start + len(ids)], alone, reduction=32, depth=2, msg=implementation)
                start += len(ids)
            packed_loss = model(**batch, use_cache=False).loss
        # the same tokens carry loss, so the mean loss over them is the unpacked batch's
        unpacked = collate_rows(examples, pad_id=0)
        with torch.no_grad():
            loss = model(**unpacked, use_cache=False).loss
        assert int((batch["labels"] != IGNORE).sum()) == int((unpacked["labels"][:, 1:] != IGNORE).sum())
        assert_close(packed_loss, loss, reduction=32 * 3, depth=2, msg=implementation)


def _recipe(tmp_path: Path, folder: Path, data: str, steps: int = 4, extra: str = "") -> Path:
    recipe = tmp_path / "chat.toml"
    recipe.write_text(f"""
out_dir = "{tmp_path / "run"}"
[model]
hf_pretrained = "{folder}"
[data]
{data}
[lora]
r = 4
alpha = 8.0
target_modules = "all-linear"
[train]
max_steps = {steps}
batch_size = 4
lr = 0.02
log_every = 1
{extra}
""")
    return recipe


def _chat_file(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            turns = [*CONVERSATION[:3], {"role": "user", "content": f"Sum {i}+{i}?"},
                     {"role": "assistant", "content": f"{2 * i}!"}]  # fmt: skip
            row = {"messages": turns} if i % 2 else {"prompt": f"Say {i}", "completion": f"{i}{i}"}
            f.write(json.dumps(row) + "\n")
    return path


def test_a_chat_recipe_trains_and_reports_held_out_loss(tmp_path, folder, tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    data = _chat_file(tmp_path / "chat.jsonl", 40)
    recipe = _recipe(tmp_path, folder, f'kind = "chat"\npath = "{data}"\nseq = 96\neval_fraction = 0.25\n'
                     "eval_batch = 3", steps=12, extra="eval_every = 6")  # fmt: skip
    result = run(recipe)
    assert result["examples"] == 30 and result["eval_examples"] == 10
    before, after = result["eval_before"], result["eval"]
    assert after["eval_loss"] < before["eval_loss"] - 0.1  # measured: 4.61 -> 4.36 nats
    assert after["eval_ppl"] == pytest.approx(math.exp(after["eval_loss"]))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [6, 12]
    assert [m for m in metrics if "eval_loss" in m][-1]["eval_loss"] == pytest.approx(after["eval_loss"])

    # "before" is the base model's mean loss per answer token on the held-out rows, computed by hand
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    torch.manual_seed(stage_seed(0, "data"))  # the recipe's draw: the data stage of seed 0
    held = build_data({"kind": "chat", "path": str(data), "seq": 96, "eval_fraction": 0.25}, tokenizer, 101)
    train_ids = {tuple(held.collate([i])["input_ids"][0].tolist()) for i in range(held.num_examples)}
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    total = count = 0
    for row in rows:
        ids, labels = encode(row, tokenizer, "row")
        if tuple(ids) in train_ids:
            continue  # a training example (every row differs; the held-out draw is by seed)
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        keep = target != IGNORE
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    assert len(rows) - len(train_ids) == 10
    assert before["eval_loss"] == pytest.approx(total / count, rel=1e-4)

    assert main(["train", str(recipe), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss on 10 examples: before" in out and "after" in out


def test_packing_and_an_eval_file_in_a_recipe(tmp_path, folder):
    train, held = _chat_file(tmp_path / "train.jsonl", 24), _chat_file(tmp_path / "eval.jsonl", 6)
    recipe = _recipe(tmp_path, folder, f'kind = "chat"\npath = "{train}"\nseq = 128\npacking = true\n'
                     f'eval_path = "{held}"', steps=3)  # fmt: skip
    result = run(recipe)
    assert result["eval_examples"] == 6 and result["examples"] < 24  # several examples per packed row
    assert result["packed_from"] == 24
    assert math.isfinite(result["eval"]["eval_loss"])


def test_long_examples_are_cut_with_a_warning_and_answerless_ones_left_out(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 50, "completion": "c"}) + "\n"
                    + json.dumps({"prompt": "p", "completion": "c" * 50}) + "\n")  # fmt: skip
    warning = r"2 example\(s\) longer than seq = 30 tokens were cut to it; 1 example\(s\) without an answer"
    with pytest.warns(UserWarning, match=warning):
        data = build_data({"kind": "chat", "path": str(path), "seq": 30}, tokenizer, 101)
    assert data.num_examples == 1 and data.collate([0])["input_ids"].shape == (1, 30)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('kind = "chat"\npath = "D"\npacking = "yes"', r"\[data\] packing = 'yes'.*true or false"),
        ('kind = "chat"\npath = "D"\neval_fraction = 1.5', r"\[data\] eval_fraction = 1.5.*between 0 and 1"),
        ('kind = "chat"\npath = "D"\neval_fraction = 0.5\neval_path = "D"', "eval_fraction and eval_path both"),
        ('kind = "chat"\npath = "D"\nseq = 0', r"\[data\] seq = 0.*integer >= 1"),
        ('kind = "chat"\npath = "D"\neval_batch = 0', r"\[data\] eval_batch = 0"),
        ('kind = "chat"\npath = "D"\nfiles = "x"', r"\[data\].*files"),
        ('kind = "chat"\npath = "nowhere.jsonl"', r"\[data\] path = 'nowhere.jsonl': no such file"),
        ('kind = "chat"\npath = "D"\neval_fraction = 0.999', "leaves none to train on"),
        ('kind = "jsonl"\npath = "D"\npacking = true', r"\[data\].*packing"),
        ('kind = "chats"\npath = "D"', "known: chat, jsonl, text"),
    ],
)
def test_bad_data_sections_are_one_line(tmp_path, folder, capsys, data, message):
    path = _chat_file(tmp_path / "d.jsonl", 6)
    recipe = _recipe(tmp_path, folder, data.replace('"D"', f'"{path}"'))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2 and err.startswith("lorakit: error: ")
    import re

    assert re.search(message, err), err


def test_text_data_can_hold_out_rows_too(tmp_path, folder):
    corpus = tmp_path / "c.txt"
    corpus.write_text("LoRA trains a small low-rank update. " * 60)
    recipe = _recipe(tmp_path, folder, f'kind = "text"\nfiles = "{corpus}"\nseq = 32\neval_fraction = 0.2', steps=2)
    result = run(recipe)
    assert result["examples"] + result["eval_examples"] == (len("LoRA trains a small low-rank update. " * 60) - 1) // 32
    assert result["eval_examples"] == round(0.2 * ((len("LoRA trains a small low-rank update. " * 60) - 1) // 32))
