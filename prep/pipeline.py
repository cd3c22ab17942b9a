"""The main job: scan -> migrate -> caption -> t5 -> dinov3 -> vae, resumable, under Accelerate.

Shape of a run (every rank runs this file; `accelerate launch` starts the ranks):

1. Every rank checks its inputs (cheap, read-only), so a bad flag fails everywhere at once.
2. The main rank prepares the manifest alone: merges journals a killed run left, scans
   `--images` for new files, applies `.txt` sidecar captions, migrates v0/v1 records, and
   rewrites the manifest atomically. The others wait at a barrier.
3. For each pass, every rank loads the manifest as a `datasets.Dataset`, decides the work
   with a `Dataset.filter` (`needs_*`, reading side-file headers only), meets the others
   at a barrier (nobody writes before everybody has filtered), takes its contiguous shard
   and runs a batched `Dataset.map` that encodes and writes side files. Images are decoded
   in DataLoader workers while the model runs; writes go to a thread pool. Record updates
   (captions, T5 masks, provenance stamps) go to the rank's journal; the main rank merges
   journals into the manifest every `--checkpoint-every` batches and at the end of each pass.

Resume comes from files on disk (valid side files count as done; journals hold record
updates), never from the `datasets` cache: every map runs with `load_from_cache_file=False`
on an in-memory dataset. No collective runs during long work, only between passes.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prep import journal, provenance, store
from prep.buckets import assign_aspect_bucket, format_bucket, parse_bucket
from prep.errors import UserError
from prep.fsio import sweep_temp_files
from prep.manifest import Manifest, read_manifest, write_manifest
from prep.migrate import EXTRACTED, FAILED, MIGRATED, ids_for_records, migrate_record
from prep.needs import NEEDS, NeedsPlan
from prep.options import RunOptions
from prep.passes import (
    AsyncWriter,
    PassContext,
    config_fields,
    expected_config,
    fresh_fingerprint,
    load_encoder,
    model_id_of,
    run_pass_on_shard,
)
from prep.records import has_caption, needs_migration, new_record
from prep.scan import assign_image_ids, iter_image_files, read_headers, relative_key
from prep.tally import Tally, progress_line, refreshed_line

logger = logging.getLogger("prep")

__all__ = ["RunOptions", "RunSummary", "run", "run_job"]


class RunError(UserError):
    """An expected condition that stops the run (bad input, no space); reported as one line."""


# ------------------------------------------------------------------------------- checks
def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_inputs(opts: RunOptions) -> None:
    """Read-only checks every rank runs first, so bad input fails cleanly everywhere."""
    if opts.images is not None:
        if not opts.images.exists():
            raise RunError(f"images directory {opts.images} does not exist")
        if not opts.images.is_dir():
            raise RunError(f"--images {opts.images} is not a directory")
    if opts.manifest.exists() and not opts.manifest.is_file():
        raise RunError(f"manifest {opts.manifest} is not a file")
    if opts.images is None and not opts.manifest.exists():
        raise RunError(f"manifest {opts.manifest} does not exist and no --images folder was given")
    if opts.output_base_dir.exists() and not opts.output_base_dir.is_dir():
        raise RunError(f"output base dir {opts.output_base_dir} is not a directory")
    for target in (opts.output_base_dir, opts.manifest.parent):
        parent = nearest_existing(target)
        if not parent.is_dir():
            raise RunError(f"cannot create {target}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunError(f"{target} is not writable")
    free_gb = shutil.disk_usage(nearest_existing(opts.output_base_dir)).free / 1e9
    if free_gb < opts.min_free_gb:
        raise RunError(
            f"only {free_gb:.1f} GB free under {opts.output_base_dir}, need {opts.min_free_gb:g} "
            "(about 675 KiB per 1024x1024 image; lower with --min-free-gb)"
        )
    for width, height in opts.buckets:
        parse_bucket(f"{width}x{height}")
    if (opts.batch_size is not None and opts.batch_size < 1) or opts.text_batch_size < 1 or opts.caption_batch_size < 1:
        raise RunError("batch sizes must be >= 1")


# ------------------------------------------------------------------------------ prepare
def start_over(opts: RunOptions) -> None:
    """--no-resume: keep the old manifest as a timestamped backup, delete the side files."""
    if opts.manifest.exists():
        backup = opts.manifest.with_name(f"{opts.manifest.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(opts.manifest, backup)
        logger.info("--no-resume: previous manifest kept as %s", backup)
    journal.clear(opts.manifest)
    for kind in store.ARTIFACTS:
        shutil.rmtree(store.artifact_dir(opts.output_base_dir, kind), ignore_errors=True)


def normalised(path: str | Path) -> str:
    """The key that matches an image file to its record (absolute, normalised)."""
    return os.path.normpath(os.path.abspath(path))


def scan_images(opts: RunOptions, manifest: Manifest, tally: Tally) -> list[dict]:
    """Records for images under `--images` that the manifest does not know yet."""
    from tqdm.auto import tqdm

    known = {normalised(path) for path in manifest.projections_column("image_path")}
    taken = set(manifest.projections_column("image_id")) - {None}
    candidates = [p for p in iter_image_files(opts.images) if normalised(p) not in known]
    headers = list(
        tqdm(read_headers(candidates), total=len(candidates), desc="scan", unit="img", leave=False)
    )
    readable = []
    for header in headers:
        if header.error:
            tally.unreadable += 1
            logger.warning("skipped %s: %s", header.path, header.error)
        else:
            readable.append(header)
    keys = [relative_key(h.path, opts.images) for h in readable]
    ids = assign_image_ids(keys, taken)
    records = []
    for header, image_id in zip(readable, ids, strict=True):
        bucket = assign_aspect_bucket(header.width, header.height, opts.buckets)
        records.append(
            new_record(
                image_id=image_id,
                image_path=str(header.path),
                width=header.width,
                height=header.height,
                aspect_bucket=bucket,
            )
        )
        tally.new.add(image_id)
        logger.debug("new %s: %s %dx%d -> %s", image_id, header.path, header.width, header.height, bucket)
    return records


def sidecar_caption(image_path: str) -> str | None:
    """The caption in `<image stem>.txt` beside the image, if any."""
    path = Path(image_path).with_suffix(".txt")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def prepare_manifest(opts: RunOptions, tally: Tally) -> None:
    """Main rank only: recover journals, scan, sidecars, migrate; one atomic rewrite if anything changed."""
    if opts.no_resume:
        start_over(opts)
    store.ensure_dirs(opts.output_base_dir)
    swept = store.sweep_stray_temp_files(opts.output_base_dir)
    # A manifest checkpoint (or rejected-lines / metadata rewrite) killed before its rename
    # leaves `.manifest.jsonl.<random>.prep-tmp` beside the manifest: sweep those too.
    swept += sweep_temp_files(opts.manifest.parent, prefix=f".{opts.manifest.name}.")
    swept += sweep_temp_files(opts.output_base_dir, prefix=f".{store.METADATA_FILE}.")
    if swept:
        logger.info("removed %d temp files left by an interrupted run", swept)
    legacy_idx = opts.manifest.with_suffix(".idx")
    if legacy_idx.exists():
        logger.info("ignoring legacy %s: resume now comes from the manifest and side files", legacy_idx)
    manifest = read_manifest(opts.manifest)
    updates = journal.read_updates(opts.manifest)
    new_records = scan_images(opts, manifest, tally) if opts.images is not None else []
    run_migrate = "migrate" in opts.selected_passes()
    run_sidecars = opts.sidecar_captions and "caption" in opts.selected_passes() and not opts.recaption

    records = list(manifest)
    changed = bool(new_records) or bool(manifest.rejected)
    if updates:
        by_id = {r.get("image_id"): r for r in records}
        for image_id, update in updates.items():
            if image_id in by_id and journal.apply_update(by_id[image_id], update):
                changed = True
    records.extend(new_records)
    if run_sidecars:
        changed |= apply_sidecar_captions(records, tally)
    if run_migrate:
        changed |= migrate_all(records, opts, tally)
    changed |= rebucket(records, opts)
    changed |= refresh_image_fingerprints(records)
    if changed:
        write_manifest(opts.manifest, records, manifest.rejected)
    journal.clear(opts.manifest)


def apply_sidecar_captions(records: list[dict], tally: Tally) -> bool:
    """Captions from `<stem>.txt` files: for records without one, and where the sidecar changed since."""
    changed = False
    for record in records:
        stamp = (record.get("provenance") or {}).get("caption") or {}
        from_sidecar = stamp.get("source") == "sidecar" and stamp.get(
            "text_sha256"
        ) == provenance.text_sha256(record.get("caption"))
        if has_caption(record) and not from_sidecar:
            continue
        caption = sidecar_caption(record["image_path"])
        if caption and caption != record.get("caption"):
            journal.apply_update(
                record,
                {
                    "caption": caption,
                    "provenance.caption": {
                        "source": "sidecar",
                        "text_sha256": provenance.text_sha256(caption),
                    },
                },
            )
            tally.enriched.add(record.get("image_id") or record["image_path"])
            changed = True
    return changed


def rebucket(records: list[dict], opts: RunOptions) -> bool:
    """Move v2 records to the nearest bucket of the current set (their VAE latent then goes stale)."""
    moved = 0
    for record in records:
        width, height, bucket = record.get("width"), record.get("height"), record.get("aspect_bucket")
        if (
            needs_migration(record)
            or type(width) is not int
            or type(height) is not int
            or width <= 0
            or height <= 0
        ):
            continue
        nearest = assign_aspect_bucket(width, height, opts.buckets)
        if nearest != bucket:
            record["aspect_bucket"] = nearest
            moved += 1
    if moved:
        logger.info("%d records moved to a new aspect bucket (the bucket set changed)", moved)
    return moved > 0


def refresh_image_fingerprints(records: list[dict]) -> bool:
    """Re-hash images whose size or mtime changed since their fingerprint; True if any changed.

    Only files with a fingerprint are checked (the passes take the first one when they read
    an image), and a file whose size and mtime are unchanged is never hashed.
    """
    changed = 0
    for record in records:
        previous = record.get("image_fingerprint")
        if not isinstance(previous, dict):
            continue
        current = provenance.refresh_fingerprint(record["image_path"], previous)
        if current is not None and current != previous:
            record["image_fingerprint"] = current
            changed += 1
    if changed:
        logger.info("%d image files changed on disk since their fingerprint", changed)
    return changed > 0


def migrate_all(records: list[dict], opts: RunOptions, tally: Tally) -> bool:
    """Migrate every record that needs it, in place; True if any changed."""
    taken = {r["image_id"] for r in records if isinstance(r.get("image_id"), str)}
    new_ids = ids_for_records(records, taken)
    changed = False
    for index, record in enumerate(records):
        result = migrate_record(record, opts.output_base_dir, new_ids.get(record["image_path"]), opts.buckets)
        label = result.record.get("image_id") or record["image_path"]
        if result.status == FAILED:
            tally.failed[label] = f"migrate: {result.reason}"
            logger.warning("not migrated %s: %s", record["image_path"], result.reason)
        elif result.status in (MIGRATED, EXTRACTED):
            records[index] = result.record
            (tally.migrated if result.status == MIGRATED else tally.extracted).add(label)
            logger.debug("%s %s -> v2", result.status, label)
            changed = True
    return changed


@dataclass
class PassStats:
    """Timing of one pass on one rank: the figures the benchmarks read."""

    kind: str
    records: int = 0
    load_seconds: float = 0.0
    encode_seconds: float = 0.0  # wall time of the map, model loading excluded
    model_seconds: float = 0.0  # time inside the model's forward / generate

    @property
    def model_share(self) -> float:
        return self.model_seconds / self.encode_seconds if self.encode_seconds else 0.0


def run_encoder_pass(kind: str, opts: RunOptions, state, tally: Tally) -> PassStats:
    """One pass on every rank: filter (all ranks) -> barrier -> shard -> load -> map -> unload."""
    import datasets

    device = device_for(opts, state)
    plan = NeedsPlan(opts, expected_config(kind, opts, device))
    manifest = read_manifest(opts.manifest)
    todo = manifest.to_dataset().filter(
        functools.partial(NEEDS[kind], plan=plan),
        batched=True,
        batch_size=10_000,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=fresh_fingerprint(f"needs-{kind}"),
        desc=f"needs_{kind}" if state.is_main_process else None,
    )
    del manifest
    state.wait_for_everyone()  # every rank has decided the work before anyone writes
    shard = todo.shard(state.num_processes, state.process_index, contiguous=True)
    if state.is_main_process:
        stale = (
            f", {len(plan.stale)} stale{' (kept: --keep-stale)' if opts.keep_stale else ''}"
            if plan.stale
            else ""
        )
        logger.info("%s: %d records need work%s (%d on this rank)", kind, len(todo), stale, len(shard))
    stats = PassStats(kind, records=len(shard))
    if len(shard):
        started = time.perf_counter()
        encoder = load_encoder(kind, opts, device)
        stats.load_seconds = time.perf_counter() - started
        stamp_base = config_fields(kind, opts, str(encoder.dtype))
        record_models_used(kind, encoder, opts, stamp_base)
        ctx = PassContext(
            kind=kind,
            opts=opts,
            encoder=encoder,
            journal=journal.Journal(opts.manifest, state.process_index),
            writer=AsyncWriter(),
            tally=tally,
            is_main=state.is_main_process,
            stamp_base=stamp_base,
            stale=plan.stale,
        )
        try:
            if not state.is_main_process:
                datasets.disable_progress_bars()
            encode_started = time.perf_counter()
            run_pass_on_shard(ctx, shard)
            ctx.writer.drain()
            stats.encode_seconds = time.perf_counter() - encode_started
            stats.model_seconds = ctx.model_seconds
        finally:
            ctx.writer.close()
            ctx.journal.close()
            encoder.unload()
            del encoder, ctx.encoder
            free_memory()
        elapsed = time.perf_counter() - started
        logger.info(
            "%s: rank %d encoded %d records in %.1f s (%.2f/s; model load %.1f s; %.0f%% of encode time in the model)",
            kind,
            state.process_index,
            len(shard),
            elapsed,
            len(shard) / max(elapsed, 1e-9),
            stats.load_seconds,
            100 * stats.model_share,
        )
    state.wait_for_everyone()
    if state.is_main_process:
        journal.merge_into_manifest(opts.manifest)
        journal.clear(opts.manifest)
    state.wait_for_everyone()
    return stats


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_for(opts: RunOptions, state) -> str:
    """--device auto follows Accelerate (one GPU per rank); an explicit device wins."""
    return str(state.device) if opts.models.device == "auto" else opts.models.device


def record_models_used(kind: str, encoder, opts: RunOptions, stamp_base: dict) -> None:
    """Write which model made which artifact (and the latent convention) to prep_metadata.json."""
    entry = {
        "model_id": model_id_of(kind, opts),
        "revision": stamp_base["revision"],
        "dtype": stamp_base["dtype"],
    }
    updates: dict = {"buckets": [format_bucket(w, h) for w, h in opts.buckets]}
    metadata = store.read_metadata(opts.output_base_dir)
    models = dict(metadata.get("models", {}))
    models[kind] = entry
    updates["models"] = models
    if kind == "vae":
        updates["vae"] = encoder.convention()
    if any(metadata.get(key) != value for key, value in updates.items()):
        store.update_metadata(opts.output_base_dir, updates)


def lock_manifest(manifest: Path):
    """Hold `<manifest>.lock` for the run: two jobs on one manifest would race its rewrites.

    An flock is released by the kernel when its holder dies, so a killed run never leaves a
    stale lock behind; the (empty) lock file itself may stay.
    """
    import fcntl

    manifest.parent.mkdir(parents=True, exist_ok=True)
    handle = open(manifest.with_name(manifest.name + ".lock"), "a")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"another prep run is using {manifest} (its lock {handle.name} is held)") from None
    return handle


def make_state(opts: RunOptions):
    """Accelerate's PartialState; on a machine without CUDA it runs ranks on the CPU (gloo)."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or opts.models.device == "cpu"
    return PartialState(cpu=cpu)


