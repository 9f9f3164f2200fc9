"""Small models for the library tests, built in code (nothing is downloaded): an MLP, tiny Hugging
Face models from configs with random weights, and model/data factories for recipe tests."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn


class SeedMLP(nn.Module):
    """A ReLU MLP whose linear layers are named ``fc1, fc2, ...``; by default 784→256→128→10
    (235,146 parameters), the shape of the flipped-MNIST classifier."""

    def __init__(self, sizes: Sequence[int] = (784, 256, 128, 10)) -> None:
        super().__init__()
        self.depth = len(sizes) - 1
        for k, (n_in, n_out) in enumerate(pairwise(sizes), start=1):
            setattr(self, f"fc{k}", nn.Linear(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(1, self.depth + 1):
            x = getattr(self, f"fc{k}")(x)
            if k < self.depth:
                x = torch.relu(x)
        return x


def mlp_factory(hidden: int = 16, classes: int = 4) -> nn.Module:
    """Recipe model factory (``factory = "tests.models:mlp_factory"``): 8 inputs → ``hidden`` → ``classes``."""
    torch.manual_seed(0)
    return SeedMLP((8, hidden, classes))


def toy_data(n: int = 256, classes: int = 4, tokenizer=None):
    """Recipe data factory: ``n`` random 8-dimensional points labelled by their largest coordinate
    (of the first ``classes``); ``tokenizer`` is accepted (and unused) to check it is passed."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :classes].argmax(1)
    return (lambda idx: (x[idx], y[idx])), n, (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))


NOT_CALLABLE = 42


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def _llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=32,
        **extra,
    )


def tiny_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config()).eval()


def tiny_mixtral() -> nn.Module:
    """A two-layer Mixtral with 4 experts (their weights stacked in 3-D parameters), 2 per token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    sizes = {"vocab_size": 101, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 4, "num_experts_per_tok": 2}
    cfg = MixtralConfig(**sizes, **heads)
    return MixtralForCausalLM(cfg).eval()


class TransposedExperts(nn.Module):
    """Expert weights stored ``[E, in, out]`` (``is_transposed``, as some MoE implementations do);
    every expert runs and their outputs are averaged, gated by ``up``."""

    is_transposed = True

    def __init__(self, experts: int = 3, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(experts, d_in, d_out) * 0.4)
        self.up = nn.Parameter(torch.randn(experts, d_in, d_out) * 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.einsum("bi,eio->beo", x, self.gate)
        return (torch.sigmoid(gate) * torch.einsum("bi,eio->beo", x, self.up)).mean(1)


class ExpertNet(nn.Module):
    """proj (Linear) → TransposedExperts → head (Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.experts = TransposedExperts()
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(torch.tanh(self.proj(x))))


def expert_net() -> nn.Module:
    torch.manual_seed(0)
    return ExpertNet().eval()


def tiny_llama_classifier() -> nn.Module:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(_llama_config(num_labels=3, pad_token_id=0)).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        vocab_size=101,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def token_batch(batch: int = 3, length: int = 7, vocab: int = 101, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out
