"""The kept images' DINOv3 embeddings, cached for near-duplicate judging of new images at scale.

A full near-duplicate judgement compares every image with every kept one: O(n^2), about an hour
and a half at a million images on a CPU. A run that adds a few images must not pay that. After
every judgement the unit embeddings of the kept images (float16) are saved in the derived dir
with their ids and the stamps of the files they came from; the next run judges only the images
it has not judged (new, or whose embedding changed) against them, reading no other side file.

The rows live in segment files (`.prep/near-kept-*.npy`) named by the index
(`.prep/near-kept.json`): a run appends one small segment of the images it kept, so adding 200
images to a million costs a 400 KB write, not a 2 GB one. Rows of images no longer kept are
skipped when read (their stamps no longer match); the cache is compacted into one segment when
those reach a quarter of it or the segments grow many. Every file is written atomically, rows
before the index, so an index is only ever read with its own rows.

Decisions already made stand: a new image that duplicates a kept one is flagged, even if it is
larger. `prep curate` judges everything again from scratch (and rewrites the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FOLDER = ".prep"
INDEX_FILE = f"{FOLDER}/near-kept.json"
SEGMENT_GLOB = "near-kept-*.npy"
CHUNK_ROWS = 65536  # rows read, compared and written at a time: 128 MB of float16 at D = 1024
MAX_SEGMENTS = 32  # more, and the next save compacts
MAX_DEAD_SHARE = 0.25  # rows of images no longer kept, above which the next save compacts


@dataclass
class Segment:
    path: Path
    offset: int  # where the rows start in the .npy file
    rows: int


@dataclass
class KeptEmbeddings:
    """The cache as found on disk: ids, their files' stamps (hash prefixes), and the segments of
    unit float16 rows, read a chunk at a time (`chunks`) so memory stays one chunk however many
    images are kept (2 GB of rows at a million)."""

    ids: list[str]
    stamps: np.ndarray  # int64
    key: str  # the judgement settings it belongs to (threshold, forced keeps)
    segments: list[Segment]
    dim: int

    def chunks(self, select: np.ndarray | None = None, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """The float16 rows in order (only those `select` marks), `rows` at a time."""
        done = 0
        for segment in self.segments:
            for block in _read_rows(segment, self.dim, rows):
                yield block if select is None else block[select[done : done + len(block)]]
                done += len(block)


def _read_rows(segment: Segment, dim: int, rows: int) -> Iterator[np.ndarray]:
    width = dim * 2
    with open(segment.path, "rb") as f:
        for start in range(0, segment.rows, rows):
            count = min(rows, segment.rows - start)
            block = np.empty((count, dim), dtype=np.float16)
            f.seek(segment.offset + start * width)
            if f.readinto(memoryview(block).cast("B")) != count * width:
                raise OSError(f"{segment.path}: shorter than its header says")
            yield block


def settings_key(threshold: float, keep: set[str]) -> str:
    return hashlib.sha256(json.dumps([threshold, sorted(keep)]).encode()).hexdigest()


def load(derived_dir: str | Path) -> KeptEmbeddings | None:
    """The cache (index and segment headers only), or None when absent or unreadable (then
    everything is judged again)."""
    base = Path(derived_dir)
    try:
        index = json.loads((base / INDEX_FILE).read_text(encoding="utf-8"))
        ids, stamps, names, dim = index["ids"], index["stamps"], index["segments"], int(index["dim"])
        if not isinstance(ids, list) or not isinstance(stamps, list) or len(ids) != len(stamps):
            return None
        segments = [_segment(base / FOLDER / Path(name).name, dim) for name in names]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(s is None for s in segments) or sum(s.rows for s in segments) != len(ids):
        return None
    return KeptEmbeddings(ids, np.asarray(stamps, dtype=np.int64), str(index.get("key")), segments, dim)


def _segment(path: Path, dim: int) -> Segment | None:
    """A segment's header, checked against the file's size (float16, C order, (rows, dim))."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            return None
        shape, fortran, dtype = readers[version](f)
        offset, size = f.tell(), os.fstat(f.fileno()).st_size
    if fortran or dtype != np.float16 or len(shape) != 2 or shape[1] != dim or size != offset + shape[0] * dim * 2:
        return None
    return Segment(path, offset, int(shape[0]))


