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
`{id}.t5h.npy` (byte copies of the side files) and `{id}.t5m.npy` (the T5 attention mask as
uint8 (77,)). The key is the image_id (no dots by construction). What the JSON member holds:
prep/export/fields.py.

The work is split in steps, one module each: readiness (readiness.py: which records can
go, one read of each .npy header, `store.readiness_reasons`), the plan (plan.py: shuffle, limit, group by
bucket, chunk), the JSON layout (fields.py: image_path, user metadata), the shard writer
(tarwriter.py: deterministic tars, atomic, every side file checked as it is copied), the
resume state (resume.py) and the worker processes (workers.py). This module ties them
together and writes the card, stats.json and, last, index.json: an export without it is
unfinished.

Shards are independent: `num_workers` processes write whole shards, with the same bytes
whatever their number. A sample whose side file fails the check while it is copied (NaN/Inf,
changed since the readiness check) is left out and counted in the summary.
`resume=True` keeps each shard whose sidecar matches the planned content (same keys, same
JSON members, same side-file sizes and mtimes) and whose bytes still hash to the recorded
sha256; it rewrites the rest and removes stray temp files. Memory is flat in the number of
samples: only row numbers are held, and a few shards' records at a time.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prep import __version__, config, store
from prep.buckets import format_bucket, latent_shape, parse_bucket_list
from prep.export.fields import (
    JSON_FIELDS,
    FieldStats,
    JsonLayout,
    check_key,
    choose_layout,
    field_stats,
    images_roots,
    mask_member,
    relative_image_path,
)
from prep.export.plan import DEFAULT_SHARD_SIZE, ShardPlan, make_plan, shard_relpath
from prep.export.readiness import Readiness, readiness
from prep.export.resume import (
    CARD_FILE,
    INDEX_FILE,
    STATE_DIR,
    STATS_FILE,
    existing_export,
    read_index,
    remove_export,
    sweep_temps,
)
from prep.export.tarwriter import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    ShardTask,
    WriteContext,
    check_shard,
    members,
    process_shard,
)
from prep.export.workers import WorkerPool, default_workers
from prep.fsio import atomic_open, fsync_dir
from prep.manifest import Manifest, read_manifest

logger = logging.getLogger(__name__)

DEFAULT_PROGRESS_EVERY = 5000
MAX_SKIP_WARNINGS = 20
STATS_CHUNK = 2000
AUTO_PARALLEL_MIN_SAMPLES = 256  # below this, without num_workers, shards are written in this process

__all__ = [
    "CARD_FILE", "DEFAULT_SHARD_SIZE", "EXPORT_FORMAT", "INDEX_FILE", "JSON_FIELDS", "STATE_DIR", "STATS_FILE",
    "ExportOptions", "ExportSummary", "JsonLayout", "Readiness", "ShardPlan", "check_key", "export_webdataset",
    "format_summary", "hf_features", "make_plan", "mask_member", "readiness", "relative_image_path", "shard_relpath",
]


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
    skipped_at_write: dict[str, int] = field(default_factory=dict)
    written_samples: int = 0
    written_shards: int = 0
    kept_shards: int = 0
    new_shards: int = 0
    removed_stale_shards: int = 0
    buckets: dict[str, dict] = field(default_factory=dict)
    json_fields: list[str] = field(default_factory=list)
    dropped_fields: dict[str, str] = field(default_factory=dict)
    field_notes: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    bytes_written: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# What one invocation did, not what the export holds: left out of stats.json, so a resumed
# export gives the same stats.json as an uninterrupted one.
VOLATILE_FIELDS = ("elapsed_s", "bytes_written", "output_dir", "dry_run", "kept_shards", "new_shards",
                   "removed_stale_shards")


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
    for reason, count in s.skipped_at_write.items():
        lines.append(f"    not exported (side file failed the check while writing): {reason}: {count}")
    for bucket, info in s.buckets.items():
        size = f", {info['bytes'] / 1e6:.1f} MB" if info.get("bytes") else ""
        lines.append(f"    bucket {bucket}: {info['samples']} samples, {info['shards']} shards{size}")
    if s.dropped_fields:
        lines.append("  fields dropped from the JSON member: " + ", ".join(
            f"{k} ({v})" for k, v in s.dropped_fields.items()
        ))
    for key, note in s.field_notes.items():
        lines.append(f"    field {key}: {note}")
    if not s.dry_run and s.elapsed_s > 0:
        rate = s.bytes_written / 1e6 / s.elapsed_s
        lines.append(f"  {s.elapsed_s:.1f} s, {rate:.0f} MB/s written")
    return "\n".join(lines)


