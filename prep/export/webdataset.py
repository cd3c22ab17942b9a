"""`prep export webdataset`: ready records -> reproducible, resumable WebDataset tar shards.

Layout of an export folder `OUT` (a ready Hub dataset repo):

    OUT/README.md                       dataset card: one `configs:` entry per bucket
    OUT/bucket_{WxH}/shard-000000.tar   samples of one bucket, `shard_size` per shard
    OUT/stats.json                      the summary (counts, skipped records by reason)
    OUT/index.json                      every shard: bucket, path, samples, bytes, sha256
    OUT/.prep-export/bucket_{WxH}/shard-000000.json
                                        per-shard "done" sidecar (keys, sha256, fingerprint);
                                        local resume state, never pushed

Each sample holds exactly the members `{id}.json`, `{id}.dinov3.npy`, `{id}.vae.npy`,
`{id}.t5h.npy` (byte copies of the side files, streamed from disk) and `{id}.t5m.npy`
(the T5 attention mask as uint8 (77,)). The key is the image_id (no dots by construction).

The JSON member holds the v2 fields image_id, image_path, caption, height, width,
aspect_bucket, format_version, plus every extra field that is a scalar (str, int, float,
bool; never null or NaN) of one type in *every* exported sample. Any other extra field is
dropped from the whole export (and listed in stats.json / index.json with the reason), so
all samples share one key set without nulls, which `datasets` needs to infer one schema.

Reproducible: the same manifest, side files and options give byte-identical tars (fixed
GNU tar headers: mtime 0, uid/gid 0, empty owner names, mode 0644, fixed member order).
Crash-safe: a shard is written to a temp file beside its final name and renamed when
complete (fsync), then its sidecar is written; `index.json` is written last, so an export
without it is unfinished. `resume=True` keeps each shard whose sidecar matches the planned
content (same keys, same JSON members, same side-file sizes and mtimes) and whose bytes
still hash to the recorded sha256; it rewrites the rest and removes stray temp files.
Memory is flat in the number of samples: only row numbers are held, never payloads.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prep import __version__, config, store
from prep.buckets import format_bucket, latent_shape, parse_bucket_list
from prep.fsio import TMP_MARK, atomic_open, atomic_write_text, fsync_dir
from prep.manifest import Manifest, read_manifest
from prep.provenance import expected_from_metadata
from prep.records import INLINE_DINOV3_FIELD, V2_FIELDS, is_safe_id

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "prep-webdataset"
EXPORT_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
CARD_FILE = "README.md"
STATE_DIR = ".prep-export"

JSON_FIELDS = ("image_id", "image_path", "caption", "height", "width", "aspect_bucket", "format_version")
# member suffix -> side-file kind in prep.store.ARTIFACTS (order = order in the tar)
ARRAY_MEMBERS = {"dinov3.npy": "dinov3", "vae.npy": "vae", "t5h.npy": "t5"}
MASK_MEMBER = "t5m.npy"
MEMBERS = ("json", *ARRAY_MEMBERS, MASK_MEMBER)

SHARD_RE = re.compile(r"shard-([0-9]{6})\.tar")
BUCKET_DIR_RE = re.compile(r"bucket_([1-9][0-9]*x[1-9][0-9]*)")
COPY_BUFSIZE = 1 << 20
DEFAULT_SHARD_SIZE = 1000
DEFAULT_PROGRESS_EVERY = 5000


# --------------------------------------------------------------------------- helpers
class RecordLookup:
    """Full manifest record by row number (the Dataset's `row` column), parsed on demand."""

    def __init__(self, manifest: Manifest):
        self._manifest = manifest

    def __call__(self, row: int) -> dict:
        return self._manifest.record(row)


def shard_relpath(bucket: str, index: int) -> str:
    return f"bucket_{bucket}/shard-{index:06d}.tar"


def sidecar_path(out: Path, relpath: str) -> Path:
    return out / STATE_DIR / (relpath.removesuffix(".tar") + ".json")


def check_key(key: Any) -> str:
    """The sample key (image_id), refused unless it is a safe token without dots or slashes."""
    if not is_safe_id(key):
        raise store.UnsafeIdError(
            f"refusing to export image_id {str(key)[:120]!r}: a WebDataset key must match [A-Za-z0-9_-]{{1,100}}"
        )
    return key


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def json_member(record: dict, extra_keys: Iterable[str]) -> bytes:
    obj = {key: record[key] for key in JSON_FIELDS}
    for key in extra_keys:
        obj[key] = record[key]
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def mask_member(record: dict) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(
        buf, np.asarray(record["t5_attention_mask"], dtype=np.uint8), version=(1, 0), allow_pickle=False
    )
    return buf.getvalue()


def _scalar_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return "float" if math.isfinite(value) else None
    if isinstance(value, str):
        return "str"
    return None


def choose_extra_fields(records: Iterable[dict]) -> tuple[list[str], dict[str, str]]:
    """(extra keys kept, {dropped key: reason}) over every exported record (see module doc)."""
    types: dict[str, str] = {}
    dropped: dict[str, str] = {}
    first = True
    for record in records:
        extras = {k: v for k, v in record.items() if k not in V2_FIELDS and k != INLINE_DINOV3_FIELD}
        if first:
            first = False
            for key, value in extras.items():
                kind = _scalar_type(value)
                if kind is None:
                    dropped[key] = "not a scalar (list, dict, null, NaN or out-of-int64 value)"
                else:
                    types[key] = kind
            continue
        for key in list(types):
            if key not in extras:
                dropped[key] = "missing in some samples"
                del types[key]
            elif _scalar_type(extras[key]) != types[key]:
                kind = _scalar_type(extras[key])
                dropped[key] = "not a scalar in some samples" if kind is None else "mixed types"
                del types[key]
        for key in extras:
            if key not in types and key not in dropped:
                dropped[key] = "missing in some samples"
    return sorted(types), dict(sorted(dropped.items()))


class _HashingWriter:
    """File-object wrapper for tarfile: counts and sha256-hashes every byte written."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.count += len(data)
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.count


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_BUFSIZE):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ plan
@dataclass
class ShardPlan:
    """One planned shard: its bucket, number and the manifest rows of its samples, in order."""

    bucket: str
    index: int
    rows: np.ndarray

    @property
    def relpath(self) -> str:
        return shard_relpath(self.bucket, self.index)


def make_plan(
    rows: np.ndarray,
    buckets: Iterable[str] | np.ndarray,
    *,
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    bucket_names: list[str] | None = None,
) -> list[ShardPlan]:
    """Shuffle (random.Random(seed)), then limit, then group by bucket (sorted), then chunk.

    `rows` are manifest row numbers of ready records in manifest order; `buckets` their
    aspect_bucket strings, or (with `bucket_names`) integer codes into `bucket_names`.
    Only integer arrays are built (a few bytes per sample), never payloads.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if bucket_names is None:
        bucket_names, codes = np.unique(np.asarray(list(buckets), dtype=str), return_inverse=True)
        bucket_names = bucket_names.tolist()
    else:
        codes = np.asarray(buckets, dtype=np.int64)
    order = np.arange(len(rows), dtype=np.int64)
    if shuffle:
        # random.Random(seed).shuffle on a compact int64 array.array: the same permutation
        # as on a list, at 8 bytes per sample instead of ~36.
        positions = array.array("q", order.tobytes())
        random.Random(seed).shuffle(positions)
        order = np.frombuffer(positions, dtype=np.int64)
    if limit is not None:
        order = order[:limit]
    codes = codes[order]
    plan = []
    for bucket in sorted(set(bucket_names)):
        code = bucket_names.index(bucket)
        selected = rows[order[codes == code]]
        for i, start in enumerate(range(0, len(selected), shard_size)):
            plan.append(ShardPlan(bucket, i, selected[start : start + shard_size]))
    return plan


# ------------------------------------------------------------------------- readiness
def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr((parts, time.time_ns(), os.getpid())).encode()).hexdigest()[:32]


