"""Which modules a LoRA layer can wrap exactly: a plain floating-point weight registered on the
module (merging writes ``ΔW`` into it), and no subclass ``forward`` that merging would not reproduce."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def own_forward_problem(module: nn.Module, base: type[nn.Module]) -> str | None:
    """A subclass of ``base`` with its own ``forward``: nothing says that merging ``ΔW`` into its
    weight reproduces the adapter beside it (e.g. bitsandbytes' StableEmbedding normalizes)."""
    if isinstance(module, base) and type(module).forward is not base.forward:
        return (
            f"it subclasses {base.__module__}.{base.__qualname__} with its own forward, so merging ΔW into its "
            "weight may not equal the adapter beside it; if its output is what its base class computes, register "
            "a wrapper for it with lorakit.register_kind (a subclass of the lorakit layer whose base_problem "
            "returns None)"
        )
    return None


def plain_weight_problem(module: nn.Module) -> str | None:
    """Why ``module.weight`` is not a tensor that merging can write ``ΔW`` into (None: it is)."""
    if parametrize.is_parametrized(module):
        return (
            "its weight is computed by a parametrization (torch.nn.utils.parametrize, e.g. weight_norm), so a "
            "merge could not write ΔW into it; bake it in first: "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
        )
    weight = dict(module.named_parameters(recurse=False)).get("weight")
    if weight is None:
        weight = dict(module.named_buffers(recurse=False)).get("weight")
    if weight is None:
        hint = (
            "torch.nn.utils.remove_weight_norm(module) first (old-style weight_norm recomputes it before every forward)"
            if hasattr(module, "weight_g") else "register it as an nn.Parameter named 'weight'"
        )  # fmt: skip
        return (
            f"its weight is not a parameter (or buffer) registered on the module, so a merge could not write ΔW "
            f"into it; {hint}"
        )
    if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.dtype.is_floating_point:
        return (
            f"its weight is a {type(weight).__module__}.{type(weight).__name__} of dtype {weight.dtype}, not a plain "
            "floating-point tensor (a quantized weight, e.g. bitsandbytes 8-bit), so merging ΔW into it would be "
            "wrong; use a 4-bit NF4 base (lorakit.quantize(model, bits=4), or transformers' "
            "BitsAndBytesConfig(load_in_4bit=True)) or a dense base"
        )
    if weight.is_meta:
        return (
            "its weight is on the meta device (no values yet, e.g. built under init_empty_weights); "
            "load the model's weights first, then add adapters"
        )
    return None
