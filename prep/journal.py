"""Per-rank journals of record updates: the crash-safe link between encoder passes and the manifest.

Each process appends one JSON line per updated record (`{"image_id": ..., "caption": ...}`)
to its own file and fsyncs after every batch; no process ever writes another's file, so
no locks or collectives are needed during long work. The main process merges all journals
into the manifest at checkpoints; a crash loses at most the batch in flight, and a restart
merges whatever the journals hold before doing anything else. Merging is idempotent.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path


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
        lines = "".join(json.dumps(u, ensure_ascii=False, separators=(",", ":")) + "\n" for u in updates)
        if not lines:
            return
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across batches
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
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    update = json.loads(line)
                except ValueError:
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

    A key `provenance.<kind>` sets one entry of the record's `provenance` dict, so passes
    running on different ranks never overwrite each other's stamps.
    """
    changed = False
    for key, value in update.items():
        target, name = record, key
        if key.startswith("provenance."):
            name = key.split(".", 1)[1]
            if not isinstance(record.get("provenance"), dict):
                record["provenance"] = {}
            target = record["provenance"]
        if name not in target or target[name] != value:
            target[name] = value
            changed = True
    return changed


def merge_into_manifest(manifest_path: str | Path) -> int:
    """Checkpoint: fold the journals into the manifest (one atomic rewrite); returns records changed.

    The journals are kept: other ranks may still be appending. They are cleared only once
    every rank is done (`clear`).
    """
    from prep.manifest import read_manifest, write_manifest

    updates = read_updates(manifest_path)
    if not updates:
        return 0
    manifest = read_manifest(manifest_path)
    records = list(manifest)
    changed = 0
    for record in records:
        update = updates.get(record.get("image_id"))
        if update and apply_update(record, update):
            changed += 1
    if changed:
        write_manifest(manifest_path, records, manifest.rejected)
    return changed
