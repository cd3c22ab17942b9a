"""The manifest's tail rewritten in place, with an undo file: how a run that adds or changes a few
records at the end of a large manifest avoids copying the whole file.

A run on 200 new images in a million-record manifest changes only its last 200 lines: they are
appended by the preparation, then changed by the passes. An atomic rewrite (temp + fsync +
rename) copies the other 999,800 lines (2 GB) each time. Here the old bytes of the tail are saved
first (`<manifest>.undo`, atomically: a header line, then the bytes), then the tail is written over
in place and fsynced, then the undo file is removed. A kill at any point leaves either no undo
file (the old or the new manifest, whole) or a complete one, and the next `lock_manifest` (every
writer) or read puts the old tail back (`roll_back`): the same state as a kill before the change.

A reader that finds an undo file while a live writer holds the lock waits for it (the window is
one tail's write); one left by a dead writer is rolled back under the lock.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import orjson

from prep.errors import UserError
from prep.fsio import atomic_open, fsync_dir

logger = logging.getLogger("prep")

TAIL_SHARE = 1 / 16  # a tail up to this share of the manifest (in bytes) is rewritten in place
WAIT_S = 60.0  # how long a reader waits for a live writer's in-place change


def undo_path(path: str | Path) -> Path:
    """`<manifest>.undo`, beside the manifest."""
    path = Path(path)
    return path.with_name(path.name + ".undo")


def lock_path(path: str | Path) -> Path:
    """`<manifest>.lock`: the lock of the manifest's one writer (`prep.manifest.lock_manifest`)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def rewrite_tail(path: Path, start: int, old_tail: bytes, new_tail: bytes) -> None:
    """Replace the manifest's bytes from `start` to its end (`old_tail`) with `new_tail`, crash-safely."""
    undo = undo_path(path)
    with atomic_open(undo, "wb") as f:
        f.write(orjson.dumps({"offset": start, "length": len(old_tail), "inode": path.stat().st_ino}) + b"\n")
        f.write(old_tail)
    try:
        _write_at(path, start, new_tail)
    except BaseException:
        roll_back(path)
        raise
    undo.unlink()
    fsync_dir(path.parent)


def _write_at(path: Path, start: int, data: bytes) -> None:
    """`data` at `start`, the file cut right after it, durable before returning."""
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(data)
        f.truncate(start + len(data))
        f.flush()
        os.fsync(f.fileno())


def roll_back(path: str | Path) -> bool:
    """Put back the tail an interrupted `rewrite_tail` saved; True if there was one. The caller
    holds the manifest's lock (or is the writer that failed)."""
    path = Path(path)
    undo = undo_path(path)
    try:
        with open(undo, "rb") as f:
            header = orjson.loads(f.readline())
            old_tail = f.read()
    except FileNotFoundError:
        return False
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UserError(f"cannot read {undo} (the saved end of {path} from an interrupted run): {exc}") from None
    if not isinstance(header, dict) or header.get("length") != len(old_tail) or not isinstance(header.get("offset"), int):
        raise UserError(f"{undo} (the saved end of {path} from an interrupted run) is damaged: left as it is")
    if header.get("inode") != path.stat().st_ino:  # the manifest was replaced since: the undo is not for it
        stale = undo.with_name(undo.name + ".stale")
        os.replace(undo, stale)
        logger.warning("%s belongs to a manifest that has since been replaced: kept as %s, not applied", undo, stale)
        return False
    _write_at(path, header["offset"], old_tail)
    undo.unlink()
    fsync_dir(path.parent)
    return True


def settle(path: Path) -> None:
    """Before reading: no in-place change in flight. One a dead writer left is rolled back (under the
    lock); one a live writer holds the lock for is waited for."""
    from prep.fsio import LockedError, acquire_lock, held_lock_paths, release_lock

    deadline = time.monotonic() + WAIT_S
    lock_file = lock_path(path)
    while undo_path(path).exists():
        if str(lock_file) in held_lock_paths():  # this process is the writer
            roll_back(path)
            return
        try:
            lock = acquire_lock(lock_file, f"the manifest {path}")
        except LockedError:
            if time.monotonic() > deadline:
                raise UserError(f"the manifest {path} is being changed in place by another prep job "
                                f"({undo_path(path)} stays): try again when it is done") from None
            time.sleep(0.05)
            continue
        try:
            roll_back(path)
        finally:
            release_lock(lock)

