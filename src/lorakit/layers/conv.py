"""LoRA on ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (zero padding; any stride, dilation and
groups). A is a convolution with the base's kernel, stride, padding and dilation down to ``r``
channels, B a 1×1 convolution back up, grouped like the base (``r`` divisible by ``groups``)::

    y = base(x) + s · conv1x1(conv(dropout(x), A), B, groups=g)
    ΔW[o, i, k…] = s · Σ_{j ∈ group(o)} B[o, j] A[j, i, k…]      (A [r, in, k…], B [out, r/g, 1…])

With ``groups = 1`` that ``ΔW`` has the base kernel's shape and merges into it. With ``groups > 1``
each output channel's ``ΔW`` spans every input channel while the base kernel holds only its group's
(``[out, in/g, k…]``), so such an adapter runs beside the layer but cannot be merged (as in PEFT).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..bank import routed_input_dropout
from .base import LoraLayer
from .eligibility import own_forward_problem, plain_weight_problem
from .registry import register_kind


class LoraConv(LoraLayer):
    """LoRA on an N-d convolution; ``ΔW`` has the shape ``[out, in, k…]`` (the base kernel's when
    ``groups = 1``). Subclasses fix the dimension."""

    dims = 2
    base_type: type[nn.Module] = nn.Conv2d
    conv: Callable[..., torch.Tensor] = staticmethod(F.conv2d)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels
        self.groups = base_layer.groups

    @classmethod
    def base_problem(cls, module: nn.Module) -> str | None:
        name = cls.base_type.__name__
        if isinstance(module, cls.base_type) and module.padding_mode != "zeros":
            return f"LoRA on {name} with padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        return plain_weight_problem(module) or own_forward_problem(module, cls.base_type)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if r % self.groups:
            raise ValueError(
                f"rank {r} is not divisible by the convolution's groups={self.groups}: B is grouped like the base "
                "(PEFT's layout), so choose a rank that is a multiple of groups (e.g. with rank_pattern)"
            )
        ones = (1,) * self.dims
        return (r, self.in_channels, *self.base_layer.kernel_size), (self.out_channels, r // self.groups, *ones)

    @staticmethod
    def factor_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        r, per_group = A.shape[0], B.shape[1]  # per_group = r / groups
        groups, out = r // per_group, B.shape[0]
        # B's group j maps rank channels j·r/g … (j+1)·r/g to output channels j·out/g … (j+1)·out/g
        blocks = torch.bmm(B.reshape(groups, out // groups, per_group), A.reshape(groups, per_group, -1))
        return blocks.reshape(out, *A.shape[1:]) * scaling

    def merge_delta(self, name: str) -> torch.Tensor:
        if self.groups != 1:
            raise RuntimeError(
                f"LoRA on a grouped {self.base_type.__name__} (groups={self.groups}) cannot be merged: ΔW spans every "
                "input channel while the base kernel holds only its group's; keep the adapter unmerged"
            )
        return super().merge_delta(name)

    def low_rank(self, h: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        A, B = self.lora_A[name], self.lora_B[name]
        t = self.conv(h.to(A.dtype), A, None, base.stride, base.padding, base.dilation) * self.scaling[name]
        return self.conv(t, B, self.scaled_lora_bias(name), 1, 0, 1, self.groups)

    def bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None,
        bags: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        if self.groups != 1:
            raise NotImplementedError("per-row routing of LoRA on grouped convolutions is not supported")
        # banks: A [S, R, C, k…], B [S, out, R, 1…]. Rows become groups of one grouped conv.
        A, B = A.index_select(0, slots), B.index_select(0, slots)
        base = self.base_layer
        b, c = x.shape[0], x.shape[1]
        h = x.to(A.dtype)
        if keep is not None:
            h = routed_input_dropout(h, keep)
        t = self.conv(h.reshape(1, b * c, *x.shape[2:]), A.reshape(-1, *A.shape[2:]), None,
                      base.stride, base.padding, base.dilation, b)  # fmt: skip
        spatial = t.shape[2:]
        t = t.reshape(b, A.shape[1], -1)  # [b, R, positions]
        return torch.einsum("brp,bor->bop", t, B.reshape(*B.shape[:3])).reshape(b, B.shape[1], *spatial)


class LoraConv1d(LoraConv):
    """LoRA on ``nn.Conv1d``."""

    kind, dims, base_type, conv = "conv1d", 1, nn.Conv1d, staticmethod(F.conv1d)


class LoraConv2d(LoraConv):
    """LoRA on ``nn.Conv2d``."""

    kind, dims, base_type, conv = "conv2d", 2, nn.Conv2d, staticmethod(F.conv2d)


class LoraConv3d(LoraConv):
    """LoRA on ``nn.Conv3d``."""

    kind, dims, base_type, conv = "conv3d", 3, nn.Conv3d, staticmethod(F.conv3d)


for _cls in (LoraConv1d, LoraConv2d, LoraConv3d):
    register_kind(_cls, lambda module, t=_cls.base_type: isinstance(module, t))
