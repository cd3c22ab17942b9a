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
   (captions, T5 masks) go to the rank's journal; the main rank merges journals into the
   manifest every `--checkpoint-every` batches and at the end of each pass.

Resume comes from files on disk (valid side files count as done; journals hold record
updates), never from the `datasets` cache: every map runs with `load_from_cache_file=False`
on an in-memory dataset. No collective runs during long work, only between passes.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prep import journal, store
from prep.buckets import ASPECT_BUCKETS, Bucket, assign_aspect_bucket, parse_bucket, parse_bucket_list
from prep.config import PASSES, ModelConfig
from prep.errors import UserError
from prep.manifest import Manifest, read_manifest, write_manifest
from prep.migrate import EXTRACTED, FAILED, MIGRATED, ids_for_records, migrate_record
from prep.records import new_record
from prep.scan import assign_image_ids, iter_image_files, read_headers, relative_key

logger = logging.getLogger("prep")

OK, FAIL = "ok", "failed"


class RunError(UserError):
    """An expected condition that stops the run (bad input, no space); reported as one line."""


# ------------------------------------------------------------------------------ options
@dataclass
class RunOptions:
    """Everything a run needs; built from the CLI or directly from Python."""

    manifest: Path
    output_base_dir: Path
    images: Path | None = None
    pass_: str = "all"
    buckets: list[Bucket] = field(default_factory=lambda: list(ASPECT_BUCKETS))
    models: ModelConfig = field(default_factory=ModelConfig)
    recaption: bool = False
    sidecar_captions: bool = True
    verify: bool = False
    no_resume: bool = False
    min_free_gb: float = 20.0
    batch_size: int = 8
    text_batch_size: int = 64
    caption_batch_size: int = 4
    num_workers: int = 2
    checkpoint_every: int = 50
    verbose: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        models = ModelConfig(
            vae_model=args.vae_model,
            vae_subfolder=args.vae_subfolder or None,
            t5_model=args.t5_model,
            dinov3_model=args.dinov3_model,
            caption_model=args.caption_model,
            caption_prompt=args.caption_prompt,
            caption_max_new_tokens=args.caption_max_new_tokens,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
        return cls(
            manifest=args.manifest,
            output_base_dir=args.output_base_dir,
            images=args.images,
            pass_=args.pass_,
            buckets=parse_bucket_list(args.buckets) if args.buckets else list(ASPECT_BUCKETS),
            models=models,
            recaption=args.recaption,
            sidecar_captions=not args.no_sidecar_captions,
            verify=args.verify,
            no_resume=args.no_resume,
            min_free_gb=args.min_free_gb,
            batch_size=args.batch_size,
            text_batch_size=args.text_batch_size,
            caption_batch_size=args.caption_batch_size,
            num_workers=args.num_workers,
            checkpoint_every=args.checkpoint_every,
            verbose=args.verbose,
        )

    def selected_passes(self) -> tuple[str, ...]:
        return PASSES if self.pass_ == "all" else (self.pass_,)


# ----------------------------------------------------------------------------- counters
@dataclass
class Tally:
    """What happened to which records on one rank; merged on the main rank at the end."""

    new: set[str] = field(default_factory=set)
    migrated: set[str] = field(default_factory=set)
    extracted: set[str] = field(default_factory=set)
    enriched: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    unreadable: int = 0

    def merge(self, other: Tally) -> None:
        for name in ("new", "migrated", "extracted", "enriched"):
            getattr(self, name).update(getattr(other, name))
        self.failed.update(other.failed)
        self.unreadable += other.unreadable

    def counts(self, total: int) -> dict[str, int]:
        """Each record counted once: failed > new > migrated > extracted > enriched > skipped."""
        failed = set(self.failed)
        new = self.new - failed
        migrated = self.migrated - failed - new
        extracted = self.extracted - failed - new - migrated
        enriched = self.enriched - failed - new - migrated - extracted
        counted = len(failed) + len(new) + len(migrated) + len(extracted) + len(enriched)
        return {
            "new": len(new),
            "migrated": len(migrated),
            "enriched": len(enriched),
            "extracted": len(extracted),
            "skipped": max(0, total - counted),
            "failed": len(failed),
            "total": total,
        }


def progress_line(counts: dict[str, int], rate: float) -> str:
    """The seeds' progress format."""
    return (
        f"progress: {counts['new']} new, {counts['migrated']} migrated, {counts['enriched']} enriched, "
        f"{counts['extracted']} extracted, {counts['skipped']} skipped, {counts['failed']} failed "
        f"(total: {counts['total']}) rate={rate:.1f}/s"
    )


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
    if opts.batch_size < 1 or opts.text_batch_size < 1 or opts.caption_batch_size < 1:
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


def apply_update(record: dict, update: dict) -> bool:
    """Apply a journaled update to a record; True if anything changed."""
    changed = False
    for key, value in update.items():
        if record.get(key) != value or key not in record:
            record[key] = value
            changed = True
    return changed


def prepare_manifest(opts: RunOptions, tally: Tally) -> None:
    """Main rank only: recover journals, scan, sidecars, migrate; one atomic rewrite if anything changed."""
    if opts.no_resume:
        start_over(opts)
    store.ensure_dirs(opts.output_base_dir)
    swept = store.sweep_stray_temp_files(opts.output_base_dir)
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
            if image_id in by_id and apply_update(by_id[image_id], update):
                changed = True
    records.extend(new_records)
    if run_sidecars:
        for record in records:
            if not record.get("caption") and (caption := sidecar_caption(record["image_path"])):
                record["caption"] = caption
                tally.enriched.add(record.get("image_id") or record["image_path"])
                changed = True
    if run_migrate:
        changed |= migrate_all(records, opts, tally)
    if changed:
        write_manifest(opts.manifest, records, manifest.rejected)
    journal.clear(opts.manifest)


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


def checkpoint(manifest_path: Path) -> int:
    """Merge journaled updates into the manifest (atomically); returns how many records changed."""
    updates = journal.read_updates(manifest_path)
    if not updates:
        return 0
    manifest = read_manifest(manifest_path)
    records = list(manifest)
    changed = 0
    for record in records:
        update = updates.get(record.get("image_id"))
        if update and apply_update(record, update):
            changed += 1
    if changed:
        write_manifest(manifest_path, records, manifest.rejected)
    return changed


# -------------------------------------------------------------------------------- needs
def needs_caption(batch: dict, opts: RunOptions) -> list[bool]:
    return [
        (caption is None or opts.recaption) and image_id is not None and not migrating
        for caption, image_id, migrating in zip(
            batch["caption"], batch["image_id"], batch["needs_migration"], strict=True
        )
    ]


def _needs_artifact(kind: str, batch: dict, base: Path) -> list[bool]:
    out = []
    for image_id, bucket, migrating in zip(
        batch["image_id"], batch["aspect_bucket"], batch["needs_migration"], strict=True
    ):
        if image_id is None or migrating or (kind == "vae" and bucket is None):
            out.append(False)
        else:
            out.append(not store.artifact_ok(base, kind, {"image_id": image_id, "aspect_bucket": bucket}))
    return out


def needs_t5(batch: dict, opts: RunOptions) -> list[bool]:
    file_missing = _needs_artifact("t5", batch, opts.output_base_dir)
    return [
        caption is not None and (missing or not mask_ok)
        for caption, mask_ok, missing in zip(batch["caption"], batch["mask_ok"], file_missing, strict=True)
    ]


def needs_dinov3(batch: dict, opts: RunOptions) -> list[bool]:
    return _needs_artifact("dinov3", batch, opts.output_base_dir)


def needs_vae(batch: dict, opts: RunOptions) -> list[bool]:
    return _needs_artifact("vae", batch, opts.output_base_dir)


NEEDS: dict[str, Callable[[dict, RunOptions], list[bool]]] = {
    "caption": needs_caption,
    "t5": needs_t5,
    "dinov3": needs_dinov3,
    "vae": needs_vae,
}


# ------------------------------------------------------------------------------ writing
class AsyncWriter:
    """Side-file writes on a small thread pool, so the model never waits on the disk.

    At most `max_pending` writes are in flight (bounded memory); the first write error
    is raised on the next submit or on `drain`.
    """

    def __init__(self, threads: int = 2, max_pending: int = 64):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prep-writer")
        self.pending: list[Future] = []
        self.max_pending = max_pending

    def submit(self, fn: Callable, *args) -> None:
        self._reap(block=len(self.pending) >= self.max_pending)
        self.pending.append(self.pool.submit(fn, *args))

    def _reap(self, block: bool) -> None:
        if block and self.pending:
            self.pending[0].result()
        done = [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if not f.done()]
        for future in done:
            future.result()  # re-raise a write error here, in the main thread

    def drain(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pending = []

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)


# ------------------------------------------------------------------------------ encoders
def load_encoder(kind: str, opts: RunOptions, device: str):
    """Load one model through the production `from_pretrained` path."""
    m = opts.models
    if kind == "caption":
        from prep.encoders.captioner import Captioner

        return Captioner.load(
            m.caption_model,
            device=device,
            dtype=m.dtype,
            prompt=m.caption_prompt,
            max_new_tokens=m.caption_max_new_tokens,
            trust_remote_code=m.trust_remote_code,
        )
    if kind == "t5":
        from prep.encoders.t5 import T5Encoder

        return T5Encoder.load(m.t5_model, device=device, dtype=m.dtype)
    if kind == "dinov3":
        from prep.encoders.dinov3 import DINOv3Encoder

        return DINOv3Encoder.load(m.dinov3_model, device=device, dtype=m.dtype)
    if kind == "vae":
        from prep.encoders.vae import VAEEncoder

        return VAEEncoder.load(m.vae_model, subfolder=m.vae_subfolder, device=device, dtype=m.dtype)
    raise KeyError(kind)


def model_id_of(kind: str, opts: RunOptions) -> str:
    m = opts.models
    return {"caption": m.caption_model, "t5": m.t5_model, "dinov3": m.dinov3_model, "vae": m.vae_model}[kind]


def run_with_oom_retry(fn: Callable[[list], list], items: list) -> list:
    """Run `fn` on a batch; on CUDA out-of-memory, retry in halves down to single items."""
    import torch

    try:
        return fn(items)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(items) == 1:
            raise
        logger.warning("CUDA out of memory on a batch of %d; retrying in halves", len(items))
        half = len(items) // 2
        return run_with_oom_retry(fn, items[:half]) + run_with_oom_retry(fn, items[half:])


# --------------------------------------------------------------------------- pass state
@dataclass
class PassContext:
    """What a pass's map function needs besides its batch."""

    kind: str
    opts: RunOptions
    encoder: object
    journal: journal.Journal
    writer: AsyncWriter
    tally: Tally
    is_main: bool
    batches_done: int = 0
    records_done: int = 0

    def fail(self, image_id: str, reason: str) -> str:
        self.tally.failed[image_id] = f"{self.kind}: {reason}"
        logger.warning("failed %s %s: %s", self.kind, image_id, reason)
        return FAIL

    def succeed(self, image_id: str) -> str:
        self.tally.enriched.add(image_id)
        if self.opts.verbose:
            logger.debug("%s %s: done", self.kind, image_id)
        return OK

    def after_batch(self, size: int) -> None:
        self.batches_done += 1
        self.records_done += size
        if (
            self.is_main
            and self.kind in ("caption", "t5")
            and self.batches_done % self.opts.checkpoint_every == 0
        ):
            checkpoint(self.opts.manifest)


def image_transform(kind: str, encoder, bucket: str | None) -> Callable[[str], object]:
    """The picklable per-image work the DataLoader workers do for a pass."""
    from prep import preprocess

    if kind == "vae":
        width, height = parse_bucket(bucket)
        return functools.partial(preprocess.load_bucket_image, width=width, height=height)
    if kind == "dinov3":
        return functools.partial(dinov3_pixels, encoder.processor)
    return preprocess.open_rgb


def dinov3_pixels(processor, path: str):
    """Decode + DINOv3 preprocessing in a worker: (3, 224, 224) float tensor."""
    from prep.preprocess import open_rgb

    return processor(images=[open_rgb(path)], return_tensors="pt")["pixel_values"][0]


def encode_image_batch(batch: dict, *, ctx: PassContext, loader_iter: Iterator) -> dict:
    """The `Dataset.map` function of image passes: take the prefetched batch, encode, write."""
    items = next(loader_iter)
    ids = batch["image_id"]
    if [item[0] for item in items] != ids:
        raise RuntimeError("data loader out of step with the dataset (this is a bug)")
    status = {image_id: FAIL for image_id in ids}
    good = []
    for image_id, data, error in items:
        if error is not None:
            status[image_id] = ctx.fail(image_id, error)
        else:
            good.append((image_id, data))
    if good:
        try:
            outputs = run_with_oom_retry(functools.partial(encode_items, ctx), good)
        except Exception as exc:  # a model error fails this batch's records, not the run
            if isinstance(exc, OSError):
                raise
            outputs = [(image_id, None, f"{type(exc).__name__}: {exc}") for image_id, _ in good]
        for image_id, result, error in outputs:
            if error is not None:
                status[image_id] = ctx.fail(image_id, error)
            elif ctx.kind == "caption":
                ctx.journal.append([{"image_id": image_id, "caption": result}])
                status[image_id] = ctx.succeed(image_id)
            else:
                ctx.writer.submit(store.save_artifact, ctx.opts.output_base_dir, ctx.kind, image_id, result)
                status[image_id] = ctx.succeed(image_id)
    ctx.after_batch(len(ids))
    return {"status": [status[i] for i in ids]}


def encode_items(ctx: PassContext, good: list[tuple[str, object]]) -> list[tuple[str, object, str | None]]:
    """Run the pass's model on decoded items; returns (id, result, error) per item."""
    import numpy as np
    import torch

    ids = [image_id for image_id, _ in good]
    data = [d for _, d in good]
    if ctx.kind == "caption":
        captions = ctx.encoder.caption(data)
        return [
            (i, c.strip(), None if c.strip() else "empty caption") for i, c in zip(ids, captions, strict=True)
        ]
    if ctx.kind == "dinov3":
        arrays, finite = ctx.encoder.encode_pixels(torch.stack(data))
    else:
        from prep.preprocess import to_vae_pixels

        arrays, finite = ctx.encoder.encode(to_vae_pixels(np.stack(data)))
    return [
        (i, np.array(a), None if ok else "non-finite output")
        for i, a, ok in zip(ids, arrays, finite, strict=True)
    ]


def encode_text_batch(batch: dict, *, ctx: PassContext) -> dict:
    """The `Dataset.map` function of the T5 pass: hidden states to disk, masks to the journal."""
    ids, captions = batch["image_id"], batch["caption"]
    rows = run_with_oom_retry(
        lambda chunk: list(zip(*ctx.encoder.encode(chunk), strict=True)), list(captions)
    )
    statuses, updates = [], []
    for image_id, (array, mask, ok) in zip(ids, rows, strict=True):
        if not ok:
            statuses.append(ctx.fail(image_id, "non-finite output"))
            continue
        store.save_artifact(ctx.opts.output_base_dir, "t5", image_id, array)  # file first, then the mask
        updates.append({"image_id": image_id, "t5_attention_mask": [int(v) for v in mask]})
        statuses.append(ctx.succeed(image_id))
    ctx.journal.append(updates)
    ctx.after_batch(len(ids))
    return {"status": statuses}


def fresh_fingerprint(kind: str) -> str:
    import uuid

    return f"prep-{kind}-{uuid.uuid4().hex}"


def group_by_bucket(ds) -> list[tuple[str | None, object]]:
    """Split a dataset into per-bucket datasets (sorted bucket order), so a batch never mixes shapes."""
    buckets = ds["aspect_bucket"]
    groups: dict[str, list[int]] = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(index)
    return [(bucket, ds.select(indices)) for bucket, indices in sorted(groups.items())]


def run_pass_on_shard(ctx: PassContext, shard, progress: bool) -> None:
    """Encode one rank's share of a pass with `Dataset.map`."""
    from prep.loader import make_loader

    map_kwargs = {"batched": True, "load_from_cache_file": False, "keep_in_memory": True}
    # A fresh fingerprint per map: the datasets cache must never replay side-effecting work,
    # and the closures (models, loaders) are not meant to be hashed.
    fingerprint = functools.partial(fresh_fingerprint, ctx.kind)
    if ctx.kind == "t5":
        shard.map(
            functools.partial(encode_text_batch, ctx=ctx),
            batch_size=ctx.opts.text_batch_size,
            desc="t5",
            new_fingerprint=fingerprint(),
            **map_kwargs,
        )
        return
    batch_size = ctx.opts.caption_batch_size if ctx.kind == "caption" else ctx.opts.batch_size
    groups = group_by_bucket(shard) if ctx.kind == "vae" else [(None, shard)]
    for bucket, group in groups:
        loader = make_loader(
            group["image_id"],
            group["image_path"],
            image_transform(ctx.kind, ctx.encoder, bucket),
            batch_size=batch_size,
            num_workers=ctx.opts.num_workers,
        )
        loader_iter = iter(loader)
        group.map(
            functools.partial(encode_image_batch, ctx=ctx, loader_iter=loader_iter),
            batch_size=batch_size,
            desc=f"{ctx.kind}{' ' + bucket if bucket else ''}",
            new_fingerprint=fingerprint(),
            **map_kwargs,
        )
        del loader_iter, loader
        ctx.writer.drain()


def run_encoder_pass(kind: str, opts: RunOptions, state, tally: Tally) -> None:
    """One pass on every rank: filter (all ranks) -> barrier -> shard -> load -> map -> unload."""
    import datasets

    manifest = read_manifest(opts.manifest)
    todo = manifest.to_dataset().filter(
        functools.partial(NEEDS[kind], opts=opts),
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
        logger.info("%s: %d records need work (%d on this rank)", kind, len(todo), len(shard))
    if len(shard):
        started = time.perf_counter()
        encoder = load_encoder(kind, opts, device_for(opts, state))
        record_models_used(kind, encoder, opts)
        ctx = PassContext(
            kind=kind,
            opts=opts,
            encoder=encoder,
            journal=journal.Journal(opts.manifest, state.process_index),
            writer=AsyncWriter(),
            tally=tally,
            is_main=state.is_main_process,
        )
        try:
            if not state.is_main_process:
                datasets.disable_progress_bars()
            run_pass_on_shard(ctx, shard, progress=state.is_main_process)
        finally:
            ctx.writer.close()
            ctx.journal.close()
            encoder.unload()
            del encoder, ctx.encoder
            free_memory()
        elapsed = time.perf_counter() - started
        logger.info(
            "%s: rank %d encoded %d records in %.1f s (%.2f/s)",
            kind,
            state.process_index,
            len(shard),
            elapsed,
            len(shard) / max(elapsed, 1e-9),
        )
    state.wait_for_everyone()
    if state.is_main_process:
        checkpoint(opts.manifest)
        journal.clear(opts.manifest)
    state.wait_for_everyone()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_for(opts: RunOptions, state) -> str:
    """--device auto follows Accelerate (one GPU per rank); an explicit device wins."""
    return str(state.device) if opts.models.device == "auto" else opts.models.device


def record_models_used(kind: str, encoder, opts: RunOptions) -> None:
    """Write which model made which artifact (and the latent convention) to prep_metadata.json."""
    from prep.encoders.common import model_revision

    model_id = model_id_of(kind, opts)
    entry = {"model_id": model_id, "revision": model_revision(model_id)}
    updates: dict = {}
    metadata = store.read_metadata(opts.output_base_dir)
    models = dict(metadata.get("models", {}))
    models[kind] = entry
    updates["models"] = models
    if kind == "vae":
        updates["vae"] = encoder.convention()
    if metadata.get("models", {}).get(kind) != entry or (
        kind == "vae" and metadata.get("vae") != updates["vae"]
    ):
        store.update_metadata(opts.output_base_dir, updates)


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


def run(opts: RunOptions) -> int:
    """The main job. Returns the process exit code."""
    check_inputs(opts)
    state = make_state(opts)
    started = time.perf_counter()
    tally = Tally()
    if state.is_main_process:
        prepare_manifest(opts, tally)
    state.wait_for_everyone()
    for kind in opts.selected_passes():
        if kind != "migrate":
            run_encoder_pass(kind, opts, state, tally)
    merged = gather_tallies(state, tally)
    code = 0
    if state.is_main_process:
        total = len(read_manifest(opts.manifest))
        counts = merged.counts(total)
        elapsed = time.perf_counter() - started
        worked = total - counts["skipped"]
        print(progress_line(counts, worked / max(elapsed, 1e-9)), flush=True)
        if merged.unreadable:
            print(f"scan: {merged.unreadable} unreadable files skipped (see warnings above)", flush=True)
        if opts.verify:
            from prep.verify import print_report, verify_manifest

            report = verify_manifest(opts.manifest, opts.output_base_dir)
            print_report(report)
            code = 0 if report.ok else 1
    state.wait_for_everyone()
    return code
