"""A pass on one rank: the image stages together over the rank's work, or a text stage.

An image pass feeds every image stage with work (captioner, DINOv3, VAE) from one read and
one decode of each image, made in DataLoader worker processes while the models run; each
stage encodes in batches of its own size (a batch never mixes buckets when the stage's arrays
follow the bucket). A text stage (T5) runs a batched `Dataset.map` over its captions. Side
files are written on a thread pool; record updates (captions, T5 masks, provenance stamps,
fingerprints) go to the rank's journal.

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
from typing import TYPE_CHECKING

from prep import journal, store
from prep.provenance import PROVENANCE_FORMAT, file_stamp, text_sha256
from prep.stages import CAPTION, Output, Stage
from prep.stages.base import ImageInput
from prep.tally import Tally

if TYPE_CHECKING:
    from prep.loader import ImageWork

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
    compiled: bool = False  # the model runs under torch.compile (--compile)
    warmup_seconds: float = 0.0  # first batch of each input shape, compilation included
    shapes_seen: set = field(default_factory=set)
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
    commit_group([(ctx, result) for result in results])


def commit_group(entries: list[tuple[PassContext, Result]]) -> None:
    """`commit` for the results of several stages of one pass (journaled in the order given)."""
    temps: list[tuple[Path, Path]] = []
    updates = []
    if entries:
        store.unmark_left_clean(entries[0][0].opts.derived_dir)  # before the first temp file
    try:
        for ctx, (image_id, output, inputs, fingerprint) in entries:
            spec = ctx.stage.artifact
            stamp = ctx.stamp(**inputs, **output.inputs)
            update = {"image_id": image_id, **output.fields}
            if fingerprint is not None:
                update["image_fingerprint"] = fingerprint
            if spec is None and "caption" in output.fields:
                stamp.update(source="model", text_sha256=text_sha256(output.fields["caption"]))
            if output.array is not None and spec is not None:
                path = store.artifact_path(ctx.opts.derived_dir, ctx.kind, image_id)
                data = store.npy_bytes(output.array, spec.dtype)
                tmp = store.write_temp(path, data)
                temps.append((tmp, path))
                stamp["file"] = file_stamp(data, os.stat(tmp))
            update[f"provenance.{ctx.kind}"] = stamp
            updates.append(update)
        if entries:
            entries[0][0].journal.append(updates)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for tmp, path in temps:
        store.publish(tmp, path)
    store.fsync_dirs(path for _, path in temps)


class RecordGate:
    """Commits a record's results once every stage of the pass that needs it has answered, all
    together and in stage order.

    Its journal lines then come in the order per-stage passes write them (so the folded record
    is the same, key for key, whatever order the stages' batches finished in), and a checkpoint
    during the pass never folds half a record. A record's early results wait in memory for its
    last stage (at most a batch of each stage).
    """

    def __init__(self, writer: AsyncWriter, order: list[str]):
        self.writer = writer
        self.rank = {name: index for index, name in enumerate(order)}
        self.waiting: dict[str, int] = {}
        self.held: dict[str, list[tuple[PassContext, Result]]] = {}
        self.ready: list[tuple[PassContext, Result]] = []

    def expect(self, image_id: str, stages: int) -> None:
        self.waiting[image_id] = stages
        self.held[image_id] = []

    def answer(self, ctx: PassContext, image_id: str, result: Result | None = None) -> None:
        """One stage is done with a record: its result, or None when it failed."""
        if result is not None:
            self.held[image_id].append((ctx, result))
        self.waiting[image_id] -= 1
        if not self.waiting[image_id]:
            del self.waiting[image_id]
            self.ready.extend(sorted(self.held.pop(image_id), key=lambda entry: self.rank[entry[0].kind]))

    def release(self) -> None:
        """Submit the complete records' results as one commit (one journal fsync)."""
        if self.ready:
            entries, self.ready = self.ready, []
            self.writer.submit(commit_group, entries)


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


def encode_items(ctx: PassContext, items: list, shape: object = None) -> list[Output]:
    """The stage's model on a batch, timed; a model error fails the batch's records, not the run.

    With --compile, the first batch of each shape pays the compilation: its time is also
    counted as warm-up.
    """
    started = time.perf_counter()
    with ctx.model_time():
        try:
            outputs = run_with_oom_retry(lambda chunk: ctx.stage.encode(ctx.encoder, chunk), items)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per record
            return [Output(error=f"{type(exc).__name__}: {exc}") for _ in items]
        finally:
            if ctx.compiled and shape not in ctx.shapes_seen:
                ctx.shapes_seen.add(shape)
                ctx.warmup_seconds += time.perf_counter() - started
    if len(outputs) != len(items):
        raise RuntimeError(f"stage {ctx.kind} returned {len(outputs)} outputs for {len(items)} items (a bug)")
    return outputs


# ------------------------------------------------------------------------- image passes
def encode_chunk(ctx: PassContext, gate: RecordGate, chunk: list[tuple[str, object, dict | None]],
                 shape: object = None) -> None:
    """Encode one batch of a stage's items (image_id, data, fingerprint); results go to the gate."""
    outputs = encode_items(ctx, [data for _, data, _ in chunk], shape=shape)
    for (image_id, _, fingerprint), output in zip(chunk, outputs, strict=True):
        if output.error is not None:
            ctx.fail(image_id, output.error)
            gate.answer(ctx, image_id)
            continue
        inputs = {"image_sha256": fingerprint["sha256"] if fingerprint else None}
        ctx.succeed(image_id)
        gate.answer(ctx, image_id, (image_id, output, inputs, fingerprint))


@dataclass
class Feed:
    """One stage's queues in an image pass: its items wait until a batch of its size is full.

    A stage whose arrays follow the bucket has one queue per bucket, so its batches are the
    consecutive runs of its own records of one bucket, exactly as in a pass of its own.
    """

    ctx: PassContext
    gate: RecordGate
    sizes: dict[str | None, int]  # batch size per queue key (bucket, or None)
    queues: dict[str | None, list] = field(default_factory=dict)

    def key(self, bucket: str | None) -> str | None:
        return bucket if self.ctx.stage.by_bucket else None

    def put(self, bucket: str | None, entry: tuple[str, object, dict | None]) -> None:
        key = self.key(bucket)
        queue = self.queues.setdefault(key, [])
        queue.append(entry)
        if len(queue) >= self.sizes[key]:
            self.queues[key] = []
            encode_chunk(self.ctx, self.gate, queue, shape=(key, len(queue)))

    def flush(self) -> None:
        """Encode what is left in every queue (the last, short batches)."""
        for key, queue in sorted(self.queues.items(), key=lambda kv: kv[0] or ""):
            if queue:
                encode_chunk(self.ctx, self.gate, queue, shape=(key, len(queue)))
        self.queues = {}


@dataclass
class ImagePassCounts:
    """What an image pass did to the files: records read, reads and decodes (the test of decode-once)."""

    records: int = 0
    reads: int = 0
    decodes: int = 0


def image_work(todos: dict[str, object]) -> ImageWork:
    """The union of the image stages' work on this rank, in manifest order, with who needs what."""
    from prep.loader import ImageWork, merge_needs

    per_stage = []
    for name, todo in todos.items():
        columns = todo.select_columns(
            ["row", "image_id", "image_path", "aspect_bucket", "fp_size", "fp_mtime", "fp_sha256"]
        ).to_dict()
        fields = list(zip(columns["image_id"], columns["image_path"], columns["aspect_bucket"],
                          previous_fingerprints(columns), strict=True))
        per_stage.append((name, columns["row"], fields))
    merged = merge_needs(per_stage)
    return ImageWork(
        image_ids=[fields[0] for _, _, fields in merged],
        paths=[fields[1] for _, _, fields in merged],
        buckets=[fields[2] for _, _, fields in merged],
        needs=[needs for _, needs, _ in merged],
        fingerprints=[fields[3] for _, _, fields in merged],
    )


def previous_fingerprints(columns: dict) -> list[dict | None]:
    """The records' image fingerprints, so workers hash only files whose size or mtime changed."""
    rows = zip(columns["fp_size"], columns["fp_mtime"], columns["fp_sha256"], strict=True)
    return [
        {"size": size, "mtime_ns": mtime, "sha256": sha} if size is not None and sha else None
        for size, mtime, sha in rows
    ]


def stage_inputs(ctx: PassContext):
    """fn(bucket) -> the stage's transform: its ImageInput, or its own fn(path) (older stages)."""

    def for_bucket(bucket: str | None):
        found = ctx.stage.image_input(ctx.encoder, bucket)
        return found if found is not None else ctx.stage.worker_transform(ctx.encoder, bucket)

    return for_bucket


def feed_for(ctx: PassContext, gate: RecordGate, table: dict, device) -> Feed:
    """A stage's feed, with its batch size per queue (by the pixels of its inputs when known)."""
    sizes: dict[str | None, int] = {}
    for (name, bucket), transform in table.items():
        if name != ctx.kind:
            continue
        pixels = transform.pixels if isinstance(transform, ImageInput) else None
        key = bucket if ctx.stage.by_bucket else None
        size = ctx.stage.batch_size_for(ctx.opts, device, pixels)
        sizes[key] = min(size, sizes.get(key, size))
    return Feed(ctx, gate, sizes)


def run_image_pass(ctxs: list[PassContext], todos: dict[str, object], *, device) -> ImagePassCounts:
    """The image stages' work on one rank in one pass: each image read once and decoded once per
    JPEG draft scale its stages need, every stage fed from that decode, each in batches of its own."""
    from prep.loader import ImageRecords, input_table, make_image_loader

    work = image_work(todos)
    table = input_table({ctx.kind: stage_inputs(ctx) for ctx in ctxs}, work)
    lead = ctxs[0]
    gate = RecordGate(lead.writer, [ctx.kind for ctx in ctxs])
    feeds = {ctx.kind: feed_for(ctx, gate, table, device) for ctx in ctxs}
    # the loader's batches are only the unit of prefetch: the smallest stage batch bounds the decoded
    # images waiting in memory (workers x 4 batches)
    loader_batch = min(size for feed in feeds.values() for size in feed.sizes.values())
    loader = make_image_loader(ImageRecords(work, table), batch_size=min(loader_batch, 64),
                               num_workers=lead.opts.num_workers)
    counts = ImagePassCounts()
    position = 0
    for items in loader:
        for image_id, made, fingerprint, decodes in items:
            if image_id != work.image_ids[position]:
                raise RuntimeError("data loader out of step with the pass's records (this is a bug)")
            bucket = work.buckets[position]
            position += 1
            counts.records += 1
            counts.reads += fingerprint is not None
            counts.decodes += decodes
            gate.expect(image_id, len(made))
            for name, (data, error) in made.items():
                if error is not None:
                    feeds[name].ctx.fail(image_id, error)
                    gate.answer(feeds[name].ctx, image_id)
                else:
                    feeds[name].put(bucket, (image_id, data, fingerprint))
        gate.release()
        lead.after_batch(len(items))
    for feed in feeds.values():
        feed.flush()
    gate.release()
    return counts


# --------------------------------------------------------------------------- text passes
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


def fresh_fingerprint(kind: str) -> str:
    """A new `datasets` fingerprint: side-effecting maps must never be replayed from a cache."""
    return f"prep-{kind}-{uuid.uuid4().hex}"


def run_text_pass(ctx: PassContext, todo, *, device) -> None:
    """Encode one rank's share of a caption-reading stage with batched `Dataset.map` calls."""
    todo.map(
        functools.partial(encode_text_batch, ctx=ctx),
        batched=True,
        batch_size=ctx.stage.batch_size(ctx.opts, device),
        load_from_cache_file=False,
        keep_in_memory=True,
        new_fingerprint=fresh_fingerprint(ctx.kind),
    )


def run_pass(ctxs: list[PassContext], todos: dict[str, object], *, device) -> ImagePassCounts:
    """One pass on one rank: the image stages together (one decode per image), or a text stage."""
    if all(ctx.stage.reads == CAPTION for ctx in ctxs):
        for ctx in ctxs:
            run_text_pass(ctx, todos[ctx.kind], device=device)
        return ImagePassCounts()
    if any(ctx.stage.reads == CAPTION for ctx in ctxs):
        raise ValueError("a pass runs either image stages or caption stages (this is a bug)")
    return run_image_pass(ctxs, todos, device=device)
