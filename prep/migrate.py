"""The `migrate` pass: v0/v1 (Stage-1) records -> v2, with no model.

v0 = image_path + inline dinov3_embedding + caption; v1 adds t5_attention_mask, height,
width. Migration moves the inline vector to `dinov3/{image_id}.npy` (float32), adds
image_id / size / aspect_bucket / format_version, and keeps every other field as it is.
A record that cannot be migrated (bad inline vector, image gone and no size) is kept
unchanged and reported; migrating a v2 record changes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.buckets import ASPECT_BUCKETS, Bucket, assign_aspect_bucket
from prep.provenance import PROVENANCE_FORMAT, file_stamp
from prep.records import (
    FORMAT_VERSION,
    INLINE_DINOV3_FIELD,
    inline_embedding_problem,
    needs_migration,
    to_v2,
)
from prep.scan import assign_image_ids, read_image_header
from prep.store import save_artifact

logger = logging.getLogger(__name__)

MIGRATED, EXTRACTED, UNCHANGED, FAILED = "migrated", "extracted", "unchanged", "failed"


@dataclass(frozen=True)
class MigrationResult:
    record: dict
    status: str
    reason: str = ""


def ids_for_records(records: Sequence[dict], taken: set[str]) -> dict[str, str]:
    """New ids for the records that have none, keyed by image_path (the scan's id rule)."""
    missing = [r["image_path"] for r in records if "image_id" not in r]
    return dict(zip(missing, assign_image_ids(missing, taken), strict=True))


def _size(record: dict) -> tuple[int, int] | str:
    """(width, height) from the record, else from the image header; a reason string on failure."""
    width, height = record.get("width"), record.get("height")
    if type(width) is int and type(height) is int and width > 0 and height > 0:
        return width, height
    header = read_image_header(record["image_path"])
    if header.error:
        return f"no size in record and image unreadable ({header.error})"
    return header.width, header.height


def migrate_record(
    record: dict, base: str | Path, image_id: str | None, buckets: Sequence[Bucket] = ASPECT_BUCKETS
) -> MigrationResult:
    """Migrate one record, writing its inline DINOv3 vector to disk first; never raises for bad data."""
    if not needs_migration(record):
        return MigrationResult(record, UNCHANGED)
    problem = inline_embedding_problem(record)
    if problem:
        return MigrationResult(record, FAILED, problem)
    size = _size(record)
    if isinstance(size, str):
        return MigrationResult(record, FAILED, size)
    width, height = size
    image_id = record.get("image_id", image_id)
    if image_id is None:
        return MigrationResult(record, FAILED, "no image_id could be assigned")
    was_v2 = record.get("format_version") == FORMAT_VERSION
    stamp = None
    if INLINE_DINOV3_FIELD in record:
        vector = np.asarray(record[INLINE_DINOV3_FIELD], dtype=np.float32)
        path = save_artifact(base, "dinov3", image_id, vector)
        # The record's own vector: it vouches for this file (model unknown: "migrated").
        stamp = {"origin": "migrated", "format": PROVENANCE_FORMAT, "file": file_stamp(path.read_bytes(), os.stat(path))}
    bucket = record.get("aspect_bucket") or assign_aspect_bucket(width, height, buckets)
    migrated = to_v2(record, image_id=image_id, width=width, height=height, aspect_bucket=bucket)
    if stamp is not None:
        prov = migrated.get("provenance") if isinstance(migrated.get("provenance"), dict) else {}
        migrated["provenance"] = {**prov, "dinov3": stamp}
    return MigrationResult(migrated, EXTRACTED if was_v2 else MIGRATED)
