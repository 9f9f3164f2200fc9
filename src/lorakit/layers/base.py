"""What every LoRA layer shares: a frozen base layer plus named low-rank adapters, run in parallel.

For an input ``x`` the active adapter ``k`` adds a low-rank path beside the frozen layer::

    y = base(x) + s_k · B_k A_k dropout(x),        s_k = alpha_k / r_k   (rsLoRA: alpha_k / √r_k)

so the effective weight is ``W0 + ΔW_k`` with ``ΔW_k = s_k · B_k A_k`` of rank ``r_k``.
``A_k ∈ R^{r×in}`` starts random and ``B_k ∈ R^{out×r}`` starts at zero, so a fresh adapter leaves the
model's output unchanged (bitwise). Merging adds ``ΔW_k`` into ``W0`` (zero added latency);
unmerging subtracts it again.

Each layer kind (linear, embedding, conv; a variant such as DoRA adds its own) is one subclass in its
own file that defines, once, its factors' shapes, ``ΔW`` from the factors (:meth:`factor_delta`, for
merging, offline merging, combining), the adapter forward (:meth:`low_rank`) and the per-row bank
forward (:meth:`bank_delta`, for ``lorakit.route``); it registers with :func:`register_kind`.

Each wrapper keeps the original module as ``base_layer`` (the same attribute name PEFT uses, so
trained biases get PEFT's keys) and the factors in ``lora_A`` / ``lora_B`` parameter dicts keyed
by adapter name. Only the active adapters run (one, unless ``set_adapter`` was given several).
Adapter factors are float32 (float64 for a float64 base) whatever the base's dtype; the output
keeps the base output's dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..functional import Dropout, accumulate
from ..quantization import merge_into_4bit
from ..targeting import is_linear4bit
from .eligibility import plain_weight_problem


class UnsupportedModuleError(InputError, TypeError):
    """A target module LoRA cannot adapt exactly (its type, or a weight that merging could not
    write into). An ``InputError``, and a ``TypeError`` for code written against older releases.
    ``path`` names the module and ``reason`` says why (type and fix), when one module is meant."""

    def __init__(self, message: str, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 (or float64 with a float64 base), never in half precision."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def init_lora_a(weight: torch.Tensor, init: str, r: int) -> None:
    """``"default"``: kaiming-uniform with a=√5 (nn.Linear's own init); ``"gaussian"``: N(0, 1/r)."""
    if init not in ("default", "gaussian"):
        raise ValueError(f"init={init!r} initialises linear layers only (as in PEFT); use 'default' or 'gaussian'")
    if init == "gaussian":
        nn.init.normal_(weight, mean=0.0, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoraLayer(nn.Module):
    """Common state of every LoRA wrapper. Subclasses define the kind-specific maths.

    Attributes:
        base_layer: the wrapped original module (``inject`` freezes it; constructing a wrapper
            changes nothing, so ``wrap_module`` can also be used to check a module).
        lora_A, lora_B: adapter factors by adapter name.
        r, scaling: per-adapter rank and output scale ``s``.
        active_adapter: the adapter that runs in ``forward`` (None: base only).
        merged_adapters: adapters whose ΔW is currently added into the base weight.
        adapters_disabled: when True the layer behaves exactly like ``base_layer``.
        route: set by ``lorakit.route`` while a per-row route is active (None otherwise); it
            decides how this layer runs, so ``forward`` hands the call to it.
    """

    #: kind name as stored in files and in the registry ("linear", "embedding", "conv2d")
    kind: str = ""
    #: the adapter variant this class implements (plain LoRA; DoRA registers its own classes)
    variant: str = "lora"
    #: names of the factors in PEFT's checkpoint keys
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    #: ``ΔW`` is stored transposed relative to ``factor_delta`` (``[in, out]`` weights)
    fan_in_fan_out: bool = False
    #: marks the insides of this module as not targetable (``targeting.candidate_modules``)
    lorakit_wrapper = True
    #: ``lorakit.route`` can give each row its own adapter (``bank_delta``)
    routable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        #: PEFT's ``lora_bias``: a trained bias on B (``y += s · (B A x + b_B)``), for some adapters
        self.lora_bias = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        #: further adapters that run too, their outputs added (``set_adapter([a, b, ...])``)
        self.also_active: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.route: Any = None
        #: other places (``path.weight``) that hold this layer's weight tensor (tied weights); a
        #: merge then gives this layer its own copy, so the other places keep ``W0``
        self.weight_shared_with: tuple[str, ...] = ()

    # ------------------------------------------------------------------ what can be wrapped
    @classmethod
    def base_problem(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot take an adapter of this kind exactly (None: it can).

        The default asks for a weight that is a plain floating-point tensor registered on the
        module itself (a parameter or a buffer) and holding values (not on the meta device):
        merging writes ``ΔW`` into it.
        """
        return plain_weight_problem(module)

    # ------------------------------------------------------------------ defined once per kind
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    @staticmethod
    def factor_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """``ΔW = s · B A`` in the factors' own layout (``[out, in]`` for linear factors)."""
        raise NotImplementedError

    @classmethod
    def weight_delta(cls, A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
        """``ΔW`` in the base weight's layout: ``factor_delta``, transposed for ``[in, out]`` weights."""
        delta = cls.factor_delta(A, B, scaling)
        return delta.T if fan_in_fan_out else delta

    def low_rank(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """``s · B A h`` of adapter ``name`` for an input ``h`` (dropout already applied)."""
        raise NotImplementedError

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The adapter term ``s · B A dropout(x)`` of adapter ``name``."""
        return self.low_rank(self.lora_dropout[name](x), name)

    def bank_layout(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``A [S, R, ...]`` and ``B [S, out, R, ...]`` rearranged as ``bank_delta`` reads
        them, so a gathered slice feeds the batched GEMM without another copy."""
        return A, B

    def bank_delta(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None,
        bags: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The adapter term when row ``b`` uses bank slot ``slots[b]`` (scale folded into ``B``;
        input-dropout keep probability ``keep[b]`` in training, None without dropout; ``bags``
        gives cached gather indices for a slot tensor and rank)."""
        raise NotImplementedError(f"{type(self).__name__} does not support per-row routing")

    def reset_adapter(self, name: str, init: str) -> None:
        init_lora_a(self.lora_A[name], init, self.r[name])
        nn.init.zeros_(self.lora_B[name])

    # ------------------------------------------------------------------ adapter bookkeeping
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s own tensors by their PEFT key suffix (a variant adds its own)."""
        bias = {"lora_B.bias": self.lora_bias[name]} if name in self.lora_bias else {}
        return {self.peft_keys[0]: self.lora_A[name], self.peft_keys[1]: self.lora_B[name], **bias}

    def param_shapes(self, r: int, lora_bias: bool = False) -> dict[str, tuple[int, ...]]:
        """The shapes ``adapter_params`` will have at rank ``r``, known before anything is allocated."""
        shape_a, shape_b = self.factor_shapes(r)
        bias = {"lora_B.bias": shape_b[:1]} if lora_bias else {}
        return {self.peft_keys[0]: shape_a, self.peft_keys[1]: shape_b, **bias}

    def add_lora_bias(self, name: str) -> None:
        """Give adapter ``name`` a trained bias on B, starting at zero (PEFT's ``lora_bias``)."""
        if self.peft_keys[1] != "lora_B.weight":
            raise ValueError(f"lora_bias is not supported on {type(self).__name__} (PEFT has none there either)")
        if getattr(self.base_layer, "bias", None) is None:
            warnings.warn(f"lora_bias on a {type(self.base_layer).__name__} without a bias: adapter {name!r} cannot be "
                          "merged (there is no base bias to take its lora bias)", stacklevel=5)  # fmt: skip
        B = self.lora_B[name]
        self.lora_bias[name] = nn.Parameter(torch.zeros(B.shape[0], dtype=B.dtype, device=B.device))

    def scaled_lora_bias(self, name: str) -> torch.Tensor | None:
        """``s · b_B`` of adapter ``name`` (None without a lora bias)."""
        return self.lora_bias[name] * self.scaling[name] if name in self.lora_bias else None

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the layout of ``base_layer.weight``, in the adapter's dtype."""
        return self.weight_delta(self.lora_A[name], self.lora_B[name], self.scaling[name], self.fan_in_fan_out)

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        shape_a, shape_b = self.factor_shapes(r)
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, **kw))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, **kw))
        # In the layer's own mode: a dropout added to a model in eval mode must not drop.
        self.lora_dropout[name] = (Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.r[name], self.scaling[name] = r, scaling
        with torch.no_grad():
            self.reset_adapter(name, init)

    def delete_adapter(self, name: str) -> None:
        if self.route is not None:
            raise RuntimeError(f"cannot delete adapter {name!r} inside lorakit.route; leave the route first")
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        self.forget_adapter(name)
        if self.active_adapter == name:
            self.active_adapter = None

    def forget_adapter(self, name: str) -> None:
        """Drop every table entry of adapter ``name`` (those that exist: also undoes a partial add)."""
        self.also_active = tuple(n for n in self.also_active if n != name)
        for table in (self.lora_A, self.lora_B, self.lora_bias, self.lora_dropout, self.r, self.scaling):
            if name in table:
                del table[name]

    def dropout_p(self, name: str) -> float:
        """The input-dropout probability of adapter ``name`` (0 without dropout)."""
        return module.p if isinstance(module := self.lora_dropout[name], nn.Dropout) else 0.0

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self) -> None:
        """``W0 ← W0 + ΔW`` for each active adapter, computed in float32 and rounded once; all of
        them or (when one refuses) none."""
        unmerged = not self.merged_adapters
        names = [n for n in (self.active_adapter, *self.also_active) if n is not None and n in self.lora_A]
        for name in names:  # refused before anything changes
            if name in self.lora_bias and getattr(self.base_layer, "bias", None) is None:
                raise RuntimeError(f"adapter {name!r} has a lora bias but the base layer has no bias to merge it "
                                   "into; keep it unmerged")  # fmt: skip
        try:
            for name in names:
                self.merge_one(name)
        except BaseException:
            if unmerged:
                self.unmerge()
            raise

    def merge_one(self, name: str) -> None:
        if self.route is not None:
            raise RuntimeError("cannot merge inside lorakit.route (routed rows would add ΔW a second time)")
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is already merged; merging twice would add ΔW twice")
        self.add_to_base(self.merge_delta(name), sign=1.0)
        self.merge_bias(name, 1.0)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def merge_bias(self, name: str, sign: float) -> None:
        """``b ← b + sign · s · b_B`` when adapter ``name`` has a lora bias."""
        if name in self.lora_bias:
            bias = self.base_layer.bias
            bias.copy_(bias.float().add_(self.scaled_lora_bias(name).float(), alpha=sign))

    def merge_delta(self, name: str) -> torch.Tensor:
        """What merging adapter ``name`` adds to the (unmerged) base weight: ``ΔW``."""
        return self.delta_weight(name)

    def unmerge_delta(self, name: str) -> torch.Tensor:
        """What unmerging adapter ``name`` (the last merged) subtracts from the base weight."""
        return self.delta_weight(name)

    def unmerge(self) -> None:
        """``W0 ← W0 − ΔW`` for every merged adapter (restores W0 up to rounding; a weight that
        was untied by the merge gets the shared tensor back, exactly)."""
        shared = self.__dict__.pop("tied_original", None)
        if shared is not None:
            for name in self.merged_adapters:
                self.merge_bias(name, -1.0)
            self.merged_adapters.clear()
            self.base_layer.weight = shared
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.add_to_base(self.unmerge_delta(name), sign=-1.0)
            self.merge_bias(name, -1.0)

    @torch.no_grad()
    def add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        """``W0 ← W0 + sign · delta``; a 4-bit base is re-quantized (with a warning)."""
        if is_linear4bit(self.base_layer):
            merge_into_4bit(self.base_layer, delta, sign)
            return
        weight = self.base_layer.weight
        if self.weight_shared_with and sign > 0 and "tied_original" not in self.__dict__:
            # Tied weights: the merged layer gets its own copy, the other holders keep W0. The shared
            # tensor is kept (outside the parameter registry) for unmerge to put back exactly.
            self.__dict__["tied_original"] = weight
            self.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            weight = self.base_layer.weight
        delta = delta.detach()
        if weight.dtype in (torch.float32, torch.float64):
            weight.add_(delta.to(weight.dtype), alpha=sign)
        else:
            weight.copy_(weight.float().add_(delta.float(), alpha=sign))

    # ------------------------------------------------------------------ forward
    def adapter_to_run(self) -> str | None:
        """The adapter this forward adds (None: the base layer alone)."""
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

    def further_adapters(self) -> tuple[str, ...]:
        """The adapters that run after :meth:`adapter_to_run`, their outputs added (``set_adapter([a, b])``)."""
        return () if self.adapters_disabled or self.merged_adapters else self.also_active

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.route is not None and not self.adapters_disabled:
            return self.route.forward(self, x, *args, **kwargs)
        out = self.forward_with(self.adapter_to_run(), x, *args, **kwargs)
        for name in self.further_adapters():  # set_adapter([a, b, ...]): the further adapters' outputs
            out = accumulate(out, self.adapter_delta(x, name), self.owns_output())
        return out

    def forward_with(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer plus adapter ``name`` (None: the base layer alone)."""
        out = self.base_layer(x, *args, **kwargs)
        return out if name is None else accumulate(out, self.adapter_delta(x, name), self.owns_output())

    def owns_output(self) -> bool:
        """Whether the base layer's output may be added to in place (no forward hook holds it)."""
        return not self.base_layer._forward_hooks

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
