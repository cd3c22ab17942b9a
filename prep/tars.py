"""WebDataset tars as input (img2dataset's output): samples with their members' offsets.

`--webdataset 'data/{00000..00099}.tar'` (a brace pattern, a glob, a folder or one tar)
names uncompressed tars. Each is read once, in order, member by member (bounded memory: one
sample at a time); members are grouped into samples by key the way WebDataset does it (the
name up to the first dot of its last component, consecutive members). A sample gives:

- its image: the first member with an image extension (`.jpg`, `.png`, `.webp`, ...); the
  record's `image_path` is `tar:///abs/00001.tar?offset=N&size=N#key.jpg`, so a pass reads it
  with one seek, and checks the tar header before the data names that member with that size;
- its caption: the `<key><--caption-extension>` member (`.txt`), else the `--caption-column`
  key of its `.json`;
- its metadata: the `.json` member's fields, kept as extra record fields.

A member that is not an image, a sample without an image, a key seen before (duplicate) or
a tar cut short skip that sample (or the rest of that tar) with a counted reason, never the
whole input. Compressed tars are refused (their members cannot be read by offset).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prep.config import IMAGE_EXTENSIONS, MAX_CAPTION_FILE_BYTES
from prep.errors import UserError
from prep.sources import TarMember

logger = logging.getLogger("prep")

MAX_JSON_MEMBER_BYTES = 1 << 20
IMAGE_PRIORITY = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class TarSample:
    """One WebDataset sample as the scan found it (or why it is skipped)."""

    key: str
    tar: str
    image: TarMember | None = None
    data: bytes | None = None  # the image bytes (for the header and the fingerprint)
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None


def expand_tars(pattern: str) -> list[str]:
    """The tars a `--webdataset` value names, in order: brace pattern, glob, folder or file."""
    from braceexpand import braceexpand

    paths: list[str] = []
    for expanded in braceexpand(pattern):
        path = os.path.expanduser(expanded)
        if os.path.isdir(path):
            paths += sorted(str(p) for p in Path(path).glob("*.tar"))
        elif glob.has_magic(path):
            paths += sorted(glob.glob(path))
        else:
            paths.append(path)
    return [os.path.abspath(p) for p in dict.fromkeys(paths)]


def check_tars(pattern: str) -> list[str]:
    """The existing tars of the pattern; UserError when none exists or one is compressed."""
    tars = expand_tars(pattern)
    existing = [t for t in tars if os.path.isfile(t)]
    if not existing:
        raise UserError(f"--webdataset {pattern}: no tar found (names {len(tars)} path(s), e.g. {tars[0] if tars else pattern})")
    for tar in existing:
        if tar.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
            raise UserError(f"--webdataset: {tar} is compressed; prep reads members by offset from plain .tar files")
    return existing


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last component."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (key, "." + ext.lower()) if key is not None else (name, "")


def iter_tar_samples(tar: str, caption_extension: str = ".txt", caption_key: str | None = None) -> Iterator[TarSample]:
    """The samples of one tar, in order; a tar cut short ends with an error sample for its tail."""
    from prep.fsio import open_regular

    caption_extension = caption_extension.lower()
    current: list[tuple[str, str, tarfile.TarInfo, object]] = []
    count = 0
    with open_regular(tar) as f:
        try:
            archive = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed with `f`
        except tarfile.TarError as exc:
            yield TarSample(key="", tar=tar, error=f"not a readable tar: {exc}")
            return
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, EOFError, OSError) as exc:
                if current:
                    yield build_sample(tar, current, caption_extension, caption_key)
                yield TarSample(key="", tar=tar, error=f"tar cut short or corrupt: the rest after {count} members ({exc})")
                return
            archive.members.clear()  # bounded memory: tarfile keeps every header otherwise
            if info is None:
                break
            count += 1
            if not info.isreg():
                continue
            key, ext = split_key(info.name)
            if current and current[0][0] != key:
                yield build_sample(tar, current, caption_extension, caption_key)
                current = []
            current.append((key, ext, info, read_member(archive, info, ext, caption_extension)))
        if current:
            yield build_sample(tar, current, caption_extension, caption_key)


def read_member(archive: tarfile.TarFile, info: tarfile.TarInfo, ext: str, caption_extension: str):
    """The bytes of the members a sample needs (image, caption, json); None for the others."""
    limit = None
    if ext == caption_extension:
        limit = MAX_CAPTION_FILE_BYTES
    elif ext == ".json":
        limit = MAX_JSON_MEMBER_BYTES
    elif ext not in IMAGE_EXTENSIONS:
        return None
    if limit is not None and info.size > limit:
        return ValueError(f"member too large: {info.name} is larger than {limit} bytes")
    try:
        handle = archive.extractfile(info)
        data = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError) as exc:
        return ValueError(f"member unreadable: {info.name} ({exc})")
    if len(data) != info.size:
        return ValueError(f"member unreadable: {info.name} is truncated")
    return data


def build_sample(tar: str, members: list, caption_extension: str, caption_key: str | None) -> TarSample:
    """Group one key's members into a sample: the image (by extension priority), caption, json."""
    sample = TarSample(key=members[0][0], tar=tar)
    by_ext = {ext: (info, data) for _, ext, info, data in members}
    image_ext = next((ext for ext in IMAGE_PRIORITY if ext in by_ext), None)
    if image_ext is None:
        sample.error = "no image member"
        return sample
    info, data = by_ext[image_ext]
    if isinstance(data, Exception):
        sample.error = str(data)
        return sample
    sample.image = TarMember(tar, info.name, info.offset_data, info.size)
    sample.data = data
    if ".json" in by_ext:
        sample.meta = parse_json_member(tar, *by_ext[".json"])
    caption = by_ext.get(caption_extension)
    if caption is not None and isinstance(caption[1], bytes):
        try:
            sample.caption = caption[1].decode("utf-8").strip() or None
        except UnicodeDecodeError:
            logger.warning("%s: caption member %s is not UTF-8: not used", tar, caption[0].name)
    if sample.caption is None and caption_key and isinstance(sample.meta.get(caption_key), str):
        sample.caption = sample.meta[caption_key].strip() or None
    return sample


def parse_json_member(tar: str, info: tarfile.TarInfo, data) -> dict:
    if isinstance(data, Exception):
        logger.warning("%s: %s: not used", tar, data)
        return {}
    try:
        value = json.loads(data)
    except ValueError as exc:
        logger.warning("%s: %s is not JSON (%s): not used", tar, info.name, exc)
        return {}
    return value if isinstance(value, dict) else {}


def index_tar(tar: str) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of a tar's regular members: headers only (seeks past the
    data), to find members again after the tar was rewritten. A tar cut short gives what precedes the cut."""
    from prep.fsio import open_regular

    found: dict[str, tuple[int, int]] = {}
    with open_regular(tar) as f:
        try:
            archive = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed with `f`
            while (info := archive.next()) is not None:
                archive.members.clear()
                if info.isreg():
                    found.setdefault(info.name, (info.offset_data, info.size))
        except (tarfile.TarError, EOFError, OSError) as exc:
            logger.warning("%s: index stops after %d members (%s)", tar, len(found), exc)
    return found
