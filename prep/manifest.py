"""The JSONL manifest: read (tolerating bad lines), view as a `datasets.Dataset`, rewrite by streaming.

The manifest is the source of truth: one JSON object per line, readable by people and by
`datasets.load_dataset("json")`. Reading never fails on a bad line: the line is set aside with
its number and reason, and every rewrite appends it to `<manifest>.rejected.jsonl`, so nothing
a user wrote is ever lost.

Scale (millions of records, eight ranks per node):
- records are parsed with orjson once, into a typed Arrow *projection* of the few fields the
  passes decide on (ids, paths, sizes, buckets, fingerprints, and per stage the provenance
  stamp's configuration, input hash and file stamp); full records stay in the file and are
  parsed again only when asked for (`record(row)`, through a memory map);
- the projection is cached beside the manifest (`<manifest>.cache.arrow`, keyed by the
  manifest's size, mtime and a sample of its bytes) and memory-mapped, so every rank of a node
  shares one copy and a run with nothing to do does not parse the JSON at all. Its columns are
  plain Arrow types that `datasets` takes as they are (a dictionary column would be decoded into
  each process's own memory: 570 MB per million records); a stamp's configuration, a long JSON
  text repeated on every record, is kept as a 64-bit hash (`config_hash`, `stamp_config`);
- a rewrite streams: untouched lines are copied as bytes, only changed records are
  serialised again, and the new projection is spliced rather than rebuilt.
A manifest reached through a symlink is read, locked and rewritten at its target.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mmap
import os
import re
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from prep.config import T5_MAX_LENGTH
from prep.errors import UserError
from prep.fsio import atomic_open
from prep.inplace import lock_path, roll_back, settle, undo_path
from prep.provenance import config_of
from prep.records import has_caption, is_safe_id, needs_migration

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 64
# Integers orjson may not keep exactly (beyond 64 bits) or that do not fit int64: 20+ digits, or
# 19 digits from 92... on. A nanosecond mtime (19 digits, 17... until 2286) is neither. Found with
# C-speed byte operations (a regex over a 2 KB line costs more than parsing it).
_DIGIT_MAP = bytes(ord("0") if chr(b).isdigit() and b < 128 else ord(" ") for b in range(256))
_TWENTY_DIGITS = b"0" * 20
_INT64_EDGE = re.compile(rb"9[2-9][0-9]{17}")


def _may_hold_a_long_int(raw: bytes) -> bool:
    return _TWENTY_DIGITS in raw.translate(_DIGIT_MAP) or _INT64_EDGE.search(raw) is not None
_BOM = b"\xef\xbb\xbf"


# ------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class RejectedLine:
    """A manifest line that could not be used, kept verbatim with where it was and why."""

    lineno: int
    text: str
    reason: str

    def to_json(self) -> str:
        import json  # the stdlib escapes the surrogates that stand for undecodable bytes

        return json.dumps({"line": self.lineno, "reason": self.reason, "text": self.text})


def dumps_record(record: dict) -> str:
    """One compact JSON line (UTF-8 kept readable)."""
    return orjson.dumps(record).decode("utf-8")


def _depth(value, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _ints_out_of_range(value) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, int) and not INT64_MIN <= item <= INT64_MAX:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_line(raw: bytes) -> object:
    """One manifest line -> a JSON value; ValueError with a one-line reason for anything unusable.

    orjson would turn integers beyond 64 bits into floats (a silent rewrite of the user's
    value) and the standard parser refuses more than 4300 digits: such lines are rejected.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "UTF-8" in text or "surrogate" in text:
            raise ValueError("not valid UTF-8") from None
        raise ValueError(f"bad JSON: {text.split(':')[0]}") from None
    if _may_hold_a_long_int(raw):
        import json

        try:
            exact = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"bad JSON: {str(exc).splitlines()[0][:120]}") from None
        if _ints_out_of_range(exact):
            raise ValueError("an integer does not fit in 64 bits")
        obj = exact
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(obj, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return obj


def check_record_line(obj: object) -> str | None:
    """Why a parsed line cannot be a record (duplicates are found later, over the whole file)."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    path = obj.get("image_path")
    if not isinstance(path, str) or not path:
        return "missing image_path"
    if "\x00" in path:
        return "image_path contains NUL"
    if "image_id" in obj and not is_safe_id(obj["image_id"]):
        return f"unsafe image_id {str(obj['image_id'])[:120]!r}"
    return None


# --------------------------------------------------------------------------- projection
def hash64(text: str | None) -> int | None:
    """A hex digest (or any string) as a signed 64-bit int: enough to notice that it changed."""
    if not isinstance(text, str) or not text:
        return None
    try:
        value = int(text[:16], 16) if len(text) >= 16 else None
    except ValueError:
        value = None
    if value is None:
        return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True)
    return value - (1 << 64) if value >= 1 << 63 else value


def _int(value) -> int | None:
    return value if type(value) is int and INT64_MIN <= value <= INT64_MAX else None


def _str(value) -> str | None:
    return value if isinstance(value, str) else None


def stage_columns() -> list[tuple[str, pa.DataType, object]]:
    """(column, type, getter(stamp)) for the provenance stamps of every registered stage."""
    from prep import stages

    columns = []
    for name, stage in stages.STAGES.items():
        prefix = f"{name}__"
        columns += [
            (prefix + "config", pa.int64(), lambda s: config_hash(config_of(s))),
            (prefix + "format", pa.int64(), lambda s: _int(s.get("format"))),
            (prefix + "origin", pa.string(), lambda s: _str(s.get("origin"))),
            (prefix + "input", pa.int64(), lambda s: hash64(s.get("caption_sha256") or s.get("image_sha256"))),
            (prefix + "file_size", pa.int64(), lambda s: _int((s.get("file") or {}).get("size"))),
            (prefix + "file_mtime", pa.int64(), lambda s: _int((s.get("file") or {}).get("mtime_ns"))),
        ]
        if stage.artifact is not None:
            columns.append((prefix + "file_sha", pa.int64(), lambda s: hash64((s.get("file") or {}).get("sha256"))))
        if stage.by_bucket:
            columns.append((prefix + "bucket", pa.string(), lambda s: _str(s.get("bucket"))))
        if stage.artifact is None:
            columns += [
                (prefix + "source", pa.string(), lambda s: _str(s.get("source"))),
                (prefix + "text", pa.int64(), lambda s: hash64(s.get("text_sha256"))),
            ]
    return columns


CONFIGS: dict[int, bytes] = {}  # config_hash -> the configuration's JSON, for every one this process met


def config_hash(config: dict | None) -> int | None:
    """A stamp configuration as the signed 64-bit hash the projection keeps (None: no configuration).

    The JSON is remembered (`CONFIGS`, content-addressed, so it never goes stale) and travels
    with the projection cache; `stamp_config` gives it back."""
    if not config:
        return None
    text = orjson.dumps(config, option=orjson.OPT_SORT_KEYS)
    key = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)
    CONFIGS.setdefault(key, text)
    return key


def stamp_config(key: int) -> dict:
    """The configuration behind a `config_hash`."""
    try:
        return orjson.loads(CONFIGS[key])
    except KeyError:
        raise RuntimeError(f"stamp configuration {key} was never seen by this process") from None


def _configs_of(table: pa.Table) -> dict[str, str]:
    """The configurations the table's `<stage>__config` columns name (for the cache's metadata)."""
    import pyarrow.compute as pc

    keys: set[int] = set()
    for name in table.column_names:
        if name.endswith("__config"):
            keys.update(k for k in pc.unique(table.column(name)).to_pylist() if k is not None)
    return {str(k): CONFIGS[k].decode() for k in sorted(keys)}


def _fp(record: dict) -> dict:
    fp = record.get("image_fingerprint")
    return fp if isinstance(fp, dict) else {}


BASE_COLUMNS: list[tuple[str, pa.DataType, object]] = [
    ("image_id", pa.string(), lambda r: _str(r.get("image_id"))),
    ("image_path", pa.string(), lambda r: r["image_path"]),
    ("caption", pa.string(), lambda r: r["caption"] if has_caption(r) else None),
    ("caption_hash", pa.int64(), lambda r: hash64(_caption_sha(r))),
    ("mask_ok", pa.bool_(), lambda r: _mask_ok(r.get("t5_attention_mask"))),
    ("width", pa.int64(), lambda r: _int(r.get("width"))),
    ("height", pa.int64(), lambda r: _int(r.get("height"))),
    ("aspect_bucket", pa.string(), lambda r: _str(r.get("aspect_bucket"))),
    ("needs_migration", pa.bool_(), needs_migration),
    ("has_provenance", pa.bool_(), lambda r: isinstance(r.get("provenance"), dict)),
    ("filtered", pa.string(), lambda r: _str((r.get("filtered") or {}).get("reason")) if isinstance(r.get("filtered"), dict) else None),
    ("fp_size", pa.int64(), lambda r: _int(_fp(r).get("size"))),
    ("fp_mtime", pa.int64(), lambda r: _int(_fp(r).get("mtime_ns"))),
    ("fp_sha", pa.int64(), lambda r: hash64(_fp(r).get("sha256"))),
    ("fp_sha256", pa.string(), lambda r: _str(_fp(r).get("sha256"))),
]
def _mask_ok(mask) -> bool:
    """`records.is_valid_mask`, at C speed: 77 ints (no bools), each 0 or 1."""
    return (
        type(mask) is list
        and len(mask) == T5_MAX_LENGTH
        and mask.count(0) + mask.count(1) == T5_MAX_LENGTH
        and set(map(type, mask)) == {int}
    )


def _caption_sha(record: dict) -> str | None:
    caption = record.get("caption")
    return hashlib.sha256(caption.encode("utf-8", "surrogatepass")).hexdigest() if isinstance(caption, str) else None


class _Projector:
    """Accumulates the projection of records column by column and turns every `CHUNK` rows into
    Arrow arrays (cheap appends, bounded Python-object memory at millions of records).

    With a `spool` (an open file), each chunk is written there as it is made and the table is
    that file memory-mapped: a parse of ten million records holds one chunk, not the table."""

    CHUNK = 65_536

    def __init__(self, spool=None) -> None:
        self.base = BASE_COLUMNS
        self.stamps = stage_columns()
        self.values: list[list] = [[] for _ in range(2 + len(self.base) + len(self.stamps))]
        self.batches: list[pa.RecordBatch] = []
        self.count = 0
        self.spool = spool
        self.writer = None

    @property
    def names(self) -> list[str]:
        return ["offset", "length", *(n for n, _, _ in self.base), *(n for n, _, _ in self.stamps)]

    @property
    def types(self) -> list[pa.DataType]:
        return [pa.int64(), pa.int64(), *(t for _, t, _ in self.base), *(t for _, t, _ in self.stamps)]

    def add(self, record: dict, offset: int, length: int) -> None:
        values = self.values
        values[0].append(offset)
        values[1].append(length)
        i = 2
        for _, _, get in self.base:
            values[i].append(get(record))
            i += 1
        provenance = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
        for name, _, get in self.stamps:
            stamp = provenance.get(name.split("__", 1)[0])
            values[i].append(get(stamp) if isinstance(stamp, dict) else None)
            i += 1
        self.count += 1
        if self.count % self.CHUNK == 0:
            self._flush()

    def _flush(self) -> None:
        """One chunk to Arrow: Python objects are held for `CHUNK` records at most."""
        if not self.values[0]:
            return
        arrays = [pa.array(values, type=kind) for kind, values in zip(self.types, self.values, strict=True)]
        batch = pa.RecordBatch.from_arrays(arrays, names=self.names)
        if self.spool is None:
            self.batches.append(batch)
        else:
            if self.writer is None:
                self.writer = pa.ipc.new_stream(self.spool, batch.schema)
            self.writer.write_batch(batch)
        for values in self.values:
            values.clear()

    def table(self) -> pa.Table:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.spool.flush()
            return _mapped(self.spool)
        schema = pa.schema(list(zip(self.names, self.types, strict=True)))
        table = pa.Table.from_batches(self.batches) if self.batches else schema.empty_table()
        self.batches = []
        return table  # in its chunks: no second copy of a million rows


def _mapped(f) -> pa.Table:
    """The Arrow stream in the open file `f`, memory-mapped (zero-copy: its pages are the page
    cache's). The buffers hold the mapping, which outlives the file's descriptor and name."""
    mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    _MAPPINGS.add(mapping)
    return pa.ipc.open_stream(pa.py_buffer(mapping)).read_all()


_MAPPINGS: weakref.WeakSet = weakref.WeakSet()  # the projections this process has mapped (while alive)


def release_mapped_pages() -> None:
    """Drop this process's hold on the pages of every mapped projection it has read so far.

    They stay in the page cache, one copy per node shared by every rank, and come back on the
    next touch. Called after each batch of a pass over the whole projection (a needs filter, a
    readiness chunk, a cache write), so a process's RSS holds about one batch of it instead of
    the whole file (6 GB at ten million records): SLURM and `ps` count a mapped page once per
    process that touched it, so eight ranks would otherwise read as eight copies."""
    for mapping in list(_MAPPINGS):
        with contextlib.suppress(ValueError, OSError):  # closed, or a kernel without madvise
            mapping.madvise(mmap.MADV_DONTNEED)


def projection_names() -> list[str]:
    """Columns of `Manifest.to_dataset()`: `row` (position in the manifest), then the projection."""
    return ["row", *_Projector().names]


def project(records: Iterable[tuple[dict, int, int]]) -> pa.Table:
    """The projection table of (record, offset, length) triples."""
    projector = _Projector()
    for record, offset, length in records:
        projector.add(record, offset, length)
    return projector.table()


# ----------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """The valid records of a manifest (projected, in file order) and its rejected lines."""

    path: Path
    table: pa.Table = field(default_factory=lambda: project([]))
    rejected: list[RejectedLine] = field(default_factory=list)
    _data: ManifestFile | None = None  # the file (the same inode) the table's offsets point into
    _spans: np.ndarray | None = None
    cache_path: Path | None = None  # the Arrow file behind `table` when it is memory-mapped
    overlay: dict[int, dict] = field(default_factory=dict)  # row -> record not yet in the file (`overlaid`)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def spans(self) -> np.ndarray:
        """(offset, length) of every record's line, as an (n, 2) int64 array."""
        if self._spans is None:
            self._spans = np.stack(
                [self.table.column("offset").to_numpy(), self.table.column("length").to_numpy()], axis=1
            ).astype(np.int64).reshape(-1, 2)
        return self._spans

    def raw(self, row: int) -> bytes:
        if row in self.overlay:
            return orjson.dumps(self.overlay[row]) + b"\n"
        offset, length = self.spans[row]
        return self._data.read_at(int(offset), int(length))

    def record(self, row: int) -> dict:
        """The full record at `row` (its position among the valid records), parsed from the file
        (or a fresh copy of its overlay record): the caller may change it."""
        if row in self.overlay:
            return orjson.loads(orjson.dumps(self.overlay[row]))
        return self._checked_record(self.raw(row), self.table.column("image_id")[row].as_py())

    def _checked_record(self, line: bytes, image_id: str) -> dict:
        """A line read back from the file, parsed; it must still be the record the projection indexed."""
        try:
            record = orjson.loads(line.rstrip(b"\r\n").removeprefix(_BOM))
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or record.get("image_id") != image_id:
            raise UserError(f"the manifest {self.path} changed while this command read it (another prep job "
                            "rewrote its end): run the command again")
        return record

    def records_between(self, start: int, stop: int) -> Iterator[dict]:
        """The records of rows [start, stop), like `record` each, from one read of their span of the
        file (a chunk of a pass over millions: one system call, not one per record). Parsed one at
        a time as they are asked for: a chunk's records are never all alive at once."""
        stop = min(stop, len(self))
        if stop <= start:
            return
        spans = self.spans[start:stop]
        if self.overlay or (len(spans) > 1 and not (np.diff(spans[:, 0]) > 0).all()):
            yield from (self.record(row) for row in range(start, stop))  # rows in memory, or not in file order
            return
        first = int(spans[0, 0])
        block = self._data.read_at(first, int(spans[-1, 0] + spans[-1, 1]) - first)
        ids = self.table.column("image_id").slice(start, stop - start).to_pylist()
        for (offset, length), image_id in zip(spans.tolist(), ids, strict=True):
            begin = offset - first
            yield self._checked_record(block[begin : begin + length], image_id)

    def __iter__(self) -> Iterator[dict]:
        for row in range(len(self)):
            yield self.record(row)

    def records(self, rows: Iterable[int]) -> Iterator[tuple[int, dict]]:
        for row in rows:
            yield int(row), self.record(int(row))

    def column(self, name: str) -> list:
        """One projected column as a Python list, in manifest order (fine for thousands; use `table` at scale)."""
        return self.table.column(name).to_pylist()

    projections_column = column

    def __getstate__(self) -> dict:
        """Picklable for worker processes: the file is mapped again on the other side, which also
        learns the stamp configurations behind the table's hashes."""
        state = dict(self.__dict__)
        state["_data"] = None
        state["_configs"] = _configs_of(self.table)
        return state

    def __setstate__(self, state: dict) -> None:
        CONFIGS.update((int(key), text.encode()) for key, text in state.pop("_configs", {}).items())
        self.__dict__.update(state)
        if self.path.exists() and len(self):
            self._data = ManifestFile(self.path)

    def overlaid(self, changed: dict[int, dict]) -> Manifest:
        """This manifest with `changed` rows (row -> record) in place of the file's, in memory only:
        the view between passes, when the journals are durable and a rewrite of the whole file
        would cost more than the pass. The next `rewrite` writes them. Its projection keeps the
        untouched chunks of this one (memory-mapped: the ranks of a node still share them). Takes
        over the open file (this object is spent)."""
        if not changed:
            return self
        table = _spliced_table(self, np.arange(len(self)), changed, [], None, None)
        data, self._data = self._data, None
        return Manifest(path=self.path, table=table, rejected=self.rejected, _data=data,
                        overlay={**self.overlay, **changed})

    def close(self) -> None:
        data, self._data = self._data, None
        if data is not None:
            data.close()

    def __del__(self) -> None:
        self.close()

    def to_dataset(self):
        """The projection as a `datasets.Dataset` (memory-mapped when the cache is current).

        An explicit fingerprint: otherwise `datasets` hashes the whole table, and these views
        are never cached (side-effecting maps must not replay)."""
        from datasets import Dataset

        table = self.table.add_column(0, "row", pa.array(np.arange(len(self), dtype=np.int64)))
        return Dataset(table, fingerprint=f"manifest-{uuid.uuid4().hex}")


def resolve_manifest_path(path: str | Path) -> Path:
    """The file a manifest path really names (a symlink is followed, so its target is rewritten)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def lock_manifest(path: str | Path, why: str | None = None, error: type[Exception] | None = None):
    """Take `<manifest>.lock` at the manifest's real path: one writer per manifest (a symlink
    reaches the same lock). A held lock raises `error` (UserError) naming the manifest and `why`.
    An in-place change a killed writer left half done is undone first (`prep.inplace`)."""
    from prep.fsio import LockedError, acquire_lock

    target = resolve_manifest_path(path)
    try:
        lock = acquire_lock(lock_path(target), f"the manifest {path}")
    except LockedError as exc:
        raise (error or UserError)(f"{exc}: {why}" if why else str(exc)) from None
    if roll_back(target):
        logger.info("put back the end of %s that an interrupted run was rewriting", target)
    return lock


def cache_file(path: Path) -> Path:
    return path.with_name(path.name + ".cache.arrow")


def _cache_key(path: Path, stat: os.stat_result) -> dict[bytes, bytes]:
    """What the cache must match: the manifest's size, mtime and a hash of its first and last MiB
    (no inode: a copy that keeps times, `cp -a` or `rsync -a`, keeps its cache), and the stages."""
    from prep import stages

    sample = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        sample.update(f.read(1 << 20))
        if stat.st_size > 2 << 20:
            f.seek(stat.st_size - (1 << 20))
            sample.update(f.read(1 << 20))
    signature = ",".join(f"{name}:{stage.by_bucket}:{stage.artifact is not None}" for name, stage in stages.STAGES.items())
    key = f"{CACHE_VERSION}|{stat.st_size}|{stat.st_mtime_ns}|{sample.hexdigest()}|{signature}"
    return {b"prep.manifest": key.encode()}


class ManifestFile:
    """The open manifest file: records are read at their offsets (a later atomic rewrite replaces
    the name, not this inode). Plain reads, not a memory map: the pages of a 2 GB manifest then
    stay in the page cache instead of counting as this process's memory."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")  # noqa: SIM115 - kept open: records are read from it on demand
        self.lock = threading.Lock()

    def read_at(self, offset: int, length: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self.file.fileno(), length, offset)
        with self.lock:  # Windows: no pread
            self.file.seek(offset)
            return self.file.read(length)

    def copy_to(self, out, start: int, end: int) -> bytes:
        """Copy bytes [start, end) to `out`; returns the last byte copied.

        In the kernel (`copy_file_range`: no trip through Python) when both are files on one
        file system, else in 1 MiB reads."""
        if end > start and _kernel_copy(self.file, out, start, end - start):
            return self.read_at(end - 1, 1)
        last = b""
        position = start
        while position < end:
            chunk = self.read_at(position, min(1 << 20, end - position))
            if not chunk:
                break
            out.write(chunk)
            last = chunk[-1:]
            position += len(chunk)
        return last

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


