"""LoRA on ``nn.MultiheadAttention``, whose projections are not ``nn.Linear`` calls: it reads the
packed ``in_proj_weight`` (queries, keys and values stacked, ``[3E, E]``) and ``out_proj.weight``
directly. An adapter therefore adapts both weights, and the attention runs with::

    W_in'  = W_in  + s · B_in  A_in       A_in  ∈ R^{r×E},  B_in  ∈ R^{3E×r}
    W_out' = W_out + s · B_out A_out      A_out ∈ R^{r×E},  B_out ∈ R^{E×r}

in place of its own weights (both sums fused and rounded once, as for ``target_parameters``).
The keys are PEFT's: ``<path>.lora_A.weight`` for the packed projection and
``<path>.base_layer.out_proj.lora_A.weight`` for the output projection. Dropout cannot act on the
adapters' input here (the weights change, not the inputs), so PEFT ignores it; lorakit says so
with a warning. Only ``_qkv_same_embed_dim`` modules (one packed projection) are supported.

PEFT 0.21 adds the output projection's ``ΔW`` twice (huggingface/peft#3774): the same file gives
``W_out + 2 s B_out A_out`` there and the formula above here. ``warn_peft_out_proj`` says so
whenever such an adapter is saved or loaded in PEFT's format.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .base import init_lora_a
from .eligibility import own_forward_problem, plain_weight_problem
from .parameter import LoraParameter, work_dtype
from .registry import register_kind

OUT_KEYS = ("base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight")


class LoraMultiheadAttention(LoraParameter):
    kind = "multihead_attention"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, "in_proj_weight")
        self.lora_out_A = nn.ParameterDict()
        self.lora_out_B = nn.ParameterDict()

    @classmethod
    def base_problem(cls, module: nn.Module) -> str | None:
        if not getattr(module, "_qkv_same_embed_dim", False):
            return "its query, key and value sizes differ (separate projections); only a packed in_proj is supported"
        return own_forward_problem(module, nn.MultiheadAttention) or plain_weight_problem(module.out_proj)

    # ------------------------------------------------------------------ the output projection's factors
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(name), OUT_KEYS[0]: self.lora_out_A[name], OUT_KEYS[1]: self.lora_out_B[name]}

    def param_shapes(self, r: int, lora_bias: bool = False) -> dict[str, tuple[int, ...]]:
        out = self.base_layer.out_proj.weight.shape
        return {**super().param_shapes(r, lora_bias), OUT_KEYS[0]: (r, out[1]), OUT_KEYS[1]: (out[0], r)}

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        super().add_adapter(name, r, scaling, 0.0, init)
        if dropout:
            warnings.warn(f"dropout={dropout} does not apply to nn.MultiheadAttention adapters (their weights change, "
                          "not their input), as in PEFT", stacklevel=5)  # fmt: skip
        A = self.lora_A[name]
        out = self.base_layer.out_proj.weight.shape
        self.lora_out_A[name] = nn.Parameter(torch.empty(r, out[1], dtype=A.dtype, device=A.device))
        self.lora_out_B[name] = nn.Parameter(torch.zeros(out[0], r, dtype=A.dtype, device=A.device))
        with torch.no_grad():
            init_lora_a(self.lora_out_A[name], init, r)

    def add_lora_bias(self, name: str) -> None:
        raise ValueError("lora_bias is not supported on nn.MultiheadAttention")

    def forget_adapter(self, name: str) -> None:
        super().forget_adapter(name)
        for table in (self.lora_out_A, self.lora_out_B):
            if name in table:
                del table[name]

    def out_effective(self, names: list[str]) -> torch.Tensor:
        weight = self.base_layer.out_proj.weight
        work = work_dtype(weight, *(self.lora_out_A[n] for n in names))
        out = weight.to(work)
        for name in names:
            B, A = self.lora_out_B[name].to(work), self.lora_out_A[name].to(work)
            out = torch.addmm(out, B, A, alpha=self.scaling[name])
        return out.to(weight.dtype)

    # ------------------------------------------------------------------ merge / forward
    @torch.no_grad()
    def add_out(self, name: str, sign: float) -> None:
        weight = self.base_layer.out_proj.weight
        work = work_dtype(weight, self.lora_out_A[name])
        delta = (self.lora_out_B[name].to(work) @ self.lora_out_A[name].to(work)) * self.scaling[name]
        weight.copy_(weight.to(work).add_(delta, alpha=sign))

    def merge_one(self, name: str) -> None:
        super().merge_one(name)
        self.add_out(name, 1.0)

    def unmerge(self) -> None:
        for name in reversed(self.merged_adapters):
            self.add_out(name, -1.0)
        super().unmerge()

    def run_base(self, names: list[str], *args: Any, **kwargs: Any) -> Any:
        if not names:
            return self.base_layer(*args, **kwargs)
        swapped = {"in_proj_weight": self.effective_weight(names), "out_proj.weight": self.out_effective(names)}
        return functional_call(self.base_layer, swapped, args, kwargs, strict=False)


def warn_peft_out_proj(model: nn.Module, name: str) -> None:
    """Warn when adapter ``name`` adapts an ``nn.MultiheadAttention`` (see the module docstring)."""
    paths = [p for p, m in model.named_modules() if isinstance(m, LoraMultiheadAttention) and name in m.lora_A]
    if paths:
        warnings.warn(
            f"adapter {name!r} adapts nn.MultiheadAttention ({paths[0]!r}{', ...' if len(paths) > 1 else ''}): "
            "PEFT 0.21 adds its out_proj ΔW twice (huggingface/peft#3774), lorakit once, as the LoRA formula says; "
            "in PEFT 0.21 the same file gives other outputs (the out_proj part doubled)",
            stacklevel=3,
        )


register_kind(LoraMultiheadAttention, lambda module: isinstance(module, nn.MultiheadAttention))
