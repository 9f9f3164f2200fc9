"""LoRA on ``nn.Conv2d`` (groups 1, zero padding): A is a convolution with the base's kernel,
stride, padding and dilation down to ``r`` channels, B a 1×1 convolution back up::

    y = base(x) + s · conv1x1(conv(dropout(x), A), B)
    ΔW[o, i, h, w] = s · Σ_k B[o, k] A[k, i, h, w]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..bank import routed_input_dropout
from .base import LoraLayer, register_kind
from .eligibility import own_forward_problem, plain_weight_problem


class LoraConv2d(LoraLayer):
    """LoRA on a 2-D convolution; ``ΔW`` has the base kernel's shape ``[out, in, kh, kw]``."""

    kind = "conv2d"

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels

    @classmethod
    def base_problem(cls, module: nn.Module) -> str | None:
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"LoRA on Conv2d with groups={module.groups} is not supported (only groups=1)"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"LoRA on Conv2d with padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        return plain_weight_problem(module) or own_forward_problem(module, nn.Conv2d)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kh, kw = self.base_layer.kernel_size
        return (r, self.in_channels, kh, kw), (self.out_channels, r, 1, 1)

    @staticmethod
    def factor_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        return torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A) * scaling

    def low_rank(self, h: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        A, B = self.lora_A[name], self.lora_B[name]
        t = F.conv2d(h.to(A.dtype), A, None, base.stride, base.padding, base.dilation) * self.scaling[name]
        return F.conv2d(t, B)

    def bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None,
        bags: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        # banks: A [S, R, C, kh, kw], B [S, out, R, 1, 1]. Rows become groups of one grouped conv.
        A, B = A.index_select(0, slots), B.index_select(0, slots)
        base = self.base_layer
        b, c = x.shape[0], x.shape[1]
        h = x.to(A.dtype)
        if keep is not None:
            h = routed_input_dropout(h, keep)
        t = F.conv2d(h.reshape(1, b * c, *x.shape[2:]), A.reshape(-1, *A.shape[2:]), None,
                     base.stride, base.padding, base.dilation, groups=b)  # fmt: skip
        t = t.reshape(b, A.shape[1], *t.shape[2:])  # [b, R, H', W']
        return torch.einsum("brhw,bor->bohw", t, B[..., 0, 0])


register_kind(LoraConv2d, lambda module: isinstance(module, nn.Conv2d))
