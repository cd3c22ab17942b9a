"""Reading an export back: `load_shards` streams WebDataset tars (a local folder or a Hub repo).

Reading is defensive, because a shard may come from anyone's Hub repo:

- tars are read with `tarfile` in stream mode `r|` (uncompressed only): a compressed shard
  is refused with a clear error unless `allow_compressed=True`;
- each member's size is taken from its tar header and checked against `max_member_bytes`
  *before* it is read; only the members a sample needs are read at all;
- members must be regular files with safe relative names (no links, devices, directories,
  absolute paths or `..`);
- a `.npy` member's header (shape x itemsize) must match its payload size before any array
  is made, so a 4 KB member claiming shape (16, 100000, 100000) allocates nothing;
  object dtypes are refused: nothing is ever unpickled.

Splitting (`split=True`, the default): each rank reads its own shards (rank and world size
from torch.distributed when initialised, else the RANK / WORLD_SIZE environment variables,
else one process), and each DataLoader worker its own part of them. Epochs are even across
ranks: every rank yields the same number of items (batches, or samples without
`batch_size`) per epoch, so no rank waits at a collective. The shards are dealt out
per epoch from the sample counts in index.json; a rank that comes out short repeats
samples of its own shards at the end of the epoch (padding). So every sample is read at
least once per epoch and a few are read twice; `batches_per_rank()` gives the count.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import math
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch.utils.data

from prep.buckets import format_bucket, latent_shape, parse_bucket

logger = logging.getLogger(__name__)

BUCKET_DIR_RE = re.compile(r"bucket_([1-9][0-9]*x[1-9][0-9]*)")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
INDEX_FILE = "index.json"
METADATA_FILE = "prep_metadata.json"  # the derived dir's metadata (prep.store.METADATA_FILE)


def sample_members() -> dict[str, str]:
    """{member suffix: sample key} of the array members, from the artifact table (`prep.stages`),
    optional ones (a mirrored crop's latent) included: a sample carries them when its export does."""
    from prep import stages

    return {artifact.member: artifact.column for artifact in stages.artifacts(stages.ALL).values()}


def required_members() -> tuple[str, ...]:
    """The members every sample has: json and the artifacts of the non-optional stages."""
    from prep import stages

    return ("json", *(artifact.member for artifact in stages.artifacts().values()))

DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # a 2048x2048 latent is 2 MiB; the T5 state 154 KiB
DEFAULT_SHUFFLE_BUFFER = 256
_MAX_NPY_HEADER = 10_000
_NPY_KINDS = "biuf"  # bool, int, uint, float: anything else (objects, strings, records) is refused
_COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gz"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
)
_TARFILE_COMPRESSION = {"gz", "bz2", "xz"}  # what tarfile can stream-decompress
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: the key ends at the basename's first dot
UNCOND_MAX_BYTES = 16 << 20
INDEX_MAX_BYTES = 256 << 20
T5_SHAPE = (77, 1024)


class ShardError(ValueError):
    """A shard (or index.json) that cannot be read safely; the message names the shard and member."""


