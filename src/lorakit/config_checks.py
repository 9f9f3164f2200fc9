"""The value checks ``LoraConfig`` runs at construction: each raises a ``ValueError`` that names
the field, the value it got and what is allowed."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import short_repr

ALL_LINEAR = "all-linear"


def check_rank(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoraConfig.{what} must be an integer >= 1, got {short_repr(value)}")


def check_alpha(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"LoraConfig.{what} must be a finite number > 0, got {short_repr(value)}")


def check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig: {what} is not a valid regular expression: {err}") from None


def check_names(what: str, value: Any, *, allow_empty: bool) -> list[str] | str:
    if isinstance(value, str):
        if value == ALL_LINEAR or value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        check_regex(what, value)
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        allowed = f"a list of module names, a regex string or {ALL_LINEAR!r}"
        raise ValueError(f"LoraConfig.{what} must be {allowed}, got {short_repr(value)}")
    names = list(value)
    if isinstance(value, (set, frozenset)) and all(isinstance(n, str) for n in names):
        names.sort()
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"LoraConfig.{what} must hold non-empty strings, got {short_repr(names)}")
    if not names and not allow_empty:
        raise ValueError(f"LoraConfig.{what} is empty: name at least one module")
    return names


def check_parameters(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(n, str) and n for n in value):
        raise ValueError(f"LoraConfig.target_parameters must be a list of parameter names (e.g. "
                         f"['experts.gate_up_proj']) or None, got {short_repr(value)}")  # fmt: skip
    names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return names or None


def check_tokens(value: Any) -> list[int] | dict[str, list[int]] | None:
    def ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and len(set(v)) == len(v) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)  # fmt: skip

    if value is None or (isinstance(value, list) and ids(value)):
        return value
    if isinstance(value, dict) and value and all(isinstance(k, str) and k and ids(v) for k, v in value.items()):
        return {k: list(v) for k, v in value.items()}
    raise ValueError("LoraConfig.trainable_token_indices must be a non-empty list of distinct token ids >= 0, or "
                     f"{{module name: such a list}}, or None; got {short_repr(value)}")  # fmt: skip
