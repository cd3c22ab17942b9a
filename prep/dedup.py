"""Finding duplicates: identical files by sha256, near-identical images by DINOv3 cosine similarity.

Which image of a group stays is decided greedily in priority order (the largest image first,
ties by the smallest id): an image is a duplicate when it is similar to an image already kept,
and it names the kept image it is most similar to. So every flagged image looks like the one it
names (no chains of "A looks like B looks like C"), and force-kept images are never flagged.

Near duplicates are found exactly (no index that could miss one): the embeddings, sorted by
priority, go through chunked matrix products in torch, a block of rows at a time against every
kept row before it. Memory stays bounded at any size: the float32 rows and one low-precision
copy on the device (2 GB for 1M x 1024 in bf16/fp16), and per block only its candidates, so
even thousands of copies of one picture never build a quadratic list of pairs. Candidates above
`threshold - margin` in low precision (the margin bounds the rounding error of unit vectors)
are checked again in float32, so the answer is the float32 answer. Cost: about N^2/2 dot
products (1M embeddings: 1e15 FLOP; `python -m prep.bench curate` measures this machine).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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


def normalize_rows(matrix: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Unit rows in place (float32), a chunk at a time (no temporary the size of the matrix); rows of
    zeros or non-finite values become all zeros (never similar to anything)."""
    for start in range(0, len(matrix), chunk):
        part = matrix[start : start + chunk]
        norms = np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))
        bad = ~np.isfinite(norms) | (norms == 0)
        norms[bad] = 1.0
        part /= norms[:, None].astype(matrix.dtype)
        part[bad] = 0.0
    return matrix


@dataclass
class _Block:
    """Candidates (positions in priority order) of one block of queries, and what they cost."""

    rows: list[np.ndarray]
    cols: list[np.ndarray]
    products: int = 0


def _screen_block(low, kept, start: int, stop: int, threshold: float, margin: float, corpus_block: int) -> _Block:
    """Low-precision products of rows [start, stop) with every earlier kept row and with each other."""
    import torch

    block = _Block([], [])
    queries = low[start:stop]
    with torch.inference_mode():
        for corpus_start in range(0, stop, corpus_block):
            corpus_stop = min(stop, corpus_start + corpus_block)
            scores = queries @ low[corpus_start:corpus_stop].T
            hits = scores >= threshold - margin
            hits &= kept[corpus_start:corpus_stop][None, :] | (
                torch.arange(corpus_start, corpus_stop, device=low.device)[None, :] >= start)
            rows, cols = torch.nonzero(hits, as_tuple=True)
            rows, cols = rows.cpu().numpy() + start, cols.cpu().numpy() + corpus_start
            earlier = cols < rows  # a row is judged against rows before it in priority order only
            block.rows.append(rows[earlier])
            block.cols.append(cols[earlier])
            block.products += (stop - start) * (corpus_stop - corpus_start)
    return block


def _confirm(exact: np.ndarray, order: np.ndarray, block: _Block, threshold: float, chunk: int = 65536):
    """The screened candidates again in float32: (row, earlier row, similarity) truly >= threshold."""
    rows = np.concatenate(block.rows) if block.rows else np.zeros(0, np.int64)
    cols = np.concatenate(block.cols) if block.cols else np.zeros(0, np.int64)
    sims = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        a, b = exact[order[rows[start : start + chunk]]], exact[order[cols[start : start + chunk]]]
        sims[start : start + chunk] = np.einsum("ij,ij->i", a, b)
    good = sims >= threshold
    return rows[good], cols[good], sims[good]


def _resolve(rows, cols, sims, kept_flags: np.ndarray, keep: np.ndarray, found: dict) -> None:
    """Greedy in priority order: a row similar to a kept earlier row is a duplicate of the most similar one."""
    if not len(rows):
        return
    by_row = np.lexsort((cols, -sims, rows))  # per row: most similar first, then the earlier (higher priority)
    rows, cols, sims = rows[by_row], cols[by_row], sims[by_row]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    for first, last in zip(starts, np.r_[starts[1:], len(rows)], strict=True):
        row = int(rows[first])
        if keep[row]:
            continue
        for k in range(first, last):
            if kept_flags[cols[k]]:
                kept_flags[row] = False
                found[row] = (int(cols[k]), float(sims[k]))
                break


def iter_near_duplicates(
    embeddings: np.ndarray, order: np.ndarray, threshold: float, *, keep: np.ndarray | None = None,
    device: str = "cpu", query_block: int = QUERY_BLOCK, corpus_block: int = CORPUS_BLOCK, first_row: int = 0,
) -> Iterator[tuple[int, int, dict[int, tuple[int, float]]]]:
    """Per block of queries (in priority order): (rows done, products computed, {duplicate: (kept, similarity)}).

    `embeddings` are unit float32 rows, `order` their priority order (`priority_order`), `keep` a
    bool per row that is never flagged. Indices in the answer are rows of `embeddings`. Each row is
    compared with the kept rows before it only, so memory stays O(N) even when thousands of
    images are copies of one another (no list of all similar pairs is ever built). `first_row`
    skips the first rows, treating them as kept (benchmarks: measure the most expensive blocks).
    """
    import torch

    n = len(embeddings)
    dtype_name = screen_dtype(device)
    keep = np.zeros(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)[order]
    low = torch.empty((n, embeddings.shape[1]), dtype=getattr(torch, dtype_name), device=device)
    for start in range(0, n, CORPUS_BLOCK):  # the low-precision copy, made in priority order chunk by chunk
        low[start : start + CORPUS_BLOCK] = torch.from_numpy(embeddings[order[start : start + CORPUS_BLOCK]]).to(
            device=device, dtype=low.dtype)
    kept_flags = np.ones(n, dtype=bool)  # positions in priority order; flagged rows are set False
    kept = torch.ones(n, dtype=torch.bool, device=device)
    for start in range(first_row - first_row % query_block, n, query_block):
        stop = min(n, start + query_block)
        block = _screen_block(low, kept, start, stop, threshold, SCREEN_MARGIN[dtype_name], corpus_block)
        found: dict[int, tuple[int, float]] = {}
        _resolve(*_confirm(embeddings, order, block, threshold), kept_flags, keep, found)
        if found:
            kept[torch.from_numpy(np.fromiter(found, dtype=np.int64)).to(device)] = False
        yield stop, block.products, {int(order[r]): (int(order[c]), s) for r, (c, s) in found.items()}


def near_duplicates(
    embeddings: np.ndarray, order: np.ndarray, threshold: float, *, keep: np.ndarray | None = None,
    device: str = "cpu", progress: Callable[[int], None] | None = None, **blocks,
) -> dict[int, tuple[int, float]]:
    """{duplicate row: (the kept row it is most similar to, cosine similarity)} (see `iter_near_duplicates`)."""
    found: dict[int, tuple[int, float]] = {}
    for done, _, part in iter_near_duplicates(embeddings, order, threshold, keep=keep, device=device, **blocks):
        found.update(part)
        if progress is not None:
            progress(done)
    return found
