"""`prep prune`: move flagged records out of the manifest into a side manifest (nothing is deleted).

The side manifest is `<manifest>.pruned.jsonl`: the records' lines, byte for byte, so moving one
back is a copy and paste. Records that can never be used (`unmigratable`, `image_missing`) keep a
manifest from passing `prep verify` cleanly only as flags; pruning puts them aside for good.

Crash safety, in this order:
1. the side manifest is rewritten atomically (its old bytes, then the new lines; fsync, rename);
2. only then is the manifest rewritten without those rows (atomic as well).
A kill between the two leaves the records in both files; the rerun finds their lines already in
the side manifest (same bytes), adds nothing twice and finishes step 2. Later scans of `--images`
do not bring a pruned image back (its path and id stay taken), and its side files stay where
they are.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow.compute as pc

from prep.errors import UserError
from prep.fsio import atomic_open, release_lock, sweep_temp_files
from prep.manifest import lock_manifest, read_manifest, resolve_manifest_path, rewrite

SUFFIX = ".pruned.jsonl"


def pruned_path(manifest: str | Path) -> Path:
    target = resolve_manifest_path(manifest)
    return target.with_name(target.name + SUFFIX)


@dataclass
class PruneResult:
    side: Path
    moved: Counter = field(default_factory=Counter)  # reason -> records moved (or that would move)
    already_aside: int = 0  # lines a killed earlier prune had already written to the side manifest
    dry_run: bool = False


def _selected_rows(manifest, reasons: set[str] | None) -> np.ndarray:
    column = manifest.table.column("filtered")
    flagged = pc.is_valid(column)
    if reasons:
        flagged = pc.and_(flagged, pc.fill_null(pc.is_in(column.cast("string"), pc.cast(list(reasons), "string")),
                                                False))
    return np.flatnonzero(flagged.to_numpy(zero_copy_only=False))


def _line(raw: bytes) -> bytes:
    return raw.rstrip(b"\r\n") + b"\n"


def write_side(side: Path, lines: list[bytes]) -> int:
    """Add `lines` the side manifest does not hold yet, atomically; returns how many were already there."""
    old = side.read_bytes() if side.exists() else b""
    present = set(old.splitlines())
    fresh = [line for line in lines if line.rstrip(b"\n") not in present]
    if fresh:
        with atomic_open(side, "wb") as f:
            f.write(old if not old or old.endswith(b"\n") else old + b"\n")
            f.writelines(fresh)
    return len(lines) - len(fresh)


def prune(manifest_path: str | Path, reasons: Iterable[str] | None = None, *, dry_run: bool = False) -> PruneResult:
    """Move the records flagged for `reasons` (default: any) to `<manifest>.pruned.jsonl`."""
    path = Path(manifest_path)
    if not path.exists() or not resolve_manifest_path(path).is_file():
        raise UserError(f"manifest {path} does not exist or is not a file (pass --manifest)")
    wanted = {r.strip() for item in (reasons or ()) for r in str(item).split(",") if r.strip()} or None
    result = PruneResult(side=pruned_path(path), dry_run=dry_run)
    lock = None if dry_run else lock_manifest(path, "prune rewrites the manifest; wait for the other job (or use --dry-run)")
    try:
        if not dry_run:  # under the lock no one else writes these: temp files of a killed prune or run
            target = resolve_manifest_path(path)
            sweep_temp_files(target.parent, prefix=f".{target.name}.")
        manifest = read_manifest(path)
        rows = _selected_rows(manifest, wanted)
        reasons_of = manifest.table.column("filtered").to_pylist()
        result.moved = Counter(reasons_of[row] for row in rows.tolist())
        if dry_run or not len(rows):
            return result
        result.already_aside = write_side(result.side, [_line(manifest.raw(row)) for row in rows.tolist()])
        rewrite(manifest, drop=rows.tolist())
    finally:
        if lock is not None:
            release_lock(lock)
    return result


def format_prune(result: PruneResult) -> str:
    total = sum(result.moved.values())
    if not total:
        return "prune: no flagged record to move"
    listed = ", ".join(f"{reason} {n}" for reason, n in sorted(result.moved.items()))
    verb = "would move" if result.dry_run else "moved"
    text = f"prune: {verb} {total} record(s) ({listed}) to {result.side}"
    if result.already_aside:
        text += f" ({result.already_aside} were already there from an interrupted prune)"
    return text + ("; dry run: nothing written" if result.dry_run else "; their side files stay in the derived dir")


def pruned_keys(manifest_path: str | Path) -> tuple[set[str], set[str]]:
    """(image paths, image ids) of the records set aside, so a scan does not bring them back."""
    side = pruned_path(manifest_path)
    paths: set[str] = set()
    ids: set[str] = set()
    if not side.exists():
        return paths, ids
    with open(side, "rb") as f:
        for raw in f:
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("image_path"), str):
                paths.add(os.path.normpath(record["image_path"]))
                if isinstance(record.get("image_id"), str):
                    ids.add(record["image_id"])
    return paths, ids