# ------------------------------------------------------------------------------ names
def check_member_name(name: str) -> bool:
    """Tar member names must be relative and stay inside the archive; raises ValueError otherwise."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "\x00" in name:
        raise ValueError(f"unsafe tar member name {name!r}: absolute paths and '..' are refused")
    return True


def _bucket_name(bucket: str) -> str:
    text = str(bucket).removeprefix("bucket_")
    return format_bucket(*parse_bucket(text))


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class ShardRef:
    """One shard: its bucket ("WxH"), where to open it, and its sample count (None: unknown)."""

    bucket: str
    url: str
    samples: int | None = None


def parse_index_shards(index: Any, where: str) -> list[tuple[str, str, int | None]]:
    """(bucket, relative path, samples) of every shard entry of an index.json; clear errors, no KeyError."""
    if not isinstance(index, dict):
        raise ShardError(f"{where}: not a prep export index (expected a JSON object)")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{where}: key 'shards' is missing or not a list")
    out = []
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise ShardError(f"{where}: shards[{i}] is not an object")
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            raise ShardError(f"{where}: shards[{i}] has no 'path' (a relative path to the tar)")
        try:
            check_member_name(path)
        except ValueError as exc:
            raise ShardError(f"{where}: shards[{i}] 'path': {exc}") from None
        bucket = entry.get("bucket")
        if bucket is None:
            match = BUCKET_DIR_RE.fullmatch(path.split("/")[0])
            bucket = match.group(1) if match else None
        try:
            bucket = _bucket_name(bucket)
        except (ValueError, TypeError):
            raise ShardError(f"{where}: shards[{i}] has no valid 'bucket' (WxH), got {bucket!r}") from None
        samples = entry.get("samples")
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 0):
            raise ShardError(f"{where}: shards[{i}] 'samples' must be a non-negative integer, got {samples!r}")
        out.append((bucket, path, samples))
    return out


def _read_index_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: not readable JSON ({exc})") from exc


def _local_shards(root: Path) -> list[ShardRef]:
    if root.is_file():
        match = BUCKET_DIR_RE.fullmatch(root.parent.name)
        bucket = match.group(1) if match else root.parent.name
        return [ShardRef(bucket, str(root))]
    match = BUCKET_DIR_RE.fullmatch(root.name)
    if match:  # a bucket folder itself
        return [ShardRef(match.group(1), str(p)) for p in sorted(root.glob("*.tar"))]
    index_path = root / INDEX_FILE
    if index_path.is_file():
        entries = parse_index_shards(_read_index_file(index_path), str(index_path))
        return [ShardRef(bucket, str(root / path), samples) for bucket, path, samples in entries]
    shards = []
    for directory in sorted(root.iterdir()):
        match = BUCKET_DIR_RE.fullmatch(directory.name)
        if match and directory.is_dir():
            shards += [ShardRef(match.group(1), str(p)) for p in sorted(directory.glob("*.tar"))]
    return shards


def _hub_root(source: str, revision: str | None) -> tuple[str, str]:
    """("OWNER/NAME", "datasets/OWNER/NAME[@rev]") for a Hub id, or FileNotFoundError."""
    repo_id = source.removeprefix("hf://").removeprefix("datasets/")
    if "@" in repo_id and revision is None:
        repo_id, revision = repo_id.split("@", 1)
    if not _HUB_ID_RE.fullmatch(repo_id):
        raise FileNotFoundError(f"{source!r} is neither an existing local path nor a Hub dataset id (OWNER/NAME)")
    return repo_id, f"datasets/{repo_id}" + (f"@{quote(revision, safe='')}" if revision else "")


def _hub_fs(fs):
    if fs is None:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
    return fs


def _hub_read_index(root: str, fs) -> dict | None:
    try:
        with fs.open(f"hf://{root}/{INDEX_FILE}", "rb") as f:
            data = f.read(INDEX_MAX_BYTES)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ShardError(f"hf://{root}/{INDEX_FILE}: not valid JSON ({exc})") from exc


def _hub_shards(source: str, revision: str | None, fs) -> list[ShardRef]:
    repo_id, root = _hub_root(source, revision)
    fs = _hub_fs(fs)
    index = _hub_read_index(root, fs)
    if index is not None:
        entries = parse_index_shards(index, f"hf://{root}/{INDEX_FILE}")
        return [ShardRef(bucket, f"hf://{root}/{path}", samples) for bucket, path, samples in entries]
    shards = []
    for path in sorted(fs.glob(f"{root}/bucket_*/*.tar")):
        # Paths come back as "datasets/OWNER/NAME[@rev]/bucket_WxH/shard-000000.tar".
        path = path.removeprefix("hf://")
        for prefix in (root + "/", f"datasets/{repo_id}/"):
            if path.startswith(prefix):
                relative = path[len(prefix) :]
                break
        else:
            start = path.find("/bucket_", len(f"datasets/{repo_id}"))
            if start < 0:
                continue
            relative = path[start + 1 :]
        check_member_name(relative)
        match = BUCKET_DIR_RE.fullmatch(relative.split("/")[0])
        if match and relative.count("/") == 1:
            shards.append(ShardRef(match.group(1), f"hf://{root}/{relative}"))
    return shards


def list_shards(
    source: str | Path, bucket: str | None = None, *, revision: str | None = None, fs=None
) -> list[ShardRef]:
    """Every shard of an export (local folder / bucket folder / tar, or a Hub id), sorted by bucket.

    An export's index.json is authoritative (its shard list and sample counts); without one,
    `bucket_WxH/*.tar` files are listed (locally, or with `HfFileSystem.glob` on the Hub).
    """
    local = Path(source).expanduser()
    shards = _local_shards(local) if local.exists() else _hub_shards(str(source), revision, fs)
    found = sorted({s.bucket for s in shards})
    if bucket is not None:
        name = _bucket_name(bucket)
        if name not in found:
            raise ValueError(f"no shards for bucket {name} in {source}; found: {', '.join(found) or 'none'}")
        shards = [s for s in shards if s.bucket == name]
    if not shards:
        raise FileNotFoundError(f"no shards (bucket_WxH/*.tar) found in {source}")
    order = {b: i for i, b in enumerate(found)}
    return sorted(shards, key=lambda s: order[s.bucket])  # stable: keeps the index order within a bucket


def resolve_shards(
    source: str | Path, bucket: str | None = None, *, revision: str | None = None, fs=None
) -> dict[str, list[str]]:
    """{bucket "WxH": [shard url, ...]} for a local export folder / bucket folder / tar, or a Hub id.

    A Hub dataset id (OWNER/NAME, optionally `hf://datasets/` prefixed or `@revision`
    suffixed) that is not an existing local path is read through `HfFileSystem` (`fs` lets
    tests inject a fake): its index.json, else a glob of `bucket_*/*.tar`, giving
    `hf://datasets/OWNER/NAME[@rev]/bucket_WxH/shard-NNNNNN.tar` URLs.
    """
    out: dict[str, list[str]] = {}
    for shard in list_shards(source, bucket, revision=revision, fs=fs):
        out.setdefault(shard.bucket, []).append(shard.url)
    return out


# --------------------------------------------------------------------- reading tars
class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front (to sniff compression magic)."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = memoryview(head), raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head.nbytes:
            n = min(len(buffer), self.head.nbytes)
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open_url(url: str, fs):
    if url.startswith("hf://"):
        return _hub_fs(fs).open(url, "rb")
    return open(url, "rb")  # noqa: SIM115 - the caller closes it


def _tar_mode(stream, url: str, allow_compressed: bool) -> tuple[Any, str]:
    head = stream.read(6)
    compression = next((name for magic, name in _COMPRESSION_MAGIC if head.startswith(magic)), None)
    stream = _Prefixed(head, stream)
    if compression is None:
        return stream, "r|"
    if not allow_compressed:
        raise ShardError(
            f"shard {url} is {compression}-compressed: prep reads uncompressed tars only (a compressed member "
            "can expand far beyond the file size); pass allow_compressed=True to read it anyway "
            "(members stay capped by max_member_bytes)"
        )
    if compression not in _TARFILE_COMPRESSION:
        raise ShardError(f"shard {url} is {compression}-compressed, which Python's tarfile cannot read")
    return stream, f"r|{compression}"


def _split_name(name: str) -> tuple[str | None, str | None]:
    match = _KEY_RE.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.isdir():
        return "a directory"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isfifo():
        return "a FIFO"
    if info.issparse():
        return "a sparse file"
    return f"of tar type {info.type!r}"


def _read_exact(fileobj, size: int, where: str) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = fileobj.readinto(view[got:])
        if not n:
            raise ShardError(f"{where}: truncated ({got} of {size} bytes)")
        got += n
    return buf


def decode_npy(data: bytes | bytearray, where: str) -> np.ndarray:
    """A `.npy` payload -> array, after checking that its header matches its size; never unpickles.

    A `bytearray` is wrapped without a copy (the array is writable); `bytes` give a read-only array.
    """
    try:
        fp = io.BytesIO(bytes(memoryview(data)[: _MAX_NPY_HEADER + 16]))
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_NPY_HEADER)
        else:
            reader = getattr(np.lib.format, "_read_array_header", None)
            if reader is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = reader(fp, version, max_header_size=_MAX_NPY_HEADER)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as exc:
        raise ShardError(f"{where}: not a plain .npy array ({exc})") from None
    if dtype.hasobject:
        raise ShardError(f"{where}: not a plain .npy array (dtype {dtype} holds Python objects; pickle is never used)")
    if dtype.kind not in _NPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ShardError(f"{where}: not a plain .npy array (dtype {dtype} is not a plain number type)")
    if any(dim < 0 for dim in shape):
        raise ShardError(f"{where}: not a plain .npy array (negative dimension in shape {shape})")
    offset = fp.tell()
    count = math.prod(shape)
    expected, actual = count * dtype.itemsize, len(data) - offset
    if expected != actual:
        raise ShardError(
            f"{where}: .npy header claims shape {shape} of {dtype} ({expected} bytes) but the member holds "
            f"{actual} bytes of data: refused before allocating"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def _decode_json(data: bytes | bytearray, where: str) -> dict:
    try:
        value = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ShardError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _finish_sample(key: str, members: dict, url: str) -> dict:
    missing = [m for m in required_members() if m not in members]
    if missing:
        raise ShardError(f"sample {key!r} in {url} lacks member(s) {', '.join(missing)}")
    return {"key": key, "json": members["json"],
            **{name: members[m] for m, name in sample_members().items() if m in members}}


def iter_tar_samples(
    stream,
    url: str,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    allow_compressed: bool = False,
) -> Iterator[dict]:
    """Decoded samples (key, json, dinov3, vae, t5_hidden, t5_mask) of one tar stream, in order.

    Members other than the five a sample needs are skipped without being read. Raises
    ShardError (a ValueError) naming the shard and member for anything unsafe or malformed.
    """
    stream, mode = _tar_mode(stream, url, allow_compressed)
    wanted = sample_members()
    key: str | None = None
    members: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tar:
            for info in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise
                name = info.name
                try:
                    check_member_name(name)
                except ValueError as exc:
                    raise ShardError(f"shard {url}: {exc}") from None
                where = f"shard {url} member {name!r}"
                if not info.isreg() or info.issparse():
                    raise ShardError(
                        f"{where} is {_member_kind(info)}, not a regular file: refused (links are never followed, "
                        f"so its sample lacks member {_split_name(name)[1]!r})"
                    )
                member_key, ext = _split_name(name)
                if member_key is None or (ext != "json" and ext not in wanted):
                    continue  # not part of a sample: skipped unread
                if info.size > max_member_bytes:
                    raise ShardError(
                        f"{where} is {info.size} bytes, over max_member_bytes={max_member_bytes}: refused "
                        "before reading (raise max_member_bytes if the export really holds members this big)"
                    )
                fileobj = tar.extractfile(info)
                data = _read_exact(fileobj, info.size, where)
                if member_key != key:
                    if members:
                        yield _finish_sample(key, members, url)
                    key, members = member_key, {}
                if ext in members:
                    raise ShardError(f"{where}: duplicate member {ext!r} for sample {key!r}")
                members[ext] = _decode_json(data, where) if ext == "json" else decode_npy(data, where)
    except (tarfile.TarError, EOFError) as exc:
        raise ShardError(f"shard {url}: not a readable tar ({exc})") from None
    if members:
        yield _finish_sample(key, members, url)


def count_samples(url: str, *, fs=None, allow_compressed: bool = False) -> int:
    """The number of samples in a shard, from its member headers only (payloads are skipped, not read)."""
    with _open_url(url, fs) as raw:
        seekable = bool(getattr(raw, "seekable", lambda: False)())
        stream, mode = _tar_mode(raw, url, allow_compressed)
        if seekable and mode == "r|":
            raw.seek(0)
            stream, mode = raw, "r:"  # random access: headers only
        keys, last = 0, None
        wanted = sample_members()
        try:
            with tarfile.open(fileobj=stream, mode=mode) as tar:
                for info in tar:
                    tar.members = []
                    key, ext = _split_name(info.name)
                    if key is not None and (ext == "json" or ext in wanted) and key != last:
                        keys, last = keys + 1, key
        except tarfile.TarError as exc:
            raise ShardError(f"shard {url}: not a readable tar ({exc})") from None
    return keys


def decode_sample(sample: dict) -> dict:
    """A raw WebDataset sample (bytes per member) -> key, json dict and numpy arrays (no pickle)."""
    key = sample.get("__key__")
    where = f"sample {key!r} in {sample.get('__url__')}"
    missing = [m for m in required_members() if m not in sample]
    if missing:
        raise ShardError(f"{where} lacks member(s) {', '.join(missing)}")
    out: dict[str, Any] = {"key": key, "json": _decode_json(sample["json"], f"{where} member json")}
    for member, name in sample_members().items():
        if member in sample:
            out[name] = decode_npy(sample[member], f"{where} member {member}")
    return out


def collate(samples: list[dict]) -> dict:
    """Stack a list of decoded samples of one bucket: arrays get a leading batch axis (numpy)."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "json": [s["json"] for s in samples]}
    for name in sample_members().values():
        if all(name in s for s in samples):
            batch[name] = np.stack([s[name] for s in samples])
    return batch


