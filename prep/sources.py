"""Where an image's bytes come from: one locator string per record (`image_path`), one reader.

A record's `image_path` is a *locator*. Four kinds:

| kind | `image_path` | read by |
|---|---|---|
| a file | `/abs/images/cat.jpg` (a plain path) | `open_regular` (regular files only) |
| a WebDataset tar member | `tar:///abs/data/00001.tar?offset=1536&size=4521#000010012.jpg` | one seek + read at `offset` |
| a row of a local `datasets` folder | `hfds:///abs/ds/train/12#image` (split, row, image column) | Arrow / parquet row lookup |
| a row of a Hub dataset | `hf://datasets/OWNER/NAME@COMMIT/train/12#image` | parquet row group via `HfFileSystem` |

`open_image(locator)` gives a binary file object for any of them (the passes' decode, the
report), `image_fingerprint(locator, previous)` its fingerprint {size, mtime_ns, sha256}
(the workers' and the manifest preparation's change detection). Every reader keeps the
local-file safety rules: a FIFO, device or directory is refused before a byte is read.

Change detection without a file of its own: `mtime_ns` is the modification time of the
*container* (the tar, or the newest data file of a local dataset); while it and the size are
unchanged the old sha256 stands, otherwise the bytes are read and hashed again. A Hub row
is pinned to a commit, which never changes: its fingerprint has no `mtime_ns`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO
from urllib.parse import quote, unquote, urlsplit

from prep.fsio import open_regular

TAR, LOCAL_DATASET, HUB_DATASET = "tar", "hfds", "hf"
SCHEMES = (TAR, LOCAL_DATASET, HUB_DATASET)
TAR_BLOCK = 512
MAX_IMAGE_BYTES = 1 << 31  # a member or row larger than this is not an image prep will hold in memory


class SourceError(OSError):
    """The bytes a locator names cannot be read (gone, moved, or not what the record says)."""


def is_uri(locator: str) -> bool:
    """A locator with a scheme (tar://, hfds://, hf://) rather than a local file path."""
    return "://" in locator


def scheme_of(locator: str) -> str | None:
    return locator.split("://", 1)[0] if is_uri(locator) else None


# ------------------------------------------------------------------------------ locators
@dataclass(frozen=True)
class TarMember:
    """A member of an uncompressed tar: where its data starts and how long it is."""

    tar: str  # absolute path of the tar
    member: str  # the member's name in the tar
    offset: int  # byte offset of the member's data (its header is the 512 bytes before)
    size: int

    @property
    def identity(self) -> str:
        return tar_identity(self.tar, self.member)

    @property
    def locator(self) -> str:
        return f"{self.identity.split('#', 1)[0]}?offset={self.offset}&size={self.size}#{quote(self.member)}"


def tar_identity(tar: str, member: str) -> str:
    """`tar://<abs path>#<member>`: a member's name, whatever its offset (what a rescan matches on)."""
    return f"tar://{quote(os.path.abspath(tar))}#{quote(member)}"


def identity_of(locator: str) -> str:
    """The locator without what may change when its container is rewritten (a tar member's offset)."""
    if locator.startswith("tar://"):
        parts = urlsplit(locator)
        return f"tar://{parts.path}#{parts.fragment}"
    if locator.startswith("hf://"):  # the same row of another commit of the same dataset
        row = parse_row(locator)
        return f"hf://datasets/{row.dataset}/{quote(row.split)}/{row.row}#{quote(row.column)}"
    return locator


@functools.lru_cache(maxsize=1 << 16)
def parse_tar(locator: str) -> TarMember:
    """The member a `tar://PATH?offset=N&size=N#MEMBER` locator names (cached: workers parse each
    locator several times; urllib's parser alone cost more than reading the member)."""
    head, _, fragment = locator.partition("#")
    path, _, query = head[len("tar://"):].partition("?")
    fields = dict(item.partition("=")[::2] for item in query.split("&")) if query else {}
    try:
        offset, size = int(fields["offset"]), int(fields["size"])
    except (KeyError, ValueError):
        raise SourceError(f"{locator}: a tar locator needs ?offset=N&size=N") from None
    if not locator.startswith("tar://") or not fragment or offset < TAR_BLOCK or size < 0:
        raise SourceError(f"{locator}: not a tar member locator")
    return TarMember(_unquote(path), _unquote(fragment), offset, size)


def _unquote(text: str) -> str:
    return unquote(text) if "%" in text else text


@dataclass(frozen=True)
class DatasetRow:
    """One row of a `datasets` dataset: a local folder (`hfds`) or a Hub repo at a commit (`hf`)."""

    scheme: str
    dataset: str  # absolute folder (hfds) or OWNER/NAME (hf)
    revision: str | None  # the Hub commit (hf only)
    split: str
    row: int
    column: str

    @property
    def locator(self) -> str:
        column = quote(self.column)
        if self.scheme == HUB_DATASET:
            return f"hf://datasets/{self.dataset}@{self.revision}/{quote(self.split)}/{self.row}#{column}"
        return f"hfds://{quote(self.dataset)}/{quote(self.split)}/{self.row}#{column}"


def parse_row(locator: str) -> DatasetRow:
    parts = urlsplit(locator)
    scheme = parts.scheme
    try:
        if scheme == HUB_DATASET:
            if parts.netloc != "datasets":
                raise ValueError
            head, split, row = parts.path.lstrip("/").rsplit("/", 2)
            dataset, revision = head.rsplit("@", 1)
        else:
            head, split, row = parts.path.rsplit("/", 2)
            dataset, revision = unquote(head), None
        return DatasetRow(scheme, dataset, revision, unquote(split), int(row), unquote(parts.fragment) or "image")
    except ValueError:
        raise SourceError(f"{locator}: not a dataset row locator ({scheme}://.../SPLIT/ROW#COLUMN)") from None


# ------------------------------------------------------------------------------ reading
def open_image(locator: str) -> IO[bytes]:
    """A binary file object holding the image bytes `locator` names (the one reader every pass uses).

    Files: `open_regular` (regular files only). Tar members: one seek and read, after checking
    the tar header just before the data names this member with this size. Dataset rows: the
    row's bytes (see `prep.hfdatasets`). Raises OSError (SourceError, NotARegularFile) when the
    bytes cannot be had.
    """
    kind = scheme_of(locator)
    if kind is None:
        return open_regular(locator)
    return io.BytesIO(read_image_bytes(locator))


def read_image_bytes(locator: str) -> bytes:
    kind = scheme_of(locator)
    if kind is None:
        with open_regular(locator) as f:
            return f.read()
    if kind == TAR:
        return read_tar_member(parse_tar(locator))
    if kind in (LOCAL_DATASET, HUB_DATASET):
        from prep.hfdatasets import read_row_bytes

        return read_row_bytes(parse_row(locator))
    raise SourceError(f"{locator}: unknown locator scheme {kind!r} (known: {', '.join(SCHEMES)})")


def read_tar_member(member: TarMember) -> bytes:
    """The member's bytes, read at its recorded offset after its header is checked (name, size)."""
    import tarfile

    if member.size > MAX_IMAGE_BYTES:
        raise SourceError(f"{member.tar}: member {member.member!r} is {member.size} bytes, over {MAX_IMAGE_BYTES}")
    fd = _TAR_HANDLES.fd(member.tar)
    block = os.pread(fd, TAR_BLOCK, member.offset - TAR_BLOCK)
    try:
        name, size = ustar_name_and_size(block)
    except (tarfile.HeaderError, ValueError) as exc:
        raise SourceError(f"{member.tar}: no tar header before offset {member.offset} ({exc}); "
                          "the tar was rewritten since it was indexed") from None
    if size != member.size or not _same_member_name(name, member.member):
        raise SourceError(f"{member.tar}: the member at offset {member.offset} is {name!r} "
                          f"({size} bytes), not {member.member!r} ({member.size} bytes)")
    data = os.pread(fd, member.size, member.offset)
    if len(data) != member.size:
        raise SourceError(f"{member.tar}: member {member.member!r} is truncated")
    return data


def ustar_name_and_size(block: bytes) -> tuple[str, int]:
    """Name and size of a tar header block, its checksum verified (5x faster than TarInfo.frombuf).

    Sizes in GNU base-256 and anything unusual go through `tarfile` itself.
    """
    import tarfile

    if len(block) != TAR_BLOCK:
        raise ValueError("truncated header")
    try:
        stored, size = int(block[148:154], 8), int(block[124:135], 8)  # the usual "%06o\0 " and "%011o\0"
    except ValueError:
        header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # other encodings of the fields
        return header.name, header.size
    if stored != sum(block) - sum(block[148:156]) + 256:
        raise ValueError("bad checksum")
    end = block.find(b"\0", 0, 100)
    name = block[: 100 if end < 0 else end]
    if block[257:262] == b"ustar" and block[345]:
        end = block.find(b"\0", 345, 500)
        name = block[345 : 500 if end < 0 else end] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size


class _OpenTars:
    """A few tars kept open per process, so reading a member costs a stat and two preads, not an open.

    A handle is reused only while the path still names the same file (device, inode, size,
    mtime); otherwise the tar is opened again through `open_regular` (regular files only).
    The oldest of `keep` open tars is closed first (a worker reads tars mostly in order).
    Handles of a parent process are never used in a forked worker.
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.handles: OrderedDict = OrderedDict()

    def fd(self, path: str) -> int:
        st = os.stat(path)
        key = (self.pid, path)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        held = self.handles.get(key)
        if held is not None and held[1] == identity:
            return held[2]
        if held is not None:
            self._close(key)
        handle = open_regular(path)
        self.handles[key] = (handle, identity, handle.fileno())
        while len(self.handles) > self.keep:
            self._close(next(iter(self.handles)))
        return handle.fileno()

    @property
    def pid(self) -> int:
        return os.getpid()

    def _close(self, key) -> None:
        handle = self.handles.pop(key)[0]
        if key[0] == os.getpid():
            handle.close()


_TAR_HANDLES = _OpenTars()


def _same_member_name(in_header: str, wanted: str) -> bool:
    """A long name (pax / GNU header before) leaves only its first 100 bytes in the member's own header."""
    if in_header == wanted:
        return True
    return len(wanted.encode("utf-8")) >= 100 and bool(in_header) and wanted.startswith(in_header.rstrip("\x00"))


def image_exists(locator: str) -> bool:
    """Whether the locator's container is there (a cheap check; reading can still fail)."""
    kind = scheme_of(locator)
    try:
        if kind is None:
            return os.path.isfile(locator)
        if kind == TAR:
            return os.path.isfile(parse_tar(locator).tar)
        if kind == LOCAL_DATASET:
            return os.path.isdir(parse_row(locator).dataset)
        return kind == HUB_DATASET
    except SourceError:
        return False


# --------------------------------------------------------------------------- fingerprints
def container_mtime(locator: str) -> int | None:
    """The modification time that stands for the locator's bytes (None: immutable, a Hub commit)."""
    kind = scheme_of(locator)
    if kind is None:
        return os.stat(locator).st_mtime_ns
    if kind == TAR:
        return os.stat(parse_tar(locator).tar).st_mtime_ns
    if kind == LOCAL_DATASET:
        from prep.hfdatasets import local_version_mtime

        return local_version_mtime(parse_row(locator))
    return None


def declared_size(locator: str) -> int | None:
    """The size the locator itself records (tar members), else None."""
    return parse_tar(locator).size if scheme_of(locator) == TAR else None


def image_fingerprint(locator: str, previous: dict | None, data: bytes | None = None) -> dict | None:
    """{size, mtime_ns, sha256} of the locator's bytes, re-hashing only when its container changed.

    Files: the file's size and mtime (`provenance.refresh_fingerprint`). Tar members and local
    dataset rows: the member's size and the container's mtime; a Hub row: the previous one as
    long as it has a sha256 (the commit pins the bytes). None when the bytes are gone. `data`:
    the bytes when the caller has just read them (hashed instead of read again).
    """
    kind = scheme_of(locator)
    if kind is None:
        from prep.provenance import refresh_file_fingerprint

        return refresh_file_fingerprint(locator, previous)
    try:
        if kind == TAR:
            member = parse_tar(locator)
            mtime, size = os.stat(member.tar).st_mtime_ns, member.size
        else:
            mtime, size = container_mtime(locator), None
    except (OSError, ValueError):
        return None
    if (
        isinstance(previous, dict)
        and previous.get("sha256")
        and previous.get("mtime_ns") == mtime
        and (size is None or previous.get("size") == size)
    ):
        return previous
    if data is None:
        try:
            data = read_image_bytes(locator)
        except OSError:
            return None
    return bytes_fingerprint(data, mtime)


def bytes_fingerprint(data: bytes, mtime_ns: int | None) -> dict:
    return {"size": len(data), "mtime_ns": mtime_ns, "sha256": hashlib.sha256(data).hexdigest()}


# ------------------------------------------------------------------------ showing paths
def local_path_of(locator: str) -> str | None:
    """The local file or folder a locator lives in (None for a Hub row)."""
    kind = scheme_of(locator)
    if kind is None:
        return locator
    if kind == TAR:
        return parse_tar(locator).tar
    if kind == LOCAL_DATASET:
        return parse_row(locator).dataset
    return None


def relative_locator(locator: str, start: str) -> str:
    """The locator with its local part relative to `start`, for an export that must not leak paths.

    A file: `os.path.relpath`. A tar member: `tar:REL/00001.tar#key.jpg` (offset dropped: it is
    an index, not an identity). A local dataset row: `hfds:REL/train/12#image`. A Hub row is
    public and unchanged. The relative forms have no `//`, so nothing treats them as absolute.
    """
    kind = scheme_of(locator)
    if kind is None:
        return os.path.relpath(locator, start)
    if kind == TAR:
        member = parse_tar(locator)
        return f"tar:{quote(os.path.relpath(member.tar, start))}#{quote(member.member)}"
    if kind == LOCAL_DATASET:
        row = parse_row(locator)
        return f"hfds:{quote(os.path.relpath(row.dataset, start))}/{quote(row.split)}/{row.row}#{quote(row.column)}"
    return locator