class _SkipLog:
    """Counts the samples left out while writing, by reason; logs the first few keys."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, skipped: list) -> None:
        for key, reason in skipped:
            if sum(self.counts.values()) < MAX_SKIP_WARNINGS:
                logger.warning("sample %s not exported: %s", key, reason)
            self.counts[reason] += 1

    def result(self) -> dict[str, int]:
        if sum(self.counts.values()) > MAX_SKIP_WARNINGS:
            logger.warning("%d samples not exported in all (counts in stats.json)", sum(self.counts.values()))
        return dict(sorted(self.counts.items()))


def build_index(infos: list[dict], summary: ExportSummary, layout: JsonLayout | None = None,
                derived_dir: str | Path = "") -> dict:
    """index.json: format, members, JSON fields, options, per-bucket counts and every shard (with a file)."""
    infos = [info for info in infos if info["samples"]]  # a shard whose samples were all skipped has no file
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
        "members": list(members(derived_dir)),
        "json_fields": summary.json_fields,
        "json_field_types": dict(layout.types) if layout else {},
        "dropped_fields": summary.dropped_fields,
        "options": summary.options,
        "samples": sum(e["samples"] for e in buckets.values()),
        "buckets": buckets,
        "shards": [
            {k: info[k] for k in ("bucket", "path", "samples", "bytes", "sha256")} for info in infos
        ],
    }


def hf_features(index: dict):
    """The `datasets.Features` of an export's samples, from its index.json content.

    What the HF `webdataset` builder infers when the first samples hold every field; pass it
    as `load_dataset("webdataset", data_files=..., features=hf_features(index))` when a
    user field is null in the first samples of the first tar (the builder infers its type
    from the first 5 samples and cannot cast a later value to the "null" type).
    """
    from datasets import Features, Value

    from prep.export.card import array_feature, exported_artifacts

    json_types = index.get("json_field_types") or dict.fromkeys(index.get("json_fields", []), "string")
    return Features({
        "json": {key: Value(dtype) for key, dtype in json_types.items()},
        **{a.member: array_feature(a, lists=True) for a in exported_artifacts(index)},
        "__key__": Value("string"),
        "__url__": Value("string"),
    })


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


def _check_card_options(card_options: dict) -> None:
    """Options for render_card are checked before any work: a misspelt option fails now, not at the end."""
    from prep.export.card import render_card

    try:
        inspect.signature(render_card).bind({}, {}, **card_options)
    except TypeError as exc:
        raise TypeError(f"export_webdataset: unexpected option(s) {sorted(card_options)} ({exc})") from None


def _check_args(input_jsonl, derived_dir, output_dir, *, shard_size, limit, overwrite, resume) -> tuple:
    """(manifest path, derived dir, output dir, existing export or None); raises on bad options."""
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
    return input_jsonl, derived_dir, out, found


@dataclass(frozen=True)
class ExportOptions:
    """What decides an export's content (recorded in stats.json and index.json)."""

    shard_size: int
    limit: int | None
    shuffle: bool
    seed: int
    buckets: set[str] | None
    allow_stale: bool
    image_path: str

    def to_dict(self) -> dict:
        return {**asdict(self), "buckets": sorted(self.buckets) if self.buckets else None}


def _plan_export(manifest: Manifest, derived_dir: Path, out: Path, options: ExportOptions, pool: WorkerPool):
    """(the shard plan, the summary so far, the JSON layout): readiness, plan, and what the samples hold."""
    roots = images_roots(store.read_metadata(derived_dir))
    ready = readiness(manifest, derived_dir, options.buckets, allow_stale=options.allow_stale, pool=pool,
                      field_roots=roots)
    plan = make_plan(ready.rows, ready.codes, bucket_names=ready.bucket_names, shuffle=options.shuffle,
                     seed=options.seed, limit=options.limit, shard_size=options.shard_size)
    planned = sum(len(s.rows) for s in plan)
    stats = ready.fields if planned == len(ready.rows) else _plan_stats(pool, manifest, plan, roots)
    layout = choose_layout(stats, image_path=options.image_path, roots=roots)
    summary = _new_summary(out, manifest, ready, plan, json_fields=layout.keys, dropped_fields=dict(layout.dropped),
                           field_notes=dict(layout.notes), options=options.to_dict())
    return plan, summary, layout


def _plan_stats(pool: WorkerPool, manifest: Manifest, plan: list[ShardPlan], roots: tuple[str, ...]) -> FieldStats:
    """The FieldStats of the planned records only (when --limit leaves some ready records out)."""
    rows = [row for shard in plan for row in shard.rows.tolist()]
    jobs = ((i, ([manifest.record(r) for r in rows[i : i + STATS_CHUNK]], roots))
            for i in range(0, len(rows), STATS_CHUNK))
    stats = FieldStats()
    for _, part in pool.imap(field_stats, jobs, inline=len(rows) <= STATS_CHUNK):
        stats.merge(part)
    return stats


