"""The kept images' DINOv3 embeddings, cached for near-duplicate judging of new images at scale.

A full near-duplicate judgement compares every image with every kept one: O(n^2), about an hour
and a half at a million images on a CPU. A run that adds a few images must not pay that. After
every judgement the unit embeddings of the kept images (float16) are saved in the derived dir
with their ids and the stamps of the files they came from; the next run judges only the images
it has not judged (new, or whose embedding changed) against them, reading no other side file.

Decisions already made stand: a new image that duplicates a kept one is flagged, even if it is
larger. `prep curate` judges everything again from scratch (and rewrites the cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MATRIX_FILE = ".prep/near-kept.npy"
INDEX_FILE = ".prep/near-kept.json"


@dataclass
class KeptEmbeddings:
    """Unit float16 embeddings of kept images, their ids and their files' stamps (hash prefixes)."""

    ids: list[str]
    stamps: np.ndarray  # int64
    matrix: np.ndarray  # (n, D) float16, possibly memory-mapped
    key: str  # the judgement settings it belongs to (threshold, forced keeps)


def settings_key(threshold: float, keep: set[str]) -> str:
    return hashlib.sha256(json.dumps([threshold, sorted(keep)]).encode()).hexdigest()


def load(derived_dir: str | Path) -> KeptEmbeddings | None:
    """The cache, or None when absent or unreadable (then everything is judged again)."""
    base = Path(derived_dir)
    try:
        index = json.loads((base / INDEX_FILE).read_text(encoding="utf-8"))
        matrix = np.lib.format.open_memmap(base / MATRIX_FILE, mode="r")  # refuses object arrays
    except (OSError, ValueError):
        return None
    ids, stamps = index.get("ids"), index.get("stamps")
    if not isinstance(ids, list) or not isinstance(stamps, list) or len(ids) != len(stamps) != matrix.shape[0]:
        return None
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        return None
    return KeptEmbeddings(ids, np.asarray(stamps, dtype=np.int64), matrix, str(index.get("key")))


def save(derived_dir: str | Path, kept: KeptEmbeddings) -> None:
    """Both files atomically, the matrix first: an index is only ever read with its own matrix."""
    import io

    from prep.fsio import atomic_write_bytes, atomic_write_text

    base = Path(derived_dir)
    (base / MATRIX_FILE).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(kept.matrix, dtype=np.float16), allow_pickle=False)
    atomic_write_bytes(base / MATRIX_FILE, buf.getvalue())
    atomic_write_text(base / INDEX_FILE, json.dumps({"key": kept.key, "ids": kept.ids,
                                                     "stamps": [int(s) for s in kept.stamps]}) + "\n")


def drop(derived_dir: str | Path) -> None:
    base = Path(derived_dir)
    for name in (INDEX_FILE, MATRIX_FILE):
        (base / name).unlink(missing_ok=True)


def still_kept(kept: KeptEmbeddings, current: dict[str, int]) -> np.ndarray:
    """Rows of the cache whose image is still kept in the pool with the same embedding file."""
    return np.asarray([current.get(i) == s for i, s in zip(kept.ids, kept.stamps.tolist(), strict=True)], dtype=bool)


def best_matches(queries: np.ndarray, corpus: np.ndarray, *, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the most similar corpus row and its cosine similarity (unit rows), in chunks."""
    import torch

    best = np.full(len(queries), -1, dtype=np.int64)
    score = np.full(len(queries), -np.inf, dtype=np.float32)
    if not len(queries) or not len(corpus):
        return best, score
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    for start in range(0, len(corpus), chunk):
        block = torch.from_numpy(np.ascontiguousarray(corpus[start : start + chunk], dtype=np.float32))
        sims = q @ block.T
        values, where = sims.max(dim=1)
        better = values.numpy() > score
        score[better] = values.numpy()[better]
        best[better] = where.numpy()[better] + start
    return best, score