def _kernel_copy(src, out, offset: int, count: int) -> bool:
    """`count` bytes of `src` from `offset` appended to `out` with copy_file_range; False when the
    kernel cannot (then nothing was written)."""
    if not hasattr(os, "copy_file_range"):
        return False
    try:
        out.flush()
        out_fd = out.fileno()
        done = os.copy_file_range(src.fileno(), out_fd, count, offset)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return False
    while done < count:  # short copies: go on from where it stopped
        step = os.copy_file_range(src.fileno(), out_fd, count - done, offset + done)
        if step <= 0:
            raise OSError(f"copy_file_range stopped after {done} of {count} bytes")
        done += step
    return True


def read_manifest(path: str | Path, *, use_cache: bool = True) -> Manifest:
    """Read a JSONL manifest; a missing file is an empty manifest. Bad lines are set aside."""
    path = resolve_manifest_path(path)
    if not path.exists():
        return Manifest(path=path)
    if path.is_dir():
        raise IsADirectoryError(f"manifest {path} is a directory")
    for _ in range(READ_TRIES):
        settle(path)
        stat = os.stat(path)
        manifest = _read_version(path, stat, use_cache)
        if _still(manifest._data, stat) and not undo_path(path).exists():
            _warn_rejected(manifest.rejected)
            return manifest
        manifest.close()  # its end was rewritten in place while being read (`prep.inplace`): again
    raise UserError(f"the manifest {path} kept changing while being read: try again when the job writing it is done")