def _new_summary(out: Path, manifest: Manifest, ready: Readiness, plan: list[ShardPlan], **known) -> ExportSummary:
    summary = ExportSummary(
        output_dir=str(out),
        total_records=len(manifest),
        rejected_lines=len(manifest.rejected),
        excluded_by_bucket=ready.excluded,
        ready_records=len(ready.rows),
        skipped_records=ready.not_ready,
        skipped_incomplete=ready.reasons,
        planned_samples=sum(len(s.rows) for s in plan),
        planned_shards=len(plan),
        **known,
    )
    for shard in plan:
        entry = summary.buckets.setdefault(shard.bucket, {"samples": 0, "shards": 0, "bytes": 0})
        entry["samples"] += len(shard.rows)
        entry["shards"] += 1
    return summary


def _previous_index(out: Path) -> dict[str, dict]:
    """{shard path: entry} of the index.json of a complete export in `out` ({} when none)."""
    if not (out / INDEX_FILE).is_file():
        return {}
    return {entry["path"]: entry for entry in read_index(out / INDEX_FILE)["shards"]}


def _tasks(plan: list[ShardPlan], manifest: Manifest, listed: dict[str, dict], pool: WorkerPool) -> Iterator:
    """(position, (ShardTask,)) per planned shard, drawn lazily; the records go with it only when
    the workers cannot read the manifest themselves (spawned, not forked)."""
    token = pool.token if pool.shares_memory and pool.shared is manifest else None
    for position, shard in enumerate(plan):
        rows = shard.rows.tolist()
        records = [manifest.record(row) for row in rows] if token is None else token
        yield position, (ShardTask(shard.bucket, shard.index, rows, records, listed.get(shard.relpath)),)


def _inline(pool: WorkerPool, plan: list[ShardPlan]) -> bool:
    """Shards in this process: one shard, or (workers not chosen) too few samples to pay for workers."""
    return len(plan) <= 1 or (pool.auto and sum(len(s.rows) for s in plan) < AUTO_PARALLEL_MIN_SAMPLES)


def _count_kept(pool: WorkerPool, ctx: WriteContext, plan, manifest, out: Path) -> int:
    """How many planned shards a resume would keep (dry run)."""
    jobs = ((position, (ctx, *args)) for position, args in _tasks(plan, manifest, _previous_index(out), pool))
    return sum(kept for _, kept in pool.imap(check_shard, jobs, inline=_inline(pool, plan)))


def _prepare_output(out: Path, *, overwrite: bool) -> None:
    """Mark `out` as an unfinished export (no index.json), sweep temp files, clear it for --overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / INDEX_FILE).unlink()
    fsync_dir(out)
    sweep_temps(out)
    if overwrite:
        remove_export(out)


class _Progress:
    """A tqdm bar (stderr) and a log line every `every` samples, advanced per finished shard."""

    def __init__(self, total: int, every: int, bar: bool | None):
        from tqdm.auto import tqdm

        self.total, self.every, self.done, self.nbytes = total, every, 0, 0
        self.started = time.perf_counter()
        disable = (not sys.stderr.isatty()) if bar is None else not bar
        self.bar = tqdm(total=total, desc="export", unit="sample", file=sys.stderr, disable=disable, leave=False)

    def update(self, samples: int, nbytes: int) -> None:
        before, self.done = self.done, self.done + samples
        self.nbytes += nbytes
        self.bar.update(samples)
        if self.every and self.done // self.every > before // self.every:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            logger.info(
                "exported %d/%d samples (%.0f samples/s, %.0f MB/s)",
                self.done, self.total, self.done / elapsed, self.nbytes / 1e6 / elapsed,
            )

    def close(self) -> None:
        self.bar.close()


def _run_shards(pool: WorkerPool, ctx: WriteContext, plan, manifest, listed, progress: _Progress, skips: _SkipLog):
    """Keep or write every planned shard (in the workers); returns their entries, in plan order.

    After a failure the workers are stopped and the temp files they leave are swept: only
    complete shards remain, under their final names.
    """
    infos: list[dict] = [{}] * len(plan)
    try:
        jobs = ((i, (ctx, *args)) for i, args in _tasks(plan, manifest, listed, pool))
        for position, info in pool.imap(process_shard, jobs, inline=_inline(pool, plan)):
            skipped = info.pop("skipped")
            infos[position] = info
            skips.add(skipped)
            progress.update(info["samples"] + len(skipped), 0 if info["kept"] else info["bytes"])
    except BaseException:
        pool.close(failed=True)
        with contextlib.suppress(OSError):
            sweep_temps(Path(ctx.out))
        raise
    finally:
        progress.close()
    return infos


def _write_json(path: Path, obj: dict) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def copy_uncond(derived_dir: Path, out: Path) -> dict | None:
    """The empty caption's T5 state (classifier-free guidance), copied to the export root when the
    run made one and its file is intact; returns index.json's `uncond` entry."""
    from prep.provenance import bytes_sha256

    entry = store.read_metadata(derived_dir).get("uncond")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or "/" in entry["path"]:
        return None
    try:
        data = (Path(derived_dir) / entry["path"]).read_bytes()
    except OSError:
        return None
    if bytes_sha256(data) != entry.get("sha256"):
        logger.warning("%s does not match its recorded sha256: not exported (rerun `prep run` to remake it)",
                       entry["path"])
        return None
    with atomic_open(out / entry["path"], "wb") as f:
        f.write(data)
    return {"path": entry["path"], "sha256": entry["sha256"], "caption": entry.get("caption", "")}


