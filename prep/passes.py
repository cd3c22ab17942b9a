"""One stage's pass on one rank: load its model, `Dataset.map` over the rank's work, unload.

Images are decoded in DataLoader worker processes while the model runs (a batch never mixes
buckets when the stage's arrays follow the bucket); side files are written on a thread pool;
record updates (captions, T5 masks, provenance stamps, fingerprints) go to the rank's journal.

Crash ordering, so that a stamp never vouches for the wrong file: a batch's arrays are written
to temp files (fsync), their size, mtime and sha256 go into the stamps, the stamps are journaled
(fsync), and only then are the temp files renamed into place. A crash before the rename leaves
the old file (or none) under the final name, which does not match its new stamp and is redone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prep import journal, store
from prep.provenance import PROVENANCE_FORMAT, file_stamp, text_sha256
from prep.stages import CAPTION, Output, Stage
from prep.tally import Tally

logger = logging.getLogger("prep")

OK, FAIL = "ok", "failed"


# ------------------------------------------------------------------------------ writing
class AsyncWriter:
    """Side-file writes on a small thread pool, so the model never waits on the disk.

    At most `max_pending` batches are in flight (bounded memory); the first write error is
    raised on the next submit or on `drain`.
    """

    def __init__(self, threads: int = 2, max_pending: int = 16):
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


# ------------------------------------------------------------------------- pass state
@dataclass
class PassContext:
    """What a pass's map function needs besides its batch."""

    stage: Stage
    opts: object  # RunOptions
    encoder: object
    journal: journal.Journal
    writer: AsyncWriter
    tally: Tally
    is_main: bool
    config: dict  # the stage's configuration, as every stamp of this pass records it
    stale: dict[str, str] = field(default_factory=dict)
    bar: object = None  # the pass's progress bar (main rank)
    batches_done: int = 0
    model_seconds: float = 0.0
    last_checkpoint: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> str:
        return self.stage.name

    @contextlib.contextmanager
    def model_time(self) -> Iterator[None]:
        """Accumulate time spent inside the model (the share the benchmarks report)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.model_seconds += time.perf_counter() - started

    def fail(self, image_id: str, reason: str) -> str:
        self.tally.failed[image_id] = f"{self.kind}: {reason}"
        logger.warning("failed %s %s: %s", self.kind, image_id, reason)
        return FAIL

    def succeed(self, image_id: str) -> str:
        self.tally.enriched.add(image_id)
        if image_id in self.stale:
            self.tally.refresh(self.kind, image_id)
        if self.opts.verbose:
            why = f" (was {self.stale[image_id]})" if image_id in self.stale else ""
            logger.debug("%s %s: done%s", self.kind, image_id, why)
        return OK

    def stamp(self, **inputs) -> dict:
        return {**self.config, **{k: v for k, v in inputs.items() if v is not None}, "format": PROVENANCE_FORMAT}

    def after_batch(self, count: int = 0) -> None:
        """Progress, and a time-based checkpoint on the main rank: fold the journals into the manifest."""
        self.batches_done += 1
        if self.bar is not None:
            self.bar.update(count)
        minutes = getattr(self.opts, "checkpoint_minutes", 0) or 0
        if self.is_main and minutes > 0 and time.monotonic() - self.last_checkpoint >= minutes * 60:
            self.writer.drain()
            journal.merge_into_manifest(self.opts.manifest)
            self.last_checkpoint = time.monotonic()


Result = tuple[str, Output, dict, dict | None]  # (image_id, output, input stamp fields, image fingerprint)


def commit(ctx: PassContext, results: list[Result]) -> None:
    """Write a batch's arrays to temp files, journal their stamps, then rename them into place."""
    spec = ctx.stage.artifact
    temps: list[tuple[Path, Path]] = []
    updates = []
    try:
        for image_id, output, inputs, fingerprint in results:
            stamp = ctx.stamp(**inputs, **output.inputs)
            update = {"image_id": image_id, **output.fields}
            if fingerprint is not None:
                update["image_fingerprint"] = fingerprint
            if ctx.stage.artifact is None and "caption" in output.fields:
                stamp.update(source="model", text_sha256=text_sha256(output.fields["caption"]))
            if output.array is not None and spec is not None:
                path = store.artifact_path(ctx.opts.derived_dir, ctx.kind, image_id)
                data = store.npy_bytes(output.array, spec.dtype)
                tmp = store.write_temp(path, data)
                temps.append((tmp, path))
                stamp["file"] = file_stamp(data, os.stat(tmp))
            update[f"provenance.{ctx.kind}"] = stamp
            updates.append(update)
        ctx.journal.append(updates)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for tmp, path in temps:
        store.publish(tmp, path)
    store.fsync_dirs(path for _, path in temps)


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


