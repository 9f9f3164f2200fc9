"""Where training runs: the device, mixed precision per device type, batches moved onto the
device, and the process group under ``torchrun`` (NCCL for CUDA devices, gloo otherwise).

Everything here is plain torch and cheap to import; the helpers that only decide something
(``autocast_settings``, ``distributed_backend``) touch no hardware, so CPU tests can check them.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import torch
from torch import nn

from .errors import InputError

DeviceLike = str | torch.device | int


def parse_device(device: DeviceLike, what: str = "device") -> torch.device:
    """``torch.device(device)``, or an ``InputError`` that names ``what`` and the value."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"{what} {device!r} is not a device torch knows ('cpu', 'cuda', 'cuda:1'...): {err}") from None


def training_device(device: DeviceLike, what: str = "device") -> torch.device:
    """``parse_device``, refusing ``"meta"`` (tensors without data cannot be trained)."""
    dev = parse_device(device, what)
    if dev.type == "meta":
        raise InputError(f"{what} {str(device)!r}: the meta device holds no data and cannot train; "
                         "use 'cpu', 'cuda', 'cuda:1'... or None (where the model is)")  # fmt: skip
    return dev


def resolve_device(device: DeviceLike | None, model: nn.Module | None = None) -> torch.device:
    """The device training runs on: ``device`` itself (checked to exist), or, when it is None, the
    device of the model's first parameter (CPU for a model without parameters).

    ``"cuda"`` without an index becomes the current CUDA device (``cuda:0`` unless
    ``torch.cuda.set_device`` chose another), so that comparisons with parameter devices hold.
    """
    if device is None:
        first = next(iter(model.parameters()), None) if model is not None else None
        return first.device if first is not None else torch.device("cpu")
    dev = training_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this torch build has no CUDA support (a CPU-only wheel)"
                if torch.version.cuda is None
                else f"torch was built for CUDA {torch.version.cuda} but finds no usable GPU (driver, "
                "CUDA_VISIBLE_DEVICES?)"
            )
            raise InputError(f"device {str(device)!r} asks for CUDA, but {build}; use device='cpu' or None")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {str(device)!r} asks for Apple's MPS, which this machine or torch build lacks")
    return dev


def autocast_settings(device_type: str, bf16: bool = False, fp16: bool = False) -> tuple[bool, torch.dtype]:
    """``(enabled, dtype)`` for ``torch.autocast(device_type, ...)``: bf16 on any device type,
    fp16 only on CUDA (where it goes with a ``GradScaler``); neither: no autocast, float32."""
    if bf16 and fp16:
        raise InputError("bf16 and fp16 mixed precision exclude each other: set at most one of them")
    if fp16:
        if device_type != "cuda":
            raise InputError(
                f"fp16 mixed precision (with a gradient scaler) runs on CUDA only, and training runs on "
                f"{device_type!r}; use bf16=True there, or no mixed precision"
            )
        return True, torch.float16
    if bf16:
        return True, torch.bfloat16
    return False, torch.float32


def move_to(obj: Any, device: DeviceLike, non_blocking: bool | None = None) -> Any:
    """``obj`` with every tensor in it on ``device``: tensors, lists and tuples (their type kept,
    named tuples included), dicts (their type kept), and anything with a ``.to(device)`` method
    (e.g. Hugging Face's ``BatchEncoding``); anything else is returned as it is.

    ``non_blocking`` defaults to True for a CUDA target (host-to-device copies overlap compute;
    from pinned memory they are truly asynchronous) and False otherwise (a device-to-host copy
    must be complete before the host reads it).
    """
    device = parse_device(device)
    if non_blocking is None:
        non_blocking = device.type == "cuda"
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        moved = {k: move_to(v, device, non_blocking) for k, v in obj.items()}
        if type(obj) is dict:
            return moved
        out = copy.copy(obj)  # OrderedDict, defaultdict, ...: same type, same extra attributes
        out.update(moved)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(move_to(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        moved_items = [move_to(v, device, non_blocking) for v in obj]
        return moved_items if type(obj) is list else type(obj)(moved_items)
    to = getattr(obj, "to", None)
    if callable(to) and not isinstance(obj, type):
        try:
            return to(device, non_blocking=non_blocking)
        except TypeError:  # a .to(device) without non_blocking (older BatchEncoding)
            return to(device)
    return obj


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (a progress bar there; piped, periodic log lines instead)."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def distributed_backend(device: DeviceLike) -> str:
    """The collective backend for tensors on ``device``: NCCL for CUDA, gloo for anything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: DeviceLike | None = None) -> torch.device:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); returns the
    device this process trains on (pass it as ``TrainerConfig(device=...)``).

    ``device`` None means CUDA when available, else CPU. On CUDA, a device without an index
    becomes ``cuda:LOCAL_RANK`` and is made the current device, so each process owns its own GPU
    and NCCL sees the right one. The backend is ``distributed_backend(device)``. A single process
    (no ``WORLD_SIZE``, or 1) joins nothing. Calling it twice is harmless.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dev = resolve_device(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not torch.distributed.is_initialized():
        if not torch.distributed.is_available():
            raise InputError(f"WORLD_SIZE={size} asks for distributed training, but this torch build lacks it")
        torch.distributed.init_process_group(distributed_backend(dev))
    return dev
