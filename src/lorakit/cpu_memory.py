"""Resident memory on CPU that follows the live tensors, not the history of allocations.

torch's CPU tensors come from the C library's ``malloc``. glibc serves a request with a mapping of
its own (returned to the operating system when freed) only above a threshold that starts at
128 KiB and *rises* to the size of every mapped block that is freed, up to 32 MiB. After the first
activations of a step are freed, every tensor below that size comes from the heap instead, and the
heap keeps the pages that freed tensors leave between live ones. The resident size (what the OOM
killer and ``ulimit`` see) then depends on the order of allocations rather than on what is alive:
one LoRA step of SmolLM2-135M at 2,048 tokens holds 4,175 MB of live tensors with lorakit and
4,196 MB with PEFT, yet peaks at 5,622 MB and 6,577 MB resident; with a fixed threshold of 1 MiB
the peaks are 4,411 MB and 4,470 MB, and the step is no slower (``benchmarks/long_sequence.py``).

:func:`return_freed_memory` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns
the rising off), so that every allocation of ``min_bytes`` or more is mapped on its own and given
back when freed. It changes the whole process (later allocations only) and does nothing outside
glibc. :func:`heap_in_use` reads glibc's count of live bytes, the measure that peak RSS
approximates once the threshold is fixed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

from .errors import InputError

log = logging.getLogger(__name__)

#: glibc's ``M_MMAP_THRESHOLD`` parameter number for ``mallopt``
M_MMAP_THRESHOLD = -3
#: the default threshold set by :func:`return_freed_memory`
DEFAULT_MIN_BYTES = 1 << 20
#: glibc's own ceiling for the threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit systems)
MAX_THRESHOLD = 32 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl and others do not)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory(min_bytes: int = DEFAULT_MIN_BYTES) -> bool:
    """Serve every later allocation of ``min_bytes`` or more with its own mapping, returned to the
    operating system when it is freed (glibc only). Returns whether the setting took effect."""
    if not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or not 0 < min_bytes <= MAX_THRESHOLD:
        raise InputError(f"return_freed_memory: min_bytes = {min_bytes!r}; allowed: 1 to {MAX_THRESHOLD} (32 MiB)")
    libc = _glibc()
    if libc is None:
        log.debug("return_freed_memory: not glibc; the C library's allocator is left as it is")
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(min_bytes)))
    log.debug("return_freed_memory: allocations of %d bytes or more are mapped on their own: %s", min_bytes, done)
    return done


def heap_in_use() -> int | None:
    """Bytes the C library's allocator has handed out and not had back (glibc ``mallinfo2``:
    heap chunks in use plus mapped blocks); None outside glibc or before glibc 2.33."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)
