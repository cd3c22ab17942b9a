"""Atomic file writes: the one path every write in `prep` goes through.

A crash (SIGKILL, power loss, full disk) at any moment leaves either the old file or the
new one, never a torn mix: write a temp file in the same directory, flush + fsync, rename.
Temp files carry a recognisable suffix so a restart can sweep the ones a crash left behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_MARK = ".prep-tmp"


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_process_umask()  # the mode open() gives a new file


def _target_mode(path: Path) -> int:
    """The mode the replaced file has (kept on rewrite), else the mode of a fresh file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return _NEW_FILE_MODE


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync it and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_MARK, dir=path.parent)
    try:
        with contextlib.suppress(OSError):  # mkstemp creates 0600; give the usual mode instead
            os.chmod(tmp, _target_mode(path))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def fsync_dir(directory: str | Path) -> None:
    """Persist a rename: fsync the directory entry (best effort; not all filesystems allow it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_temp_files(directory: str | Path, prefix: str = "") -> int:
    """Remove temp files a killed run left in `directory` (not recursive); return how many.

    With `prefix`, only the temp files of one target: `atomic_open(dir/NAME)` names its temp
    file `.NAME.<random>.prep-tmp`, so prefix `.NAME.` selects the temps of NAME (and of
    files whose name starts with NAME + ".").
    """
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for entry in os.scandir(directory):
        if entry.name.startswith(prefix) and entry.name.endswith(TMP_MARK) and entry.is_file():
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed
