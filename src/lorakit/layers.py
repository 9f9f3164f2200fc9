"""LoRA layers: a frozen base layer plus named low-rank adapters, injected in parallel.

For an input ``x`` the active adapter ``k`` adds a low-rank path beside the frozen layer::

    y = base(x) + s_k · B_k A_k dropout(x),        s_k = alpha_k / r_k   (rsLoRA: alpha_k / √r_k)

so the effective weight is ``W0 + ΔW_k`` with ``ΔW_k = s_k · B_k A_k`` of rank ``r_k``.
``A_k ∈ R^{r×in}`` starts random and ``B_k ∈ R^{out×r}`` starts at zero, so a fresh adapter leaves the
model's output unchanged (bitwise). Merging adds ``ΔW_k`` into ``W0`` (zero added latency);
unmerging subtracts it again.

Each wrapper keeps the original module as ``base_layer`` (the same attribute name PEFT uses, so
trained biases get PEFT's keys) and the factors in ``lora_A`` / ``lora_B`` parameter dicts keyed
by adapter name. Only the active adapter runs: there is no loop over adapters in ``forward``.
Adapter factors are float32 (float64 for a float64 base) whatever the base's dtype; the output
keeps the base output's dtype.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bank import (
    bag_indices,
    bank_delta_gathered,
    inference_bank,
    routed_input_dropout,
    row_slots,
    stack_bank,
)
from .functional import Dropout, lora_linear
from .quantization import is_linear4bit, merge_into_4bit


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's fused projections).

    Detected by class name and module, so transformers need not be installed or imported.
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 (or float64 with a float64 base), never in half precision."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def init_lora_a(weight: torch.Tensor, init: str, r: int) -> None:
    """``"default"``: kaiming-uniform with a=√5 (nn.Linear's own init); ``"gaussian"``: N(0, 1/r)."""
    if init == "gaussian":
        nn.init.normal_(weight, mean=0.0, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoraLayer(nn.Module):
    """Common state of every LoRA wrapper. Subclasses define shapes, forward and ``delta_weight``.

    Attributes:
        base_layer: the wrapped original module (frozen).
        lora_A, lora_B: adapter factors by adapter name.
        r, scaling: per-adapter rank and output scale ``s``.
        active_adapter: the adapter that runs in ``forward`` (None: base only).
        merged_adapters: adapters whose ΔW is currently added into the base weight.
        adapters_disabled: when True the layer behaves exactly like ``base_layer``.
    """

    #: names of the factors in PEFT's checkpoint keys
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        #: per-row bank slots while inside ``lorakit.route`` (None: every row runs the active adapter)
        self.routing: torch.Tensor | None = None
        #: the inference bank captured when the route was entered, and whether any adapter trains
        self.route_bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.route_trains = False
        base_layer.requires_grad_(False)

    # ------------------------------------------------------------------ to be defined by subclasses
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the layout of ``base_layer.weight``, in the adapter's dtype."""
        raise NotImplementedError

    def reset_adapter(self, name: str, init: str) -> None:
        init_lora_a(self.lora_A[name], init, self.r[name])
        nn.init.zeros_(self.lora_B[name])

    # ------------------------------------------------------------------ adapter bookkeeping
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        shape_a, shape_b = self.factor_shapes(r)
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, **kw))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, **kw))
        self.lora_dropout[name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.scaling[name] = r, scaling
        with torch.no_grad():
            self.reset_adapter(name, init)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        del self.r[name], self.scaling[name]
        if self.active_adapter == name:
            self.active_adapter = None

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self) -> None:
        """``W0 ← W0 + ΔW`` for the active adapter, computed in float32 and rounded once."""
        name = self.active_adapter
        if name is None or name not in self.lora_A:
            return
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is already merged; merging twice would add ΔW twice")
        self._add_to_base(self.delta_weight(name), sign=1.0)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """``W0 ← W0 − ΔW`` for every merged adapter (restores W0 up to rounding)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._add_to_base(self.delta_weight(name), sign=-1.0)

    @torch.no_grad()
    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        if is_linear4bit(self.base_layer):
            merge_into_4bit(self.base_layer, delta, sign)
            return
        weight = self.base_layer.weight
        delta = delta.detach()
        if weight.dtype in (torch.float32, torch.float64):
            weight.add_(delta.to(weight.dtype), alpha=sign)
        else:
            weight.copy_(weight.float().add_(delta.float(), alpha=sign))

    # ------------------------------------------------------------------ forward helpers
    def _adapter_to_run(self) -> str | None:
        name = self.active_adapter
        if name is None or self.adapters_disabled or name not in self.lora_A:
            return None
        if self.merged_adapters:
            if self.training and torch.is_grad_enabled() and self.lora_A[name].requires_grad:
                raise RuntimeError(
                    f"adapter {name!r} is merged into the base weights and cannot be trained: call "
                    "lorakit.unmerge(model) before training (or model.eval() / torch.no_grad() for inference)"
                )
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._routed():
            return self._routed_forward(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        name = self._adapter_to_run()
        return out if name is None else self._accumulate(out, self._delta(x, name))

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The adapter term ``s · B A x`` of adapter ``name`` (layer-specific)."""
        raise NotImplementedError

    def _routed(self) -> bool:
        return self.routing is not None and not self.adapters_disabled and bool(self.lora_A)

    def _routed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row with its own adapter: one gather from the bank, then batched GEMMs."""
        out = self.base_layer(x, *args, **kwargs)
        if torch.is_grad_enabled() and self.route_trains:
            A, B, p = stack_bank(self)  # rebuilt each step so gradients reach each adapter
        else:
            A, B, p = self.route_bank if self.route_bank is not None else inference_bank(self)
        slots = row_slots(self, x.shape[0])
        keep = (1.0 - p[slots]) if self.training and bool((p > 0).any()) else None
        return self._accumulate(out, self._bank_delta(x, A, B, slots, keep))

    def route_prepare(self, shared: dict) -> None:
        """Called once per layer when a route is entered (``self.routing`` is set): precompute
        what every routed forward of this route needs, sharing it through ``shared`` between
        layers of the same route."""

    def bank_layout(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``A [S, R, ...]`` and ``B [S, out, R, ...]`` rearranged as ``_bank_delta`` reads
        them, so a gathered slice feeds the batched GEMM without another copy."""
        return A, B

    def _bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """The adapter term when row ``b`` uses bank slot ``slots[b]`` (input dropout keep
        probability ``keep[b]`` in training, None without dropout)."""
        raise NotImplementedError(f"{type(self).__name__} does not support per-row routing")

    @staticmethod
    def _accumulate(out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # In inference, add into the base output in place (no second full-size tensor); under
        # autograd keep it out of place so the graph never sees a mutated tensor.
        if not torch.is_grad_enabled() and not out.requires_grad:
            return out.add_(delta)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, s={self.scaling[n]:g})" for n in self.lora_A)
        return f"adapters=[{adapters}], active={self.active_adapter!r}, merged={self.merged_adapters}"

    def __getattr__(self, name: str) -> Any:
        # Code written for the original layer (``layer.in_features``, ``lm_head.weight``) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight ``[out, in]``) and on Hugging Face ``Conv1D`` (weight ``[in, out]``).

    ``y = base(x) + s · (dropout(x) Aᵀ) Bᵀ``; ``ΔW = s · B A`` (transposed for ``Conv1D``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # The fused kernel (functional.lora_linear) computes the base layer itself, so it is used
        # only for the exact types whose forward it reproduces; subclasses take the generic path.
        self._fused = type(base_layer) is nn.Linear or self.fan_in_fan_out
        w = base_layer.weight
        # nn.Linear stores [out, in]; Conv1D stores [in, out]; a 4-bit Linear4bit stores packed codes.
        if self.fan_in_fan_out:
            self.in_features, self.out_features = w.shape[0], w.shape[1]
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        # banks: A [S, R, in], B [S, R, out] (scale folded into B)
        rank = A.shape[1]
        h = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # [b, tokens, in]
        if keep is not None:
            h = routed_input_dropout(h, keep)
        bags = self._bag_indices(slots, rank) if h.shape[1] == 1 else None
        return bank_delta_gathered(h, A, B, slots, bags).reshape(*x.shape[:-1], B.shape[2])

    def bank_layout(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return A, B.transpose(1, 2).contiguous()

    def route_prepare(self, shared: dict) -> None:
        # Layers of one route that share a slot tensor and rank share its bag indices.
        rank = max(self.r.values())
        key = ("bags", id(self.routing), rank)
        if key not in shared:
            shared[key] = bag_indices(self.routing, rank)
        self.__dict__["_bag_cache"] = (self.routing, rank, shared[key])

    def _bag_indices(self, slots: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``bank.bag_indices`` for the current route, cached while the same route tensor is in
        use (a decode loop reuses them at every step)."""
        cached = self.__dict__.get("_bag_cache")
        if cached is None or cached[0] is not slots or cached[1] != rank:
            cached = (slots, rank, bag_indices(slots, rank))
            self.__dict__["_bag_cache"] = cached
        return cached[2]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._routed():
            return self._routed_forward(x, *args, **kwargs)
        name = self._adapter_to_run()
        base = self.base_layer
        if name is None:
            return base(x, *args, **kwargs)
        A, B = self.lora_A[name], self.lora_B[name]
        fused = self._fused and not args and not kwargs and not torch.is_autocast_enabled(x.device.type)
        if fused and not base._forward_hooks and not base._forward_pre_hooks:
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
            return lora_linear(x, base.weight, base.bias, A, B, self.scaling[name], p, self.fan_in_fan_out)
        out = base(x, *args, **kwargs)
        h = self.lora_dropout[name](x)
        # Scale the rank-r intermediate, the smallest tensor on the path.
        t = F.linear(h.to(A.dtype), A) * self.scaling[name]
        return self._accumulate(out, F.linear(t, B))


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding`` (weight ``[num_embeddings, dim]``).

    ``y = base(ids) + s · A[:, ids]ᵀ Bᵀ`` with ``A ∈ R^{r×num}``, ``B ∈ R^{dim×r}``; ``ΔW = s · (B A)ᵀ``.
    As in PEFT, A starts at zero and B normal (ΔW = 0 either way), and no dropout is applied to ids.
    """

    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def reset_adapter(self, name: str, init: str) -> None:
        nn.init.zeros_(self.lora_A[name])
        nn.init.normal_(self.lora_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        return ((self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]).T

    def _bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        # banks: A [S, num, R], B [S, R, dim]; row b looks its ids up in its own slot of A
        ids = x.reshape(x.shape[0], -1)  # [b, tokens]
        t = A[slots.unsqueeze(1), ids]  # [b, tokens, R]
        return torch.bmm(t, B.index_select(0, slots)).reshape(*x.shape, B.shape[2])

    def bank_layout(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return A.transpose(1, 2).contiguous(), B.transpose(1, 2).contiguous()

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        t = F.embedding(x, A.T, padding_idx=self.base_layer.padding_idx) * self.scaling[name]
        return F.linear(t, B)


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A is a conv with the base's kernel, stride, padding and dilation
    down to ``r`` channels, B a 1×1 conv back up. ``ΔW[o,i,h,w] = s · Σ_k B[o,k] A[k,i,h,w]``.
    """

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise TypeError(f"LoRA on Conv2d with groups={base_layer.groups} is not supported (only groups=1)")
        if base_layer.padding_mode != "zeros":
            raise TypeError(
                f"LoRA on Conv2d with padding_mode={base_layer.padding_mode!r} is not supported (only 'zeros')"
            )
        super().__init__(base_layer)
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kh, kw = self.base_layer.kernel_size
        return (r, self.in_channels, kh, kw), (self.out_channels, r, 1, 1)

    def delta_weight(self, name: str) -> torch.Tensor:
        B = self.lora_B[name][:, :, 0, 0]
        return torch.einsum("or,rihw->oihw", B, self.lora_A[name]) * self.scaling[name]

    def _bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
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

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        A, B = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x).to(A.dtype)
        t = F.conv2d(h, A, None, base.stride, base.padding, base.dilation) * self.scaling[name]
        return F.conv2d(t, B)


class ModulesToSave(nn.Module):
    """A module trained in full for each adapter (e.g. a new classification head).

    ``original_module`` stays frozen; each adapter gets its own trainable copy in
    ``modules_to_save[name]``. The active adapter's copy runs; with adapters disabled (or an
    adapter that has no copy here) the original runs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        module.requires_grad_(False)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a trainable copy of this module")
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        name = self.active_adapter
        if self.adapters_disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)


def wrap_module(module: nn.Module, path: str) -> LoraLayer:
    """The LoRA wrapper for ``module``; ``TypeError`` naming the type when it has none."""
    if isinstance(module, nn.Linear) or is_conv1d(module) or is_linear4bit(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise TypeError(
        f"module {path!r} is a {type(module).__module__}.{type(module).__qualname__}, which LoRA cannot wrap; "
        "supported types: nn.Linear, nn.Embedding, nn.Conv2d, transformers Conv1D, bitsandbytes Linear4bit"
    )
