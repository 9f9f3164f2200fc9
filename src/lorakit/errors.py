"""The errors every piece of lorakit raises for input a user can fix (a bad file, a bad option),
and the two small helpers their messages and checks share.

``InputError`` is a ``ValueError``; the CLI answers it with one line and a hint instead of a
traceback. Experiments built on lorakit subclass it for their own data errors.
"""

from __future__ import annotations

import numbers
import reprlib
from typing import Any


class InputError(ValueError):
    """Bad input: the message names what is wrong (which key, which shape, which names exist)."""


class ArgumentTypeError(InputError, TypeError):
    """An argument of the wrong Python type (``None``, a class instead of an instance, a dict for a
    config). An ``InputError`` whose message names the argument, the value and what is allowed,
    and a ``TypeError`` for code that catches that."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 3, 60, 60, 6, 4


def short_repr(value: Any) -> str:
    """``repr`` cut to a readable length and depth (a 10,000-deep list prints as ``[[[...]]]``),
    for error messages."""
    return _SHORT.repr(value)


def is_whole(value: Any, minimum: int | None = None) -> bool:
    """An integer (a bool is not one), at least ``minimum`` when given."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return whole and (minimum is None or value >= minimum)
