"""A module's ``forward`` replaced on one instance, in a way that copies, pickles and undoes.

A closure assigned to ``module.forward`` breaks three things users do: ``copy.deepcopy`` shares
the closure (the copy runs the original's weights), ``pickle`` cannot store it, and ``inspect``
sees ``(*args, **kwargs)`` (Hugging Face ``Trainer`` then drops every dataset column). An
:class:`InstanceForward` is an object that holds its module: deepcopy and pickle carry it bound to
the copy, its ``__signature__`` is the module's own, and :meth:`restore` puts back whatever
instance-level forward was there before (another library's hook) instead of deleting it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


class InstanceForward:
    """Base of a replacement ``module.forward``; subclasses define ``__call__`` and ``__reduce__``."""

    def __init__(self, module: nn.Module, previous: Any) -> None:
        self.module, self.previous = module, previous
        self.__signature__ = inspect.signature(self.plain())

    @classmethod
    def install(cls, module: nn.Module, *args: Any) -> InstanceForward:
        """Put a ``cls`` in ``module.forward`` (replacing one already there, keeping what it replaced)."""
        current = module.__dict__.get("forward")
        previous = current.previous if isinstance(current, InstanceForward) else current
        module.forward = cls(module, previous, *args)
        return module.forward

    def plain(self) -> Any:
        """The forward without this replacement: the earlier instance-level one, or the class's."""
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def restore(self) -> None:
        if self.previous is not None:
            self.module.forward = self.previous
        else:
            del self.module.forward