# --------------------------------------------------------------------- epoch planning
def _units(samples: int, batch_size: int | None, drop_last: bool) -> int:
    """Items yielded for `samples` samples of one bucket: batches (or samples without batch_size)."""
    if not batch_size:
        return samples
    return samples // batch_size if drop_last else -(-samples // batch_size)


def _deal(shards: list[ShardRef], parts: int) -> list[list[ShardRef]]:
    """Deal shards (in order) to `parts` lists, each to the part with the fewest samples so far."""
    out: list[list[ShardRef]] = [[] for _ in range(parts)]
    heap = [(0, i) for i in range(parts)]
    for shard in shards:
        load, i = heapq.heappop(heap)
        out[i].append(shard)
        heapq.heappush(heap, (load + (shard.samples if shard.samples is not None else 1), i))
    return out


def _slot_units(shards: list[ShardRef], batch_size: int | None, drop_last: bool) -> int:
    per_bucket: dict[str, int] = {}
    for shard in shards:
        per_bucket[shard.bucket] = per_bucket.get(shard.bucket, 0) + (shard.samples or 0)
    return sum(_units(n, batch_size, drop_last) for n in per_bucket.values())


def _latent_shape(bucket: str) -> tuple[int, ...] | None:
    try:
        return latent_shape(bucket)
    except ValueError:
        return None  # a lone tar outside a bucket_WxH folder: no bucket to check against


