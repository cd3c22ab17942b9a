"""One encoder pass on one rank: load the model, `Dataset.map` over the rank's shard, unload.

Images are decoded in DataLoader workers while the model runs; side files are written on a
thread pool; record updates (captions, T5 masks, provenance) go to the rank's journal.

Crash ordering, so that a stamp never vouches for the wrong file: for DINOv3 and VAE
artifacts the old file (if any) is removed, then the batch's stamps are journaled, then the
new files are written; a crash in between leaves a missing file, which is simply redone.
For T5 the file is written before its mask and stamp are journaled (no mask = redone).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from prep import journal, store
from prep.buckets import parse_bucket
from prep.options import RunOptions
from prep.provenance import PROVENANCE_FORMAT, Expected, text_sha256
from prep.tally import Tally

logger = logging.getLogger("prep")

OK, FAIL = "ok", "failed"


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


# ----------------------------------------------------------------------------- models
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

        return DINOv3Encoder.load(
            m.dinov3_model, device=device, dtype=m.dtype, trust_remote_code=m.trust_remote_code
        )
    if kind == "vae":
        from prep.encoders.vae import VAEEncoder

        return VAEEncoder.load(m.vae_model, subfolder=m.vae_subfolder, device=device, dtype=m.dtype)
    raise KeyError(kind)


def model_id_of(kind: str, opts: RunOptions) -> str:
    m = opts.models
    return {"caption": m.caption_model, "t5": m.t5_model, "dinov3": m.dinov3_model, "vae": m.vae_model}[kind]


def config_fields(kind: str, opts: RunOptions, dtype: str | None) -> dict:
    """The configuration a kind's provenance records (and a run judges staleness against)."""
    from prep.encoders.common import model_revision

    model_id = model_id_of(kind, opts)
    fields = {"model_id": model_id, "revision": model_revision(model_id), "dtype": dtype}
    if kind == "vae":
        from prep.encoders.vae import effective_vae_subfolder

        fields["subfolder"] = effective_vae_subfolder(model_id, opts.models.vae_subfolder)
    elif kind == "t5":
        from prep.config import T5_MAX_LENGTH

        fields["max_length"] = T5_MAX_LENGTH
    elif kind == "caption":
        fields["prompt_sha256"] = hashlib.sha256(opts.models.caption_prompt.encode("utf-8")).hexdigest()
        fields["max_new_tokens"] = opts.models.caption_max_new_tokens
    return fields


def expected_config(kind: str, opts: RunOptions, device: str) -> Expected:
    """What this run expects of existing `kind` artifacts; unknowable fields are not judged.

    The dtype is judged only when `--dtype` was given: "auto" differs between a GPU and a
    CPU machine, and resuming elsewhere should not redo a whole dataset.
    """
    import torch

    from prep.encoders.common import resolve_dtype

    dtype = (
        None if opts.models.dtype == "auto" else str(resolve_dtype(opts.models.dtype, torch.device(device)))
    )
    fields = config_fields(kind, opts, dtype)
    if fields["revision"] == "unknown":
        fields["revision"] = None
    return Expected({kind: fields})


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


# ------------------------------------------------------------------------- pass state
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
    stamp_base: dict
    stale: dict[str, str]
    batches_done: int = 0
    model_seconds: float = 0.0

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
            logger.debug(
                "%s %s: done%s",
                self.kind,
                image_id,
                f" (was {self.stale[image_id]})" if image_id in self.stale else "",
            )
        return OK

    def stamp(self, **inputs) -> dict:
        return {**self.stamp_base, **inputs, "format": PROVENANCE_FORMAT}

    def after_batch(self) -> None:
        self.batches_done += 1
        if self.is_main and self.batches_done % self.opts.checkpoint_every == 0:
            journal.merge_into_manifest(self.opts.manifest)


def retire_then_journal(ctx: PassContext, updates: list[dict]) -> None:
    """Remove the files about to be replaced, then journal their new stamps (one fsync per batch)."""
    for update in updates:
        with contextlib.suppress(FileNotFoundError):
            store.artifact_path(ctx.opts.output_base_dir, ctx.kind, update["image_id"]).unlink()
    ctx.journal.append(updates)


