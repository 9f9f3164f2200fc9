"""LoRA on a bare ``nn.Parameter`` (PEFT's ``target_parameters``), e.g. the stacked expert weights
of a mixture-of-experts block, which no ``nn.Linear`` holds.

The module keeps computing with its own code; during its forward it reads ``W + ΔW`` in place of
``W``. For a 2-D weight ``W ∈ R^{out×in}`` that is plain LoRA, ``ΔW = s · B A`` with
``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``. For a stack of ``E`` expert matrices each expert ``e`` gets its
own rank-r pair, stored as PEFT stores them (two matrices, so a checkpoint travels both ways)::

    A ∈ R^{(E·r)×in},   A_e = A[e·r : (e+1)·r]                         (expert-major rows)
    B ∈ R^{out×(r·E)},  B_e = B[:, k·E + e] for k < r                  (rank-major columns)
    ΔW[e] = s · B_e A_e            for W ∈ R^{E×out×in}
    ΔW[e] = s · (B_e A_e)ᵀ         for W ∈ R^{E×in×out} (a module with ``is_transposed = True``)

The forward adds ``ΔW`` with one fused ``addmm``/``baddbmm`` per active adapter (summed when several
run), in float32 (float64 for a float64 weight), rounded once to the weight's dtype. Several
parameters of one module get one wrapper each, nested: the first registered is the innermost, so
checkpoint keys read ``<module>.base_layer.lora_A.weight`` as PEFT writes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .base import LoraLayer, adapter_dtype
from .eligibility import type_name


def work_dtype(weight: torch.Tensor, *factors: torch.Tensor) -> torch.dtype:
    """float32 (float64 with a float64 weight or factor): a model moved to half precision after
    injection has half-precision factors, which still add in float32."""
    dtypes = [adapter_dtype(weight), *(adapter_dtype(f) for f in factors)]
    return torch.float64 if torch.float64 in dtypes else torch.float32


class LoraParameter(LoraLayer):
    """Adapters on ``base_layer.<param_name>`` (the parameter of the innermost non-wrapper module).

    Not chosen by module type: ``inject`` builds it for ``LoraConfig.target_parameters``.
    """

    kind = "parameter"
    #: a per-row bank would need one effective weight per row: refused by ``lorakit.route``
    routable = False

    def __init__(self, base_layer: nn.Module, param_name: str) -> None:
        super().__init__(base_layer)
        self.param_name = param_name
        problem = self.parameter_problem(self.owner(), param_name)
        if problem is not None:
            raise ValueError(problem)

    # ------------------------------------------------------------------ the parameter
    def owner(self) -> nn.Module:
        """The module that registers the parameter (below any nested parameter wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def relative_name(self) -> str:
        """The parameter's name as seen from ``base_layer`` (``base_layer.`` once per nested wrapper)."""
        module, prefix = self.base_layer, ""
        while isinstance(module, LoraParameter):
            module, prefix = module.base_layer, prefix + "base_layer."
        return prefix + self.param_name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner(), self.param_name)

    @staticmethod
    def parameter_problem(owner: nn.Module, param_name: str) -> str | None:
        """Why ``owner.<param_name>`` cannot take an adapter exactly (None: it can)."""
        param = dict(owner.named_parameters(recurse=False)).get(param_name)
        if param is None:
            return f"{type_name(owner)} registers no parameter named {param_name!r}"
        if not param.dtype.is_floating_point or type(param) is not nn.Parameter:
            return (
                f"parameter {param_name!r} is a {type(param).__name__} of dtype {param.dtype}, not a plain float tensor"
            )
        if param.dim() not in (2, 3):
            return f"parameter {param_name!r} has shape {tuple(param.shape)}; only 2-D and 3-D (experts) are supported"
        if param.is_meta:
            return f"parameter {param_name!r} is on the meta device (no values yet); load the model's weights first"
        return None

    def layout(self) -> tuple[int, int, int, bool]:
        """``(experts, in, out, transposed)`` of the parameter (``experts = 1`` for a 2-D weight)."""
        shape = self.weight.shape
        if len(shape) == 2:
            return 1, shape[1], shape[0], False
        transposed = bool(getattr(self.owner(), "is_transposed", False))
        experts, d1, d2 = shape
        return (experts, d1, d2, True) if transposed else (experts, d2, d1, False)

    # ------------------------------------------------------------------ the maths
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        experts, fan_in, fan_out, _ = self.layout()
        return (r * experts, fan_in), (fan_out, r * experts)

    def expert_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``ΔW = s · lhs @ rhs`` in the parameter's own layout (batched over experts)."""
        A, B = self.lora_A[name], self.lora_B[name]
        experts, _, _, transposed = self.layout()
        if self.weight.dim() == 2:
            return B, A
        r = A.shape[0] // experts
        A_e = A.reshape(experts, r, A.shape[1])  # [E, r, in]
        B_e = B.reshape(B.shape[0], r, experts).permute(2, 0, 1)  # [E, out, r]
        return (A_e.transpose(1, 2), B_e.transpose(1, 2)) if transposed else (B_e, A_e)

    def delta_weight(self, name: str) -> torch.Tensor:
        lhs, rhs = self.expert_factors(name)
        work = work_dtype(self.weight, lhs)
        return torch.matmul(lhs.to(work), rhs.to(work)) * self.scaling[name]

    def effective_weight(self, names: list[str]) -> torch.Tensor:
        """``W + Σ_k s_k ΔW_k``, fused per adapter, in the adapters' precision, rounded once."""
        weight = self.weight
        work = work_dtype(weight, *(self.lora_A[n] for n in names))
        out = weight.to(work)
        fused = torch.addmm if weight.dim() == 2 else torch.baddbmm
        for name in names:
            lhs, rhs = self.expert_factors(name)
            out = fused(out, lhs.to(work), rhs.to(work), alpha=self.scaling[name])
        return out.to(weight.dtype)

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError("an adapter on a parameter changes the module's weight, not its output")

    # ------------------------------------------------------------------ merge / forward
    @torch.no_grad()
    def add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.weight
        if weight.dtype in (torch.float32, torch.float64):
            weight.add_(delta.detach().to(weight.dtype), alpha=sign)
        else:
            weight.copy_(weight.float().add_(delta.detach().float(), alpha=sign))

    def running(self) -> list[str]:
        """The adapters this forward adds (``set_adapter``'s order)."""
        first = self.adapter_to_run()
        if first is None:
            return []
        return [first, *(n for n in self.also_active if n in self.lora_A)]

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.route is not None and not self.adapters_disabled:
            return self.route.forward(self, x, *args, **kwargs)
        return self.run_base(self.running(), x, *args, **kwargs)

    def forward_with(self, name: str | None, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.run_base([] if name is None else [name], x, *args, **kwargs)

    def run_base(self, names: list[str], *args: Any, **kwargs: Any) -> Any:
        """The base module's forward, reading ``W + ΔW`` for ``names`` (``W`` itself when empty)."""
        if not names:
            return self.base_layer(*args, **kwargs)
        swapped = {self.relative_name(): self.effective_weight(names)}
        return functional_call(self.base_layer, swapped, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"parameter={self.param_name!r}, {super().extra_repr()}"
