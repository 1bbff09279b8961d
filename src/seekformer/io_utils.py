"""Atomic writes: a crash leaves the old file (or directory) or the new one, never half of one."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` for a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def fsync_dir(directory: str | Path) -> None:
    """Make the entries of `directory` (renames into it) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling_temp_dir(target: str | Path, prefix: str) -> Path:
    """A new empty directory beside `target` (on its filesystem, so it can replace `target`), with
    the permissions of an existing `target`, or those of any new directory."""
    target = Path(target)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    os.chmod(path, target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~_umask())
    return path


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Put the finished directory `new` at `target` (same filesystem), removing what was there.

    Where the system can (Linux `renameat2` with `RENAME_EXCHANGE`), an existing `target` is swapped
    with `new` in one atomic step, so `target` always names a complete directory, the old one or the
    new one. Elsewhere the old directory is first renamed aside (`.{name}.old-*` beside it), leaving
    a moment in which `target` does not exist but nothing is lost.
    """
    new, target = Path(new), Path(target)
    fsync_dir(new)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now names the old directory
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    fsync_dir(target.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