# -------------------------------------------------------------------------- transforms
def image_transform(kind: str, encoder, bucket: str | None) -> Callable[[str], object]:
    """The picklable per-image work the DataLoader workers do for a pass."""
    from prep import preprocess

    if kind == "vae":
        width, height = parse_bucket(bucket)
        return functools.partial(preprocess.load_bucket_crop, width=width, height=height)
    if kind == "dinov3":
        return functools.partial(dinov3_pixels, encoder.processor)
    return preprocess.open_rgb


def dinov3_pixels(processor, path: str):
    """Decode + DINOv3 preprocessing in a worker: a (3, H, W) float tensor.

    Big JPEGs are draft-decoded to at least twice the processor's input size (1.2x faster
    measured, 0.25 grey levels mean difference before the processor's own resize).
    """
    from prep.preprocess import open_rgb

    return processor(images=[open_rgb(path, draft_to=processor_size(processor))], return_tensors="pt")[
        "pixel_values"
    ][0]


def processor_size(processor) -> tuple[int, int] | None:
    """(width, height) an image processor resizes to, when it says so plainly."""
    size = getattr(processor, "size", None)
    read = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    width, height = read("width"), read("height")
    return (int(width), int(height)) if width and height else None


# ----------------------------------------------------------------------- map functions
def encode_image_batch(batch: dict, *, ctx: PassContext, loader_iter: Iterator) -> dict:
    """The `Dataset.map` function of image passes: take the prefetched batch, encode, write."""
    items = next(loader_iter)
    ids = batch["image_id"]
    if [item[0] for item in items] != ids:
        raise RuntimeError("data loader out of step with the dataset (this is a bug)")
    status = {image_id: FAIL for image_id in ids}
    good, fingerprints = [], {}
    for image_id, data, error, fp in items:
        if error is not None:
            status[image_id] = ctx.fail(image_id, error)
        else:
            good.append((image_id, data))
            fingerprints[image_id] = fp
    if good:
        try:
            outputs = run_with_oom_retry(functools.partial(encode_items, ctx), good)
        except OSError:
            raise
        except Exception as exc:  # a model error fails this batch's records, not the run
            outputs = [(image_id, None, {}, f"{type(exc).__name__}: {exc}") for image_id, _ in good]
        updates, arrays = [], []
        for image_id, result, inputs, error in outputs:
            if error is not None:
                status[image_id] = ctx.fail(image_id, error)
                continue
            fp = fingerprints[image_id]
            stamp = ctx.stamp(image_sha256=fp["sha256"] if fp else None, **inputs)
            update = {"image_id": image_id, "image_fingerprint": fp, f"provenance.{ctx.kind}": stamp}
            if ctx.kind == "caption":
                stamp.update(source="model", text_sha256=text_sha256(result))
                update["caption"] = result
            else:
                arrays.append((image_id, result))
            updates.append(update)
            status[image_id] = ctx.succeed(image_id)
        if ctx.kind == "caption":
            ctx.journal.append(updates)
        elif updates:
            retire_then_journal(ctx, updates)
            for image_id, array in arrays:
                ctx.writer.submit(store.save_artifact, ctx.opts.output_base_dir, ctx.kind, image_id, array)
    ctx.after_batch()
    return {"status": [status[i] for i in ids]}