READ_TRIES = 20


def _read_version(path: Path, stat: os.stat_result, use_cache: bool) -> Manifest:
    """The manifest as the file is at `stat`: from the projection cache when its key matches."""
    key = _cache_key(path, stat)
    data = ManifestFile(path)
    if use_cache:
        cached = _load_cache(path, key)
        if cached is not None:
            table, rejected = cached
            return Manifest(path=path, table=table, rejected=rejected, _data=data, cache_path=cache_file(path))
    try:
        with _spool(path if use_cache else None) as spool:
            manifest = _parse(path, data, spool)
    except OSError as exc:  # the spool could not be written (a full disk): reading must not fail for it
        if not use_cache:
            raise
        logger.debug("parsing %s in memory: %s", path, exc)
        manifest = _parse(path, data)
    if use_cache and _still(data, stat):  # never a cache of a version torn by an in-place change
        mapped = _cache_and_map(manifest, key)
        if mapped is not None:
            manifest.table = mapped  # the parsed table is let go
    return manifest


@contextlib.contextmanager
def _spool(path: Path | None):
    """A nameless temp file beside the manifest for the parse's projection (None: parse in memory,
    also when the folder is read-only). Closed, or killed, it is gone; its mapping lives on."""
    import tempfile

    f = None
    if path is not None:
        try:
            f = tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".parse.prep-tmp")  # noqa: SIM115
        except OSError:
            f = None
    try:
        yield f
    finally:
        if f is not None:
            f.close()


