"""Atomic writes: one file (a fsynced temporary file and a rename) or a whole folder's files
together (a fsynced hidden sibling folder swapped in at once: Linux ``renameat2(RENAME_EXCHANGE)``;
elsewhere the old folder aside then the new one in, a kill between rolled back by the next write
or read). Other entries of the folder are carried over (with their owners). A folder that is or
holds a mount point is updated file by file instead, and no deletion descends into a mount. A full
disk says so and names the target, which is left unchanged.
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
from collections.abc import Iterator
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


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_owner(like: os.stat_result | None, path: str | os.PathLike[str]) -> None:
    """Give ``path`` (never followed) the owner and group of ``like`` (a ``stat`` of what it
    replaces or copies), when they differ; silently not when not allowed (not root, or an owner
    unknown to this user namespace)."""
    if like is not None and hasattr(os, "lchown"):
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (like.st_uid, like.st_gid):
            with contextlib.suppress(OSError):  # PermissionError when not root
                os.lchown(path, like.st_uid, like.st_gid)


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename (keeping the owner
    of the file it replaces)."""
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _same_owner(_lstat_or_none(path), tmp)
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
            remove_tree(entry) if entry.is_dir() and not entry.is_symlink() else os.unlink(entry)


def _mount_points() -> set[Path]:
    """Every mount point of this process (Linux ``/proc/self/mountinfo``, which also lists bind
    mounts that ``os.path.ismount`` cannot tell); empty elsewhere."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(errors="surrogateescape").splitlines()
    except OSError:
        return set()
    unescape = re.compile(r"\\([0-7]{3})")
    return {Path(unescape.sub(lambda m: chr(int(m.group(1), 8)), f[4])) for f in map(str.split, lines) if len(f) > 4}


def _is_mount(path: Path, mounts: set[Path]) -> bool:
    return os.path.ismount(path) or Path(os.path.realpath(path)) in mounts


def holds_mount(folder: Path) -> bool:
    """Whether a file system is mounted on ``folder`` or anywhere inside it."""
    mounts, real = _mount_points(), Path(os.path.realpath(folder))
    if any(real == m or real in m.parents for m in mounts):
        return True
    walk = os.walk(folder)  # symlinks not followed; a mount is found before it is entered
    return os.path.ismount(folder) or any(os.path.ismount(os.path.join(r, d)) for r, dirs, _ in walk for d in dirs)


def remove_tree(path: Path) -> None:
    """``shutil.rmtree`` that never descends into a mounted file system (the mount point and what
    leads to it stay, with a warning); errors are ignored."""
    mounts = _mount_points()

    def remove(p: Path) -> bool:
        if _is_mount(p, mounts):
            logger.warning("lorakit: %s is a mount point; not deleting what is mounted there", p)
            return False
        emptied = True
        with contextlib.suppress(OSError), os.scandir(p) as entries:
            for e in list(entries):
                if e.is_dir(follow_symlinks=False):
                    emptied = remove(Path(e.path)) and emptied
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
        if emptied:
            with contextlib.suppress(OSError):
                os.rmdir(p)
        return emptied

    remove(Path(path))


def _carry_over(old: Path, new: Path, skip: set[str]) -> bool:
    """Hard-link (or copy) every entry of ``old`` except ``skip`` into ``new``; False when one is
    neither a file, a folder nor a symlink (the folder is then updated in place instead)."""
    for entry in old.iterdir():
        if entry.name in skip:
            continue
        dest = new / entry.name
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(entry), dest)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(dest)
            shutil.copystat(entry, dest)
            if not _carry_over(entry, dest, set()):
                return False
        elif stat.S_ISREG(st.st_mode):
            try:
                os.link(entry, dest)
            except OSError:
                shutil.copy2(entry, dest)
        else:
            return False
        _same_owner(st, dest)
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
    """Whether ``target`` cannot be swapped as a whole: a mount point or a folder with one inside
    (deleting the previous folder would empty that file system), or the working directory (or one
    of its parents), which a rename would pull from under the process."""
    if holds_mount(target):
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
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise InputError(f"directory = {directory!r}: name the folder to save into (an empty path is refused)")
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
        return _replace_each(target, files, "is a mount point or the working folder, or holds a mount point")
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
            _same_owner(_lstat_or_none(target / name), tmp / name)
        if not why:
            fsync_path(tmp)
            if target.is_dir():
                shutil.copystat(target, tmp)  # the folder's mode and times
                _same_owner(os.stat(target), tmp)  # and its owner (a save as root into a user's folder)
            previous = _swap_in(tmp, target) if target.is_dir() else os.rename(tmp, target)  # (None)
    except OSError as err:
        if not (target.is_dir() and err.errno in _CANNOT_SWAP):
            raise _save_error(err, target) from err
        why = f"cannot be swapped ({err.strerror})"
    finally:
        if previous is not None:
            remove_tree(previous)
    if why:
        return _replace_each(target, files, why)
    with contextlib.suppress(OSError):  # durability of the rename; the new folder is already in place
        fsync_path(target.parent)
    return target


@contextlib.contextmanager
def replacing_folder(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh hidden folder beside ``directory`` to write a whole output into (a model export,
    whose files are too large to hold in memory for ``write_folder``). When the block ends, its
    files are fsynced and it replaces ``directory`` in one step (a previous folder there is
    deleted); when the block raises, it is deleted and ``directory`` is left as it was."""
    target = Path(os.path.abspath(directory))
    if target.exists() and not target.is_dir():
        raise InputError(f"{directory}: a file, not a folder")
    if target.is_dir() and _in_place(target):
        raise InputError(f"{directory}: is a mount point or the working folder (or holds one), so it cannot be "
                         "replaced as a whole; write into a new folder")  # fmt: skip
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(target)
        tmp = _temp_name(target, "tmp")
        os.mkdir(tmp)
    except OSError as err:
        raise _save_error(err, target) from err
    previous: Path | None = tmp
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                fsync_path(Path(root) / name)
        fsync_path(tmp)
        previous = _swap_in(tmp, target) if target.is_dir() else os.rename(tmp, target)  # (None)
    except OSError as err:
        raise _save_error(err, target) from err
    finally:
        if previous is not None:
            remove_tree(previous)
    with contextlib.suppress(OSError):
        fsync_path(target.parent)


@contextlib.contextmanager
def replacing_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a large file written by another library; when the
    block ends it is fsynced and renamed over ``path``, when it raises it is deleted."""
    target = Path(os.path.abspath(path))
    if target.is_dir():
        raise InputError(f"{path}: a folder, where a file is written")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(target)  # temporary files of a killed earlier write
    except OSError as err:
        raise _save_error(err, target) from err
    tmp = _temp_name(target, "tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
    except OSError as err:
        raise _save_error(err, target) from err
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        fsync_path(target.parent)