def _finish(out: Path, plan, infos: list[dict], skips: _SkipLog, summary: ExportSummary, layout: JsonLayout,
            derived_dir: Path, card_options: dict) -> None:
    """Remove stale shards, write the card, stats.json and, last, index.json (the export is complete)."""
    from prep.export.card import render_card

    summary.kept_shards = sum(info["kept"] for info in infos)
    summary.new_shards = len(plan) - summary.kept_shards
    summary.bytes_written = sum(info["bytes"] for info in infos if not info["kept"])
    # planned shards left with no sample have no file (the writer removed any) but keep their sidecar
    summary.removed_stale_shards = remove_export(out, keep={s.relpath for s in plan})
    summary.skipped_at_write = skips.result()
    index = build_index(infos, summary, layout, derived_dir)
    uncond = copy_uncond(derived_dir, out)
    if uncond:
        index["uncond"] = uncond
    summary.buckets = {b: {k: e[k] for k in ("samples", "shards", "bytes")} for b, e in index["buckets"].items()}
    summary.written_samples = index["samples"]
    summary.written_shards = len(index["shards"])
    with atomic_open(out / CARD_FILE, "w") as f:
        f.write(render_card(index, store.read_metadata(derived_dir), **card_options))
    stats = {k: v for k, v in summary.to_dict().items() if k not in VOLATILE_FIELDS}
    _write_json(out / STATS_FILE, stats)
    _write_json(out / INDEX_FILE, index)


def export_webdataset(
    input_jsonl: str | Path = config.DEFAULT_MANIFEST,
    derived_dir: str | Path = config.DEFAULT_DERIVED_DIR,
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
    verify_kept: bool = True,
    num_workers: int | None = None,
    progress_bar: bool | None = None,
    allow_stale: bool = False,
    image_path: str = "relative",
    **card_options,
) -> ExportSummary:
    """Export the ready records of a manifest as WebDataset shards (see the module doc).

    Raises FileNotFoundError (no manifest / derived dir), FileExistsError (an export is
    already in `output_dir` and neither `overwrite` nor `resume`), ValueError (bad options).
    `progress_bar`: tqdm on stderr; None = only when stderr is a terminal. `num_workers`:
    processes that check readiness and write shards (1 = in this process; default: the CPUs,
    at most 8, and none for an export of under 256 samples or 2000 records); the output does not
    depend on it.
    `image_path`: "relative" (to the images root), "absolute" or "none" (prep/export/fields.py).
    `card_options` are passed to `prep.export.card.render_card`.
    """
    started = time.perf_counter()
    input_jsonl, derived_dir, out, found = _check_args(
        input_jsonl, derived_dir, output_dir, shard_size=shard_size, limit=limit, overwrite=overwrite, resume=resume
    )
    _check_card_options(card_options)
    options = ExportOptions(shard_size, limit, shuffle, seed, normalise_buckets(buckets), allow_stale, image_path)
    manifest = read_manifest(input_jsonl)
    workers = num_workers
    with WorkerPool(workers or default_workers(), shared=manifest, auto=workers is None) as pool:
        plan, summary, layout = _plan_export(manifest, derived_dir, out, options, pool)
        ctx = WriteContext(str(out), str(derived_dir), layout, resume=resume, verify=verify_kept)
        summary.dry_run = dry_run
        if dry_run:
            if resume and found:
                summary.kept_shards = _count_kept(pool, ctx, plan, manifest, out)
            return summary
        listed = _previous_index(out) if resume else {}
        _prepare_output(out, overwrite=overwrite)
        todo = _Progress(summary.planned_samples, progress_every, progress_bar)
        skips = _SkipLog()
        infos = _run_shards(pool, ctx, plan, manifest, listed, todo, skips)
    _finish(out, plan, infos, skips, summary, layout, derived_dir, card_options)
    summary.elapsed_s = time.perf_counter() - started
    return summary
