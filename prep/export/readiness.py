"""Which manifest records can be exported: a valid v2 record and three valid side files.

A record with several problems counts under each reason. Unless `allow_stale`, an artifact
whose provenance is stale (image or caption edited, bucket or model changed since, judged
against the last run's models) is not ready.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prep import store
from prep.manifest import Manifest
from prep.provenance import expected_from_metadata


@dataclass
class Readiness:
    """The ready records of a manifest (row numbers and bucket codes) and why the others are not."""

    rows: np.ndarray  # manifest rows of ready records, in manifest order (int64)
    codes: np.ndarray  # bucket code of each ready row (int64), into `bucket_names`
    bucket_names: list[str]
    reasons: dict[str, int] = field(default_factory=dict)  # not-ready reason -> count
    not_ready: int = 0
    excluded: int = 0  # outside the selected buckets


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr((parts, time.time_ns(), os.getpid())).encode()).hexdigest()[:32]


def _select_buckets(ds, selected: set[str] | None):
    if selected is None:
        return ds, 0
    total = len(ds)
    ds = ds.filter(
        lambda b: [x in selected for x in b],
        input_columns="aspect_bucket",
        batched=True,
        new_fingerprint=_fingerprint("bucket", sorted(selected)),
        desc="select buckets",
    )
    return ds, total - len(ds)


def readiness(
    manifest: Manifest,
    derived_dir: Path,
    selected: set[str] | None = None,
    *,
    num_proc: int | None = None,
    allow_stale: bool = False,
) -> Readiness:
    """Check every record of `manifest` (in buckets `selected`, None = all) with `store.readiness_reasons`."""
    import pyarrow.compute as pc

    ds, excluded = _select_buckets(manifest.to_dataset(), selected)
    base = str(derived_dir)
    yardstick = None if allow_stale else expected_from_metadata(store.read_metadata(derived_dir))

    def reasons(rows: list[int]) -> dict:
        return {
            "not_ready": [
                store.readiness_reasons(manifest.record(row), base, stale_against=yardstick) for row in rows
            ]
        }

    # Explicit fingerprints: hashing the closure would serialise the whole manifest.
    ds = ds.map(
        reasons,
        input_columns="row",
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        load_from_cache_file=False,
        new_fingerprint=_fingerprint("ready", base),
        desc="readiness",
    )
    counts: dict[str, int] = {}
    if len(ds):
        flat = pc.list_flatten(ds.with_format("arrow")["not_ready"])
        counts = {item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(flat)}
    ready = ds.filter(
        lambda batch: [len(x) == 0 for x in batch],
        input_columns="not_ready",
        batched=True,
        new_fingerprint=_fingerprint("ready-filter", base),
        desc="ready records",
    )
    table = ready.with_format("arrow")[:]
    encoded = pc.dictionary_encode(table.column("aspect_bucket")).combine_chunks()
    return Readiness(
        rows=table.column("row").to_numpy().astype(np.int64),
        codes=encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
        bucket_names=encoded.dictionary.to_pylist(),
        reasons=dict(sorted(counts.items())),
        not_ready=len(ds) - len(ready),
        excluded=excluded,
    )