def encode_items(ctx: PassContext, items: list) -> list[Output]:
    """The stage's model on a batch, timed; a model error fails the batch's records, not the run."""
    with ctx.model_time():
        try:
            outputs = run_with_oom_retry(lambda chunk: ctx.stage.encode(ctx.encoder, chunk), items)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per record
            return [Output(error=f"{type(exc).__name__}: {exc}") for _ in items]
    if len(outputs) != len(items):
        raise RuntimeError(f"stage {ctx.kind} returned {len(outputs)} outputs for {len(items)} items (a bug)")
    return outputs


# ----------------------------------------------------------------------- map functions
def encode_image_batch(batch: dict, *, ctx: PassContext, loader_iter: Iterator) -> dict:
    """The `Dataset.map` function of image stages: take the prefetched batch, encode, write."""
    items = next(loader_iter)
    ids = batch["image_id"]
    if [item[0] for item in items] != ids:
        raise RuntimeError("data loader out of step with the dataset (this is a bug)")
    status = {image_id: FAIL for image_id in ids}
    good = []
    for image_id, data, error, fingerprint in items:
        if error is not None:
            status[image_id] = ctx.fail(image_id, error)
        else:
            good.append((image_id, data, fingerprint))
    results: list[Result] = []
    if good:
        outputs = encode_items(ctx, [data for _, data, _ in good])
        for (image_id, _, fingerprint), output in zip(good, outputs, strict=True):
            if output.error is not None:
                status[image_id] = ctx.fail(image_id, output.error)
                continue
            inputs = {"image_sha256": fingerprint["sha256"] if fingerprint else None}
            results.append((image_id, output, inputs, fingerprint))
            status[image_id] = ctx.succeed(image_id)
    if results:
        ctx.writer.submit(commit, ctx, results)
    ctx.after_batch(len(ids))
    return {"status": [status[i] for i in ids]}


def encode_text_batch(batch: dict, *, ctx: PassContext) -> dict:
    """The `Dataset.map` function of stages that read captions (T5)."""
    ids, captions = batch["image_id"], batch["caption"]
    outputs = encode_items(ctx, list(captions))
    statuses, results = [], []
    for image_id, caption, output in zip(ids, captions, outputs, strict=True):
        if output.error is not None:
            statuses.append(ctx.fail(image_id, output.error))
            continue
        results.append((image_id, output, {"caption_sha256": text_sha256(caption)}, None))
        statuses.append(ctx.succeed(image_id))
    if results:
        ctx.writer.submit(commit, ctx, results)
    ctx.after_batch(len(ids))
    return {"status": statuses}


# ---------------------------------------------------------------------------- the pass
def fresh_fingerprint(kind: str) -> str:
    """A new `datasets` fingerprint: side-effecting maps must never be replayed from a cache."""
    return f"prep-{kind}-{uuid.uuid4().hex}"


def group_by_bucket(ds) -> list[tuple[str | None, object]]:
    """Split a dataset into per-bucket datasets (sorted bucket order), so a batch never mixes shapes."""
    groups: dict[str, list[int]] = {}
    for index, bucket in enumerate(ds["aspect_bucket"]):
        groups.setdefault(bucket, []).append(index)
    return [(bucket, ds.select(indices)) for bucket, indices in sorted(groups.items())]


def previous_fingerprints(ds) -> list[dict | None]:
    """The records' image fingerprints, so workers hash only files whose size or mtime changed."""
    columns = zip(ds["fp_size"], ds["fp_mtime"], ds["fp_sha256"], strict=True)
    return [
        {"size": size, "mtime_ns": mtime, "sha256": sha} if size is not None and sha else None
        for size, mtime, sha in columns
    ]


def run_pass_on_shard(ctx: PassContext, shard, *, device) -> None:
    """Encode one rank's share of a stage with batched `Dataset.map` calls."""
    from prep.loader import make_loader

    map_kwargs = {"batched": True, "load_from_cache_file": False, "keep_in_memory": True}
    batch_size = ctx.stage.batch_size(ctx.opts, device)
    if ctx.stage.reads == CAPTION:
        shard.map(
            functools.partial(encode_text_batch, ctx=ctx),
            batch_size=batch_size,
            new_fingerprint=fresh_fingerprint(ctx.kind),
            **map_kwargs,
        )
        return
    groups = group_by_bucket(shard) if ctx.stage.by_bucket else [(None, shard)]
    for bucket, group in groups:
        loader = make_loader(
            group["image_id"],
            group["image_path"],
            ctx.stage.worker_transform(ctx.encoder, bucket),
            batch_size=batch_size,
            num_workers=ctx.opts.num_workers,
            fingerprints=previous_fingerprints(group),
        )
        loader_iter = iter(loader)
        group.map(
            functools.partial(encode_image_batch, ctx=ctx, loader_iter=loader_iter),
            batch_size=batch_size,
            new_fingerprint=fresh_fingerprint(ctx.kind),
            **map_kwargs,
        )
        del loader_iter, loader
        ctx.writer.drain()
