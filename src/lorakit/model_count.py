"""Parameter counts of any transformers architecture, from its config alone: the model is built on
the meta device (shapes, no memory, nothing downloaded) and its modules are counted.

The planner's hand-written formulas cover a few families exactly; this covers the rest (MoE blocks,
new attention variants, ...) with the numbers transformers itself would allocate. transformers is
imported only when this runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InputError


def meta_counts(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """``layers, hidden, per_layer, embedding, head, other, layer_linears, intermediate, heads, vocab``
    of the model ``cfg`` (a ``config.json`` dict) describes; ``InputError`` naming what is wrong."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"{where}: counting a {cfg.get('model_type')!r} model needs transformers installed") from None
    kind = cfg.get("model_type")
    settings = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(kind, **settings)
    except ValueError as err:
        if str(kind) not in transformers.CONFIG_MAPPING:
            raise InputError(f"{where}: model_type {kind!r} is not known to the planner or to transformers") from None
        raise InputError(f"{where}: transformers refuses this {kind} config: {str(err)[:200]}") from None
    except Exception as err:  # any architecture's own checks, reported by name
        raise InputError(f"{where}: transformers refuses this {kind} config: {type(err).__name__}: "
                         f"{str(err)[:200]}") from None  # fmt: skip
    try:
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:  # no causal-LM head for this architecture: the bare model
                model = transformers.AutoModel.from_config(config)
    except Exception as err:  # e.g. a zero head count dividing a width
        raise InputError(f"{where}: the {kind} model this config describes cannot be built ({type(err).__name__}: "
                         f"{str(err)[:200]}); check its sizes") from None  # fmt: skip
    total = sum(p.numel() for p in model.parameters())  # a tied tensor once
    blocks = _blocks(model, getattr(config, "num_hidden_layers", None), where)
    in_blocks = sum(p.numel() for block in blocks for p in block.parameters())
    first = blocks[0]
    linears = {n: (m.in_features, m.out_features) for n, m in first.named_modules() if isinstance(m, nn.Linear)}
    embedding_module = model.get_input_embeddings()
    embedding = embedding_module.weight.numel() if embedding_module is not None else 0
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head_module is not None and embedding_module is not None and head_module.weight is embedding_module.weight
    head = head_module.weight.numel() if head_module is not None and not tied else 0
    layers = len(blocks)
    return {
        "model_type": str(kind), "layers": layers, "hidden": int(getattr(config, "hidden_size", 0) or 0),
        "per_layer": in_blocks // layers, "embedding": embedding, "head": head,
        "other": total - embedding - head - layers * (in_blocks // layers), "layer_linears": linears,
        "intermediate": int(getattr(config, "intermediate_size", 0) or 0),
        "heads": int(getattr(config, "num_attention_heads", 0) or 0),
        "vocab": head_module.out_features if isinstance(head_module, nn.Linear) else 0,
    }  # fmt: skip


def _blocks(model: nn.Module, layers: int | None, where: str) -> nn.ModuleList:
    """The model's list of repeated blocks: the largest ``nn.ModuleList`` of ``num_hidden_layers`` items."""
    lists = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and (layers is None or len(m) == layers)
    ]
    if not lists:
        raise InputError(f"{where}: no list of {layers} blocks found in the {type(model).__name__} it describes")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
