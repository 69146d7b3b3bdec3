"""Crash-safe files: the one place that decides how the project writes what others read.

Everything is written to a temporary file or folder in the destination's own directory (same filesystem,
so the final `os.replace` is atomic), flushed and fsynced, then renamed into place. A crash, a kill or a
full disk leaves either the old version or the new one, never a mix; temporary names start with "." so
readers never pick them up, and a failed write removes its temporary.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only file system); nothing was replaced."""


# errno values that mean "this storage cannot take the write", not "the program is wrong"
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def _write_failure(e: BaseException, dest: Path) -> WriteError | None:
    """A clear `WriteError` for a write the storage refused, or None for any other exception. MLX's writers
    raise RuntimeError("[write] Unable to write N bytes to file.") on a full disk."""
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        reason = e.strerror or str(e)
    elif isinstance(e, RuntimeError) and "Unable to write" in str(e):
        reason = f"No space left on device? ({e})"
    else:
        return None
    return WriteError(errno.ENOSPC if "space" in reason.lower() else (getattr(e, "errno", None) or errno.EIO),
                      f"could not write {dest}: {reason}. Nothing was replaced (the previous version, if any, is "
                      "intact); free some space or choose another folder, then run again (--resume continues)")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the content to a temporary file beside `path`; it is fsynced and renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        tmp.chmod(0o644)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if (failure := _write_failure(e, path)) is not None:
            raise failure from e
        raise


@contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success its files are fsynced and it replaces `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; what we write is meant to be readable
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o644)
                _fsync(f)
        old = _move_aside(dest) if dest.exists() else None
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (failure := _write_failure(e, dest)) is not None:
            raise failure from e
        raise


def _move_aside(path: Path) -> Path:
    """Rename a folder to `.{name}.old-{pid}` beside it (atomic): a kill before it is deleted leaves only that
    hidden leftover, never a half-deleted folder under its name."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    return old


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder so that no half-deleted copy is ever seen under its name (`_move_aside`, then removed)."""
    shutil.rmtree(_move_aside(Path(path)), ignore_errors=True)


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and prove a file can be written there; raises OSError otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}-{id(folder)}"
    probe.write_bytes(b"")
    probe.unlink()
