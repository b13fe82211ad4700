"""The one way a file is replaced: write a temp file beside it, fsync, rename over it, fsync the
folder. A crash leaves the old file or the new one, never half of either. (Prompt folders in the
bank are swapped as whole folders; bank/files.py builds them with the same fsync helpers.)"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def write_file(
    path: str | os.PathLike,
    data: bytes | str | Callable[[BinaryIO], None],
    *,
    mode: int | None = None,
) -> Path:
    """Replace `path` with `data` (bytes, text as UTF-8, or a function writing to the open binary
    file, e.g. `lambda f: torch.save(state, f)`); `mode`: the new file's permissions (default:
    the umask's, as `open` would give)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames / new entries in `path` durable; a no-op where directories cannot be synced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (and Windows) refuse fsync on a directory
        log.debug("fsync of folder %s not supported: %s", path, exc)
    finally:
        os.close(fd)
