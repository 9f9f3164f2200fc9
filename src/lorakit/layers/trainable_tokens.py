"""Trainable tokens (PEFT's ``trainable_token_indices``): train only chosen rows of an embedding,
e.g. the vectors of newly added special tokens, and leave the rest of the vocabulary frozen.

For token rows ``T = {t_1 … t_n}`` an adapter holds values ``V ∈ R^{n×d}`` (starting as the
original rows ``W[T]``) and the layer computes with ``W'``, which is ``W`` with rows ``T`` replaced
by ``V``::

    embedding:  y = W'[x]                      (rows looked up; a token in T reads its row of V)
    linear:     y = x Wᵀ + b + x (V − W[T])ᵀ on the features T   (a tied output head)

Neither builds ``W'`` (a copy of a vocabulary-sized matrix per forward): the base layer runs as is,
and only the outputs that involve ``T`` are replaced. A layer whose weight is tied to the embedding
(the output head of most language models) is wrapped too, sharing the same ``V``, as PEFT does;
the values are saved once, under the embedding's key ``<path>.token_adapter.trainable_tokens_delta``
(PEFT's name: the tensor holds the new rows themselves, not a difference).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import adapter_dtype
from .eligibility import own_forward_problem, plain_weight_problem
from .modules_to_save import ModulesToSave

#: the key suffix PEFT stores the values under
VALUES_KEY = "token_adapter.trainable_tokens_delta"


class TokenRows(nn.Module):
    """One adapter's rows: their indices and trained values (and the originals, for reference)."""

    def __init__(self, weight: torch.Tensor, indices: list[int]) -> None:
        super().__init__()
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        self.register_buffer("indices", index, persistent=False)
        ordered, order = index.sort()  # for a binary search from token id to row of ``values``
        self.register_buffer("sorted_indices", ordered, persistent=False)
        self.register_buffer("order", order, persistent=False)
        original = weight.detach()[index].to(adapter_dtype(weight))
        self.values = nn.Parameter(original.clone())

    def positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """For every id in ``tokens``: the row of ``values`` holding it, or -1 for a frozen token (a
        binary search over the chosen ids, not a vocabulary-sized table built every forward)."""
        found = torch.searchsorted(self.sorted_indices, tokens).clamp_(max=len(self.sorted_indices) - 1)
        return torch.where(self.sorted_indices[found] == tokens, self.order[found], -1)


class TrainableTokens(ModulesToSave):
    """``original_module`` (an ``nn.Embedding``, or an ``nn.Linear`` sharing its weight) with chosen
    rows replaced by the active adapter's values; ``modules_to_save[name]`` holds a ``TokenRows``.

    ``tied_to`` names the wrapper whose values this one shares (None for the one that saves them).
    """

    def __init__(self, module: nn.Module, tied_to: str | None = None) -> None:
        super().__init__(module)
        self.tied_to = tied_to
        #: other holders of the weight that do not follow these rows: unloading gives this module its own copy
        self.weight_shared_with: tuple[str, ...] = ()

    @staticmethod
    def module_problem(module: nn.Module, indices: list[int]) -> str | None:
        """Why ``module`` cannot take trainable token rows ``indices`` (None: it can)."""
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            return f"is a {type(module).__name__}; trainable tokens need an nn.Embedding (or a tied nn.Linear head)"
        kind = nn.Embedding if isinstance(module, nn.Embedding) else nn.Linear
        problem = plain_weight_problem(module) or own_forward_problem(module, kind)
        if problem is not None:
            return problem
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
            return "uses max_norm or scale_grad_by_freq, which would act on the whole weight; not supported"
        rows = module.weight.shape[0]
        bad = [i for i in indices if not 0 <= i < rows]
        if bad:
            return f"has {rows} rows; token indices {bad[:5]} are out of range"
        return None

    def add_rows(self, name: str, indices: list[int], shared: TokenRows | None = None) -> TokenRows:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has trainable tokens on this module")
        rows = shared if shared is not None else TokenRows(self.original_module.weight, indices)
        self.modules_to_save[name] = rows
        return rows

    def active_module(self) -> nn.Module:
        """The base module (attributes such as ``weight`` read through the wrapper come from it)."""
        return self.original_module

    def saved_state(self, name: str) -> dict[str, torch.Tensor]:
        return {} if self.tied_to is not None else {VALUES_KEY: self.modules_to_save[name].values}

    def running(self) -> TokenRows | None:
        name = self.active_adapter
        if self.adapters_disabled or name is None or name not in self.modules_to_save:
            return None
        rows = self.modules_to_save[name]
        assert isinstance(rows, TokenRows)
        return rows

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.original_module(x, *args, **kwargs)
        rows = self.running()
        if rows is None:
            return out
        module, weight = self.original_module, self.original_module.weight
        values = rows.values.to(weight.dtype)
        if isinstance(module, nn.Embedding):
            if module.padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
                values = torch.where((rows.indices == module.padding_idx)[:, None], values.detach(), values)
            where = rows.positions(x)
            return torch.where((where >= 0)[..., None], values[where.clamp(min=0)].to(out.dtype), out)
        # Added as a difference, so that values still equal to W[T] leave the output bitwise unchanged.
        change = F.linear(x, values - weight.detach()[rows.indices])
        return out.index_add(-1, rows.indices, change.to(out.dtype))

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The base module with the active adapter's rows written into its weight."""
        rows = self.running()
        if rows is not None:
            module = self.original_module
            if self.weight_shared_with:  # the other holders keep the original rows
                module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
            module.weight.index_copy_(0, rows.indices, rows.values.to(module.weight.dtype))
        return self.original_module