def _still(data: ManifestFile | None, stat: os.stat_result) -> bool:
    """Whether the open file is still the version `stat` saw (same inode, size and mtime). A whole
    rewrite replaces the name, not this inode (what was read stays whole); an in-place one changes it."""
    if data is None:
        return True
    now = os.fstat(data.file.fileno())
    return (now.st_ino, now.st_size, now.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _warn_rejected(rejected: list[RejectedLine]) -> None:
    for item in rejected[:20]:
        logger.warning("manifest line %d skipped: %s", item.lineno, item.reason)
    if len(rejected) > 20:
        logger.warning("... %d more manifest lines skipped (see the .rejected.jsonl file after the next rewrite)",
                       len(rejected) - 20)


def _iter_lines(data: ManifestFile) -> Iterator[tuple[int, int, bytes]]:
    """(line number, offset, the line's bytes including its newline) of every line, streamed."""
    data.file.seek(0)
    offset = 0
    for lineno, line in enumerate(data.file, start=1):
        yield lineno, offset, line
        offset += len(line)


def _decode_for_humans(raw: bytes) -> str:
    return raw.decode("utf-8", errors="surrogateescape").rstrip("\n").rstrip("\r")


def _parse(path: Path, data: ManifestFile, spool=None) -> Manifest:
    """Parse every line; the projection in memory, or spooled to `spool` (an open temp file)."""
    import array

    projector = _Projector(spool)
    rejected: list[RejectedLine] = []
    linenos = array.array("q")
    for lineno, offset, line in _iter_lines(data):
        length = len(line)
        raw = line.rstrip(b"\r\n")
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
            offset, length = offset + len(_BOM), length - len(_BOM)
        if not raw.strip():
            continue
        try:
            obj = parse_line(raw)
            reason = check_record_line(obj)
        except ValueError as exc:
            reason = str(exc)
        if reason:
            rejected.append(RejectedLine(lineno, _decode_for_humans(raw), reason))
            continue
        projector.add(obj, offset, length)
        linenos.append(lineno)
    table = projector.table()
    table, duplicates = _drop_duplicates(table, np.frombuffer(linenos, dtype=np.int64), data)
    rejected = sorted(rejected + duplicates, key=lambda r: r.lineno)
    return Manifest(path=path, table=table, rejected=rejected, _data=data)


def _drop_duplicates(table: pa.Table, linenos: np.ndarray, data) -> tuple[pa.Table, list[RejectedLine]]:
    """Later lines repeating an earlier image_path or image_id are set aside (the first one wins)."""
    import pyarrow.compute as pc

    keep = np.ones(table.num_rows, dtype=bool)
    reasons: dict[int, str] = {}
    for column in ("image_path", "image_id"):
        values = table.column(column)
        if pc.count_distinct(values, mode="only_valid").as_py() == pc.count(values, mode="only_valid").as_py():
            continue  # the usual case: no duplicate, decided in C++
        first_seen: dict[str, int] = {}
        for row, value in enumerate(values.to_pylist()):
            if value is None or not keep[row]:
                continue
            if value in first_seen:
                keep[row] = False
                what = "image_path" if column == "image_path" else f"image_id {value}"
                reasons[row] = f"duplicate {what} (first at line {linenos[first_seen[value]]})"
            else:
                first_seen[value] = row
    if keep.all():
        return table, []
    offsets = table.column("offset").to_numpy()
    lengths = table.column("length").to_numpy()
    rejected = [
        RejectedLine(int(linenos[row]), _decode_for_humans(data.read_at(int(offsets[row]), int(lengths[row]))), reason)
        for row, reason in sorted(reasons.items())
    ]
    return table.filter(pa.array(keep)), rejected


def _load_cache(path: Path, key: dict[bytes, bytes]) -> tuple[pa.Table, list[RejectedLine]] | None:
    cache = cache_file(path)
    try:
        with open(cache, "rb") as f:
            table = _mapped(f)
    except (OSError, ValueError, pa.ArrowInvalid):  # ValueError: an empty file cannot be mapped
        return None
    metadata = table.schema.metadata or {}
    if metadata.get(b"prep.manifest") != key[b"prep.manifest"]:
        return None
    try:
        import json  # the rejected texts may hold escaped surrogates (undecodable bytes), which orjson refuses

        rejected = [
            RejectedLine(item["line"], item["text"], item["reason"]) for item in json.loads(metadata.get(b"prep.rejected", b"[]"))
        ]
        configs = {int(key): text.encode() for key, text in orjson.loads(metadata.get(b"prep.configs", b"{}")).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    CONFIGS.update(configs)
    return table.replace_schema_metadata(None), rejected


def _save_cache(path: Path, manifest: Manifest, key: dict[bytes, bytes]) -> Path | None:
    """Write the projection beside the manifest (best effort: a read-only folder just has no cache)."""
    cache = cache_file(path)
    rejected = ("[" + ",".join(r.to_json() for r in manifest.rejected) + "]").encode()
    if len(rejected) > 16 << 20:
        return None  # a manifest that is mostly garbage is not worth caching
    table = manifest.table
    schema = table.schema.with_metadata({**key, b"prep.rejected": rejected, b"prep.configs": orjson.dumps(_configs_of(table))})
    try:
        with atomic_open(cache, "wb") as f, pa.ipc.new_stream(f, schema) as writer:
            for start in range(0, table.num_rows, CACHE_BATCH):
                # one batch of whole chunks at a time: slices of a spliced table are gathered here,
                # so the cache never fragments and memory holds one batch, not a second table
                for batch in table.slice(start, CACHE_BATCH).combine_chunks().to_batches():
                    writer.write_batch(batch)
                release_mapped_pages()
    except OSError as exc:
        logger.debug("no manifest cache at %s: %s", cache, exc)
        return None
    return cache


CACHE_BATCH = 65_536  # rows per record batch of the cache


def _cache_and_map(manifest: Manifest, key: dict[bytes, bytes]) -> pa.Table | None:
    """Save `manifest`'s projection as its cache and return the cache memory-mapped (its pages
    shared by every rank and process of a node), to replace the table in memory; None when no
    cache could be written."""
    manifest.cache_path = _save_cache(manifest.path, manifest, key)
    cached = _load_cache(manifest.path, key) if manifest.cache_path is not None else None
    return cached[0] if cached is not None else None


# ------------------------------------------------------------------------------ rejected
def rejected_path(manifest_path: str | Path) -> Path:
    """`<manifest>.rejected.jsonl`, beside the manifest."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.name + ".rejected.jsonl")


def save_rejected(manifest_path: str | Path, rejected: list[RejectedLine]) -> None:
    """Append newly rejected lines to the side file (atomically, without duplicating old ones)."""
    if not rejected:
        return
    import json

    side = rejected_path(manifest_path)
    existing = side.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if side.exists() else []
    known_texts = set()
    for line in existing:
        try:
            known_texts.add(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            continue
    fresh = [item.to_json() for item in rejected if item.text not in known_texts]
    if not fresh:
        return
    with atomic_open(side, "w") as f:
        for line in existing + fresh:
            f.write(line + "\n")


# ------------------------------------------------------------------------------ writing
def write_manifest(path: str | Path, records: Iterable[dict], rejected: list[RejectedLine] = ()) -> int:
    """Write `records` as JSONL atomically (the old file survives any crash); returns the count.

    Rejected lines are saved to the side file first, so a line leaves the manifest only
    after it is safe elsewhere.
    """
    path = resolve_manifest_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rejected(path, list(rejected))
    count = 0
    with atomic_open(path, "wb") as f:
        for record in records:
            f.write(orjson.dumps(record) + b"\n")
            count += 1
    return count


def rewrite(
    manifest: Manifest,
    changed: dict[int, dict] | None = None,
    appended: list[dict] = (),
    *,
    drop: Iterable[int] = (),
) -> Manifest:
    """Stream `manifest` to a new file: untouched lines copied as bytes, `changed` rows (row ->
    record) serialised again, `drop` rows left out, `appended` records added at the end.

    Atomic (temp + fsync + rename). The rejected lines are saved to the side file first. The
    returned manifest reads the new file; its projection is the old one with only the changed
    and appended rows projected again, and is written to the cache. Rows of the manifest's
    overlay are written as changed rows.
    """
    changed = {**manifest.overlay, **(changed or {})}
    drop_set = {int(r) for r in drop}
    path = manifest.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if not drop_set:
        tail = _tail_in_place(manifest, changed, appended)
        if tail is not None:
            return tail
    save_rejected(path, manifest.rejected)
    spans = manifest.spans
    n = len(manifest)
    keep = np.ones(n, dtype=bool)
    if drop_set:
        keep[list(drop_set)] = False
    new_lines = {row: orjson.dumps(record) + b"\n" for row, record in changed.items() if keep[row]}
    appended_lines = [orjson.dumps(record) + b"\n" for record in appended]
    lengths = spans[:, 1].copy()
    for row, line in new_lines.items():
        lengths[row] = len(line)
    with atomic_open(path, "wb") as f:
        _copy_rows(f, manifest, keep, new_lines, lengths)
        for line in appended_lines:
            f.write(line)
    kept_rows = np.flatnonzero(keep)
    new_lengths = np.concatenate([lengths[kept_rows], np.asarray([len(x) for x in appended_lines], dtype=np.int64)])
    new_offsets = np.concatenate([[0], np.cumsum(new_lengths)[:-1]]).astype(np.int64)
    return _written(manifest, _spliced_table(manifest, kept_rows, changed, appended, new_offsets, new_lengths))


def _written(old: Manifest, table: pa.Table) -> Manifest:
    """The manifest as just written (`table`, its projection), its cache saved; `old` is closed."""
    path = old.path
    key = _cache_key(path, os.stat(path))
    result = Manifest(path=path, table=table, rejected=[], _data=ManifestFile(path))
    mapped = _cache_and_map(result, key)
    result.table = mapped if mapped is not None else table.combine_chunks()  # no cache: the table in one piece
    old.close()
    return result


def _tail_in_place(manifest: Manifest, changed: dict[int, dict], appended: list[dict]) -> Manifest | None:
    """`rewrite` of a manifest whose changes are all in its last lines (new records appended,
    then changed by the passes): only the tail is written, in place (`prep.inplace`). None when
    the rewrite must be whole: a tail over `TAIL_SHARE` of the file, rejected lines to move out,
    or a file that is not the one read."""
    from prep.inplace import TAIL_SHARE, rewrite_tail

    n, data = len(manifest), manifest._data
    if manifest.rejected or data is None or not n or not (changed or appended):
        return None
    first = min(changed) if changed else n
    spans = manifest.spans
    start = int(spans[first, 0]) if first < n else int(spans[-1].sum())
    opened = os.fstat(data.file.fileno())
    size = opened.st_size
    try:
        same_file = os.path.samestat(opened, os.stat(manifest.path))
    except OSError:
        return None
    contiguous = first >= n or bool((spans[first + 1:, 0] == spans[first:-1].sum(axis=1)).all())
    if not same_file or int(spans[-1].sum()) != size or not contiguous or size - start > size * TAIL_SHARE:
        return None
    if opened.st_nlink > 1:  # another name for this file (a `cp -al` snapshot): a write in place would change it too
        return None
    old_tail = data.read_at(start, size - start)
    if (old_tail[-1:] or data.read_at(size - 1, 1)) != b"\n":  # the file's last byte: appends follow a newline
        return None
    lines = [orjson.dumps(changed[row]) + b"\n" if row in changed
             else old_tail[int(spans[row, 0]) - start : int(spans[row].sum()) - start] for row in range(first, n)]
    lines += [orjson.dumps(record) + b"\n" for record in appended]
    rewrite_tail(manifest.path, start, old_tail, b"".join(lines))
    lengths = np.concatenate([spans[:first, 1], np.asarray([len(line) for line in lines], dtype=np.int64)])
    offsets = np.concatenate([spans[:first, 0], start + np.concatenate([[0], np.cumsum(lengths[first:])[:-1]])])
    return _written(manifest, _spliced_table(manifest, np.arange(n), changed, appended, offsets.astype(np.int64), lengths))


def _copy_rows(f, manifest: Manifest, keep: np.ndarray, new_lines: dict[int, bytes], lengths: np.ndarray) -> None:
    """Write kept rows in order: runs of untouched, contiguous lines as one copy of the old file.

    The runs are found with numpy (a run breaks at a changed or dropped row, and where the old
    file has a gap: a rejected line), so the Python loop is over runs and changed rows only."""
    spans = manifest.spans
    data = manifest._data
    rows = np.flatnonzero(keep)
    if not len(rows):
        return
    offsets, sizes = spans[rows, 0].astype(np.int64), spans[rows, 1].astype(np.int64)
    special = np.zeros(len(rows), dtype=bool)
    if new_lines:
        special[np.searchsorted(rows, np.fromiter(new_lines, dtype=np.int64, count=len(new_lines)))] = True
    breaks = np.ones(len(rows), dtype=bool)  # a row that starts a new run
    breaks[1:] = special[1:] | special[:-1] | (offsets[1:] != offsets[:-1] + sizes[:-1])
    starts = np.flatnonzero(breaks)
    ends = np.append(starts[1:], len(rows))
    for first, stop in zip(starts.tolist(), ends.tolist(), strict=True):
        if special[first]:
            f.write(new_lines[int(rows[first])])
        else:
            _write_run(f, data, int(offsets[first]), int(offsets[stop - 1] + sizes[stop - 1]))


def _write_run(f, data: ManifestFile, start: int, end: int) -> None:
    if data.copy_to(f, start, end) != b"\n":
        f.write(b"\n")  # the old file's last line had no newline


def _spliced_table(
    manifest: Manifest, kept_rows: np.ndarray, changed: dict[int, dict], appended: list[dict],
    offsets: np.ndarray | None, lengths: np.ndarray | None,
) -> pa.Table:
    """The new projection: the old one with the changed rows projected again, dropped rows left
    out and appended ones added; offsets and lengths of the new file (None: kept as they are).
    In chunks: the untouched ones are still the old (memory-mapped) buffers."""
    old = manifest.table
    kept = kept_rows.astype(np.int64)
    changed_rows = np.asarray(sorted(changed), dtype=np.int64)
    changed_rows = changed_rows[np.isin(changed_rows, kept)] if len(changed_rows) else changed_rows
    table = _splice_in_place(old, kept, changed_rows, changed, appended)
    if table is None:  # a new column or type: the general (slower) way
        table = _splice_by_take(old, kept, changed_rows, changed, appended)
    if offsets is not None:
        table = table.set_column(table.schema.get_field_index("offset"), "offset", pa.array(offsets, pa.int64()))
        table = table.set_column(table.schema.get_field_index("length"), "length", pa.array(lengths, pa.int64()))
    return table


MAX_SLICES = 4096  # changed rows spliced as slices; more, and one take is cheaper


def _splice_in_place(old: pa.Table, kept: np.ndarray, changed_rows: np.ndarray, changed: dict[int, dict],
                     appended: list[dict]) -> pa.Table | None:
    """Slices of the old table with the re-projected rows between them (zero-copy slices, then one
    C++ concatenation): no per-row Python and no decoding of the dictionary columns. None when a
    new part does not fit the old schema."""
    if len(kept) != old.num_rows:
        old = old.take(pa.array(kept))  # rows dropped (rare: prune)
        changed_rows = np.searchsorted(kept, changed_rows)
        changed = {int(new): changed[int(row)] for new, row in zip(changed_rows.tolist(), kept[changed_rows].tolist(),
                                                                     strict=True)} if len(changed_rows) else {}
        changed_rows = np.asarray(sorted(changed), dtype=np.int64)
    parts, position = [], 0
    fresh = _fitted(project((changed[int(row)], 0, 0) for row in changed_rows.tolist()), old.schema) if len(
        changed_rows) else None
    if len(changed_rows) and fresh is None:
        return None
    if len(changed_rows) > MAX_SLICES:  # many scattered rows: one take over old + fresh (still no decoding)
        indices = np.arange(old.num_rows, dtype=np.int64)
        indices[changed_rows] = old.num_rows + np.arange(len(changed_rows), dtype=np.int64)
        old = pa.concat_tables([old, fresh]).take(pa.array(indices))
        changed_rows = changed_rows[:0]
    for i, row in enumerate(changed_rows.tolist()):
        if row > position:
            parts.append(old.slice(position, row - position))
        parts.append(fresh.slice(i, 1))
        position = row + 1
    if position < old.num_rows:
        parts.append(old.slice(position))
    if appended:
        tail = _fitted(project((record, 0, 0) for record in appended), old.schema)
        if tail is None:
            return None
        parts.append(tail)
    if not parts:
        return old.slice(0, 0)
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _fitted(table: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """`table` with the columns and types of `schema` (missing columns null); None when it has a
    column `schema` lacks or a value that does not cast."""
    if any(name not in schema.names for name in table.column_names):
        return None
    columns = []
    try:
        for field in schema:
            if field.name in table.column_names:
                column = table.column(field.name)
                if column.type != field.type:
                    column = column.cast(field.type)
            else:
                column = pa.nulls(table.num_rows, field.type)
            columns.append(column)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    return pa.Table.from_arrays(columns, schema=schema)


def _splice_by_take(old: pa.Table, kept: np.ndarray, changed_rows: np.ndarray, changed: dict[int, dict],
                    appended: list[dict]) -> pa.Table:
    parts = [old]
    indices = kept.copy()
    if len(changed_rows):
        parts.append(project((changed[int(row)], 0, 0) for row in changed_rows.tolist()))
        indices[np.searchsorted(kept, changed_rows)] = old.num_rows + np.arange(len(changed_rows), dtype=np.int64)
    extra = old.num_rows + len(changed_rows)
    if appended:
        parts.append(project((record, 0, 0) for record in appended))
        indices = np.concatenate([indices, extra + np.arange(len(appended), dtype=np.int64)])
    combined = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    return combined.take(pa.array(indices))