def readiness(
    manifest: Manifest,
    derived_dir: Path,
    selected: set[str] | None = None,
    *,
    num_proc: int | None = None,
    allow_stale: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, int], int, int]:
    """(ready rows, bucket codes, bucket names, {reason: count}, not ready, outside `selected`).

    A `Dataset.filter` over the manifest's projected rows; each row's full record is looked
    up and checked with `store.readiness_reasons` (v2 fields, mask, and the three .npy
    headers: shape and dtype). A record with several problems counts under each reason.
    Unless `allow_stale`, an artifact whose provenance is stale (image or caption edited,
    bucket or model changed since, judged against the last run's models) is not ready.
    """
    import pyarrow.compute as pc

    ds = manifest.to_dataset()
    excluded = 0
    if selected is not None:
        total = len(ds)
        ds = ds.filter(
            lambda b: [x in selected for x in b],
            input_columns="aspect_bucket",
            batched=True,
            new_fingerprint=_fingerprint("bucket", sorted(selected)),
            desc="select buckets",
        )
        excluded = total - len(ds)
    lookup = RecordLookup(manifest)
    base = str(derived_dir)
    yardstick = None if allow_stale else expected_from_metadata(store.read_metadata(derived_dir))

    def reasons(rows: list[int]) -> dict:
        return {"not_ready": [store.readiness_reasons(lookup(row), base, stale_against=yardstick) for row in rows]}

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
    rows = table.column("row").to_numpy().astype(np.int64)
    encoded = pc.dictionary_encode(table.column("aspect_bucket")).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names = encoded.dictionary.to_pylist()
    return rows, codes, names, dict(sorted(counts.items())), len(ds) - len(ready), excluded


