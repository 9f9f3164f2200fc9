"""How many optimizer steps this process has taken, counted by a hook on every torch optimizer.

lorakit caches values derived from adapter weights (a route's stacked adapter bank, DoRA's weight
norms) and keys them on the tensors' version counters, which every in-place write bumps. torch's
fused optimizers (``AdamW(fused=True)``, Hugging Face's ``adamw_torch_fused``) write the parameters
in one kernel without bumping them, so a key of versions alone would keep serving the weights of
before the step. Keys also carry :func:`steps_taken`, which the global post-step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) advances after every ``step()`` of
any optimizer, fused or not.
"""

from __future__ import annotations

import threading
from typing import Any

_count = 0
_handle: Any = None
_lock = threading.Lock()


def _advance(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _count
    _count += 1


def steps_taken() -> int:
    """The number of optimizer steps since the first call (which installs the hook): a cache key
    part that changes whenever an optimizer may have written parameters."""
    global _handle
    if _handle is None:
        with _lock:
            if _handle is None:
                from torch.optim.optimizer import register_optimizer_step_post_hook

                _handle = register_optimizer_step_post_hook(_advance)
    return _count
