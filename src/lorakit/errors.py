"""The error every piece of lorakit raises for input a user can fix (a bad file, a bad option).

It is a ``ValueError``; the CLI answers it with one line and a hint instead of a traceback.
Experiments built on lorakit subclass it for their own data errors.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names what is wrong (which key, which shape, which names exist)."""