# ---------------------------------------------------------------------------- writing
def _add_sample(tar: tarfile.TarFile, record: dict, derived_dir: Path, extra_keys: list[str], fp) -> int:
    """Append one sample's five members; feed what identifies its content to `fp`. Returns bytes."""
    key = check_key(record.get("image_id"))
    data = json_member(record, extra_keys)
    fp.update(data)
    tar.addfile(_tarinfo(f"{key}.json", len(data)), io.BytesIO(data))
    size = len(data)
    for suffix, kind in ARRAY_MEMBERS.items():
        with open(store.artifact_path(derived_dir, kind, key), "rb") as f:
            st = os.fstat(f.fileno())
            fp.update(f"{kind}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            tar.addfile(_tarinfo(f"{key}.{suffix}", st.st_size), f)
            size += st.st_size
    mask = mask_member(record)
    fp.update(mask)
    tar.addfile(_tarinfo(f"{key}.{MASK_MEMBER}", len(mask)), io.BytesIO(mask))
    return size + len(mask)


def _fingerprint_hasher():
    return hashlib.sha256(f"{EXPORT_FORMAT}/{EXPORT_FORMAT_VERSION}\n".encode())


def planned_fingerprint(shard: ShardPlan, lookup: RecordLookup, derived_dir: Path, extra_keys: list[str]) -> str:
    """The content fingerprint a shard written now would get (same as `_write_shard` computes)."""
    fp = _fingerprint_hasher()
    for row in shard.rows.tolist():
        record = lookup(row)
        key = check_key(record.get("image_id"))
        fp.update(json_member(record, extra_keys))
        for kind in ARRAY_MEMBERS.values():
            st = os.stat(store.artifact_path(derived_dir, kind, key))
            fp.update(f"{kind}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        fp.update(mask_member(record))
    return fp.hexdigest()


def _write_shard(
    out: Path,
    shard: ShardPlan,
    lookup: RecordLookup,
    derived_dir: Path,
    extra_keys: list[str],
    on_sample: Callable[[int], None],
) -> dict:
    """Write one shard atomically (temp + fsync + rename), then its done-sidecar; returns its info."""
    final = out / shard.relpath
    final.parent.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint_hasher()
    keys = []
    with atomic_open(final, "wb") as raw:
        writer = _HashingWriter(raw)
        # On an exception TarFile.__exit__ writes nothing more and atomic_open deletes the temp
        # file; on success close() writes the end-of-archive blocks before the rename.
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
            tar.copybufsize = COPY_BUFSIZE
            for row in shard.rows.tolist():
                record = lookup(row)
                on_sample(_add_sample(tar, record, derived_dir, extra_keys, fp))
                keys.append(record["image_id"])
    info = {
        "bucket": shard.bucket,
        "path": shard.relpath,
        "samples": len(keys),
        "bytes": writer.count,
        "sha256": writer.sha.hexdigest(),
        "fingerprint": fp.hexdigest(),
        "keys": keys,
    }
    side = sidecar_path(out, shard.relpath)
    side.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(side, json.dumps(info, separators=(",", ":")) + "\n")
    del info["keys"]  # only the sidecar keeps the key list: memory stays flat in the sample count
    return info


def _read_sidecar(out: Path, relpath: str) -> dict | None:
    try:
        info = json.loads(sidecar_path(out, relpath).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _kept_shard(out: Path, shard: ShardPlan, fingerprint: str, *, verify: bool) -> dict | None:
    """The sidecar of a complete shard that matches the plan, or None (then it is rewritten)."""
    info = _read_sidecar(out, shard.relpath)
    path = out / shard.relpath
    if info is None or not path.is_file():
        return None
    if info.get("fingerprint") != fingerprint or info.get("path") != shard.relpath:
        return None
    if path.stat().st_size != info.get("bytes"):
        return None
    if verify and sha256_file(path) != info.get("sha256"):
        return None
    info.pop("keys", None)
    return info


# ------------------------------------------------------------------ existing exports
def _bucket_dirs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and BUCKET_DIR_RE.fullmatch(p.name))


def _shard_files(out: Path) -> list[Path]:
    return [p for d in _bucket_dirs(out) for p in sorted(d.iterdir()) if SHARD_RE.fullmatch(p.name)]


def existing_export(out: Path) -> str | None:
    """A short description of the export already in `out`, or None when there is none."""
    shards = _shard_files(out)
    if shards or (out / INDEX_FILE).exists() or (out / STATE_DIR).exists():
        done = "complete" if (out / INDEX_FILE).exists() else "unfinished"
        return f"{len(shards)} shard(s), {done}"
    return None


def _sweep_temps(out: Path) -> int:
    removed = 0
    for directory in [out, *_bucket_dirs(out)]:
        for entry in directory.iterdir():
            if entry.name.endswith(TMP_MARK) and entry.is_file():
                entry.unlink()
                removed += 1
    state = out / STATE_DIR
    if state.is_dir():
        for entry in state.rglob(f"*{TMP_MARK}"):
            entry.unlink()
            removed += 1
    return removed


def _remove_export(out: Path, keep: set[str] = frozenset()) -> int:
    """Delete the files of an export in `out` (only ours), except shards in `keep`; returns count."""
    removed = 0
    for path in _shard_files(out):
        relpath = path.relative_to(out).as_posix()
        if relpath in keep:
            continue
        path.unlink()
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(out, relpath).unlink()
        removed += 1
    state = out / STATE_DIR
    if state.is_dir():
        for side in sorted(state.rglob("*.json")):
            if side.relative_to(state).as_posix().removesuffix(".json") + ".tar" not in keep:
                side.unlink()
        for directory in sorted((p for p in state.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        if not keep:
            shutil.rmtree(state, ignore_errors=True)
    for directory in _bucket_dirs(out):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty
    return removed


# --------------------------------------------------------------------------- summary
@dataclass
class ExportSummary:
    """What an export found and wrote (printed, and saved as stats.json)."""

    output_dir: str
    dry_run: bool = False
    total_records: int = 0
    rejected_lines: int = 0
    excluded_by_bucket: int = 0
    ready_records: int = 0
    skipped_records: int = 0
    skipped_incomplete: dict[str, int] = field(default_factory=dict)
    planned_samples: int = 0
    planned_shards: int = 0
    written_samples: int = 0
    written_shards: int = 0
    kept_shards: int = 0
    new_shards: int = 0
    removed_stale_shards: int = 0
    buckets: dict[str, dict] = field(default_factory=dict)
    json_fields: list[str] = field(default_factory=list)
    dropped_fields: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    bytes_written: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def format_summary(s: ExportSummary) -> str:
    lines = [
        f"{'dry run: ' if s.dry_run else ''}export to {s.output_dir}",
        f"  records: {s.total_records} in manifest ({s.rejected_lines} rejected lines), "
        f"{s.excluded_by_bucket} outside --bucket, {s.ready_records} ready, {s.skipped_records} not ready",
    ]
    for reason, count in s.skipped_incomplete.items():
        lines.append(f"    not ready: {reason}: {count}")
    if s.dry_run:
        lines.append(f"  would write {s.planned_samples} samples in {s.planned_shards} shards")
        if s.kept_shards:
            lines.append(f"  ({s.kept_shards} complete shards would be kept)")
    else:
        lines.append(
            f"  wrote {s.written_samples} samples in {s.written_shards} shards "
            f"({s.new_shards} new, {s.kept_shards} kept, {s.removed_stale_shards} stale removed)"
        )
    for bucket, info in s.buckets.items():
        size = f", {info['bytes'] / 1e6:.1f} MB" if info.get("bytes") else ""
        lines.append(f"    bucket {bucket}: {info['samples']} samples, {info['shards']} shards{size}")
    if s.dropped_fields:
        lines.append("  extra fields dropped from the JSON member: " + ", ".join(
            f"{k} ({v})" for k, v in s.dropped_fields.items()
        ))
    if not s.dry_run and s.elapsed_s > 0:
        rate = s.bytes_written / 1e6 / s.elapsed_s
        lines.append(f"  {s.elapsed_s:.1f} s, {rate:.0f} MB/s written")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def normalise_buckets(buckets: str | Iterable[str] | None) -> set[str] | None:
    """--bucket values (repeatable, or comma lists) -> a set of "WxH" strings; None = all."""
    if buckets is None:
        return None
    if not isinstance(buckets, str):
        buckets = list(buckets)
        if not buckets:
            return None
    return {format_bucket(w, h) for w, h in parse_bucket_list(buckets)}


def export_webdataset(
    input_jsonl: str | Path = config.DEFAULT_MANIFEST,
    derived_dir: str | Path = config.DEFAULT_OUTPUT_BASE_DIR,
    output_dir: str | Path = config.DEFAULT_SHARDS_DIR,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    buckets: str | Iterable[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    num_proc: int | None = None,
    verify_kept: bool = True,
    progress_bar: bool | None = None,
    allow_stale: bool = False,
) -> ExportSummary:
    """Export the ready records of a manifest as WebDataset shards (see the module doc).

    Raises FileNotFoundError (no manifest / derived dir), FileExistsError (an export is
    already in `output_dir` and neither `overwrite` nor `resume`), ValueError (bad options).
    `progress_bar`: tqdm on stderr; None = only when stderr is a terminal.
    """
    started = time.perf_counter()
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other")
    input_jsonl, derived_dir, out = Path(input_jsonl), Path(derived_dir), Path(output_dir)
    if not input_jsonl.is_file():
        raise FileNotFoundError(f"manifest {input_jsonl} not found")
    if not derived_dir.is_dir():
        raise FileNotFoundError(f"derived dir {derived_dir} not found")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output-dir {out} is not a directory")
    found = existing_export(out)
    if found and not (overwrite or resume):
        raise FileExistsError(
            f"{out} already holds an export ({found}); pass --overwrite to replace it or --resume to finish it"
        )
    selected = normalise_buckets(buckets)

    manifest = read_manifest(input_jsonl)
    rows, codes, names, reasons, not_ready, excluded = readiness(
        manifest, derived_dir, selected, num_proc=num_proc, allow_stale=allow_stale
    )
    plan = make_plan(
        rows, codes, bucket_names=names, shuffle=shuffle, seed=seed, limit=limit, shard_size=shard_size
    )
    lookup = RecordLookup(manifest)
    extra_keys, dropped = choose_extra_fields(lookup(row) for shard in plan for row in shard.rows.tolist())

    summary = ExportSummary(
        output_dir=str(out),
        dry_run=dry_run,
        total_records=len(manifest),
        rejected_lines=len(manifest.rejected),
        excluded_by_bucket=excluded,
        ready_records=len(rows),
        skipped_records=not_ready,
        skipped_incomplete=reasons,
        planned_samples=sum(len(s.rows) for s in plan),
        planned_shards=len(plan),
        json_fields=[*JSON_FIELDS, *extra_keys],
        dropped_fields=dropped,
        options={
            "shard_size": shard_size,
            "limit": limit,
            "shuffle": shuffle,
            "seed": seed,
            "buckets": sorted(selected) if selected else None,
            "allow_stale": allow_stale,
        },
    )
    for shard in plan:
        entry = summary.buckets.setdefault(shard.bucket, {"samples": 0, "shards": 0, "bytes": 0})
        entry["samples"] += len(shard.rows)
        entry["shards"] += 1

    if dry_run:
        if resume and found:
            summary.kept_shards = sum(
                _kept_shard(out, s, planned_fingerprint(s, lookup, derived_dir, extra_keys), verify=verify_kept)
                is not None
                for s in plan
            )
        return summary

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / INDEX_FILE).unlink()  # from here on the folder is an unfinished export
    fsync_dir(out)
    _sweep_temps(out)
    if overwrite:
        _remove_export(out)

    infos: list[dict] = []
    todo: list[ShardPlan] = []
    for shard in plan:
        info = None
        if resume:
            fingerprint = planned_fingerprint(shard, lookup, derived_dir, extra_keys)
            info = _kept_shard(out, shard, fingerprint, verify=verify_kept)
        infos.append(info)
        if info is None:
            todo.append(shard)
    summary.kept_shards = len(plan) - len(todo)

    from tqdm.auto import tqdm

    total_todo = sum(len(s.rows) for s in todo)
    bar = tqdm(
        total=total_todo,
        desc="export",
        unit="sample",
        file=sys.stderr,
        disable=(not sys.stderr.isatty()) if progress_bar is None else not progress_bar,
        leave=False,
    )
    done = 0
    written_bytes = 0
    write_started = time.perf_counter()

    def on_sample(nbytes: int) -> None:
        nonlocal done, written_bytes
        done += 1
        written_bytes += nbytes
        bar.update(1)
        if progress_every and done % progress_every == 0:
            elapsed = max(time.perf_counter() - write_started, 1e-9)
            logger.info(
                "exported %d/%d samples (%.0f samples/s, %.0f MB/s)",
                done, total_todo, done / elapsed, written_bytes / 1e6 / elapsed,
            )

    try:
        for i, shard in enumerate(plan):
            if infos[i] is None:
                infos[i] = _write_shard(out, shard, lookup, derived_dir, extra_keys, on_sample)
                summary.bytes_written += infos[i]["bytes"]
    finally:
        bar.close()
    summary.new_shards = len(todo)
    summary.removed_stale_shards = _remove_export(out, keep={s.relpath for s in plan})

    index = build_index(infos, summary)
    for bucket, entry in index["buckets"].items():
        summary.buckets[bucket]["bytes"] = entry["bytes"]
    summary.written_samples = sum(info["samples"] for info in infos)
    summary.written_shards = len(infos)
    from prep.export.card import render_card

    atomic_write_text(out / CARD_FILE, render_card(index, store.read_metadata(derived_dir)))
    stats = summary.to_dict()
    # Volatile: what this invocation did, not what the export holds (a resumed export must
    # give the same stats.json as an uninterrupted one).
    for volatile in (
        "elapsed_s", "bytes_written", "output_dir", "dry_run", "kept_shards", "new_shards", "removed_stale_shards"
    ):
        stats.pop(volatile)
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")  # last: marks the export complete
    summary.elapsed_s = time.perf_counter() - started
    return summary


def build_index(infos: list[dict], summary: ExportSummary) -> dict:
    buckets: dict[str, dict] = {}
    for info in infos:
        entry = buckets.setdefault(info["bucket"], {"samples": 0, "shards": 0, "bytes": 0})
        entry["samples"] += info["samples"]
        entry["shards"] += 1
        entry["bytes"] += info["bytes"]
    for bucket, entry in buckets.items():
        entry["vae_shape"] = list(latent_shape(bucket, config.VAE_LATENT_CHANNELS, config.VAE_DOWNSCALE))
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "prep_version": __version__,
        "members": list(MEMBERS),
        "json_fields": summary.json_fields,
        "dropped_fields": summary.dropped_fields,
        "options": summary.options,
        "samples": sum(e["samples"] for e in buckets.values()),
        "buckets": buckets,
        "shards": [
            {k: info[k] for k in ("bucket", "path", "samples", "bytes", "sha256")} for info in infos
        ],
    }
