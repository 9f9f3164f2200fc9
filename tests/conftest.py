"""Shared fixtures: small models built in code (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .models import SeedMLP

__all__ = ["Mixed", "SeedMLP", "randomize_adapters", "train_like"]


class Mixed(nn.Module):
    """One of every supported layer type, plus a head for modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16, padding_idx=0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.proj = nn.Linear(16 + 4 * 4 * 4, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids).mean(1)
        c = torch.nn.functional.max_pool2d(self.conv(img), 2).flatten(1)
        return self.head(torch.tanh(self.proj(torch.cat([e, c], 1))))


def randomize_adapters(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Give every adapter factor random values (a trained adapter), so ΔW ≠ 0."""
    import lorakit as lk

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def train_like(model: nn.Module, seed: int = 0, scale: float = 0.3, spread: float = 0.2) -> None:
    """Trained-looking adapters: factors N(0, scale²) (ΔW about W0's size) and DoRA magnitudes
    moved off their start by a factor 1 + N(0, spread²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + spread * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def mlp() -> SeedMLP:
    torch.manual_seed(0)
    return SeedMLP()


@pytest.fixture
def mixed() -> Mixed:
    torch.manual_seed(0)
    return Mixed()


@pytest.fixture
def mixed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (6, 5), generator=g)
    img = torch.randn(6, 1, 8, 8, generator=g)
    return ids, img
