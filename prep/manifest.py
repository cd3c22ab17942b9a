"""The JSONL manifest: read (tolerating bad lines), view as a `datasets.Dataset`, rewrite atomically.

The manifest is the source of truth. Reading never fails on a bad line: the line is set
aside with its number and reason, and every rewrite appends it to
`<manifest>.rejected.jsonl`, so nothing a user wrote is ever lost.

Valid records are not held in memory: a `Manifest` keeps the file open and the byte
offset and length of each valid line, and parses a record when it is asked for (the open
file is a snapshot: a later atomic rewrite replaces the name, not the inode it reads).
The few fields the passes filter on are projected into typed Arrow columns, which is what
the `datasets.Dataset` view holds. At 1M records this keeps memory flat and under 1 GB.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from prep.fsio import atomic_open
from prep.records import has_caption, is_safe_id, is_valid_mask, needs_migration

logger = logging.getLogger(__name__)

CHUNK = 50_000


@dataclass(frozen=True)
class RejectedLine:
    """A manifest line that could not be used, kept verbatim with where it was and why."""

    lineno: int
    text: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"line": self.lineno, "reason": self.reason, "text": self.text})


def dumps_record(record: dict) -> str:
    """One compact JSON line (UTF-8 kept readable)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def projection(record: dict) -> dict:
    """The typed fields the passes filter on (the rest stays in the JSON text)."""
    def _int(value):
        return value if type(value) is int else None

    return {
        "image_id": record.get("image_id") if isinstance(record.get("image_id"), str) else None,
        "image_path": record["image_path"],
        "caption": record.get("caption") if has_caption(record) else None,
        "mask_ok": is_valid_mask(record.get("t5_attention_mask")),
        "aspect_bucket": record.get("aspect_bucket") if isinstance(record.get("aspect_bucket"), str) else None,
        "width": _int(record.get("width")),
        "height": _int(record.get("height")),
        "needs_migration": needs_migration(record),
        "provenance": dumps_record(record["provenance"]) if isinstance(record.get("provenance"), dict) else None,
        "image_fingerprint": dumps_record(record["image_fingerprint"])
        if isinstance(record.get("image_fingerprint"), dict)
        else None,
    }


PROJECTION_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("mask_ok", pa.bool_()),
        ("aspect_bucket", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("needs_migration", pa.bool_()),
        ("provenance", pa.string()),  # JSON text of the record's provenance (or null)
        ("image_fingerprint", pa.string()),  # JSON text {size, mtime_ns, sha256} (or null)
    ]
)


@dataclass
class Manifest:
    """The valid records of a manifest (by offset into the open file, in file order) and its rejected lines."""

    path: Path
    projections: list[pa.RecordBatch] = field(default_factory=list)
    rejected: list[RejectedLine] = field(default_factory=list)
    spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (offset, length) per record
    file: BinaryIO | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def record(self, row: int) -> dict:
        """The full record at `row` (its position among the valid records), parsed from the file."""
        offset, length = self.spans[row]
        return _parse(os.pread(self.file.fileno(), int(length), int(offset)))

    def __iter__(self) -> Iterator[dict]:
        for row in range(len(self.spans)):
            yield self.record(row)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __del__(self) -> None:  # no ResourceWarning for a manifest dropped without close()
        self.close()

    def projections_column(self, name: str) -> list:
        """One projected column (e.g. "image_id") as a Python list, in manifest order."""
        return [value for batch in self.projections for value in batch.column(name).to_pylist()]

    def to_dataset(self):
        """The projected columns plus `row` (position in the manifest) as an in-memory `Dataset`."""
        from datasets import Dataset

        if self.projections:
            table = pa.Table.from_batches(self.projections, schema=PROJECTION_SCHEMA)
        else:
            table = PROJECTION_SCHEMA.empty_table()
        # An explicit fingerprint: otherwise `datasets` pickles the whole table to hash it
        # (0.7 s and +350 MB peak at 1M records), and these in-memory views are never cached.
        return Dataset(table, fingerprint=f"manifest-{uuid.uuid4().hex}")


