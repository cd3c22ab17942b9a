"""Finding duplicates: identical files by sha256, near-identical images by DINOv3 cosine similarity.

Near duplicates are found exactly (every pair is compared, no index that could miss one) with
chunked matrix products in torch, so memory stays bounded at any size: the embeddings are held
once in a low-precision copy on the device (2 GB for 1M x 1024 in bf16/fp16) and compared block
by block, upper triangle only. Pairs above `threshold - margin` in low precision (the margin
bounds the rounding error of unit vectors) are checked again in float32, so the answer is the
float32 answer. Cost: N^2/2 dot products (1M embeddings: 1e15 FLOP, seconds on a GPU; see
`python -m prep.bench curate` for this machine).

Which image of a group stays is decided greedily in priority order (the largest image first,
ties by id): an image is a duplicate when it is similar to an image already kept, so every
flagged image names a kept one it is itself similar to (no chains of "A looks like B looks
like C").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Worst-case error of a dot product of two unit vectors whose components were rounded to the
# low-precision type (relative error 2^-8 for bf16, 2^-11 for fp16, each side): 2 * eps.
SCREEN_MARGIN = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 1e-5}
QUERY_BLOCK = 4096
CORPUS_BLOCK = 32768


# ------------------------------------------------------------------------------ priority
def priority_order(ids: Sequence[str], pixels: np.ndarray) -> np.ndarray:
    """Indices from the image that should stay first: the most pixels, then the smallest id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.table({"pixels": pa.array(np.asarray(pixels, dtype=np.int64)), "id": pa.array(list(ids), pa.string())})
    return pc.sort_indices(table, sort_keys=[("pixels", "descending"), ("id", "ascending")]).to_numpy()


def keep_greedily(
    order: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray], keep: np.ndarray
) -> dict[int, tuple[int, float]]:
    """{duplicate index: (index of the kept image it duplicates, similarity)}.

    `order` is the priority order, `pairs` (i, j, similarity) the similar pairs, `keep` a bool
    array of images that are never flagged (they can still be the image others duplicate).
    Only images with a similar partner are visited, so a million lone images cost nothing.
    """
    left, right, sims = pairs
    if not len(left):
        return {}
    heads = np.concatenate([left, right])
    tails = np.concatenate([right, left])
    weights = np.concatenate([sims, sims])
    by_head = np.argsort(heads, kind="stable")
    heads, tails, weights = heads[by_head], tails[by_head], weights[by_head]
    starts = np.searchsorted(heads, np.arange(len(order) + 1))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    linked = np.unique(heads)
    kept = np.zeros(len(order), dtype=bool)
    duplicates: dict[int, tuple[int, float]] = {}
    for node in linked[np.argsort(rank[linked], kind="stable")].tolist():
        others = tails[starts[node] : starts[node + 1]]
        similar = weights[starts[node] : starts[node + 1]]
        chosen = kept[others]
        if keep[node] or not chosen.any():
            kept[node] = True
            continue
        candidates = np.flatnonzero(chosen)
        best = candidates[np.lexsort((rank[others[candidates]], -similar[candidates]))[0]]
        duplicates[node] = (int(others[best]), float(similar[best]))
    return duplicates


# ---------------------------------------------------------------------------- exact
def exact_duplicate_groups(shas: Sequence[str | None], rank: np.ndarray) -> list[list[int]]:
    """Groups of entries with the same sha256, each in priority order (`rank`: lower stays first).

    Entries that are None are skipped. Found in C++ (value counts), so a million distinct
    files cost a fraction of a second; only repeated hashes are grouped in Python.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    column = pa.array(list(shas), pa.string())
    counts = pc.value_counts(column.drop_null())
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return []
    members = np.flatnonzero(pc.fill_null(pc.is_in(column, repeated), False).to_numpy(zero_copy_only=False))
    groups: dict[str, list[int]] = {}
    for index in members.tolist():
        groups.setdefault(shas[index], []).append(index)
    return [sorted(group, key=lambda i: rank[i]) for group in groups.values()]


def _no_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


# ------------------------------------------------------------------------------ near
@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read(1 << 20)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def screen_dtype(device: str) -> str:
    """The fast type for the screening products: fp16 on a GPU, bf16 on CPUs that have it, else fp32."""
    if str(device).startswith("cuda"):
        return "float16"
    return "bfloat16" if _cpu_has_bf16() else "float32"


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Unit rows in place (float32); rows of zeros or non-finite values become all zeros (never similar)."""
    norms = np.linalg.norm(matrix, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    norms[bad] = 1.0
    matrix /= norms[:, None]
    matrix[bad] = 0.0
    return matrix


def iter_similar_blocks(
    embeddings: np.ndarray, threshold: float, *, device: str = "cpu", query_block: int = QUERY_BLOCK,
    corpus_block: int = CORPUS_BLOCK,
) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per block of query rows: (rows done, the pairs (i < j) of that block with similarity >= threshold).

    `embeddings` must be unit rows (float32). Each block is compared with every later row.
    """
    import torch

    dtype_name = screen_dtype(device)
    margin = SCREEN_MARGIN[dtype_name]
    low = torch.from_numpy(embeddings).to(device=device, dtype=getattr(torch, dtype_name))
    exact = torch.from_numpy(embeddings)
    n = len(embeddings)
    for start in range(0, n, query_block):
        stop = min(n, start + query_block)
        found = []
        with torch.inference_mode():
            queries = low[start:stop]
            for corpus_start in range(start, n, corpus_block):
                scores = queries @ low[corpus_start : corpus_start + corpus_block].T
                rows, cols = torch.nonzero(scores >= threshold - margin, as_tuple=True)
                rows, cols = rows.cpu().numpy() + start, cols.cpu().numpy() + corpus_start
                upper = cols > rows
                found.append((rows[upper], cols[upper]))
        yield stop, _confirm(exact, found, threshold)


def _confirm(exact, found: list[tuple[np.ndarray, np.ndarray]], threshold: float):
    """The screened candidates again in float32: only pairs truly at or above the threshold."""
    import torch

    left = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
    right = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64)
    if not len(left):
        return _no_pairs()
    li, ri = torch.from_numpy(left.astype(np.int64)), torch.from_numpy(right.astype(np.int64))
    sims = (exact[li] * exact[ri]).sum(dim=1).numpy()
    good = sims >= threshold
    return left[good].astype(np.int64), right[good].astype(np.int64), sims[good].astype(np.float32)


def similar_pairs(
    embeddings: np.ndarray, threshold: float, *, device: str = "cpu", progress: Callable[[int], None] | None = None,
    **blocks,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of unit rows with cosine similarity >= threshold, as (i, j, similarity)."""
    parts = []
    for done, pairs in iter_similar_blocks(embeddings, threshold, device=device, **blocks):
        parts.append(pairs)
        if progress is not None:
            progress(done)
    if not parts:
        return _no_pairs()
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]