def save(derived_dir: str | Path, key: str, ids: list[str], stamps, parts: Iterable[np.ndarray], dim: int) -> None:
    """A new cache of one segment (rows streamed from `parts`, in order), then its index; the
    segments the index no longer names are removed."""
    base = Path(derived_dir)
    segment = write_segment(base, parts, len(ids), dim)
    write_index(base, key, ids, stamps, [segment], dim)
    for stray in (base / FOLDER).glob(SEGMENT_GLOB):
        if stray.name != segment:
            stray.unlink(missing_ok=True)


def append(derived_dir: str | Path, cache: KeptEmbeddings, alive: np.ndarray, ids: list[str], stamps,
           rows: np.ndarray) -> None:
    """The cache with the rows no longer kept left out and `rows` added: one new segment and the
    index when that is cheap, else a compacted cache (one segment)."""
    base = Path(derived_dir)
    all_ids = [i for i, a in zip(cache.ids, alive.tolist(), strict=True) if a] + list(ids)
    all_stamps = np.concatenate([cache.stamps[alive], np.asarray(stamps, dtype=np.int64)])
    dead = len(cache.ids) - int(alive.sum())
    if dead > MAX_DEAD_SHARE * max(1, len(cache.ids)) or len(cache.segments) + 1 > MAX_SEGMENTS:
        save(base, cache.key, all_ids, all_stamps, _chain(cache.chunks(alive), [rows]), cache.dim)
        return
    kept_ids = list(cache.ids) + list(ids)  # dead rows stay in their segment; their stamps no longer match
    kept_stamps = np.concatenate([cache.stamps, np.asarray(stamps, dtype=np.int64)])
    names = [s.path.name for s in cache.segments]
    if len(rows):
        names.append(write_segment(base, [rows], len(rows), cache.dim))
    write_index(base, cache.key, kept_ids, kept_stamps, names, cache.dim)