def gather_tallies(state, tally: Tally) -> Tally:
    """Merge every rank's tally on the main rank (one collective, at the very end)."""
    if state.num_processes == 1:
        return tally
    from accelerate.utils import gather_object

    merged = Tally()
    for item in gather_object([tally]):
        merged.merge(item)
    return merged


@dataclass
class RunSummary:
    """What a run did: counts (main rank), this rank's pass timings, wall time, exit code."""

    counts: dict[str, int]
    passes: list[PassStats]
    seconds: float
    exit_code: int


def run_job(opts: RunOptions) -> RunSummary:
    """The main job; every rank calls it. Counts are complete on the main rank only."""
    check_inputs(opts)
    state = make_state(opts)
    started = time.perf_counter()
    tally = Tally()
    lock = lock_manifest(opts.manifest) if state.is_main_process else None
    if state.is_main_process:
        prepare_manifest(opts, tally)
    state.wait_for_everyone()
    passes = [
        run_encoder_pass(kind, opts, state, tally) for kind in opts.selected_passes() if kind != "migrate"
    ]
    merged = gather_tallies(state, tally)
    code, counts = 0, {}
    if state.is_main_process:
        counts = merged.counts(len(read_manifest(opts.manifest)))
        elapsed = time.perf_counter() - started
        print(progress_line(counts, (counts["total"] - counts["skipped"]) / max(elapsed, 1e-9)), flush=True)
        if line := refreshed_line(merged):
            print(line, flush=True)
        if merged.unreadable:
            print(f"scan: {merged.unreadable} unreadable files skipped (see warnings above)", flush=True)
        if opts.verify:
            from prep.verify import print_report, verify_manifest

            report = verify_manifest(opts.manifest, opts.output_base_dir)
            print_report(report)
            code = 0 if report.ok else 1
    state.wait_for_everyone()
    if lock is not None:
        lock.close()
    return RunSummary(counts, passes, time.perf_counter() - started, code)


def run(opts: RunOptions) -> int:
    """The main job. Returns the process exit code."""
    return run_job(opts).exit_code
