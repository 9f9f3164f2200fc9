"""A transformers causal LM whose ``model(input_ids, labels=...)`` computes its loss with
``lorakit.chunked_loss`` (never materialising the ``[tokens, vocab]`` logits): one call,
``lk.use_chunked_loss(model)``, and everything that calls the model (``lk.Trainer``, recipes,
Hugging Face ``Trainer``) trains as before with less memory.

With ``labels`` the wrapped forward runs the model's body (its ``base_model_prefix`` module, which
ends with the final norm), shifts as transformers does (position t predicts label t+1; -100
ignored) and returns ``loss`` with ``logits=None``; without ``labels`` it is the original forward
(generation is unchanged). ``num_items_in_batch`` (Hugging Face Trainer's gradient accumulation)
divides the summed loss as transformers' own loss does. The head must be a plain linear layer
(frozen, trainable or tied); models that scale or cap their logits are refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .chunked_loss import DEFAULT_CHUNK, chunked_cross_entropy
from .errors import InputError
from .layers import LoraLayer

ORIGINAL = "_lorakit_plain_forward"
#: config attributes that change logits after the head: the chunked loss would not apply them
LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def use_chunked_loss(model: nn.Module, chunk: int | None = DEFAULT_CHUNK) -> nn.Module:
    """Give ``model`` the chunked loss (``chunk`` rows per chunk); ``chunk=None`` puts the original
    forward back. Returns ``model``."""
    if chunk is None:
        original = model.__dict__.pop(ORIGINAL, None)
        if original is not None:
            del model.forward
        return model
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"use_chunked_loss: chunk = {chunk!r}; allowed: an integer >= 1, or None to undo")
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if isinstance(prefix, str) else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or body is model or head is None:
        raise InputError(f"use_chunked_loss: {type(model).__name__} is not a transformers causal LM with a body "
                         "and an output head")  # fmt: skip
    if isinstance(head, LoraLayer) or type(head) is not nn.Linear:
        raise InputError(f"use_chunked_loss: the output head is a {type(head).__name__}; allowed: a plain nn.Linear "
                         "(an adapter on the head is not folded into the chunked loss yet)")  # fmt: skip
    config = getattr(model, "config", None)
    changed = [k for k in LOGIT_CHANGES if getattr(config, k, None) not in (None, 1, 1.0)]
    if changed:
        raise InputError(f"use_chunked_loss: {type(model).__name__} changes its logits after the head ({changed}); "
                         "the chunked loss would not")  # fmt: skip
    original = model.__dict__.get(ORIGINAL) or model.forward

    def forward(*args: Any, labels: Any = None, **kwargs: Any) -> Any:
        if labels is None:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        out = body(*args, **kwargs)
        hidden = out[0]
        shifted = labels[:, 1:].to(hidden.device)
        loss = chunked_cross_entropy(hidden[:, :-1], head.weight, shifted, head.bias, chunk=chunk,
                                     reduction="sum" if items is not None else "mean")  # fmt: skip
        if items is not None:
            loss = loss / items
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))  # fmt: skip

    model.__dict__[ORIGINAL] = original
    model.forward = forward
    return model
