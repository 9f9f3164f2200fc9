"""A transformers causal LM whose ``model(input_ids, labels=...)`` computes its loss with
``lorakit.chunked_loss`` (never materialising the ``[tokens, vocab]`` logits): one call,
``lk.use_chunked_loss(model)``, and everything that calls the model (``lk.Trainer``, recipes,
Hugging Face ``Trainer``) trains as before with less memory.

With ``labels`` the wrapped forward runs the model's body (its ``base_model_prefix`` module, which
ends with the final norm), shifts as transformers does (position t predicts label t+1; -100
ignored) and returns ``loss`` with ``logits=None``; without ``labels`` it is the original forward
(generation is unchanged). ``num_items_in_batch`` (Hugging Face Trainer's gradient accumulation)
divides the summed loss as transformers' own loss does. The head may be a plain linear layer
(frozen, trainable or tied), a LoRA-adapted one (its running adapters enter as the loss's low-rank
term ``t Bᵀ``, so no ``[vocab, width]`` gradient is formed for the frozen head) or a
``modules_to_save`` copy; it is looked up at each call, so switching adapters works. Models that
scale or cap their logits are refused, and so are heads whose output the loss cannot write as
``h Wᵀ + b + t Bᵀ`` (DoRA, 4-bit, a per-row route).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .chunked_loss import DEFAULT_CHUNK, chunked_cross_entropy
from .errors import InputError
from .instance_forward import InstanceForward
from .layers import LoraLayer, LoraLinear, ModulesToSave

#: config attributes that change logits after the head: the chunked loss would not apply them
LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def use_chunked_loss(model: nn.Module, chunk: int | None = DEFAULT_CHUNK) -> nn.Module:
    """Give ``model`` the chunked loss (``chunk`` rows per chunk); ``chunk=None`` puts the forward
    back that was there before. Returns ``model``."""
    current = model.__dict__.get("forward")
    if chunk is None:
        if isinstance(current, ChunkedLossForward):
            current.restore()
        return model
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"use_chunked_loss: chunk = {chunk!r}; allowed: an integer >= 1, or None to undo")
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):  # a PeftModel forwards attributes down
        raise InputError(f"use_chunked_loss: {type(model).__name__} is a PEFT wrapper; apply it to the transformers "
                         "model before get_peft_model (or use lk.inject)")  # fmt: skip
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if isinstance(prefix, str) else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or body is model or head is None:
        raise InputError(f"use_chunked_loss: {type(model).__name__} is not a transformers causal LM with a body "
                         "and an output head")  # fmt: skip
    head_problem(head)
    config = getattr(model, "config", None)
    changed = [k for k in LOGIT_CHANGES if getattr(config, k, None) not in (None, 1, 1.0)]
    if changed:
        raise InputError(f"use_chunked_loss: {type(model).__name__} changes its logits after the head ({changed}); "
                         "the chunked loss would not")  # fmt: skip
    ChunkedLossForward.install(model, chunk)
    return model


class ChunkedLossForward(InstanceForward):
    """``model.forward`` while the chunked loss is on (``lorakit.instance_forward``)."""

    def __init__(self, model: nn.Module, previous: Any, chunk: int) -> None:
        super().__init__(model, previous)
        self.chunk = chunk

    def __reduce__(self) -> tuple[Any, ...]:
        return (ChunkedLossForward, (self.module, self.previous, self.chunk))

    def __call__(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        if labels is None:
            return self.plain()(*args, **kwargs)
        return _chunked_loss_forward(self.module, self.chunk, args, labels, kwargs)


def _chunked_loss_forward(model: nn.Module, chunk: int, args: tuple, labels: Any, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    tuples = kwargs.pop("return_dict", None) is False
    out = getattr(model, model.base_model_prefix)(*args, **kwargs)
    hidden = out[0]
    # The head's terms see every position, as the head itself would (the same dropout draws).
    weight, bias, low_rank = head_terms(model.get_output_embeddings(), hidden)
    if shift_labels is None:  # position t predicts label t + 1 (transformers' shift)
        hidden, targets = hidden[:, :-1], labels[:, 1:]
        low_rank = None if low_rank is None else (low_rank[0][:, :-1], low_rank[1])
    else:  # already aligned with the positions
        targets = shift_labels
    loss = chunked_cross_entropy(hidden, weight, targets.to(hidden.device), bias, chunk=chunk, low_rank=low_rank,
                                 reduction="sum" if items is not None else "mean")  # fmt: skip
    if items is not None:
        loss = loss / items
    rest = {k: getattr(out, k, None) for k in ("past_key_values", "hidden_states", "attentions")}
    if tuples:  # the model's own tuple layout, with None where the logits would be
        return (loss, None, *(v for v in rest.values() if v is not None))
    return CausalLMOutputWithPast(loss=loss, logits=None, **rest)


def head_problem(head: nn.Module, call: bool = False) -> nn.Module:
    """The head's running ``nn.Linear`` (inside a LoRA or ``modules_to_save`` wrapper), or an error
    that names what the chunked loss cannot compute."""
    if isinstance(head, ModulesToSave) and type(head) is not ModulesToSave:  # e.g. trainable token rows
        raise InputError(f"use_chunked_loss: the output head is a {type(head).__name__}, whose output the chunked "
                         "loss cannot write as h Wᵀ + b + t Bᵀ")  # fmt: skip
    inner = head.active_module() if isinstance(head, ModulesToSave) else head
    if isinstance(inner, LoraLayer):
        if isinstance(inner, LoraLinear) and inner.variant == "lora" and type(inner.base_layer) is nn.Linear:
            return inner
        what = f"a {type(inner).__name__} on a {_qualified(inner.base_layer)}"
    elif type(inner) is nn.Linear:
        return inner
    else:
        what = f"a {_qualified(inner)}"
    when = "now " if call else ""
    raise InputError(f"use_chunked_loss: the output head is {when}{what}; allowed: torch's nn.Linear, plain LoRA "
                     "on one, or a modules_to_save copy of one")  # fmt: skip


def _qualified(module: nn.Module) -> str:
    kind = type(module)
    return kind.__name__ if kind.__module__.startswith("torch.nn") else f"{kind.__module__}.{kind.__qualname__}"


def head_terms(head: nn.Module, hidden: Any) -> tuple[Any, Any, tuple[Any, Any] | None]:
    """``(W, b, (t, B) or None)`` with logits ``hidden Wᵀ + b + t Bᵀ``, for the head as it is now."""
    inner = head_problem(head, call=True)
    if not isinstance(inner, LoraLinear):
        return inner.weight, inner.bias, None
    t, B, extra = inner.low_rank_terms(hidden)
    base = inner.base_layer
    bias = base.bias if extra is None else (extra if base.bias is None else base.bias + extra)
    return base.weight, bias, None if t is None else (t, B)
