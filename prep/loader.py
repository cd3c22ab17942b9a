"""Decode and preprocess images in DataLoader worker processes, in parallel with model compute.

Workers return `(image_id, data, error, fingerprint)`: a bad image becomes an error string
for its row instead of killing the batch, so one corrupt file never stops a run. The
fingerprint (size, mtime, sha256 of the image's bytes, `prep.sources.image_fingerprint`:
a file, a tar member or a dataset row) is taken in the worker too, reusing the record's
previous one when size and mtime are unchanged, so provenance costs the model nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from prep.fsio import before_fork, worker_init
from prep.preprocess import ImageDecodeError
from prep.sources import image_fingerprint

Item = tuple[str, Any, str | None, dict | None]


class ImageRows(Dataset):
    """Rows (id, path) mapped through a picklable top-level `transform(path)`."""

    def __init__(
        self,
        image_ids: Sequence[str],
        paths: Sequence[str],
        transform: Callable[[str], Any],
        fingerprints: Sequence[dict | None] | None = None,
    ):
        self.image_ids = list(image_ids)
        self.paths = list(paths)
        self.transform = transform
        self.fingerprints = list(fingerprints) if fingerprints is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        image_id, path = self.image_ids[index], self.paths[index]
        try:
            fingerprint = image_fingerprint(path, self.fingerprints[index])
            return image_id, self.transform(path), None, fingerprint
        except ImageDecodeError as exc:
            return image_id, None, str(exc), None
        except (OSError, ValueError, MemoryError) as exc:
            return image_id, None, f"{type(exc).__name__}: {exc}", None


def keep_items(items: list[Item]) -> list[Item]:
    """Collate as a plain list: arrays are stacked by the pass, after dropping failed rows."""
    return items


def make_loader(
    image_ids: Sequence[str],
    paths: Sequence[str],
    transform: Callable[[str], Any],
    *,
    batch_size: int,
    num_workers: int,
    fingerprints: Sequence[dict | None] | None = None,
) -> DataLoader:
    """An ordered DataLoader whose batches line up with the pass's `Dataset.map` batches."""
    workers = max(0, num_workers)
    before_fork()
    return DataLoader(
        ImageRows(image_ids, paths, transform, fingerprints),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=keep_items,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=worker_init if workers else None,
    )
