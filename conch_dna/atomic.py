"""Crash-safe files: the one place that decides how the project writes what others read.

Everything is written to a temporary file or folder in the destination's own directory (same filesystem,
so the final `os.replace` is atomic), flushed and fsynced, then renamed into place. A crash, a kill or a
full disk leaves either the old version or the new one, never a mix; temporary names start with "." so
readers never pick them up, and a failed write removes its temporary.

Nothing the tool did not write is ever deleted: every folder `atomic_folder` writes lists its files in
OWNER_FILE, and an existing destination is replaced only when it is empty or holds nothing but the files it
lists. Any other folder is refused (`ForeignFolderError`), or, when the caller asks, kept under a new name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only file system); nothing was replaced."""


class ForeignFolderError(WriteError):
    """The destination holds files this tool did not write; it was left as it is."""


# Written into every folder `atomic_folder` makes: the names of the files it put there.
OWNER_FILE = ".conch_dna.json"
# Folders written before OWNER_FILE existed list their files in their own manifest: {file: {key: {name: ...}}}.
_LEGACY_LISTS = {"conch_model.json": "files", "state.json": "sha256"}


# errno values that mean "this storage cannot take the write", not "the program is wrong"
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def _write_failure(e: BaseException, dest: Path) -> WriteError | None:
    """A clear `WriteError` for a write the storage refused, or None for any other exception. MLX's writers
    raise RuntimeError("[write] Unable to write N bytes to file.") on a full disk."""
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        reason = e.strerror or str(e)
    elif isinstance(e, RuntimeError) and "Unable to write" in str(e):
        reason = f"No space left on device? ({e})"
    elif any(s in str(e) for s in ("No space left", "StorageFull", "os error 28")):  # safetensors' own errors
        reason = "No space left on device"
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


def foreign_entries(folder: Path) -> list[str]:
    """What `folder` holds that this tool did not write there ([] when it is ours, or empty)."""
    entries = {p.name for p in folder.iterdir()}
    for name, key in ((OWNER_FILE, "files"), *_LEGACY_LISTS.items()):
        try:
            listed = json.loads((folder / name).read_text())[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(listed, list | dict):
            return sorted(entries - set(listed) - {name, OWNER_FILE})
    return sorted(entries)


def check_replaceable(dest: str | os.PathLike, hint: str = "move those files away") -> None:
    """Refuse (`ForeignFolderError`, saying `hint` as what else to do) a destination that is not a folder, or
    holds files this tool did not write; an absent or empty one, or one this tool wrote, may be replaced."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise ForeignFolderError(errno.EEXIST, f"{dest} exists and is not a folder; choose another destination")
    if foreign := foreign_entries(dest):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignFolderError(errno.ENOTEMPTY, f"{dest} holds files this tool did not write ({shown}); nothing was "
                                 f"changed. Choose an empty or new destination, or {hint}")


def _replace_or_keep(dest: Path, keep_foreign: bool) -> Path | None:
    """`check_replaceable`, or with `keep_foreign` a folder holding other files renamed aside; its new name."""
    if keep_foreign and dest.is_dir() and not dest.is_symlink() and foreign_entries(dest):
        kept = dest.with_name(f"{dest.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(dest, kept)
        return kept
    check_replaceable(dest)
    return None


@contextmanager
def atomic_folder(dest: str | os.PathLike, keep_foreign: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success its files are fsynced and it replaces `dest`.

    An existing `dest` is replaced only if it is empty or holds only what this tool wrote there; otherwise
    `ForeignFolderError`, before any work, or with `keep_foreign` it is renamed to `<dest>.kept-<time>` (logged)
    and nothing in it is deleted."""
    dest = Path(dest)
    if not keep_foreign:
        check_replaceable(dest)  # before the caller's work, not only at the end
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; what we write is meant to be readable
    try:
        yield tmp
        (tmp / OWNER_FILE).write_text(json.dumps({"files": sorted(p.name for p in tmp.iterdir())}))
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o644)
                _fsync(f)
        kept = _replace_or_keep(dest, keep_foreign)
        old = _move_aside(dest) if dest.exists() else None
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if kept is not None:
            log.warning("kept what was in the destination under another name", destination=str(dest), kept=str(kept))
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
    """Delete a folder this tool wrote so that no half-deleted copy is ever seen under its name (`_move_aside`,
    then removed); a folder holding anything else is left alone (`ForeignFolderError`)."""
    path = Path(path)
    if foreign := foreign_entries(path):
        raise ForeignFolderError(errno.ENOTEMPTY, f"not removing {path}: it holds files this tool did not write ({', '.join(foreign[:5])})")
    shutil.rmtree(_move_aside(path), ignore_errors=True)


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and prove a file can be written there; raises OSError otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}-{id(folder)}"
    probe.write_bytes(b"")
    probe.unlink()