def encode_items(
    ctx: PassContext, good: list[tuple[str, object]]
) -> list[tuple[str, object, dict, str | None]]:
    """Run the pass's model on decoded items: (id, result, provenance inputs, error) per item."""
    import numpy as np
    import torch

    ids = [image_id for image_id, _ in good]
    data = [d for _, d in good]
    if ctx.kind == "caption":
        with ctx.model_time():
            captions = [c.strip() for c in ctx.encoder.caption(data)]
        return [(i, c, {}, None if c else "empty caption") for i, c in zip(ids, captions, strict=True)]
    if ctx.kind == "dinov3":
        pixels = torch.stack(data)
        inputs = [{"input_size": list(pixels.shape[-2:])}] * len(ids)
        with ctx.model_time():
            arrays, finite = ctx.encoder.encode_pixels(pixels)
    else:
        from prep.preprocess import to_vae_pixels

        pixels = to_vae_pixels(np.stack([crop for crop, _ in data]))
        inputs = [
            {"bucket": f"{pixels.shape[-1]}x{pixels.shape[-2]}", "crop_box": list(box)} for _, box in data
        ]
        with ctx.model_time():
            arrays, finite = ctx.encoder.encode(pixels)
    return [
        (i, np.array(a), extra, None if ok else "non-finite output")
        for i, a, extra, ok in zip(ids, arrays, inputs, finite, strict=True)
    ]


def encode_text_batch(batch: dict, *, ctx: PassContext) -> dict:
    """The `Dataset.map` function of the T5 pass: hidden states to disk, then masks to the journal."""
    ids, captions = batch["image_id"], batch["caption"]
    with ctx.model_time():
        rows = run_with_oom_retry(
            lambda chunk: list(zip(*ctx.encoder.encode(chunk), strict=True)), list(captions)
        )
    statuses, updates = [], []
    for image_id, caption, (array, mask, ok) in zip(ids, captions, rows, strict=True):
        if not ok:
            statuses.append(ctx.fail(image_id, "non-finite output"))
            continue
        store.save_artifact(ctx.opts.output_base_dir, "t5", image_id, array)  # file first, then the mask
        updates.append(
            {
                "image_id": image_id,
                "t5_attention_mask": [int(v) for v in mask],
                "provenance.t5": ctx.stamp(caption_sha256=text_sha256(caption)),
            }
        )
        statuses.append(ctx.succeed(image_id))
    ctx.journal.append(updates)
    ctx.after_batch()
    return {"status": statuses}


# ---------------------------------------------------------------------------- the pass
def image_batch_size(ctx: PassContext) -> int:
    """--batch-size, or by default 8 on a GPU and 1 on a CPU (where batching the VAE is slower:
    2.46 s/image at batch 1 vs 2.97 at batch 2 for the real-size VAE, measured)."""
    if ctx.opts.batch_size:
        return ctx.opts.batch_size
    return 8 if str(getattr(ctx.encoder, "device", "cpu")).startswith("cuda") else 1


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
    import json

    return [json.loads(text) if text else None for text in ds["image_fingerprint"]]


def run_pass_on_shard(ctx: PassContext, shard) -> None:
    """Encode one rank's share of a pass with batched `Dataset.map` calls."""
    from prep.loader import make_loader

    map_kwargs = {"batched": True, "load_from_cache_file": False, "keep_in_memory": True}
    if ctx.kind == "t5":
        shard.map(
            functools.partial(encode_text_batch, ctx=ctx),
            batch_size=ctx.opts.text_batch_size,
            desc="t5",
            new_fingerprint=fresh_fingerprint("t5"),
            **map_kwargs,
        )
        return
    batch_size = ctx.opts.caption_batch_size if ctx.kind == "caption" else image_batch_size(ctx)
    groups = group_by_bucket(shard) if ctx.kind == "vae" else [(None, shard)]
    for bucket, group in groups:
        loader = make_loader(
            group["image_id"],
            group["image_path"],
            image_transform(ctx.kind, ctx.encoder, bucket),
            batch_size=batch_size,
            num_workers=ctx.opts.num_workers,
            fingerprints=previous_fingerprints(group),
        )
        loader_iter = iter(loader)
        group.map(
            functools.partial(encode_image_batch, ctx=ctx, loader_iter=loader_iter),
            batch_size=batch_size,
            desc=f"{ctx.kind}{' ' + bucket if bucket else ''}",
            new_fingerprint=fresh_fingerprint(ctx.kind),
            **map_kwargs,
        )
        del loader_iter, loader
        ctx.writer.drain()
