"""QLoRA: a frozen 4-bit NF4 base (double-quantized statistics) under float adapters.

NF4 stores each weight as one of 16 code values ``q_j`` (quantiles of a standard normal, scaled to
[−1, 1]) times the absolute maximum of its block of 64 weights::

    W ≈ absmax_block · q[idx],   idx ∈ {0..15} (4 bits)

Double quantization stores the 32-bit absmax values themselves in 8 bits, in blocks of 256 after
subtracting their mean. Per weight: 4 bits + 8/64 bits + 32/(64·256) bits ≈ 4.127 bits (4.5
without double quantization). The quantization kernels are bitsandbytes' (CPU from 0.46);
lorakit adds the model surgery, the bit accounting, LoRA on top, and merging.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .targeting import candidate_modules, is_linear4bit, name_matches, set_submodule

QUANT_TYPES = ("nf4", "fp4")


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or an ``ImportError`` that says how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(
            "4-bit quantization needs bitsandbytes>=0.46 (CPU support): pip install 'lorakit[quant]'"
        ) from None
    return bitsandbytes


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes → 4-bit indices, high nibble first (bitsandbytes' order)."""
    q = packed.reshape(-1)
    return torch.stack(((q >> 4), (q & 15)), 1).reshape(-1).long()


class _DequantizedMatmul(torch.autograd.Function):
    """``y = x Wᵀ`` with ``W`` dequantized in the forward and again in the backward, so that only
    the 4-bit codes are kept between them (keeping the float ``W`` would undo QLoRA's saving)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (NF4 or FP4, blocks of 64), with
    optionally double-quantized block statistics; ``W[k] = code[idx_k] · absmax[k // 64]``.

    Quantization uses bitsandbytes' ``quantize_4bit``; dequantization is plain torch here (it is
    a table lookup and a scale), correct for every shape. (bitsandbytes 0.50's CPU dequantize
    kernel mis-reads rows whose length is not a multiple of the block size, e.g. 784.)
    """

    #: recognised by ``targeting.is_linear4bit`` (and so wrapped by ``LoraLinear``)
    lorakit_4bit = True

    def __init__(
        self,
        linear: nn.Linear,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        blocksize: int = 64,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.double_quant, self.blocksize = quant_type, double_quant, blocksize
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        self.store(linear.weight.detach())
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
        self.train(linear.training)

    def store(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` ``[out, in]`` into this layer (flattened: blocks run across rows)."""
        bnb = require_bitsandbytes()
        packed, state = bnb.functional.quantize_4bit(
            weight.reshape(-1).float(), blocksize=self.blocksize, compress_statistics=self.double_quant,
            quant_type=self.quant_type,
        )  # fmt: skip
        self.weight.data = packed.reshape(-1)
        self.register_buffer("code", state.code.float())
        self.register_buffer("absmax", state.absmax)
        if state.nested:
            self.register_buffer("absmax2", state.state2.absmax.float())
            self.register_buffer("code2", state.state2.code.float())
            self.register_buffer("offset", torch.as_tensor(state.offset, dtype=torch.float32).reshape(1))
            self.blocksize2 = state.state2.blocksize

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:
        # model.to(torch.bfloat16) must move the code tables, never round them: they define the weights.
        tables = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, old in tables.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(new.device)
        return self

    def block_absmax(self) -> torch.Tensor:
        """The float absmax of every block (undoing double quantization)."""
        if not self.double_quant:
            return self.absmax.float()
        level2 = self.absmax2.repeat_interleave(self.blocksize2)[: self.absmax.numel()]
        return self.code2[self.absmax.long()] * level2 + self.offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` these 4 bits stand for."""
        n = self.in_features * self.out_features
        values = self.code[_unpack(self.weight)[:n]]
        scale = self.block_absmax().repeat_interleave(self.blocksize)[:n]
        return (values * scale).reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.compute_dtype)
        y = _DequantizedMatmul.apply(h, self)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        dq = "+DQ" if self.double_quant else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, {self.quant_type}{dq}, block {self.blocksize}"


#: a frozen 4-bit copy of an ``nn.Linear``: ``quantize_linear(linear, quant_type, double_quant, ...)``
quantize_linear = NF4Linear


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip: list[str] | tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except names in ``skip``, matched as dotted-path
    suffixes) by a frozen 4-bit ``NF4Linear``; returns ``model``. Inject LoRA afterwards."""
    if bits != 4:
        raise ValueError(f"quantize supports bits=4 (NF4/FP4), got bits={bits}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    require_bitsandbytes()
    targets = [p for p, m in candidate_modules(model) if type(m) is nn.Linear and not name_matches(list(skip), p)]
    if not targets:
        raise ValueError("quantize found no nn.Linear to quantize (after skip=" + repr(list(skip)) + ")")
    for path in targets:
        linear = model.get_submodule(path)
        set_submodule(model, path, NF4Linear(linear, quant_type, double_quant, compute_dtype))
    return model


def is_packed_for_cpu(layer: nn.Module) -> bool:
    """True when bitsandbytes has re-laid a ``Linear4bit``'s codes out for its AVX512-BF16 CPU
    kernel: the first eval forward without autograd on such a CPU does it, in place (the quant
    state then says ``packing_format_for_cpu``; absmax becomes bfloat16 ``[in/block, out]``)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _dequantize_packed_for_cpu(layer: nn.Module) -> torch.Tensor:
    """The float32 weight ``[out, in]`` of a CPU-packed ``Linear4bit``, read without changing it.

    bitsandbytes' own inverse conversion leaves absmax transposed when the statistics are not
    double-quantized (and re-quantizes them when they are), which garbles layers whose rows span
    several blocks. The layout, from bitsandbytes 0.50: the codes ``[out, in]`` are cut into
    tiles of 32 rows × 2 columns; each tile's 64 codes are stored as 32 bytes, code ``j`` of the
    tile in the low nibble of byte ``j`` and code ``32 + j`` in its high nibble."""
    state = layer.weight.quant_state
    out_features, in_features = (int(n) for n in state.shape)
    data = layer.weight.data
    expected = ((out_features, in_features // 2), (in_features // state.blocksize, out_features))
    if (tuple(data.shape), tuple(state.absmax.shape)) != expected or out_features % 32 or data.dtype != torch.uint8:
        raise RuntimeError(
            f"this bitsandbytes build keeps CPU-packed 4-bit weights in a layout lorakit does not know (codes "
            f"{tuple(data.shape)} {data.dtype}, absmax {tuple(state.absmax.shape)}; expected {expected}): reload the "
            "model and merge before any eval forward on the CPU"
        )
    packed = data.reshape(-1, 32)
    tiles = torch.cat((packed & 15, packed >> 4), dim=1)  # [tiles, 64], the tile's codes in order
    idx = tiles.reshape(out_features // 32, in_features // 2, 32, 2).transpose(1, 2).reshape(out_features, in_features)
    absmax = state.absmax.float().T  # [out, in / block]
    scale = absmax.repeat_interleave(state.blocksize, dim=1)[:, :in_features]
    return state.code.float().to(idx.device)[idx.long()] * scale


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a 4-bit layer represents. Reads the layer without
    changing it, in either layout bitsandbytes keeps a ``Linear4bit`` in (the one it quantized
    to, or the one its CPU kernel repacks to on the first eval forward)."""
    if isinstance(layer, NF4Linear):
        return layer.dequantize()
    bnb = require_bitsandbytes()
    if is_packed_for_cpu(layer):
        return _dequantize_packed_for_cpu(layer)
    w = layer.weight
    return (
        bnb.functional.dequantize_4bit(w.data, w.quant_state)
        .to(torch.float32)
        .reshape(layer.out_features, layer.in_features)
    )


def requantize_into(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` into a 4-bit ``layer`` with the layer's own settings (those it was
    quantized with, also after bitsandbytes repacked it for the CPU)."""
    if isinstance(layer, NF4Linear):
        layer.store(weight)
        return
    bnb = require_bitsandbytes()
    state = layer.weight.quant_state
    packed_for_cpu = is_packed_for_cpu(layer)
    dtype = getattr(state, "original_dtype", state.dtype) if packed_for_cpu else state.dtype
    nested = getattr(state, "original_nested", state.nested) if packed_for_cpu else state.nested
    packed, new_state = bnb.functional.quantize_4bit(
        weight.to(dtype), blocksize=state.blocksize, compress_statistics=nested, quant_type=state.quant_type
    )
    layer.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=new_state, blocksize=state.blocksize,
        compress_statistics=nested, quant_type=state.quant_type, bnb_quantized=True, module=layer,
    )  # fmt: skip


def merge_into_4bit(layer: nn.Module, delta: torch.Tensor, sign: float) -> float:
    """``W4 ← quantize(dequantize(W4) ± ΔW)``; warns and returns the relative error
    ``‖Ŵ − (W + ΔW)‖ / ‖W + ΔW‖`` that the re-quantization adds."""
    target = dequantize_weight(layer) + sign * delta.detach().float()
    requantize_into(layer, target)
    error = float((dequantize_weight(layer) - target).norm() / target.norm().clamp_min(1e-12))
    warnings.warn(
        f"merging into a 4-bit weight re-quantizes it: relative error {error:.2e} added "
        "(use lorakit.merge_and_unload(model, dequantize=True) for an exact dense merge)",
        stacklevel=3,
    )
    return error


def dense_linear(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """An ``nn.Linear`` holding a 4-bit layer's dequantized weight (and its bias), in ``dtype``,
    on the layer's device, frozen."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    out.weight = nn.Parameter(dequantize_weight(layer).to(dtype), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().to(dtype=dtype, copy=True), requires_grad=False)
    return out.train(layer.training)


@dataclass(frozen=True)
class QuantizedSize:
    """Bytes of the 4-bit layers of a model, read from the tensors themselves."""

    weights: int  # number of weights represented
    packed_bytes: int  # the 4-bit codes
    statistics_bytes: int  # absmax (8-bit with double quantization) + second-level absmax, code, offset

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * (self.packed_bytes + self.statistics_bytes) / max(self.weights, 1)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def quantized_size(model: nn.Module) -> QuantizedSize:
    """Count the real bytes of every 4-bit layer in ``model`` (codes; absmax, and with double
    quantization the second-level absmax, its code table and the offset)."""
    weights = packed = stats = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            weights += module.in_features * module.out_features
            packed += _nbytes(module.weight)
            stats += _nbytes(module.absmax)
            if module.double_quant:
                stats += _nbytes(module.absmax2) + _nbytes(module.code2) + _nbytes(module.offset)
        elif is_linear4bit(module):
            state = module.weight.quant_state
            weights += module.in_features * module.out_features
            packed += _nbytes(module.weight.data)
            stats += _nbytes(state.absmax)
            if state.nested:
                stats += _nbytes(state.state2.absmax) + _nbytes(state.state2.code) + _nbytes(state.offset)
    return QuantizedSize(weights, packed, stats)
