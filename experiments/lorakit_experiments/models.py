"""Models the experiments train, and factories that ``lorakit train`` recipes can name."""

from __future__ import annotations

import torch
from torch import nn


class SeedMLP(nn.Module):
    """The seed's classifier: three ``nn.Linear`` with ReLU, 784→256→128→10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def seed_mlp() -> SeedMLP:
    """Recipe model factory: ``[model] factory = "lorakit_experiments.models:seed_mlp"``."""
    return SeedMLP()
