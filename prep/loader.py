"""Read and decode images in DataLoader worker processes, in parallel with model compute.

An image pass feeds several stages at once (captioner, DINOv3, VAE): a worker reads each file
once, decodes it once per JPEG draft scale its stages need (once when they agree, see
`prep.preprocess.ImageSource`) and derives every stage's input from that decode. It returns
`(image_id, {stage: (data, error)}, fingerprint, decodes)`: a bad image becomes an error
string for its row instead of killing the batch, so one corrupt file never stops a run. The
fingerprint (size, mtime, sha256) is taken from the same bytes that were decoded, reusing the
record's previous one when size and mtime are unchanged, so provenance costs the model nothing
and the file is read from disk once. `path` is any locator `prep.sources` reads: a file, a tar
member or a dataset row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset

from prep.fsio import before_fork, worker_init
from prep.preprocess import ImageDecodeError, ImageSource
from prep.provenance import bytes_sha256, unchanged_fingerprint
from prep.sources import SourceError, image_fingerprint, is_uri, read_image_bytes
from prep.stages.base import ImageInput

Item = tuple[str, dict[str, tuple[Any, str | None]], dict | None, int]
Transform = ImageInput | Callable[[str], Any]  # a stage's input from the shared decode, or its own fn(path)


@dataclass
class ImageWork:
    """The records of an image pass, in manifest order, and which of its stages each one needs."""

    image_ids: list[str]
    paths: list[str]
    buckets: list[str | None]
    needs: list[tuple[str, ...]]
    fingerprints: list[dict | None]

    def __len__(self) -> int:
        return len(self.image_ids)


class ImageRecords(Dataset):
    """Rows of an `ImageWork` mapped to every input the stages that need them take.

    `inputs[(stage, bucket)]` is that stage's `ImageInput` for the bucket (or an older fn(path)
    that decodes on its own). Everything here is picklable, for DataLoader workers.
    """

    def __init__(self, work: ImageWork, inputs: dict[tuple[str, str | None], Transform]):
        self.work = work
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, index: int) -> Item:
        work = self.work
        image_id, path, bucket, needs = work.image_ids[index], work.paths[index], work.buckets[index], work.needs[index]
        try:
            source, fingerprint = read_source(path, work.fingerprints[index])
        except ImageDecodeError as exc:
            return image_id, {name: (None, str(exc)) for name in needs}, None, 0
        own_decodes = 0
        made: dict[str, tuple[Any, str | None]] = {}
        for name in needs:
            transform = self.inputs[(name, bucket)]
            try:
                if isinstance(transform, ImageInput):
                    made[name] = (transform.make(source.decode(transform.draft_to)), None)
                else:
                    own_decodes += 1
                    made[name] = (transform(path), None)
            except ImageDecodeError as exc:
                made[name] = (None, str(exc))
            except (OSError, ValueError, MemoryError) as exc:
                made[name] = (None, f"{type(exc).__name__}: {exc}")
        return image_id, made, fingerprint, source.decodes + own_decodes


def read_source(locator: str, previous: dict | None) -> tuple[ImageSource, dict | None]:
    """The image's bytes, read once, and their fingerprint (a file's or a tar member's / dataset row's)."""
    if not is_uri(locator):
        source, stat = ImageSource.read(locator)
        return source, fingerprint_of(source.data, stat, previous)
    try:
        data = read_image_bytes(locator)
    except SourceError as exc:
        raise ImageDecodeError(f"source: {exc}"[:300]) from exc
    except OSError as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}"[:300]) from exc
    return ImageSource(data, locator), image_fingerprint(locator, previous, data=data)


def fingerprint_of(data: bytes, stat: os.stat_result, previous: dict | None) -> dict:
    """The file's fingerprint from the bytes read; the previous one when size and mtime are unchanged."""
    return unchanged_fingerprint(previous, stat) or {
        "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": bytes_sha256(data)}


def keep_items(items: list[Item]) -> list[Item]:
    """Collate as a plain list: each stage stacks its own inputs, after dropping failed rows."""
    return items


def make_image_loader(records: ImageRecords, *, batch_size: int, num_workers: int) -> DataLoader:
    """An ordered DataLoader over an image pass's records (batches are only the unit of prefetch).

    Host memory is pinned where a batch is stacked (`prep.models.stack_on_host`), not here:
    the stages re-stack their items, and a pinned item would be copied into pageable memory.
    """
    workers = max(0, num_workers)
    before_fork()
    return DataLoader(
        records,
        batch_size=max(1, batch_size),
        shuffle=False,
        num_workers=workers,
        collate_fn=keep_items,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=worker_init if workers else None,
    )


def input_table(
    stages_inputs: dict[str, Callable[[str | None], Transform]], work: ImageWork
) -> dict[tuple[str, str | None], Transform]:
    """{(stage, bucket): its transform} for every (stage, bucket) pair the work has."""
    pairs = {(name, bucket) for needs, bucket in zip(work.needs, work.buckets, strict=True) for name in needs}
    return {pair: stages_inputs[pair[0]](pair[1]) for pair in sorted(pairs, key=lambda p: (p[0], p[1] or ""))}


def merge_needs(per_stage: Sequence[tuple[str, Sequence[int], Sequence[tuple]]]) -> list[tuple[int, tuple[str, ...], tuple]]:
    """Merge per-stage row lists (each in ascending row order) into one list in row order.

    `per_stage` is [(stage, rows, row_fields)]; returns [(row, stages needing it, fields)],
    linear in the total (a k-way merge of sorted lists).
    """
    import heapq

    streams = [_tagged(order, name, rows, fields) for order, (name, rows, fields) in enumerate(per_stage)]
    merged: list[tuple[int, tuple[str, ...], tuple]] = []
    for row, _, name, fields in heapq.merge(*streams):
        if merged and merged[-1][0] == row:
            merged[-1] = (row, (*merged[-1][1], name), merged[-1][2])
        else:
            merged.append((row, (name,), fields))
    return merged


def _tagged(order: int, name: str, rows: Sequence[int], fields: Sequence[tuple]):
    for row, row_fields in zip(rows, fields, strict=True):
        yield row, order, name, row_fields
