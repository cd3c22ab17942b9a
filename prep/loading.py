"""Loading the dataset in Python: the manifest with lazy arrays.

`load_manifest` gives a `datasets.Dataset` of the valid v2 records whose rows also carry
the three side-file arrays, read from disk only when a row (or a batch of rows) is accessed.
Reading exported shards (`load_shards`) lives in `prep.shards`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa

from prep import config, store
from prep.records import INLINE_DINOV3_FIELD, V2_FIELDS, validate_record

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------- load_manifest
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("t5_attention_mask", pa.list_(pa.int8())),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("aspect_bucket", pa.string()),
        ("format_version", pa.int64()),
        ("extra", pa.string()),  # every non-v2 field, as one JSON object (heterogeneous extras)
    ]
)
_CHUNK = 50_000


def array_columns(derived_dir: str | Path) -> dict[str, str]:
    """{column: artifact kind} of the dataset's side files (from the artifact table): dinov3, vae, t5_hidden, ..."""
    return {artifact.column: kind for kind, artifact in store.dataset_artifacts(derived_dir).items()}


class ArrayLoader:
    """The `with_transform` function: adds the side-file arrays (`dinov3`, `vae`, `t5_hidden`) to accessed rows.

    Arrays keep their on-disk dtypes (float32, float16, float16). A file is read only after its
    header matched the shape the row expects and the file's size; a missing, unreadable, wrongly
    shaped or non-finite array gives None, never wrong data. A batch that holds one column only
    (a column query in datasets < 4, or `select_columns` without `image_id`) loads no arrays.
    """

    def __init__(self, derived_dir: str | Path):
        self.derived_dir = str(derived_dir)
        self.columns = array_columns(derived_dir)

    def __call__(self, batch: dict) -> dict:
        if len(batch) <= 1 or "image_id" not in batch:
            return batch
        out = dict(batch)
        buckets = batch.get("aspect_bucket") or [None] * len(batch["image_id"])
        for column, kind in self.columns.items():
            out[column] = [self.load(kind, i, b) for i, b in zip(batch["image_id"], buckets, strict=True)]
        return out

    def load(self, kind: str, image_id: str, bucket: str | None):
        import numpy as np

        spec = store.artifact_spec(kind)
        try:
            shape = store.expected_shape(kind, {"image_id": image_id, "aspect_bucket": bucket})
        except (KeyError, ValueError, TypeError):
            return None
        array = store.load_npy(store.artifact_path(self.derived_dir, kind, image_id), shape, spec.dtype)
        return array if array is not None and np.isfinite(array).all() else None


def _row(record: dict) -> dict:
    row = {key: record[key] for key in V2_FIELDS}
    extra = {k: v for k, v in record.items() if k not in V2_FIELDS and k != INLINE_DINOV3_FIELD}
    row["extra"] = json.dumps(extra, ensure_ascii=False, sort_keys=True)
    return row


def load_manifest(
    manifest: str | Path = config.DEFAULT_MANIFEST,
    derived_dir: str | Path = config.DEFAULT_DERIVED_DIR,
    *,
    ready_only: bool = False,
):
    """A `datasets.Dataset` of the manifest's valid v2 records, with lazily loaded arrays.

    Columns: the v2 fields plus `extra` (the record's other fields as a JSON object string,
    `json.loads(row["extra"])`). Accessing a row or a slice also yields `dinov3` (1024,)
    float32, `vae` (16, H/8, W/8) float16 and `t5_hidden` (77, 1024) float16 numpy arrays
    (None when the file is missing), read at access time via `with_transform`.
    Records that are not valid v2 records are left out (logged); with `ready_only`, so are
    records whose side files are missing, of the wrong shape or dtype (headers), not the files
    their records stamped, listed as invalid by the last `prep verify`, or filtered out.

    Note: in datasets >= 4 a column query (`ds["caption"]`) on a dataset with a transform
    formats every row, so it would read every array; for metadata columns use
    `ds.with_format(None)["caption"]` (or `ds.select_columns(["caption"])`).
    """
    from datasets import Dataset

    from prep.manifest import read_manifest
    from prep.needs import read_redo

    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} not found")
    redo = set().union(*read_redo(derived_dir).values()) if ready_only else set()
    batches, rows, skipped = [], [], 0
    for record in read_manifest(manifest):
        problems = validate_record(record)
        if not problems and ready_only:
            problems = store.readiness_reasons(record, derived_dir) or (["invalid when verified"] if record["image_id"] in redo else [])
        if problems:
            skipped += 1
            continue
        rows.append(_row(record))
        if len(rows) >= _CHUNK:
            batches.append(pa.RecordBatch.from_pylist(rows, schema=MANIFEST_SCHEMA))
            rows = []
    if rows:
        batches.append(pa.RecordBatch.from_pylist(rows, schema=MANIFEST_SCHEMA))
    if skipped:
        logger.info("load_manifest: %d record(s) left out (not %s)", skipped, "ready" if ready_only else "valid v2")
    table = pa.Table.from_batches(batches, schema=MANIFEST_SCHEMA) if batches else MANIFEST_SCHEMA.empty_table()
    return Dataset(table).with_transform(ArrayLoader(derived_dir))


_MOVED_TO_SHARDS = ("load_shards", "resolve_shards", "decode_sample", "collate", "check_member_name")


def __getattr__(name: str):
    # The shard reader moved to prep.shards; old imports keep working (lazily: no torch import here).
    if name in _MOVED_TO_SHARDS:
        from prep import shards

        return getattr(shards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
