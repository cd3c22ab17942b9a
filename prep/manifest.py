"""The JSONL manifest: read (tolerating bad lines), view as a `datasets.Dataset`, rewrite atomically.

The manifest is the source of truth. Reading never fails on a bad line: the line is set
aside with its number and reason, and every rewrite appends it to
`<manifest>.rejected.jsonl`, so nothing a user wrote is ever lost. Valid records are held
as compact JSON text in an Arrow column (flat memory at millions of records); the few
fields the passes filter on are projected into typed columns of the Dataset.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    """The valid records of a manifest (as JSON text, in file order) and its rejected lines."""

    path: Path
    lines: list[pa.Array] = field(default_factory=list)  # chunks of large_string
    projections: list[pa.RecordBatch] = field(default_factory=list)
    rejected: list[RejectedLine] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.lines)

    def __iter__(self) -> Iterator[dict]:
        for chunk in self.lines:
            for text in chunk.to_pylist():
                yield json.loads(text)

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
    texts: list[str] = []
    rows: list[dict] = []
    count = 0

    def flush() -> None:
        if texts:
            manifest.lines.append(pa.array(texts, pa.large_string()))
            manifest.projections.append(pa.RecordBatch.from_pylist(rows, schema=PROJECTION_SCHEMA))
            texts.clear()
            rows.clear()

    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # -sig: a leading BOM is skipped
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                manifest.rejected.append(RejectedLine(lineno, line, f"bad JSON: {exc.msg}"))
                continue
            reason = _check_line(obj, seen_ids, seen_paths, lineno)
            text = dumps_record(obj) if reason is None else ""
            if reason is None and not _is_utf8(text):
                reason = "not valid UTF-8"
            if reason:
                manifest.rejected.append(RejectedLine(lineno, line, reason))
                continue
            seen_paths[hash(obj["image_path"])] = lineno
            if obj.get("image_id") is not None:
                seen_ids[hash(obj["image_id"])] = lineno
            texts.append(text)
            rows.append({"row": count, **projection(obj)})
            count += 1
            if len(texts) >= CHUNK:
                flush()
    flush()
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
