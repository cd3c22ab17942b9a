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


# --------------------------------------------------------------------------- reading safely
class NotARegularFile(OSError):
    """A path that is a FIFO, a device, a socket or a directory: never opened for reading."""


_CHUNK = 1 << 20


def open_regular(path: str | Path) -> IO[bytes]:
    """Open `path` for binary reading only if it is a regular file (no FIFO, device or directory).

    A FIFO or `/dev/zero` would block or never end; they are refused before a byte is read.
    `O_NONBLOCK` makes the open itself return at once even for a FIFO without a writer.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (FIFO, device or socket)"
            raise NotARegularFile(f"{path} is {kind}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped_text(path: str | Path, max_bytes: int) -> str:
    """A small UTF-8 text file (a caption), refusing files over `max_bytes` or not regular."""
    with open_regular(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes")
    return data.decode("utf-8")


def sha256_file(path: str | Path) -> str:
    """sha256 of a regular file's bytes, read in 1 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- locks
_HELD_LOCKS: list = []  # FileLock objects this process holds (closed in forked children)


class LockedError(RuntimeError):
    """Another job holds the lock."""


def acquire_lock(path: str | Path, what: str):
    """Take an exclusive lock file (portable `filelock`); LockedError names `what` when it is held.

    The lock is released by the operating system when its holder dies. Children forked from
    this process (DataLoader workers) close their copy with `forget_inherited_locks`, so an
    orphaned worker can never keep a dead job's lock.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"another prep job is using {what} (lock {path} is held)") from None
    _HELD_LOCKS.append(lock)
    return lock


def held_lock_paths() -> list[str]:
    """The lock files this process holds."""
    return [str(lock.lock_file) for lock in _HELD_LOCKS]


def release_lock(lock) -> None:
    with contextlib.suppress(ValueError):
        _HELD_LOCKS.remove(lock)
    lock.release(force=True)


def forget_inherited_locks() -> None:
    """In a forked child: close the inherited lock descriptors (the parent keeps its lock)."""
    for lock in _HELD_LOCKS:
        fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD_LOCKS.clear()


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (no orphans).

    Elsewhere this is a no-op; torch's DataLoader workers also watch their parent themselves.
    """
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


_FORKING_PID = os.getpid()


def before_fork() -> None:
    """Call in the parent before starting workers, so a child can tell its parent is gone."""
    global _FORKING_PID
    _FORKING_PID = os.getpid()


def worker_init(_worker_id: int = 0) -> None:
    """`worker_init_fn` of every DataLoader: die with the parent, hold no inherited lock."""
    die_with_parent()
    forget_inherited_locks()
    if os.getppid() != _FORKING_PID:  # the parent died before the death signal was armed
        os._exit(1)
