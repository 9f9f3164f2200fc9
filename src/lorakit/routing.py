"""Many adapters in one batch: every row of the batch runs its own adapter.

Each LoRA layer stacks its adapters into a bank (one tensor per factor, the scale folded into B,
ranks zero-padded to the largest, and one all-zero slot for rows that use no adapter)::

    A_bank ∈ R^{S×R×in},  B_bank ∈ R^{S×out×R},   B_bank[k] = s_k · pad(B_k)

and a batch whose row ``b`` uses slot ``k_b`` computes, with one gather and two batched GEMMs
(BGMV-style: "shrink" to rank R, then "expand")::

    y_b = base(x_b) + (x_b A_bank[k_b]ᵀ) B_bank[k_b]ᵀ

There is no Python loop over adapters in ``forward``. Zero padding and the zero slot contribute
exactly nothing, so adapters of different ranks and alphas mix freely. Under autograd the bank is
stacked from the adapters' own parameters on every forward, so each row's loss reaches only its own
adapter; in inference the bank is cached until an adapter changes (added, deleted, written to, or
stepped by an optimizer); see ``route`` for edits inside an entered route.

Row ``b`` of the route is row ``b`` of every LoRA layer's input: layers must see the batch
dimension first. A layer that receives any other number of rows raises (a layer that sees the
sequence first, or tokens flattened to ``[B·T, d]``, would otherwise mix rows up); the one
exception is an expanded batch, where each name covers ``k`` consecutive rows: inside
``model.generate(...)`` (beams and ``num_return_sequences`` repeat each prompt contiguously) and
with ``route(..., expand=k)``.

All routing state lives here: entering a route gives each LoRA layer one :class:`LayerRoute`
(``layer.route``), leaving it restores what was there before. The caches (inference banks, slot
tables) are owned by this module, keyed weakly by layer and guarded by a lock, so two threads
routing different models never interfere. (One model routed by two threads at once is not
supported: a route is state of the model, like ``train()``/``eval()``.)
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from .bank import bag_indices, stack_factors
from .errors import ArgumentTypeError, InputError, is_whole, short_repr
from .injection import UnknownAdapterError, adapter_configs, lora_layers, wrapper_list
from .layers import LoraLayer, ModulesToSave, accumulate
from .optimizer_steps import steps_taken
from .targeting import require_module

Routing = Sequence[str | None] | torch.Tensor

_ABSENT = object()

_VERSION = attrgetter("_version")
_REQUIRES_GRAD = attrgetter("requires_grad")
_LOCK = threading.Lock()
_BANKS: weakref.WeakKeyDictionary[LoraLayer, tuple[tuple, tuple[torch.Tensor, ...]]] = weakref.WeakKeyDictionary()
_SLOT_TABLES: weakref.WeakKeyDictionary[LoraLayer, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------- banks
def _cached(store: weakref.WeakKeyDictionary, layer: LoraLayer, key: tuple, build: Callable[[], Any]) -> Any:
    """``store[layer]``'s value while it was built for ``key``, else ``build()`` (without autograd),
    stored. The lock guards the dictionary only; two threads may build the same value once each."""
    with _LOCK:
        cached = store.get(layer)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        with _LOCK:
            store[layer] = cached
    return cached[1]


def stack_bank(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer``'s adapters stacked (differentiably) into ``(A_bank, B_bank, dropout_p)`` in the
    layer's bank layout."""
    names = list(layer.lora_A.keys())
    A, B, p = stack_factors(
        [layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names],
        [layer.scaling[n] for n in names], [layer.dropout_p(n) for n in names],
    )  # fmt: skip
    A, B = layer.bank_layout(A, B)
    return A, B, p


def factor_tensors(layer: LoraLayer) -> Iterator[torch.Tensor]:
    """Every ``A`` then every ``B`` of ``layer`` (``parameters(recurse=False)``: 3x faster than
    indexing the ParameterDicts, which matters when a route is entered for every batch)."""
    return chain(layer.lora_A.parameters(recurse=False), layer.lora_B.parameters(recurse=False))


def inference_bank(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bank for forwards without autograd, cached and rebuilt only when an adapter was added,
    deleted, replaced or changed in place (tensor version counters)."""
    params = list(factor_tensors(layer))
    # map() with C-level getters: this check runs for every layer each time a route is entered.
    # the optimizer steps too: a fused optimizer writes without bumping the tensors' versions
    key = (steps_taken(), tuple(layer.lora_A.keys()), tuple(map(id, params)), tuple(map(_VERSION, params)),
           tuple(layer.scaling.values()))  # fmt: skip
    return _cached(_BANKS, layer, key, lambda: stack_bank(layer))


def _slot_table(layer: LoraLayer, order: list[str]) -> torch.Tensor:
    """Model adapter position → this layer's bank slot (the zero slot for adapters the layer
    lacks, and for position ``len(order)`` = no adapter)."""
    names = tuple(layer.lora_A.keys())

    def build() -> torch.Tensor:
        slot = {n: i for i, n in enumerate(names)}
        return torch.tensor([slot.get(n, len(names)) for n in order] + [len(names)])

    return _cached(_SLOT_TABLES, layer, (tuple(order), names), build)


# ---------------------------------------------------------------------------------------- one layer
class LayerRoute:
    """How one LoRA layer runs inside a route: one adapter (or none) for every row, or each row
    its own bank slot (``slots``). Layers of one route share slot tensors and gather indices
    through ``shared``, a dict that lives as long as the route."""

    __slots__ = ("adapter", "bank", "has_dropout", "nograd_bank", "seen", "shared", "slots", "trains", "watched")

    def __init__(
        self, adapter: str | None = None, slots: torch.Tensor | None = None, bank: tuple | None = None,
        trains: bool = False, shared: dict | None = None,
    ) -> None:  # fmt: skip
        self.adapter, self.slots, self.bank = adapter, slots, bank
        self.trains = trains
        #: a route over trainable adapters, run without autograd (an evaluation inside a training
        #: loop): the bank is rebuilt after an optimizer step or an in-place write to one of the
        #: ``watched`` (trainable) factors, whose versions were ``seen``
        self.watched: list[torch.Tensor] | None = None
        self.seen: tuple[int, ...] | None = None
        self.nograd_bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: whether any of the layer's adapters has input dropout, looked up the first time a
        #: forward in training mode asks (an inference route never pays for the per-adapter look)
        self.has_dropout: bool | None = None
        self.shared = shared if shared is not None else {}

    def bank_without_grad(self, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.watched is None:
            self.watched = [p for p in factor_tensors(layer) if p.requires_grad]
        versions = (steps_taken(), *map(_VERSION, self.watched))
        if self.nograd_bank is None or versions != self.seen:
            self.nograd_bank, self.seen = inference_bank(layer), versions
        return self.nograd_bank

    def dropout_in(self, layer: LoraLayer) -> bool:
        if self.has_dropout is None:
            self.has_dropout = any(layer.dropout_p(n) > 0 for n in layer.lora_A)
        return self.has_dropout

    def rows(self, batch: int) -> torch.Tensor:
        """The bank slot of every row. An expanded batch (each name covering ``k`` consecutive
        rows) is accepted only inside ``generate`` or with ``route(..., expand=k)``; any other
        number of rows raises ``InputError``."""
        slots = self.slots
        assert slots is not None
        names = slots.shape[0]
        if batch == names:
            return slots
        factor, rest = divmod(batch, names)
        if rest or not factor or not (self.shared.get("generating") or factor == self.shared.get("expand", 1)):
            raise InputError(
                f"lorakit.route was given {names} names but a layer received a batch of {batch} rows (layers must "
                "see the batch dimension first, one row per name; each name covers k consecutive rows only inside "
                f"model.generate(...) of the routed model, or with lorakit.route(model, names, expand=k))"
            )
        key = ("rows", id(slots), batch)
        if key not in self.shared:
            self.shared[key] = (slots, slots.repeat_interleave(batch // slots.shape[0]))
        return self.shared[key][1]

    def bag_indices(self, slots: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``bank.bag_indices`` for these slots, computed once per route (a decode loop reuses
        them at every step and in every layer)."""
        key = ("bags", id(slots), rank)
        entry = self.shared.get(key)
        if entry is None or entry[0] is not slots:
            entry = (slots, bag_indices(slots, rank))
            self.shared[key] = entry
        return entry[1]

    def forward(self, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.slots is None:  # every row runs the same adapter (or none): the exact, cheaper path
            return layer.forward_with(self.adapter, x, *args, **kwargs)
        out = layer.base_layer(x, *args, **kwargs)
        if torch.is_grad_enabled() and self.trains:
            A, B, p = stack_bank(layer)  # rebuilt each step so gradients reach each adapter
        else:
            A, B, p = self.bank if self.bank is not None else self.bank_without_grad(layer)
        slots = self.rows(x.shape[0])
        keep = (1.0 - p[slots]) if layer.training and self.dropout_in(layer) else None
        return accumulate(out, layer.bank_delta(x, A, B, slots, keep, self.bag_indices))


# ---------------------------------------------------------------------------------------- the route
def _row_names(model: nn.Module, adapters: Routing) -> tuple[list[str], list[str | None]]:
    order = list(adapter_configs(model))
    allowed = "allowed: a list with one adapter name (or None) per row, or a 1-D integer tensor of positions"
    if isinstance(adapters, torch.Tensor):
        if adapters.dim() != 1 or adapters.dtype.is_floating_point or adapters.dtype == torch.bool:
            raise InputError(f"lorakit.route: adapters = a {tuple(adapters.shape)} {adapters.dtype} tensor; allowed: "
                             "a 1-D integer tensor of positions")  # fmt: skip
        bad = [int(i) for i in adapters.tolist() if not -1 <= int(i) < len(order)]
        if bad:
            raise InputError(f"lorakit.route: routing indices {bad} are out of range; allowed: -1 (no adapter) to "
                             f"{len(order) - 1}, positions in {order}")  # fmt: skip
        names: list[str | None] = [order[i] if i >= 0 else None for i in adapters.tolist()]
    elif isinstance(adapters, str):
        raise ArgumentTypeError(f"lorakit.route: adapters = the string {adapters!r}; route takes one adapter name "
                                f"per row (a list); {allowed}")  # fmt: skip
    elif not isinstance(adapters, Sequence):
        raise ArgumentTypeError(f"lorakit.route: adapters = {short_repr(adapters)}; {allowed}")
    else:
        names = list(adapters)
        wrong = [n for n in names if n is not None and not isinstance(n, str)]
        if wrong:
            raise ArgumentTypeError(f"lorakit.route: adapters holds {short_repr(wrong[0])}; {allowed}")
        unknown = sorted({n for n in names if n is not None and n not in order})
        if unknown:
            raise UnknownAdapterError(f"lorakit.route: adapters names unknown adapters {unknown}; allowed: "
                                      f"{order or 'none (the model holds no adapters)'} or None")  # fmt: skip
    if not names:
        raise InputError(f"lorakit.route: adapters = {short_repr(adapters)} (no rows); {allowed}, at least one row")
    return order, names


#: the inputs whose first dimension is the batch of prompts ``generate`` expands
_PROMPT_INPUTS = ("inputs", "input_ids", "inputs_embeds", "input_features", "input_values", "pixel_values")


class RoutedGenerate:
    """``model.generate`` while a route is entered on ``model``: checks that the prompts are one per
    route name, and marks the route as generating, so layers accept the batch ``generate``
    expands (each prompt's beams / returned sequences are consecutive rows)."""

    def __init__(self, generate: Callable[..., Any], names: int, shared: dict) -> None:
        self.__wrapped__ = generate  # inspect.signature(model.generate) still shows generate's own
        self.names, self.shared = names, shared

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        given = [args[0]] if args else []
        given += [kwargs[k] for k in _PROMPT_INPUTS if kwargs.get(k) is not None]
        batch = next((int(t.shape[0]) for t in given if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if batch is not None and batch != self.names:
            raise InputError(
                f"lorakit.route was given {self.names} names but generate received a batch of {batch} prompts; "
                "allowed: one name per prompt (generate then routes each prompt's beams and sequences itself)"
            )
        self.shared["generating"] = self.shared.get("generating", 0) + 1
        try:
            return self.__wrapped__(*args, **kwargs)
        finally:
            self.shared["generating"] -= 1


@contextlib.contextmanager
def route(model: nn.Module, adapters: Routing, *, expand: int = 1) -> Iterator[nn.Module]:
    """Within the block, row ``b`` of every batch runs adapter ``adapters[b]`` (None: base only).

    ``adapters`` is a list of adapter names (or None), or an integer tensor of positions in
    ``lorakit.adapter_configs(model)`` order (-1: base only). Works in training (each row's loss
    updates only its own adapter; see ``set_trainable``) and in inference.

    Every LoRA layer must see the batch dimension first, one row per name: a layer that receives
    another number of rows raises ``InputError``. Expanded batches, where name ``b`` covers rows
    ``b·k … b·k+k-1``, are accepted only inside ``model.generate(...)`` called on the routed model
    (beam search and ``num_return_sequences`` expand each prompt so; the prompts must be one per
    name) and, for expansions of your own, with ``expand=k``. A layer that transposes its input
    to sequence-first is refused when the sequence length differs from the number of names, but
    cannot be told apart when the two happen to be equal: such models must not be routed. Rows
    that all use one adapter run it whatever the layer's input shape.

    Without autograd the adapters are read from a bank stacked when the route is entered (frozen
    adapters) or rebuilt after each optimizer step (trainable ones); an in-place edit of a frozen
    adapter's tensors inside the block is not seen until the route is entered again.
    """
    require_module(model, "lorakit.route")
    if not is_whole(expand, 1):
        raise InputError(
            f"lorakit.route: expand = {short_repr(expand)}; allowed: a whole number >= 1 "
            "(each name covers that many consecutive rows)"
        )
    order, names = _row_names(model, adapters)
    wrappers = wrapper_list(model)
    if any(isinstance(m, ModulesToSave) for m in wrappers):
        raise NotImplementedError(
            "per-row routing does not support modules_to_save (a fully trained module per adapter); "
            "use set_adapter for such adapters"
        )
    layers = [m for m in wrappers if isinstance(m, LoraLayer)]
    if any(layer.merged_adapters for layer in layers):
        raise RuntimeError("an adapter is merged into the base weights: call lorakit.unmerge(model) before routing")
    position = {n: i for i, n in enumerate(order)}
    rows = torch.tensor([position[n] if n is not None else len(order) for n in names])
    used = set(names)
    shared: dict = {"expand": int(expand)}
    routes: list[LayerRoute] = []
    for layer in layers:
        present = used.intersection(layer.lora_A.keys())
        if len(used) == 1 or not present:
            routes.append(LayerRoute(adapter=next(iter(present), None)))
            continue
        if layer.variant != "lora" or not layer.routable or not present.isdisjoint(layer.lora_bias.keys()):
            what = (f"{layer.variant} adapters" if layer.variant != "lora" else f"adapters on {layer.kind} targets"
                    if not layer.routable else "adapters with a lora bias")  # fmt: skip
            raise NotImplementedError(
                f"lorakit.route: {what} cannot be mixed per row (the bank holds plain A and B factors only); "
                "route plain LoRA adapters, or run one adapter per batch with lorakit.set_adapter"
            )
        # Layers holding the same adapters share one slot tensor (and its cached indices).
        device = layer.base_layer.weight.device
        key = ("slots", tuple(layer.lora_A.keys()), device)
        if key not in shared:
            shared[key] = _slot_table(layer, order)[rows].to(device)
        # Captured once here, so a forward does no per-adapter Python work.
        trains = any(map(_REQUIRES_GRAD, factor_tensors(layer)))  # A or B: LoRA-FA trains B alone
        bank = None if trains else inference_bank(layer)
        routes.append(LayerRoute(slots=shared[key], bank=bank, trains=trains, shared=shared))
    # Plain attribute writes through __dict__ (nn.Module.__setattr__ is slow); restored on exit.
    previous = [layer.__dict__["route"] for layer in layers]
    generate = getattr(model, "generate", None)
    previous_generate = model.__dict__.get("generate", _ABSENT)
    try:
        for layer, layer_route in zip(layers, routes, strict=True):
            layer.__dict__["route"] = layer_route
        if callable(generate):
            model.__dict__["generate"] = RoutedGenerate(generate, len(names), shared)
        yield model
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.__dict__["route"] = old
        if previous_generate is _ABSENT:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = previous_generate


def set_trainable(model: nn.Module, adapters: Sequence[str]) -> None:
    """Make exactly these adapters trainable (e.g. all adapters of a mixed-batch training run);
    ``set_adapter`` makes only the active one trainable."""
    require_module(model, "lorakit.set_trainable")
    configs = adapter_configs(model)
    if isinstance(adapters, str) or not isinstance(adapters, Sequence | set | frozenset):
        raise ArgumentTypeError(f"lorakit.set_trainable: adapters = {short_repr(adapters)}; allowed: a list of adapter "
                                f"names among {sorted(configs)}")  # fmt: skip
    unknown = sorted({a for a in adapters if a not in configs}, key=repr)
    if unknown:
        raise UnknownAdapterError(f"lorakit.set_trainable: adapters names unknown adapters {unknown}; allowed: "
                                  f"{sorted(configs) or 'none (the model holds no adapters)'}")  # fmt: skip
    wanted = set(adapters)
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            for p in layer.adapter_params(name).values():
                p.requires_grad_(name in wanted)
