"""Atomic writes: one file (a fsynced temporary file and a rename) or a whole folder's files
together (a fsynced hidden sibling folder swapped in at once: Linux ``renameat2(RENAME_EXCHANGE)``;
elsewhere the old folder aside then the new one in, a kill between rolled back by the next write
or read). Other entries of the folder are carried over. A full disk says so and names the target,
which is left unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path

from .errors import InputError

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
_CANNOT_SWAP = (errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV)  # the folder is then updated in place


# ---------------------------------------------------------------------------------------- writing
def _temp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.lorakit-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _save_error(err: OSError, target: Path) -> OSError:
    """``err`` restated for a failed save of ``target`` (whose previous contents are unchanged)."""
    if err.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on device: cannot save to {target}; it is unchanged", str(target))
    text = f"cannot save to {target} ({err}); it is unchanged"
    return OSError(err.errno, text, str(target)) if err.errno is not None else OSError(text)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename."""
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _save_error(err, path) from err
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``);
    False where the system or the file system cannot."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    number = _SYS_RENAMEAT2.get(platform.machine())  # glibc < 2.28 has no renameat2 wrapper
    if not hasattr(libc, "renameat2") and number is None:
        return False
    result = libc.renameat2(*args) if hasattr(libc, "renameat2") else libc.syscall(ctypes.c_long(number), *args)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def recover_folder(target: Path) -> None:
    """Finish what a killed save of ``target`` left: put back a folder renamed aside when
    ``target`` is missing, delete temporary files and folders. Entries of live writers stay."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.lorakit-(\d+)-[0-9a-z_]+\.(tmp|old)$")
    for entry in sorted(target.parent.iterdir(), key=lambda p: p.name.endswith(".tmp")):
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):  # never delete a folder that could not be put back
                os.rename(entry, target)
                logger.warning("lorakit: restored %s, which an interrupted save had moved aside", target)
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else os.unlink(entry)


def _carry_over(old: Path, new: Path, skip: set[str]) -> bool:
    """Hard-link (or copy) every entry of ``old`` except ``skip`` into ``new``; False when one is
    neither a file, a folder nor a symlink (the folder is then updated in place instead)."""
    for entry in old.iterdir():
        if entry.name in skip:
            continue
        dest = new / entry.name
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry), dest)
        elif stat.S_ISDIR(mode):
            os.mkdir(dest)
            shutil.copystat(entry, dest)
            if not _carry_over(entry, dest, set()):
                return False
        elif stat.S_ISREG(mode):
            try:
                os.link(entry, dest)
            except OSError:
                shutil.copy2(entry, dest)
        else:
            return False
    return True


def _swap_in(tmp: Path, target: Path) -> Path:
    """Put folder ``tmp`` at ``target``; returns where the previous folder now is (to delete)."""
    if exchange(tmp, target):
        return tmp
    aside = _temp_name(target, "old")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


def _in_place(target: Path) -> bool:
    """Whether ``target`` cannot be swapped as a whole: a mount point, or the working directory
    (or one of its parents), which a rename would pull from under the process."""
    if os.path.ismount(target):
        return True
    cwd, real = Path.cwd().resolve(), target.resolve()
    return real == cwd or real in cwd.parents


def _replace_each(target: Path, files: dict[str, bytes], why: str) -> Path:
    logger.warning("lorakit: %s %s; replacing its files one by one", target, why)
    for name, data in files.items():
        atomic_write(target / name, data)
    return target


def write_folder(directory: str | os.PathLike[str], files: dict[str, bytes]) -> Path:
    """Replace the ``files`` (name → bytes) of folder ``directory`` all together: afterwards a
    reader finds either every old file or every new one. Other entries of the folder are kept.
    Where the folder cannot be swapped (a mount point, the working directory, a parent lorakit may
    not write), each file is replaced atomically on its own, in the order given. Returns the folder."""
    given = Path(directory)
    target = given.resolve() if given.is_symlink() else Path(os.path.abspath(given))
    if target.exists() and not target.is_dir():
        raise InputError(f"{given}: a file, not a folder; an adapter is saved into a folder")
    tmp = _temp_name(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(target)
        for name in files if target.is_dir() else ():
            recover_folder(target / name)  # temporary files of an interrupted in-place update
    except OSError as err:
        raise _save_error(err, target) from err
    if target.is_dir() and _in_place(target):
        return _replace_each(target, files, "is a mount point or the working folder")
    try:
        os.mkdir(tmp)
    except OSError as err:
        if target.is_dir() and err.errno in _CANNOT_SWAP:
            return _replace_each(target, files, f"cannot be swapped ({err.strerror})")
        raise _save_error(err, target) from err
    previous: Path | None = tmp
    why = ""
    try:
        if target.is_dir() and not _carry_over(target, tmp, set(files)):
            why = "holds special files (devices, pipes or sockets)"
        for name, data in files.items() if not why else ():
            with open(tmp / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if not why:
            _fsync_path(tmp)
            if target.is_dir():
                shutil.copystat(target, tmp)  # the folder's mode and times
            previous = _swap_in(tmp, target) if target.is_dir() else os.rename(tmp, target)  # (None)
    except OSError as err:
        if not (target.is_dir() and err.errno in _CANNOT_SWAP):
            raise _save_error(err, target) from err
        why = f"cannot be swapped ({err.strerror})"
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    if why:
        return _replace_each(target, files, why)
    with contextlib.suppress(OSError):  # durability of the rename; the new folder is already in place
        _fsync_path(target.parent)
    return target
