"""Keeping torch's fused Transformer-encoder kernels away from adapted layers.

In eval mode ``nn.TransformerEncoderLayer`` may skip its submodules' ``forward`` and hand their
weights (``self_attn.in_proj_weight``, ``linear1.weight``, ...) to one fused kernel, and
``nn.TransformerEncoder`` may pack a padded batch into a nested tensor for it. Read through a
lorakit wrapper those are the base weights: the adapter would silently not run. While an encoder
layer holds a lorakit wrapper it carries a no-op forward pre-hook, which torch's own check reads as
"hooks attached: take the regular path", and its encoder does not build nested tensors; both are
undone when the layer holds no wrapper any more.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..targeting import is_wrapper

#: where an ``nn.TransformerEncoder``'s own ``use_nested_tensor`` is kept while it is switched off
NESTED_ATTR = "_lorakit_use_nested_tensor"


def keep_regular_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook whose presence turns torch's fused encoder path off. It refuses nested
    input: an encoder above the injected model packed it for that path, which the layer will not take."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_nested:
        raise RuntimeError(
            "lorakit: this nn.TransformerEncoderLayer holds adapters, but the nn.TransformerEncoder around it packed "
            "its input as a nested tensor for torch's fused path (it was not part of the model given to inject); "
            "set that encoder's use_nested_tensor = False, or inject into the encoder itself"
        )


def _adapted(module: nn.Module) -> bool:
    return any(is_wrapper(m) for m in module.modules())


def sync_fast_paths(model: nn.Module) -> None:
    """Turn the fused encoder paths off where adapters are, back on where none are left."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            hooked = [k for k, hook in module._forward_pre_hooks.items() if hook is keep_regular_path]
            if _adapted(module) and not hooked:
                module.register_forward_pre_hook(keep_regular_path)
            elif hooked and not _adapted(module):
                for key in hooked:
                    del module._forward_pre_hooks[key]
        elif isinstance(module, nn.TransformerEncoder):
            if _adapted(module) and NESTED_ATTR not in module.__dict__:
                module.__dict__[NESTED_ATTR] = getattr(module, "use_nested_tensor", False)
                module.use_nested_tensor = False
            elif NESTED_ATTR in module.__dict__ and not _adapted(module):
                module.use_nested_tensor = module.__dict__.pop(NESTED_ATTR)
