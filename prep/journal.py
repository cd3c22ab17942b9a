"""Per-rank journals of record updates: the crash-safe link between encoder passes and the manifest.

Each process appends one JSON line per updated record (`{"image_id": ..., "caption": ...}`)
to its own file and fsyncs after every batch; no process ever writes another's file, so
no locks or collectives are needed during long work. The main process merges all journals
into the manifest at checkpoints; a crash loses at most the batch in flight, and a restart
merges whatever the journals hold before doing anything else. Merging is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import orjson


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
                    merged.setdefault(image_id, {}).update(update)
    return merged


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


def merge_into_manifest(manifest_path: str | Path, manifest=None):
    """Checkpoint: fold the journals into the manifest (one streaming rewrite); returns the
    manifest as it now is (the same object when nothing changed).

    Untouched lines are copied as bytes; only records with updates are parsed and written
    again. The journals are kept: other ranks may still be appending. They are cleared only
    once every rank is done (`clear`).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from prep.manifest import read_manifest, rewrite

    if manifest is None:
        manifest = read_manifest(manifest_path)
    updates = read_updates(manifest_path)
    if not updates:
        return manifest
    ids = list(updates)
    rows = pc.index_in(pa.array(ids, pa.string()), value_set=manifest.table.column("image_id").cast(pa.string()))
    changed = {}
    for image_id, row in zip(ids, rows.to_pylist(), strict=True):
        if row is None:
            continue
        record = manifest.record(row)
        if apply_update(record, updates[image_id]):
            changed[row] = record
    if not changed:
        return manifest
    return rewrite(manifest, changed)
