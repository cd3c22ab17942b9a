"""Decode and preprocess images in DataLoader worker processes, in parallel with model compute.

Workers return `(image_id, data, error)` triples: a bad image becomes an error string for
its row instead of killing the batch, so one corrupt file never stops a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from prep.preprocess import ImageDecodeError

Item = tuple[str, Any, str | None]


class ImageRows(Dataset):
    """Rows (id, path) mapped through a picklable top-level `transform(path)`."""

    def __init__(self, image_ids: Sequence[str], paths: Sequence[str], transform: Callable[[str], Any]):
        self.image_ids = list(image_ids)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        image_id = self.image_ids[index]
        try:
            return image_id, self.transform(self.paths[index]), None
        except ImageDecodeError as exc:
            return image_id, None, str(exc)
        except (OSError, ValueError, MemoryError) as exc:
            return image_id, None, f"{type(exc).__name__}: {exc}"


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
) -> DataLoader:
    """An ordered DataLoader whose batches line up with the pass's `Dataset.map` batches."""
    workers = max(0, num_workers)
    return DataLoader(
        ImageRows(image_ids, paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=keep_items,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