def _mix(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass
class SlotPlan:
    """What one DataLoader worker of one rank reads in one epoch."""

    shards: list[ShardRef]
    quota: int | None  # exactly this many items (None: whatever the shards give)
    pad: list[ShardRef]  # read again, cyclically, to fill the quota
    planned: int | None = None  # items the shards give by their index counts


def plan_epoch(
    shards: list[ShardRef],
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    interleave: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int | None,
    drop_last: bool,
    even: bool,
) -> SlotPlan:
    """Deal the epoch's shards to ranks, then to the rank's workers; size the padding (see module doc).

    Deterministic: every rank and worker computes the same global plan and takes its slot.
    """
    order = list(shards)
    buckets = sorted({s.bucket for s in order})
    if shuffle:
        random.Random(_mix(seed, epoch)).shuffle(order)
    per_rank = _deal(order, world_size)
    per_worker = _deal(per_rank[rank], num_workers)
    mine = per_worker[worker]
    if interleave:
        if not shuffle:  # round-robin over buckets so they alternate
            queues = {b: [s for s in mine if s.bucket == b] for b in buckets}
            mine = [q[i] for i in range(max(map(len, queues.values()), default=0)) for q in queues.values() if i < len(q)]
    else:
        mine = sorted(mine, key=lambda s: buckets.index(s.bucket))  # one bucket after another
    if not even or world_size == 1:
        return SlotPlan(mine, None, [])
    units = [[_slot_units(w, batch_size, drop_last) for w in _deal(r, num_workers)] for r in per_rank]
    target = max(sum(u) for u in units)
    own = units[rank]
    pads = [0] * num_workers
    for _ in range(target - sum(own)):
        w = min(range(num_workers), key=lambda i: (own[i] + pads[i], i))
        pads[w] += 1
    # Padding repeats the rank's own shards first (from a different one per worker), then the
    # others: with drop_last, a rank's own shards alone may hold no complete batch.
    source = per_rank[rank]
    start = worker % len(source) if source else 0
    own_ids = {id(s) for s in source}
    pad_source = source[start:] + source[:start] + [s for s in order if id(s) not in own_ids]
    return SlotPlan(mine, own[worker] + pads[worker], pad_source, own[worker])


# --------------------------------------------------------------------------- dataset
def _shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _batched(samples: Iterable[dict], batch_size: int | None, drop_last: bool) -> Iterator[dict]:
    """Batches that never mix buckets: one pending list per bucket (by latent shape)."""
    if not batch_size:
        yield from samples
        return
    pending: dict[Any, list[dict]] = {}
    for sample in samples:
        group = pending.setdefault(sample["vae"].shape, [])
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group.clear()
    if not drop_last:
        for group in pending.values():
            if group:
                yield collate(group)


def resolve_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torch.distributed when initialised, else RANK / WORLD_SIZE."""
    env_rank, env_world = 0, 1
    try:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
    except (ImportError, RuntimeError):
        initialised = False
    if initialised:
        env_rank, env_world = dist.get_rank(), dist.get_world_size()
    else:
        try:
            env_rank = int(os.environ.get("RANK", 0))
            env_world = int(os.environ.get("WORLD_SIZE", 1))
        except ValueError as exc:
            raise ValueError(f"RANK / WORLD_SIZE must be integers: {exc}") from None
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    return rank, world_size


class ShardDataset(torch.utils.data.IterableDataset):
    """The iterable `load_shards` returns; use it directly or in a `DataLoader(ds, batch_size=None)`.

    Attributes: `urls` ({bucket: [shard url]}), `buckets`, `shards` ([ShardRef]), `rank`,
    `world_size`, `uncond` (the empty-caption T5 state with `uncond=True`, else None).
    """

    def __init__(
        self,
        shards: list[ShardRef],
        *,
        shuffle: bool,
        seed: int,
        shuffle_buffer: int,
        batch_size: int | None,
        drop_last: bool,
        interleave: bool,
        split: bool,
        rank: int,
        world_size: int,
        even_batches: bool,
        max_member_bytes: int,
        allow_compressed: bool,
        fs=None,
    ):
        super().__init__()
        self.shards = list(shards)
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.batch_size, self.drop_last, self.interleave = batch_size, drop_last, interleave
        self.split, self.rank, self.world_size, self.even_batches = split, rank, world_size, even_batches
        self.max_member_bytes, self.allow_compressed, self.fs = max_member_bytes, allow_compressed, fs
        self.epoch, self._auto_epoch = 0, True
        self.uncond: dict | None = None
        self.urls: dict[str, list[str]] = {}
        for shard in self.shards:
            self.urls.setdefault(shard.bucket, []).append(shard.url)
        self.buckets = list(self.urls)

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's shard order (like DistributedSampler.set_epoch); needed with DataLoader
        workers that are not persistent, since their copy of the dataset never sees the last epoch."""
        self.epoch, self._auto_epoch = int(epoch), False

    def plan(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None) -> SlotPlan:
        return plan_epoch(
            self.shards,
            epoch=self.epoch if epoch is None else epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            interleave=self.interleave,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            even=self.even_batches,
        )

    def batches_per_rank(self, num_workers: int = 0) -> int:
        """Items (batches, or samples) this rank yields per epoch with `num_workers` DataLoader workers."""
        workers = max(num_workers, 1)
        plans = [self.plan(w, workers) for w in range(workers)]
        if all(p.quota is not None for p in plans):
            return sum(p.quota for p in plans)
        return sum(_slot_units(p.shards, self.batch_size, self.drop_last) for p in plans)

    def _samples(self, shards: Iterable[ShardRef]) -> Iterator[dict]:
        for shard in shards:
            expected = _latent_shape(shard.bucket)
            with _open_url(shard.url, self.fs) as stream:
                for sample in iter_tar_samples(
                    stream, shard.url, max_member_bytes=self.max_member_bytes, allow_compressed=self.allow_compressed
                ):
                    if expected is not None and sample["vae"].shape != expected:
                        raise ShardError(
                            f"sample {sample['key']!r} in {shard.url}: vae shape {sample['vae'].shape} does not "
                            f"match its bucket {shard.bucket} {expected}"
                        )
                    yield sample

    def _items(self, shards: list[ShardRef], rng: random.Random) -> Iterator[dict]:
        if self.interleave:
            groups = [shards]
        else:
            groups = []
            for shard in shards:
                if groups and groups[-1][-1].bucket == shard.bucket:
                    groups[-1].append(shard)
                else:
                    groups.append([shard])
        for group in groups:  # one shuffle buffer alive at a time
            samples = self._samples(group)
            if self.shuffle and self.shuffle_buffer > 1:
                samples = _shuffled(samples, self.shuffle_buffer, rng)
            yield from _batched(samples, self.batch_size, self.drop_last)

    def _padding(self, shards: list[ShardRef]) -> Iterator[dict]:
        while True:
            produced = False
            for item in _batched(self._samples(shards), self.batch_size, self.drop_last):
                produced = True
                yield item
            if not produced:
                raise RuntimeError("cannot pad this rank's epoch: the shards yield no complete batch")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        if self._auto_epoch:
            self.epoch += 1
        plan = self.plan(worker, num_workers, epoch)
        rng = random.Random(_mix(self.seed, epoch, self.rank, worker))
        items = self._items(plan.shards, rng)
        if plan.quota is None:
            yield from items
            return
        done = 0
        for item in items:
            if done == plan.quota:
                logger.warning(
                    "rank %d worker %d: the shards hold more samples than index.json says; stopping at %d items "
                    "so every rank yields the same number", self.rank, worker, plan.quota,
                )
                items.close()
                return
            yield item
            done += 1
        if done < plan.quota:
            if plan.planned is not None and done < plan.planned:
                logger.warning("rank %d worker %d: shards held fewer samples than index.json says", self.rank, worker)
            yield from islice(self._padding(plan.pad), plan.quota - done)


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def load_shards(
    path_or_hub_id: str | Path,
    bucket: str | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    batch_size: int | None = None,
    drop_last: bool = False,
    interleave: bool = False,
    split: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    even_batches: bool = True,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    allow_compressed: bool = False,
    uncond: bool = False,
    revision: str | None = None,
    fs=None,
) -> ShardDataset:
    """An iterable over an export (a torch IterableDataset: `DataLoader(it, batch_size=None, num_workers=N)`).

    Samples are dicts: `key`, `json` (dict), `dinov3`, `vae`, `t5_hidden`, `t5_mask` (numpy,
    on-disk dtypes: float32, float16, float16, uint8). With `batch_size`, each item is a batch of
    one bucket: `key`/`json` lists and stacked arrays (a short last batch per bucket is kept
    unless `drop_last`). `bucket=None` reads every bucket: one after another, or with
    `interleave=True` mixed (shards of all buckets in one order); a batch never mixes buckets.
    `shuffle` shuffles the shard order per epoch and samples in a `shuffle_buffer`-sized buffer
    of decoded samples (about 675 KiB each at 1024^2: mind the memory per worker).

    Splitting (`split=True`): each rank takes its own shards and each DataLoader worker its
    part of them; `rank`/`world_size` default to torch.distributed, else RANK / WORLD_SIZE.
    With `even_batches` (default) every rank yields the same number of items per epoch, padding
    a short rank with repeated samples of its own shards (see `batches_per_rank`). All ranks must
    use the same num_workers. `split=False`: every rank reads the whole export (DataLoader
    workers still share it out). Call `set_epoch(e)` each epoch with non-persistent workers.

    Safety: tars are read uncompressed (`allow_compressed=True` to accept gzip/bz2/xz),
    members over `max_member_bytes` (by their header) or that are not regular files with safe
    names are refused with a ShardError (a ValueError) naming shard and member, `.npy` headers
    are checked against the payload size, and nothing is unpickled.

    `uncond=True` also loads the export's empty-caption T5 state (see `load_uncond`) into `.uncond`.
    """
    _check_positive(batch_size=batch_size, max_member_bytes=max_member_bytes)
    shards = list_shards(path_or_hub_id, bucket, revision=revision, fs=fs)
    rank, world_size = resolve_rank_world(rank, world_size) if split else (0, 1)
    if world_size > 1 and even_batches:
        shards = _counted(shards, fs, allow_compressed)
    dataset = ShardDataset(
        shards, shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer, batch_size=batch_size,
        drop_last=drop_last, interleave=interleave, split=split, rank=rank, world_size=world_size,
        even_batches=even_batches, max_member_bytes=max_member_bytes, allow_compressed=allow_compressed, fs=fs,
    )
    if uncond:
        dataset.uncond = load_uncond(path_or_hub_id, revision=revision, fs=fs)
    return dataset


def _counted(shards: list[ShardRef], fs, allow_compressed: bool) -> list[ShardRef]:
    """Shards with their sample counts: without index.json (a bare folder), counted once from the
    tar headers, so the epoch can be split evenly across ranks."""
    return [
        s if s.samples is not None
        else ShardRef(s.bucket, s.url, count_samples(s.url, fs=fs, allow_compressed=allow_compressed))
        for s in shards
    ]


# ------------------------------------------------------------------------ uncond
def _uncond_entry(meta: dict, where: str) -> tuple[str, dict]:
    entry = meta.get("uncond") if isinstance(meta, dict) else None
    if entry is None:
        raise FileNotFoundError(
            f"{where} names no unconditional (empty-caption) T5 state: it has no 'uncond' entry"
        )
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ShardError(f"{where}: 'uncond' must be a relative path or an object with a 'path'")
    try:
        check_member_name(entry["path"])
    except ValueError as exc:
        raise ShardError(f"{where}: 'uncond' path: {exc}") from None
    return entry["path"], entry


def parse_uncond(data: bytes, name: str, entry: dict | None = None) -> dict:
    """The uncond file's bytes -> dict(t5_hidden=(77, 1024) float16, t5_mask=(77,) uint8, caption=str).

    Formats by suffix: `.safetensors` (tensors `t5_hidden`, `t5_mask`) or `.npz` (same names,
    read without pickle).
    """
    entry = entry or {}
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"{name}: sha256 does not match the one recorded for it")
    try:
        if name.endswith(".safetensors"):
            from safetensors.numpy import load

            arrays = load(bytes(data))
        elif name.endswith(".npz"):
            arrays = _read_npz(data, name)
        else:
            raise ShardError(f"{name}: unknown uncond file type (expected .safetensors or .npz)")
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file is one clear error
        raise ShardError(f"{name}: not a readable uncond file ({type(exc).__name__}: {exc})") from None
    hidden, mask = arrays.get("t5_hidden"), arrays.get("t5_mask")
    if hidden is None or mask is None:
        raise ShardError(f"{name}: needs arrays 't5_hidden' and 't5_mask', has {sorted(arrays)}")
    if hidden.shape != T5_SHAPE or hidden.dtype != np.float16:
        raise ShardError(f"{name}: t5_hidden must be float16 {T5_SHAPE}, got {hidden.dtype} {hidden.shape}")
    if mask.shape != T5_SHAPE[:1] or mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
        raise ShardError(f"{name}: t5_mask must be 0/1 integers of shape {T5_SHAPE[:1]}, got {mask.dtype} {mask.shape}")
    return {"t5_hidden": hidden, "t5_mask": mask.astype(np.uint8), "caption": str(entry.get("caption", ""))}


