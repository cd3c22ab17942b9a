"""Which manifest records can be exported: a valid v2 record and three valid side files.

One pass over the manifest's records, each checked once by `store.readiness_reasons`: a
valid v2 record, not filtered out, each side file's header (shape, dtype, C order, size
exactly header + payload) and the file its record stamped, and, unless `allow_stale`, the
provenance of each artifact (stale: image or caption edited, bucket or model changed since,
judged against the last run's models). A record with several problems counts under each
reason. Records are checked in chunks, in worker processes when a pool is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prep import store
from prep.export.fields import FieldStats
from prep.export.workers import shared
from prep.manifest import Manifest
from prep.provenance import Expected, expected_from_metadata

CHUNK = 2000


@dataclass
class Readiness:
    """The ready records of a manifest (row numbers and bucket codes) and why the others are not."""

    rows: np.ndarray  # manifest rows of ready records, in manifest order (int64)
    codes: np.ndarray  # bucket code of each ready row (int64), into `bucket_names`
    bucket_names: list[str]
    reasons: dict[str, int] = field(default_factory=dict)  # not-ready reason -> count
    not_ready: int = 0
    excluded: int = 0  # outside the selected buckets
    fields: FieldStats | None = None  # what the ready records hold (with `field_roots`)


@dataclass(frozen=True)
class ReadyContext:
    base: str
    yardstick: Expected | None = None
    selected: frozenset[str] | None = None
    field_roots: tuple[str, ...] | None = None  # collect FieldStats of ready records (None: do not)


@dataclass
class ChunkResult:
    """The readiness of one chunk, compact: arrays, not one Python object per record."""

    rows: np.ndarray  # ready rows (int64)
    codes: np.ndarray  # bucket code of each ready row (int64), into `names`
    names: list[str]
    reasons: Counter
    not_ready: int = 0
    excluded: int = 0
    fields: FieldStats | None = None


def record_reasons(record: dict, ctx: ReadyContext) -> list[str]:
    """Why `record` cannot be exported (empty list = ready): `store.readiness_reasons`, the one
    judge that verify, `load_manifest(ready_only=True)` and the report also ask."""
    return store.readiness_reasons(record, ctx.base, stale_against=ctx.yardstick)


def check_chunk(ctx: ReadyContext, rows: list[int], records: list[dict] | int) -> ChunkResult:
    """The readiness of a chunk of records (what a worker process runs).

    `records`: the records, or the token of the pool sharing the manifest they are read from.
    """
    if isinstance(records, int):
        manifest = shared(records)
        records = [manifest.record(row) for row in rows]
    ready: list[int] = []
    codes: dict[str, int] = {}
    code_list: list[int] = []
    reasons: Counter = Counter()
    excluded = not_ready = 0
    stats = None if ctx.field_roots is None else FieldStats()
    for row, record in zip(rows, records, strict=True):
        bucket = record.get("aspect_bucket")
        if ctx.selected is not None and bucket not in ctx.selected:
            excluded += 1
            continue
        problems = record_reasons(record, ctx)
        if problems:
            not_ready += 1
            reasons.update(problems)
        else:
            ready.append(row)
            code_list.append(codes.setdefault(bucket, len(codes)))
            if stats is not None:
                stats.add(record, ctx.field_roots)
    return ChunkResult(
        np.asarray(ready, dtype=np.int64), np.asarray(code_list, dtype=np.int64), list(codes), reasons,
        not_ready, excluded, stats,
    )


def _chunks(manifest: Manifest, ctx: ReadyContext, token: int | None) -> Iterator[tuple[int, tuple]]:
    for start in range(0, len(manifest), CHUNK):
        rows = list(range(start, min(start + CHUNK, len(manifest))))
        yield start, (ctx, rows, [manifest.record(row) for row in rows] if token is None else token)


def readiness(
    manifest: Manifest,
    derived_dir: Path,
    selected: set[str] | None = None,
    *,
    allow_stale: bool = False,
    pool=None,
    field_roots: tuple[str, ...] | None = None,
) -> Readiness:
    """Check every record of `manifest` in the buckets `selected` (None = all); `pool`: a WorkerPool.

    With `field_roots` (images roots, may be empty), also collect the FieldStats of the ready
    records (prep/export/fields.py), in the same pass.
    """
    yardstick = None if allow_stale else expected_from_metadata(store.read_metadata(derived_dir))
    ctx = ReadyContext(str(derived_dir), yardstick, None if selected is None else frozenset(selected), field_roots)
    if pool is not None and pool.parallel and len(manifest) > CHUNK:
        token = pool.token if pool.shares_memory and pool.shared is manifest else None  # workers read it
        results = dict(pool.imap(check_chunk, _chunks(manifest, ctx, token)))
    else:
        results = {start: check_chunk(*args) for start, args in _chunks(manifest, ctx, None)}
    ready = _combine([results[start] for start in sorted(results)])
    ready.fields = None if field_roots is None else ready.fields
    return ready


def _combine(parts: list[ChunkResult]) -> Readiness:
    names = sorted({name for part in parts for name in part.names})
    code_of = {name: i for i, name in enumerate(names)}
    reasons: Counter = Counter()
    for part in parts:
        reasons.update(part.reasons)
    codes = [np.asarray([code_of[n] for n in part.names], dtype=np.int64)[part.codes] for part in parts if part.names]
    fields = FieldStats()
    for part in parts:
        if part.fields is not None:
            fields.merge(part.fields)
    return Readiness(
        rows=np.concatenate([part.rows for part in parts] or [np.zeros(0, np.int64)]),
        codes=np.concatenate(codes or [np.zeros(0, np.int64)]),
        bucket_names=names,
        reasons=dict(sorted(reasons.items())),
        not_ready=sum(part.not_ready for part in parts),
        excluded=sum(part.excluded for part in parts),
        fields=fields,
    )