def _check_line(obj: object, seen_ids: dict, seen_paths: dict, lineno: int) -> str | None:
    """Why a parsed line cannot be used as a record, or None."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    path = obj.get("image_path")
    if not isinstance(path, str) or not path:
        return "missing image_path"
    if "\x00" in path:
        return "image_path contains NUL"
    if "image_id" in obj and not is_safe_id(obj["image_id"]):
        return f"unsafe image_id {str(obj['image_id'])[:120]!r}"
    if hash(path) in seen_paths:
        return f"duplicate image_path (first at line {seen_paths[hash(path)]})"
    image_id = obj.get("image_id")
    if image_id is not None and hash(image_id) in seen_ids:
        return f"duplicate image_id {image_id} (first at line {seen_ids[hash(image_id)]})"
    return None


def _is_utf8(text: str) -> bool:
    """Arrow strings are UTF-8: raw non-UTF-8 bytes (read surrogate-escaped) or a lone \\ud800 escape are not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_line(raw: bytes) -> str:
    return raw.decode("utf-8", errors="surrogateescape").rstrip("\n").rstrip("\r")


def _parse(raw: bytes) -> dict:
    return json.loads(_decode_line(raw).lstrip("\ufeff"))


def read_manifest(path: str | Path) -> Manifest:
    """Read a JSONL manifest; a missing file is an empty manifest. Bad lines are set aside."""
    path = Path(path)
    manifest = Manifest(path=path)
    if not path.exists():
        return manifest
    if path.is_dir():
        raise IsADirectoryError(f"manifest {path} is a directory")
    # Keyed by the strings' 64-bit hashes, not the strings: a third of the memory at 1M
    # records. A (vanishingly rare) collision only sets a line aside as a duplicate; never lost.
    seen_ids: dict[int, int] = {}
    seen_paths: dict[int, int] = {}
    rows: list[dict] = []
    spans: list[tuple[int, int]] = []
    count = 0

    def flush() -> None:
        if rows:
            manifest.projections.append(pa.RecordBatch.from_pylist(rows, schema=PROJECTION_SCHEMA))
            rows.clear()

    manifest.file = open(path, "rb")  # noqa: SIM115 - kept open: records are read from it on demand
    offset = 0
    for lineno, raw in enumerate(manifest.file, start=1):
        start, offset = offset, offset + len(raw)
        line = _decode_line(raw)
        if lineno == 1:
            line = line.lstrip("\ufeff")  # a leading byte-order mark is not part of the record
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            manifest.rejected.append(RejectedLine(lineno, line, f"bad JSON: {exc.msg}"))
            continue
        reason = _check_line(obj, seen_ids, seen_paths, lineno)
        if reason is None and not _is_utf8(dumps_record(obj)):
            reason = "not valid UTF-8"
        if reason:
            manifest.rejected.append(RejectedLine(lineno, line, reason))
            continue
        seen_paths[hash(obj["image_path"])] = lineno
        if obj.get("image_id") is not None:
            seen_ids[hash(obj["image_id"])] = lineno
        spans.append((start, len(raw)))
        rows.append({"row": count, **projection(obj)})
        count += 1
        if len(rows) >= CHUNK:
            flush()
    flush()
    manifest.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    for item in manifest.rejected:
        logger.warning("manifest line %d skipped: %s", item.lineno, item.reason)
    return manifest


def rejected_path(manifest_path: str | Path) -> Path:
    """`<manifest>.rejected.jsonl`, beside the manifest."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.name + ".rejected.jsonl")


def save_rejected(manifest_path: str | Path, rejected: list[RejectedLine]) -> None:
    """Append newly rejected lines to the side file (atomically, without duplicating old ones)."""
    if not rejected:
        return
    side = rejected_path(manifest_path)
    existing = side.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if side.exists() else []
    known_texts = set()
    for line in existing:
        try:
            known_texts.add(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            continue
    fresh = [item.to_json() for item in rejected if item.text not in known_texts]
    if not fresh:
        return
    with atomic_open(side, "w") as f:
        for line in existing + fresh:
            f.write(line + "\n")


def write_manifest(path: str | Path, records: Iterable[dict], rejected: list[RejectedLine] = ()) -> int:
    """Write `records` as JSONL atomically (the old file survives any crash); returns the count.

    Rejected lines are saved to the side file first, so a line leaves the manifest only
    after it is safe elsewhere.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rejected(path, list(rejected))
    count = 0
    with atomic_open(path, "w") as f:
        for record in records:
            f.write(dumps_record(record) + "\n")
            count += 1
    return count
