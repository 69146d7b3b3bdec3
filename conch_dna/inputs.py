"""Reading what a user gives: only regular files of bounded size, checked before a byte is read.

A path can name a FIFO (reading blocks until someone writes), a device (`/dev/zero` never ends) or a file far
larger than any sensible input; each is refused with a message saying what was wrong. The file is opened
without blocking and checked again once open, so a file swapped for a pipe in between is refused too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MB = 1 << 20


def read_input(path: str | os.PathLike, what: str, max_bytes: int, error: type[Exception] = ValueError) -> bytes:
    """The bytes of the `what` file at `path` (a regular file, at most `max_bytes`), else `error` saying why."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise error(f"{what} {path} not found") from e
    except IsADirectoryError as e:
        raise error(f"{what} {path} is a folder; give a file") from e
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{what} {path} is a folder; give a file")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is not a regular file (a pipe, device or socket); give a file")
        if st.st_size > max_bytes:
            raise error(f"{what} {path} is {st.st_size / MB:.1f} MB, more than the {max_bytes / MB:.0f} MB allowed; "
                        "split it or give a smaller file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{what} {path} grew past {max_bytes / MB:.0f} MB while it was read; give a file that is not being written")
    return data
