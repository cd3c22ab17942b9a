"""Deterministic, atomic shard writing: one tar per planned shard, then its done-sidecar.

Tar headers are built directly as bytes, exactly as `tarfile` (GNU format) writes them for
a regular file with mtime 0, uid/gid 0, empty owner names and mode 0644 (names over 100
bytes get a GNU `././@LongLink` record), so the same plan and inputs give byte-identical
tars. Every byte is sha256-hashed as it streams to the file, so index.json's sha256 costs no
second read. A shard is written to a temp file beside its final name and renamed when
complete (fsync); only then is its sidecar written. `process_shard` is what a worker
process runs: it keeps a complete matching shard on resume, else writes it.

Each side file is read once into memory and checked before its bytes go into the tar
(`store.read_side_file`); a sample with a missing or invalid file (NaN/Inf values, wrong
shape, dtype, size, Fortran order) is skipped and reported, never shipped. The members of a
sample follow the artifact table (`prep.stages.artifacts()`): `{key}.json`, then one member
per artifact, side files as their bytes and record fields (the T5 mask) as a small .npy. Whether a sample
is skipped depends only on its files, so the output stays deterministic; the sidecar keeps
the skipped keys and reasons, so a resumed export reports the same counts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prep import stages, store
from prep.export.fields import JSON_FIELDS, JsonLayout, check_key, record_array_member
from prep.export.plan import shard_relpath
from prep.export.resume import kept_shard, write_sidecar
from prep.export.workers import shared
from prep.fsio import atomic_open

EXPORT_FORMAT = "prep-webdataset"
EXPORT_FORMAT_VERSION = 1
# In the resume fingerprint: shards written by an older writer (which checked less) are rewritten.
WRITER_VERSION = 2


def members(derived: str | Path) -> tuple[str, ...]:
    """The member suffixes of every sample, in tar order: json, then the dataset's artifacts'."""
    return ("json", *(a.member for a in dataset_table(str(derived)).values()))


@functools.lru_cache(maxsize=8)
def dataset_table(derived: str) -> dict:
    """The artifact table of this dataset (optional stages only when it ran them)."""
    return stages.artifacts(store.active_stages(derived))


BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the archive to a multiple of this (like `tar -b20`)
_NUL = bytes(RECORD)
WRITEBACK_EVERY = 32 << 20  # start the writeback of a shard being written every 32 MB
_GNU_MAGIC = b"ustar  \x00"
_LONGNAME = b"L"
_REGULAR = b"0"


# ------------------------------------------------------------------------ tar headers
def _number(n: int, digits: int, gnu: bool) -> bytes:
    """tarfile's itn(): octal digits + NUL, or (GNU) base-256 with a 0x80 lead byte when too big."""
    if 0 <= n < 8 ** (digits - 1):
        return b"%0*o\x00" % (digits - 1, n)
    if gnu and 0 <= n < 256 ** (digits - 1):
        return b"\x80" + n.to_bytes(digits - 1, "big")
    raise ValueError(f"overflow in tar number field: {n}")


def _block(name: bytes, size: int, typeflag: bytes, mode: int, gnu: bool) -> bytes:
    """One 512-byte header block, laid out and checksummed like tarfile's _create_header."""
    buf = b"".join((
        name[:100].ljust(100, b"\x00"),
        _number(mode, 8, gnu),
        _number(0, 8, gnu),  # uid
        _number(0, 8, gnu),  # gid
        _number(size, 12, gnu),
        _number(0, 12, gnu),  # mtime
        b"        ",  # checksum placeholder: eight spaces
        typeflag,
        bytes(100),  # linkname
        _GNU_MAGIC,
        bytes(32 + 32 + 8 + 8 + 155),  # uname, gname, devmajor, devminor (no device), prefix
    )).ljust(BLOCK, b"\x00")
    return buf[:148] + b"%06o\x00" % sum(buf) + buf[155:]


# The header of a regular file of ours around its two variable fields (name, size), and the
# sum of its fixed bytes (the checksum counts the checksum field as eight spaces).
_AFTER_NAME = _number(0o644, 8, True) + _number(0, 8, True) + _number(0, 8, True)  # mode, uid, gid
_AFTER_SIZE = _number(0, 12, True)  # mtime
_TAIL = _REGULAR + bytes(100) + _GNU_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)  # typeflag ... padding
_FIXED_SUM = sum(_AFTER_NAME) + sum(_AFTER_SIZE) + sum(b"        ") + sum(_TAIL)
_PADDING = [bytes(n) for n in range(BLOCK)]


@functools.lru_cache(maxsize=4096)
def _size_field(size: int) -> tuple[bytes, int]:
    field = _number(size, 12, True)
    return field, sum(field)


