"""LoRA on ``nn.Embedding`` (weight ``[num_embeddings, dim]``)::

    y = base(ids) + s · A[:, ids]ᵀ Bᵀ,     A ∈ R^{r×num}, B ∈ R^{dim×r}
    ΔW = s · (B A)ᵀ   ([num, dim], the weight's layout)

As in PEFT, A starts at zero and B normal (ΔW = 0 either way), and no dropout is applied to ids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer
from .eligibility import own_forward_problem, plain_weight_problem
from .registry import register_kind


class LoraEmbedding(LoraLayer):
    """LoRA on an embedding table: row ``i`` of the table gains ``s · B A[:, i]``."""

    kind = "embedding"
    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape

    @classmethod
    def base_problem(cls, module: nn.Module) -> str | None:
        return plain_weight_problem(module) or own_forward_problem(module, nn.Embedding)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def reset_adapter(self, name: str, init: str) -> None:
        if init not in ("default", "gaussian"):
            raise ValueError(f"init={init!r} initialises linear layers only (as in PEFT); use 'default' or 'gaussian'")
        nn.init.zeros_(self.lora_A[name])
        nn.init.normal_(self.lora_B[name])

    @staticmethod
    def factor_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        return (B @ A) * scaling  # [dim, num]

    @classmethod
    def weight_delta(cls, A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
        return cls.factor_delta(A, B, scaling).T  # the table stores [num, dim], whatever the flag says

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.low_rank(x, name)  # no dropout on ids

    def low_rank(self, h: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        t = F.embedding(h, A.T, padding_idx=self.base_layer.padding_idx) * self.scaling[name]
        return F.linear(t, B)

    def bank_layout(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return A.transpose(1, 2).contiguous(), B.transpose(1, 2).contiguous()  # A [S, num, R], B [S, R, dim]

    def bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None,
        bags: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        # Row b looks its ids up in its own slot of A (no dropout on ids).
        ids = x.reshape(x.shape[0], -1)  # [b, tokens]
        t = A[slots.unsqueeze(1), ids]  # [b, tokens, R]
        return torch.bmm(t, B.index_select(0, slots)).reshape(*x.shape, B.shape[2])


register_kind(LoraEmbedding, lambda module: isinstance(module, nn.Embedding))
