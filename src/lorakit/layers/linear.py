"""LoRA on ``nn.Linear`` (weight ``[out, in]``), Hugging Face ``Conv1D`` (weight ``[in, out]``) and
4-bit linear layers (NF4 / bitsandbytes ``Linear4bit``)::

    y = base(x) + s · (dropout(x) Aᵀ) Bᵀ,     A ∈ R^{r×in}, B ∈ R^{out×r}
    ΔW = s · B A   ([out, in]; transposed for Conv1D, which stores [in, out])

A route applies a bank of adapters to rows ``x_b`` by gathering (BGMV-style)::

    t_b = x_b A[k_b]ᵀ   (shrink to rank R),    y_b = t_b B[k_b]   (expand; scale folded into B)

(the bank stores ``A`` transposed, ``[S, in, R]``: see ``bank.bank_delta_gathered``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..bank import bag_indices, bank_delta_gathered, routed_input_dropout
from ..errors import InputError
from ..functional import lora_linear
from ..targeting import is_conv1d, is_linear4bit
from . import principal
from .base import LoraLayer
from .eligibility import own_forward_problem, plain_weight_problem
from .registry import register_kind


class LoraLinear(LoraLayer):
    """LoRA on a linear layer: ``y = base(x) + s · (dropout(x) Aᵀ) Bᵀ``; ``ΔW = s · B A``."""

    kind = "linear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # The fused kernel (functional.lora_linear) computes the base layer itself, so it is used
        # only for the exact types whose forward it reproduces; other types take the generic path.
        self.fused = type(base_layer) is nn.Linear or self.fan_in_fan_out
        w = base_layer.weight
        # nn.Linear stores [out, in]; Conv1D stores [in, out]; a 4-bit Linear4bit stores packed codes.
        if self.fan_in_fan_out:
            self.in_features, self.out_features = w.shape[0], w.shape[1]
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @classmethod
    def base_problem(cls, module: nn.Module) -> str | None:
        if is_linear4bit(module):  # packed 4-bit codes: merged by dequantizing (quantization.py)
            weight = getattr(module, "weight", None)
            meta = isinstance(weight, torch.Tensor) and weight.is_meta
            return "its weight is on the meta device (no values yet); load the model's weights first" if meta else None
        return plain_weight_problem(module) or own_forward_problem(module, nn.Linear)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        if principal.holds_principal(self):
            raise ValueError(
                f"this layer holds a PiSSA/OLoRA adapter {list(self.__dict__['initial_factors'])}, whose residual "
                f"base another adapter ({name!r}) would silently share; delete it first or use another model"
            )
        super().add_adapter(name, r, scaling, dropout, init)

    def reset_adapter(self, name: str, init: str) -> None:
        if init in principal.PRINCIPAL_INITS:
            principal.initialize(self, name, init)
        else:
            super().reset_adapter(name, init)

    def forget_adapter(self, name: str) -> None:
        principal.restore_base(self, name)  # a PiSSA/OLoRA adapter gives W0 back
        super().forget_adapter(name)

    def delete_adapter(self, name: str) -> None:
        if self.__dict__.get("loftq_adapter") == name:
            del self.__dict__["loftq_adapter"]
            warnings.warn(f"adapter {name!r} quantized this layer's base by LoftQ: the 4-bit base stays (the dense "
                          "weights were released)", stacklevel=4)  # fmt: skip
        super().delete_adapter(name)

    @staticmethod
    def factor_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        return (B @ A) * scaling

    def low_rank(self, h: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        # Scale the rank-r intermediate, the smallest tensor on the path.
        return F.linear(F.linear(h.to(A.dtype), A) * self.scaling[name], B, self.scaled_lora_bias(name))

    def forward_with(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if name is None:
            return base(x, *args, **kwargs)
        fused = self.fused and not args and not kwargs and not torch.is_autocast_enabled(x.device.type)
        fused = fused and name not in self.lora_bias
        # torch's linear sums a non-contiguous batch with a bias as matmul + bias (not one addmm):
        # the generic path then keeps a fresh adapter's output bitwise the base layer's
        fused = fused and (x.dim() <= 2 or x.is_contiguous() or base.bias is None or self.fan_in_fan_out)
        if fused and not base._forward_hooks and not base._forward_pre_hooks:
            p = self.dropout_p(name) if self.training else 0.0
            A, B = self.lora_A[name], self.lora_B[name]
            return lora_linear(x, base.weight, base.bias, A, B, self.scaling[name], p, self.fan_in_fan_out)
        return super().forward_with(name, x, *args, **kwargs)

    def low_rank_terms(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """What this layer's running adapters add to ``base(x)``, as ``(t, B, b)`` with the output
        ``base(x) + t Bᵀ + b``: ``t = [s_k · dropout_k(x) A_kᵀ]`` and ``B = [B_k]`` side by side over
        the running adapters (rank ``Σ r_k``), ``b`` their scaled lora biases (None where there are
        none). For a loss that takes the head's factors instead of its output (``chunked_loss``)."""
        if self.route is not None and not self.adapters_disabled:
            raise InputError(f"{type(self).__name__}: a per-row route is active; it has no single low-rank term")
        if self.fan_in_fan_out or type(self.base_layer) is not nn.Linear or self.variant != "lora":
            raise InputError(f"{type(self).__name__} on a {type(self.base_layer).__name__}: low-rank terms are "
                             "given for plain LoRA on an nn.Linear only")  # fmt: skip
        first = self.adapter_to_run()  # what forward runs, in its order
        names = [*([first] if first is not None else []), *self.further_adapters()]
        if not names:
            return None, None, None
        ts, Bs, bias = [], [], None
        for name in names:
            A = self.lora_A[name]
            ts.append(F.linear(self.lora_dropout[name](x).to(A.dtype), A) * self.scaling[name])
            Bs.append(self.lora_B[name])
            extra = self.scaled_lora_bias(name)
            bias = extra if bias is None else (bias if extra is None else bias + extra)
        one = len(names) == 1
        return (ts[0] if one else torch.cat(ts, -1)), (Bs[0] if one else torch.cat(Bs, 1)), bias

    def bank_layout(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return A.transpose(1, 2).contiguous(), B.transpose(1, 2).contiguous()  # A [S, in, R], B [S, R, out]

    def bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None,
        bags: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        h = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # [b, tokens, in]
        if keep is not None:
            h = routed_input_dropout(h, keep)
        delta = bank_delta_gathered(h, A, B, slots, bags or bag_indices)
        return delta.reshape(*x.shape[:-1], B.shape[2])


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_linear4bit(module)


register_kind(LoraLinear, is_linear)
