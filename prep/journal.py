"""Per-rank journals of record updates: the crash-safe link between encoder passes and the manifest.

Each process appends one JSON line per updated record (`{"image_id": ..., "caption": ...}`)
to its own file and fsyncs after every batch; no process ever writes another's file, so
no locks or collectives are needed during long work. Between passes the ranks read the
manifest with the journals overlaid in memory (`read_current`); the main process merges them
into the file at checkpoints (`fold_due`, the end of the run, `--checkpoint-minutes`). A crash
loses at most the batch in flight, and a restart merges whatever the journals hold before
doing anything else. Merging is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import orjson

UNSET = "unset"  # an update key listing fields to remove (a lifted `filtered` flag); prep journals no field of that name


def journal_dir(manifest_path: str | Path) -> Path:
    """`<manifest>.journal/`, beside the manifest."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.name + ".journal")


class Journal:
    """Append-only update log of one process."""

    def __init__(self, manifest_path: str | Path, rank: int):
        self.path = journal_dir(manifest_path) / f"rank-{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._lock = threading.Lock()  # writer threads append after their file is on disk

    def append(self, updates: Iterable[dict]) -> None:
        """Append updates (each with an `image_id`) and make them durable before returning."""
        lines = b"".join(orjson.dumps(u) + b"\n" for u in updates)
        if not lines:
            return
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
            self._file.write(lines)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_updates(manifest_path: str | Path) -> dict[str, dict]:
    """All journaled updates, merged per image_id in file order (later lines win).

    A torn last line (the process died mid-write) is ignored: its batch is redone.
    """
    merged: dict[str, dict] = {}
    directory = journal_dir(manifest_path)
    if not directory.is_dir():
        return merged
    for path in sorted(directory.glob("rank-*.jsonl")):
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    update = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                image_id = update.pop("image_id", None) if isinstance(update, dict) else None
                if isinstance(image_id, str):
                    merge_update(merged.setdefault(image_id, {}), update)
    return merged


def merge_update(into: dict, update: dict) -> None:
    """`update` after `into`, as one update: a later value wins, a removal (`UNSET`) cancels
    earlier values of its fields and a later value cancels an earlier removal."""
    for key, value in update.items():
        if key == UNSET:
            names = [name for name in value if isinstance(name, str)] if isinstance(value, list) else []
            for name in names:
                into.pop(name, None)
            into[UNSET] = [*(n for n in into.get(UNSET, []) if n not in names), *names]
            continue
        if key in into.get(UNSET, ()):
            into[UNSET] = [name for name in into[UNSET] if name != key]
        into[key] = value


def clear(manifest_path: str | Path) -> None:
    """Remove the journals once their updates are safely in the manifest."""
    directory = journal_dir(manifest_path)
    if directory.is_dir():
        for path in directory.glob("rank-*.jsonl"):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()


def apply_update(record: dict, update: dict) -> bool:
    """Apply one journaled update to a record in place; True if anything changed.

    A key `provenance.<kind>` sets one entry of the record's `provenance` dict (so passes on
    different ranks never overwrite each other's stamps); `provenance.<kind>.<field>` sets one
    field of that stamp (a refreshed file stamp).
    """
    changed = False
    for key, value in update.items():
        if key == UNSET:
            for name in value if isinstance(value, list) else ():
                if isinstance(name, str) and name in record:
                    del record[name]
                    changed = True
            continue
        target, name = record, key
        if key.startswith("provenance."):
            parts = key.split(".", 2)
            if not isinstance(record.get("provenance"), dict):
                record["provenance"] = {}
            target, name = record["provenance"], parts[1]
            if len(parts) == 3:
                if not isinstance(target.get(name), dict):
                    continue  # no stamp to refresh
                target, name = target[name], parts[2]
        if name not in target or target[name] != value:
            target[name] = value
            changed = True
    return changed


def pending_changes(manifest, updates: dict[str, dict]) -> dict[int, dict]:
    """The records (row -> record) the journaled `updates` change."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not updates or not len(manifest):
        return {}
    ids = list(updates)
    rows = pc.index_in(pa.array(ids, pa.string()), value_set=manifest.table.column("image_id").cast(pa.string()))
    changed = {}
    for image_id, row in zip(ids, rows.to_pylist(), strict=True):
        if row is None:
            continue
        record = manifest.record(row)
        if apply_update(record, updates[image_id]):
            changed[row] = record
    return changed


def read_current(manifest_path: str | Path):
    """The manifest as the run now has it: the file with the journals' updates overlaid in memory
    (`Manifest.overlaid`), the view of every pass after the first. Cheap while the journals are
    small; `fold_due` says when they are not."""
    from prep.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    return manifest.overlaid(pending_changes(manifest, read_updates(manifest_path)))


FOLD_SHARE = 1 / 32  # journals this large (against the manifest, in bytes) are folded between passes


def journal_bytes(manifest_path: str | Path) -> int:
    directory = journal_dir(manifest_path)
    if not directory.is_dir():
        return 0
    return sum(path.stat().st_size for path in directory.glob("rank-*.jsonl"))


def fold_due(manifest_path: str | Path) -> bool:
    """Whether to fold the journals now rather than at the end of the run: once they hold a
    sizeable share of the manifest, every rank re-reading them before each pass would cost more
    than one rewrite (whose cost, the whole file, the work done then pays for). Small journals
    (200 new images in a million records) wait for the run's one final fold."""
    from prep.manifest import resolve_manifest_path

    held = journal_bytes(manifest_path)
    if not held:
        return False
    target = resolve_manifest_path(manifest_path)
    size = target.stat().st_size if target.exists() else 0
    return held >= size * FOLD_SHARE


def merge_into_manifest(manifest_path: str | Path, manifest=None):
    """Checkpoint: fold the journals into the manifest (one streaming rewrite); returns the
    manifest as it now is (the same object when nothing changed).

    Untouched lines are copied as bytes; only records with updates are parsed and written
    again. The journals are kept: other ranks may still be appending. They are cleared only
    once every rank is done (`clear`).
    """
    from prep.manifest import read_manifest, rewrite

    if manifest is None:
        manifest = read_manifest(manifest_path)
    changed = pending_changes(manifest, read_updates(manifest_path))
    if not changed and not manifest.overlay:
        return manifest
    return rewrite(manifest, changed)
