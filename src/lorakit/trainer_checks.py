"""What ``lorakit.Trainer`` checks in its arguments before it trains, and in each loss it gets.

Every refusal is an ``ArgumentTypeError`` (an ``InputError``, so the CLI exits 2, and a
``TypeError``), one line naming the argument, the value and what is allowed. The constructor
checks the types, the dataset's size against one global batch and what trains; the loss is
checked at every micro-batch (a scalar tensor that carries a gradient), before ``backward``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .devices import training_device
from .errors import ArgumentTypeError, is_whole, short_repr
from .optim import check_training_values

logger = logging.getLogger(__name__)

LOSS = "loss_fn must return a scalar tensor with a gradient"


def check_config_values(values: Mapping[str, Any], label: Callable[[str], str]) -> None:
    """``optim.check_training_values``, and a device that torch knows and that can train."""
    check_training_values(values, label)
    if values.get("device") is not None:
        training_device(values["device"], what=label("device"))  # its error names label and value


def check_trainer_args(model: Any, loss_fn: Any, collate: Any, num_examples: Any, config: Any,
                       config_type: type, eval_fn: Any = None, optimizer_factory: Any = None) -> int:  # fmt: skip
    """Refuse arguments of the wrong type; returns ``num_examples`` as an ``int``."""
    if not isinstance(config, config_type):
        hint = ": build one with TrainerConfig(**config)" if isinstance(config, dict) else ""
        raise ArgumentTypeError(f"Trainer: config = {short_repr(config)} ({type(config).__name__}): expected a "
                            f"lorakit.TrainerConfig{hint}")  # fmt: skip
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"Trainer: model = {short_repr(model)} ({type(model).__name__}): expected a "
                            "torch.nn.Module")  # fmt: skip
    callables = {"loss_fn": (loss_fn, "loss_fn(model, batch) -> scalar loss tensor", False),
                 "collate": (collate, "collate(indices) -> batch", False),
                 "eval_fn": (eval_fn, "eval_fn(model) -> dict of metrics, or None", True),
                 "optimizer_factory": (optimizer_factory, "optimizer_factory(params, config) -> optimizer, or None",
                                       True)}  # fmt: skip
    for name, (fn, allowed, optional) in callables.items():
        if not (callable(fn) or (optional and fn is None)):
            raise ArgumentTypeError(f"Trainer: {name} = {short_repr(fn)} ({type(fn).__name__}): expected a callable "
                                f"{allowed}")  # fmt: skip
    several = sorted({n for m in model.modules() for n in getattr(m, "also_active", ())})
    if several:  # checkpoints hold config.adapter only: the others would be trained and then lost on resume
        raise ArgumentTypeError(f"Trainer: the model runs several adapters at once (also {several}, from "
                                "set_adapter([...])); lk.Trainer trains and checkpoints one: activate one")  # fmt: skip
    if not is_whole(num_examples, 1):
        raise ArgumentTypeError(f"Trainer: num_examples = {short_repr(num_examples)} ({type(num_examples).__name__}): "
                            "expected an integer >= 1, the number of examples collate(indices) can index")  # fmt: skip
    return int(num_examples)


def check_batch_fits(num_examples: int, batch_size: int, world: int, label: str = "TrainerConfig.batch_size") -> None:
    """Refuse a global batch (``batch_size`` on each of ``world`` processes) larger than the data."""
    if batch_size * world > num_examples:
        processes = f" on each of {world} processes" if world > 1 else ""
        most = f"at most {num_examples // world}" if num_examples >= world else f"more examples than {world} processes"
        raise ArgumentTypeError(f"{label} = {batch_size}{processes} needs {batch_size * world} examples per step, and "
                            f"the data holds {num_examples}; allowed: {most}")  # fmt: skip


def check_trainable(model: nn.Module, adapters: int) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` (refused when there are none); without a lorakit
    adapter (``adapters`` = 0), one INFO line says what trains."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ArgumentTypeError(
            "Trainer: the model has no trainable parameters (every requires_grad is False); "
            "allowed: a model with an adapter (lorakit.inject) or parameters to train"
        )
    if adapters == 0:
        trained, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
        what = f"all {total:,} parameters (full fine-tuning)" if trained == total else f"{trained:,} of {total:,}"
        logger.info("Trainer: the model holds no lorakit adapter; training %s", what)
    return params


def warn_schedule(warmup_steps: int, max_steps: int) -> None:
    """Warn once when the warmup is longer than the run (the learning rate never reaches ``lr``)."""
    if warmup_steps > max_steps:
        warnings.warn(
            f"lorakit: warmup_steps = {warmup_steps} exceeds max_steps = {max_steps}: the learning "
            f"rate never reaches lr (it ends at {max_steps}/{warmup_steps} of it)",
            UserWarning,
            stacklevel=3,
        )


def check_loss(loss: Any, step: int) -> None:
    """Refuse what ``loss_fn`` returned at optimizer step ``step`` unless it is a one-element
    tensor that carries a gradient."""
    if not isinstance(loss, torch.Tensor):
        raise ArgumentTypeError(f"{LOSS}; got {type(loss).__name__} {short_repr(loss)} at step {step}")
    if loss.numel() != 1:
        raise ArgumentTypeError(f"{LOSS}; got a tensor of shape {list(loss.shape)} at step {step} (reduce it, e.g. "
                            ".mean())")  # fmt: skip
    if not loss.requires_grad:
        raise ArgumentTypeError(f"{LOSS}; got a tensor that does not require grad at step {step} (detached, computed "
                            "under torch.no_grad(), or depending on no trainable parameter)")  # fmt: skip


def skipped_message(skipped: int, taken: int, first: int) -> str:
    """What to say when ``skipped`` of the ``taken`` steps after step ``first`` were non-finite."""
    if skipped == taken:
        return (
            f"every one of the {taken} steps of this run (steps {first + 1}-{first + taken}) was skipped as "
            "non-finite (on_nonfinite='skip'): the adapter did not change; check the data, the loss and lr"
        )
    return f"lorakit: {skipped} of the {taken} steps of this run were skipped as non-finite (on_nonfinite='skip')"


def check_same_parameters(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Refuse to step when the model's trainable parameters are no longer the optimizer's (replaced
    after the Trainer was built: the optimizer would update tensors the model no longer uses)."""
    now = [p for p in model.parameters() if p.requires_grad]
    if len(now) != len(params) or any(a is not b for a, b in zip(now, params, strict=False)):
        raise ArgumentTypeError(
            "Trainer: the model's trainable parameters were replaced after the Trainer was built (by "
            "fully_shard, to_empty, load_state_dict(assign=True), a new requires_grad, ...); the optimizer "
            "would train tensors the model no longer uses: build the Trainer after such changes"
        )