def _chain(*parts: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for part in parts:
        yield from part


def write_segment(base: Path, parts: Iterable[np.ndarray], count: int, dim: int) -> str:
    """Stream float16 rows into a new segment file (atomically); its name."""
    from prep.fsio import fsync_dir

    folder = base / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".near-kept-{uuid.uuid4().hex[:12]}.npy.prep-tmp"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": (count, dim)}
            np.lib.format.write_array_header_1_0(f, header)
            written = 0
            for part in parts:
                data = np.ascontiguousarray(part, dtype=np.float16).tobytes()
                f.write(data)
                digest.update(data)
                written += len(part)
            if written != count:
                raise ValueError(f"near-duplicate cache: {written} rows written for {count}")
            f.flush()
            os.fsync(f.fileno())
        name = f"near-kept-{digest.hexdigest()[:16]}.npy"  # named by content: the same rows, the same file
        os.replace(tmp, folder / name)
        fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    return name


def write_index(base: Path, key: str, ids: list[str], stamps, segments: list[str], dim: int) -> None:
    from prep.fsio import atomic_write_text

    atomic_write_text(base / INDEX_FILE, json.dumps({"key": key, "dim": dim, "segments": segments, "ids": ids,
                                                     "stamps": [int(s) for s in stamps]}) + "\n")


def drop(derived_dir: str | Path) -> None:
    base = Path(derived_dir)
    (base / INDEX_FILE).unlink(missing_ok=True)
    for segment in (base / FOLDER).glob(SEGMENT_GLOB):
        segment.unlink(missing_ok=True)


def still_kept(kept: KeptEmbeddings, current: dict[str, int]) -> np.ndarray:
    """Rows of the cache whose image is still kept in the pool with the same embedding file."""
    return np.asarray([current.get(i) == s for i, s in zip(kept.ids, kept.stamps.tolist(), strict=True)], dtype=bool)


def best_matches(queries: np.ndarray, corpus: np.ndarray | Iterable[np.ndarray], *, chunk: int = CHUNK_ROWS,
                 threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the most similar corpus row (the first, on a tie) and its cosine
    similarity (unit rows); -1 and -inf for none.

    `corpus`: an array, or its rows in consecutive chunks (`KeptEmbeddings.chunks`). With
    `threshold`, only matches at or above it are wanted: the products are screened in bf16 (on
    CPUs that have it: 3-4x faster) and only rows within the rounding margin of the threshold are
    compared again in float32, so a match found is the float32 answer and a query without one
    reports -1 and -inf."""
    from prep.dedup import SCREEN_MARGIN, screen_dtype

    best = np.full(len(queries), -1, dtype=np.int64)
    score = np.full(len(queries), -np.inf, dtype=np.float32)
    if not len(queries):
        return best, score
    if isinstance(corpus, np.ndarray):
        array = corpus
        corpus = (array[start : start + chunk] for start in range(0, len(array), chunk))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    low = screen_dtype("cpu") if threshold is not None else "float32"
    start = 0
    for rows, screen in read_ahead(_with_screen(rows, low) for rows in corpus):
        if len(rows):
            if screen is None:
                _best_exact(queries, rows, start, best, score)
            else:
                _best_screened(queries, rows, screen, start, threshold, SCREEN_MARGIN[low], best, score)
        start += len(rows)
    if threshold is not None:  # the same answer whether screened or not
        below = score < threshold
        best[below], score[below] = -1, -np.inf
    return best, score


def _with_screen(rows: np.ndarray, low: str) -> tuple[np.ndarray, object]:
    """A chunk as float32 (exact) or with its low-precision copy (screened); made in the read-ahead thread."""
    import torch

    if low == "float32":
        return np.ascontiguousarray(rows, dtype=np.float32), None
    return rows, torch.from_numpy(np.ascontiguousarray(rows)).to(getattr(torch, low))


def _best_exact(queries: np.ndarray, rows: np.ndarray, start: int, best: np.ndarray, score: np.ndarray) -> None:
    import torch

    values, where = (torch.from_numpy(queries) @ torch.from_numpy(rows).T).max(dim=1)
    better = values.numpy() > score
    score[better] = values.numpy()[better]
    best[better] = where.numpy()[better] + start


def _best_screened(queries: np.ndarray, rows: np.ndarray, screen, start: int, threshold: float, margin: float,
                   best: np.ndarray, score: np.ndarray) -> None:
    """Candidates within `margin` of `threshold` in low precision, their float32 similarities, the best
    per query of those at or above it."""
    import torch

    hits = (torch.from_numpy(queries).to(screen.dtype) @ screen.T) >= threshold - margin
    query_rows, corpus_rows = (index.numpy() for index in torch.nonzero(hits, as_tuple=True))
    if not len(query_rows):
        return
    if len(query_rows) > len(rows):  # many copies of one picture: the whole chunk costs less, and memory stays one chunk
        _best_exact(queries, np.ascontiguousarray(rows, dtype=np.float32), start, best, score)
        return
    sims = np.einsum("ij,ij->i", queries[query_rows], rows[corpus_rows].astype(np.float32))
    sure = sims >= threshold
    query_rows, corpus_rows, sims = query_rows[sure], corpus_rows[sure], sims[sure]
    order = np.lexsort((corpus_rows, -sims, query_rows))  # per query: highest first, then the first row
    query_rows, corpus_rows, sims = query_rows[order], corpus_rows[order], sims[order]
    first = np.ones(len(query_rows), dtype=bool)
    first[1:] = query_rows[1:] != query_rows[:-1]
    query_rows, corpus_rows, sims = query_rows[first], corpus_rows[first], sims[first]
    better = sims > score[query_rows]
    score[query_rows[better]] = sims[better]
    best[query_rows[better]] = corpus_rows[better] + start


def read_ahead(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """`blocks`, the next one read (and converted) in a thread while the caller compares this one:
    reading the 2 GB of rows of a million kept images and the matrix products overlap."""
    from concurrent.futures import ThreadPoolExecutor

    iterator = iter(blocks)
    with ThreadPoolExecutor(1, thread_name_prefix="prep-read-ahead") as pool:
        pending = pool.submit(next, iterator, None)
        while True:
            block = pending.result()
            if block is None:
                return
            pending = pool.submit(next, iterator, None)
            yield block