def _read_npz(data: bytes, name: str) -> dict[str, np.ndarray]:
    """An .npz archive's arrays via zipfile + decode_npy (sizes checked before inflating; no pickle)."""
    import zipfile

    arrays = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy") or info.file_size > UNCOND_MAX_BYTES:
                raise ShardError(f"{name}: unexpected member {info.filename!r} ({info.file_size} bytes)")
            arrays[info.filename.removesuffix(".npy")] = decode_npy(
                bytearray(archive.read(info)), f"{name} member {info.filename!r}"
            )
    return arrays


def load_uncond(path_or_hub_id: str | Path, *, revision: str | None = None, fs=None) -> dict:
    """The unconditional (empty-caption) T5 state for classifier-free guidance training.

    `path_or_hub_id`: an export folder or Hub dataset id whose index.json names the file under
    "uncond" (a relative path, or {"path": ..., "sha256": ..., "caption": ""}); a derived dir
    whose prep_metadata.json does; or the file itself. Returns dict(t5_hidden=(77, 1024)
    float16, t5_mask=(77,) uint8, caption=""). FileNotFoundError when nothing names one.
    """
    local = Path(path_or_hub_id).expanduser()
    if local.is_file():
        return parse_uncond(_read_capped(local), str(local))
    if local.is_dir():
        for meta_name in (INDEX_FILE, METADATA_FILE):
            meta_path = local / meta_name
            if meta_path.is_file():
                relative, entry = _uncond_entry(_read_index_file(meta_path), str(meta_path))
                return parse_uncond(_read_capped(local / relative), str(local / relative), entry)
        raise FileNotFoundError(f"{local} has no {INDEX_FILE} (or {METADATA_FILE}) naming an uncond file")
    _, root = _hub_root(str(path_or_hub_id), revision)
    fs = _hub_fs(fs)
    index = _hub_read_index(root, fs)
    if index is None:
        raise FileNotFoundError(f"hf://{root} has no {INDEX_FILE}")
    relative, entry = _uncond_entry(index, f"hf://{root}/{INDEX_FILE}")
    url = f"hf://{root}/{relative}"
    with fs.open(url, "rb") as f:
        data = f.read(UNCOND_MAX_BYTES + 1)
    if len(data) > UNCOND_MAX_BYTES:
        raise ShardError(f"{url}: over {UNCOND_MAX_BYTES} bytes, not an uncond file")
    return parse_uncond(data, url, entry)


def _read_capped(path: Path) -> bytes:
    if path.stat().st_size > UNCOND_MAX_BYTES:
        raise ShardError(f"{path}: over {UNCOND_MAX_BYTES} bytes, not an uncond file")
    return path.read_bytes()
