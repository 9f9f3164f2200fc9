"""Tiny transformers language models and tokenizers, built offline, for recipe and export tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

#: ChatML, as SmolLM2 and Qwen use it (written here, not copied from a model)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(folder: Path, chat: bool = False) -> None:
    """A character-level tokenizer: printable ASCII (98 ids, < the tiny model's 101); with ``chat``
    also newline and the ChatML markers ``<|im_start|>`` / ``<|im_end|>`` (101 ids) and a template."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + len(vocab) for i, c in enumerate(string.printable[:95])})  # digits, letters, punct., space
    if chat:
        vocab.update({"\n": 98, "<|im_start|>": 99, "<|im_end|>": 100})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    extra = {}
    if chat:
        tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
        extra = {"chat_template": CHATML, "pad_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            **extra).save_pretrained(folder)  # fmt: skip


def tiny_llama_folder(folder: Path, chat: bool = False, seed: int = 0) -> None:
    """A 2-layer Llama (width 32, vocab 101) with random weights and ``char_tokenizer`` in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    char_tokenizer(folder, chat)


def as_if_trained(model, folder: Path, seed: int = 1) -> None:
    """LoRA r=4, alpha 8 on every linear of ``model`` with non-zero B (as after training), saved to ``folder``."""
    import lorakit as lk

    torch.manual_seed(seed)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lk.save_adapter(model, folder)