def member_header(name: str, size: int) -> bytes:
    """The header blocks tarfile (GNU_FORMAT, utf-8) writes for a regular file `name` of `size` bytes."""
    raw = name.encode("utf-8")
    if len(raw) <= 100:  # the common case, without building the fixed fields again
        field, field_sum = _size_field(size)
        checksum = b"%06o\x00 " % (_FIXED_SUM + sum(raw) + field_sum)
        return b"".join((raw, _PADDING[100 - len(raw)], _AFTER_NAME, field, _AFTER_SIZE, checksum, _TAIL))
    long_name = raw + b"\x00"
    return (
        _block(b"././@LongLink", len(long_name), _LONGNAME, 0, gnu=False)
        + long_name + _PADDING[-len(long_name) % BLOCK]
        + _block(raw, size, _REGULAR, 0o644, gnu=True)
    )


def _write_all(fd: int, pieces: list) -> None:
    """os.writev until every byte of `pieces` is written (a short write continues where it stopped)."""
    while pieces:
        written = os.writev(fd, pieces[:512])  # at most IOV_MAX buffers per call
        while pieces and written >= len(pieces[0]):
            written -= len(pieces[0])
            pieces.pop(0)
        if written:
            pieces[0] = memoryview(pieces[0])[written:]


class TarStream:
    """Writes tar members to a binary file, sha256-hashing and counting every byte on the way.

    One os.writev per sample on a real file (straight to its descriptor); `write` otherwise.
    """

    def __init__(self, f):
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.flushed = 0  # bytes handed to the kernel's writeback so far
        try:
            f.flush()
            self.fd, self.f = (f.fileno(), None) if hasattr(os, "writev") else (None, f)
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.fd, self.f = None, f

    def _put(self, pieces: list) -> None:
        for piece in pieces:
            self.sha.update(piece)
            self.nbytes += len(piece)
        if self.fd is None:
            for piece in pieces:
                self.f.write(piece)
            return
        _write_all(self.fd, pieces)
        if self.nbytes - self.flushed >= WRITEBACK_EVERY:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Let the kernel write what is written so far (async), so the final fsync has little left.

        POSIX_FADV_DONTNEED starts writeback of the range's dirty pages without waiting, and
        drops the pages already clean: a shard does not push the side files out of the cache.
        """
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(self.fd, 0, self.nbytes, os.POSIX_FADV_DONTNEED)
        self.flushed = self.nbytes

    def add_members(self, members: list[tuple[str, bytes]]) -> None:
        """Append members (name, payload), each a header, its payload and zeros to a block boundary."""
        pieces = []
        for name, payload in members:
            pieces += (member_header(name, len(payload)), payload, _PADDING[-len(payload) % BLOCK])
        self._put(pieces)

    def add(self, name: str, payload: bytes) -> None:
        self.add_members([(name, payload)])

    def finish(self) -> None:
        """Two zero blocks, then zeros up to a multiple of RECORD bytes, as TarFile.close() writes."""
        end = 2 * BLOCK
        end += -(self.nbytes + end) % RECORD
        self._put([_NUL[:end]])


# ---------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class WriteContext:
    """What every shard of one export shares (sent to worker processes with each task)."""

    out: str
    derived: str
    layout: JsonLayout = JsonLayout(JSON_FIELDS, image_path="absolute")
    resume: bool = False
    verify: bool = True


@dataclass
class ShardTask:
    """One planned shard: its manifest rows, in order, and their records, or the token of the pool
    sharing the manifest they are read from (`prep.export.workers.shared`); `listed`: its entry
    in a previous index.json."""

    bucket: str
    index: int
    rows: list[int]
    records: list[dict] | int
    listed: dict | None = field(default=None)

    @property
    def relpath(self) -> str:
        return shard_relpath(self.bucket, self.index)

    def load(self) -> list[dict]:
        if isinstance(self.records, int):
            manifest = shared(self.records)
            self.records = [manifest.record(row) for row in self.rows]
        return self.records


def fingerprint_hasher():
    return hashlib.sha256(f"{EXPORT_FORMAT}/{EXPORT_FORMAT_VERSION}/writer-{WRITER_VERSION}\n".encode())


def _stat_line(kind: str, st: os.stat_result | None) -> bytes:
    return f"{kind}:missing\n".encode() if st is None else f"{kind}:{st.st_size}:{st.st_mtime_ns}\n".encode()


def read_side_file(path: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[bytes | None, str, os.stat_result | None]:
    """(the file's bytes, "", stat) when it is a valid side file, else (None, why, stat or None)."""
    try:
        st = os.stat(path)
        return store.read_side_file(path, shape, dtype), "", st
    except FileNotFoundError:
        return None, "missing", None
    except store.BadArray as exc:
        return None, f"invalid: {exc}", st
    except OSError as exc:
        return None, f"invalid: {type(exc).__name__}", None


def _side_file(derived: str, artifact, key: str) -> str:
    return f"{derived}{os.sep}{artifact.folder}{os.sep}{key}.npy"


def sample_members(ctx: WriteContext, record: dict, fp) -> tuple[list[tuple[str, bytes]] | None, str]:
    """(the (name, bytes) members of one sample in tar order, "") or (None, why it is skipped).

    A sample is skipped when one of its side files is missing or invalid (`store.read_side_file`:
    header, shape, dtype, size, finite values): "<kind> invalid: <reason>". What identifies
    the sample's content (JSON, side-file sizes and mtimes, record arrays) goes to `fp` either way.
    """
    key = check_key(record.get("image_id"))
    data = ctx.layout.member(record)
    fp.update(data)
    out, skip = [(f"{key}.json", data)], ""
    for kind, artifact in dataset_table(ctx.derived).items():
        if artifact.record_field is not None:
            payload = record_array_member(artifact, record)
            fp.update(payload)
        else:
            payload, why, st = read_side_file(_side_file(ctx.derived, artifact, key), artifact.shape_for(record),
                                              artifact.dtype)
            fp.update(_stat_line(kind, st))
            skip = skip or (f"{kind} {why}" if payload is None else "")
        out.append((f"{key}.{artifact.member}", payload))
    return (None, skip) if skip else (out, "")


def planned_fingerprint(ctx: WriteContext, records: list[dict]) -> str:
    """The fingerprint `write_shard` gives a shard of these records if the side files stay as they are."""
    fp = fingerprint_hasher()
    for record in records:
        key = check_key(record.get("image_id"))
        fp.update(ctx.layout.member(record))
        for kind, artifact in dataset_table(ctx.derived).items():
            if artifact.record_field is not None:
                fp.update(record_array_member(artifact, record))
                continue
            try:
                st = os.stat(_side_file(ctx.derived, artifact, key))
            except FileNotFoundError:
                st = None
            fp.update(_stat_line(kind, st))
    return fp.hexdigest()


class _LazyShard:
    """The temp file of a shard, opened at the first sample written (an all-skipped shard has no file)."""

    def __init__(self, final: Path, stack: contextlib.ExitStack):
        self.final, self.stack, self.tar = final, stack, None

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self.tar is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tar = TarStream(self.stack.enter_context(atomic_open(self.final, "wb")))
        self.tar.add_members(members)


def write_shard(ctx: WriteContext, task: ShardTask) -> dict:
    """Write one shard atomically (temp + fsync + rename), then its sidecar; returns its index entry.

    Samples whose side files fail the checks are left out (listed in the entry's "skipped"
    with the reason); a shard left with no sample gets no file (and an old one is removed).
    """
    out, fp = Path(ctx.out), fingerprint_hasher()
    keys, skipped = [], []
    with contextlib.ExitStack() as stack:  # on an exception atomic_open deletes the temp file
        shard = _LazyShard(out / task.relpath, stack)
        for record in task.load():
            members, why = sample_members(ctx, record, fp)
            if members is None:
                skipped.append([record["image_id"], why])
                continue
            shard.add(members)
            keys.append(record["image_id"])
        if shard.tar is not None:
            shard.tar.finish()
    if shard.tar is None:
        with contextlib.suppress(FileNotFoundError):
            (out / task.relpath).unlink()
    info = {
        "bucket": task.bucket,
        "path": task.relpath,
        "samples": len(keys),
        "bytes": 0 if shard.tar is None else shard.tar.nbytes,
        "sha256": "" if shard.tar is None else shard.tar.sha.hexdigest(),
        "fingerprint": fp.hexdigest(),
        "skipped": skipped,
    }
    write_sidecar(out, {**info, "keys": keys})  # only the sidecar keeps the key list: flat memory
    return info


def process_shard(ctx: WriteContext, task: ShardTask) -> dict:
    """What a worker does with one planned shard: keep a complete matching copy (resume), else write it.

    Returns the shard's index entry plus "kept" (True when the copy on disk was kept) and
    "skipped" ([key, reason] of the samples left out).
    """
    if ctx.resume:
        fingerprint = planned_fingerprint(ctx, task.load())
        kept = kept_shard(Path(ctx.out), task.relpath, fingerprint, verify=ctx.verify, listed=task.listed)
        if kept is not None:
            return {**kept, "kept": True}
    return {**write_shard(ctx, task), "kept": False}


def check_shard(ctx: WriteContext, task: ShardTask) -> bool:
    """True when a complete copy of this planned shard is on disk (what a resume would keep)."""
    fingerprint = planned_fingerprint(ctx, task.load())
    return kept_shard(Path(ctx.out), task.relpath, fingerprint, verify=ctx.verify, listed=task.listed) is not None
