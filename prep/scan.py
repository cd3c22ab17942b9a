"""Find images, read their size from the header (after EXIF orientation), and give them ids.

Reading only the header keeps the scan at thousands of images per second; the full
decode happens once, later, in the encoder passes' data-loader workers.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from prep.config import IMAGE_EXTENSIONS
from prep.fsio import NotARegularFile, open_regular
from prep.parallel import bounded_map
from prep.preprocess import MAX_IMAGE_PIXELS
from prep.records import is_safe_id

EXIF_ORIENTATION = 0x0112
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 / 270 degrees
MAX_ID_STEM = 80


@dataclass(frozen=True)
class ImageHeader:
    """What the scan learns about one file: its display size, or why it is unreadable."""

    path: Path
    width: int = 0
    height: int = 0
    error: str | None = None


def iter_image_files(root: str | Path) -> Iterator[Path]:
    """Every image file under `root`, recursively, in a stable (sorted) order; hidden dirs skipped."""
    for path in iter_image_paths(root):
        yield Path(path)


def iter_image_paths(root: str | Path) -> Iterator[str]:
    """Like `iter_image_files`, as strings (no Path objects: a million files walk in seconds)."""
    stack = [os.fspath(root)]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.path)
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield entry.path
        stack.extend(reversed(subdirs))


def _jpeg_has_eoi(data: bytes) -> bool:
    """True if an EOI marker follows the first scan: walk the segments (skipping APP1's EXIF
    thumbnail, which has its own EOI) to the first SOS; entropy data never holds FF D9."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        if data[pos + 1] == 0xFF:  # fill byte
            pos += 1
            continue
        if data[pos + 1] == 0xDA:  # SOS
            return data.find(b"\xff\xd9", pos) != -1
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _looks_truncated(f, size: int, image_format: str | None) -> bool:
    """Cheap truncation check without decoding: a JPEG must end with EOI, a PNG must verify."""
    if image_format == "JPEG":
        f.seek(max(0, size - 4096))
        if b"\xff\xd9" in f.read():
            return False
        # No EOI near the end: cut short, or data appended after the image (a phone's
        # "motion photo" video); only then read the whole file to tell the two apart.
        f.seek(0)
        return not _jpeg_has_eoi(f.read())
    if image_format == "PNG":
        f.seek(0)
        with Image.open(f) as img:
            img.verify()  # reads chunks and CRCs, decodes no pixels; raises if cut short
    return False


def read_image_header(path: str | Path) -> ImageHeader:
    """Width and height as a viewer shows the image (EXIF 5-8 swap them); never raises."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 name (surrogate-escaped) cannot go into the JSON manifest
        return ImageHeader(path, error="file name is not valid UTF-8")
    try:
        with open_regular(path) as f:
            return _header_of_open(path, f, os.fstat(f.fileno()).st_size)
    except NotARegularFile:
        return ImageHeader(path, error="not a regular file (FIFO, device or directory)")
    except OSError as exc:
        return ImageHeader(path, error=f"unreadable: {exc}")


def read_image_header_bytes(data: bytes, label: str) -> ImageHeader:
    """`read_image_header` of an image held in memory (a tar member, a dataset row); never raises."""
    import io

    return _header_of_open(Path(label), io.BytesIO(data), len(data))


def _header_of_open(path: Path, f, size: int) -> ImageHeader:
    """The header checks on an open binary file of `size` bytes."""
    if size == 0:
        return ImageHeader(path, error="empty file")
    try:
        width, height, image_format, orientation = _header_of(f)
    except Image.DecompressionBombError as exc:
        return ImageHeader(path, error=f"decompression bomb: {str(exc).split(' could')[0]}")
    except UnidentifiedImageError:
        return ImageHeader(path, error="not a recognised image")
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        return ImageHeader(path, error=f"unreadable: {exc}")
    try:
        if width * height > MAX_IMAGE_PIXELS:  # the decoder's limit, so scan and decode agree
            return ImageHeader(path, error=f"decompression bomb: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")
        if _looks_truncated(f, size, image_format):
            return ImageHeader(path, error="truncated file")
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        return ImageHeader(path, error=f"unreadable: {exc}")
    if width <= 0 or height <= 0:
        return ImageHeader(path, error=f"bad size {width}x{height}")
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(path, width=width, height=height)


def _header_of(f) -> tuple[int, int, str | None, int]:
    """(width, height, format, EXIF orientation) from an open file, decoding no pixels."""
    with Image.open(f) as img:  # Pillow itself refuses > 2x its limit (DecompressionBombError)
        width, height = img.size
        image_format = img.format
        # Pillow's PNG getexif() decodes every pixel to look for an eXIf chunk after the
        # image data; the header-only scan uses the eXIf read with the header (before IDAT).
        pixels_needed = image_format == "PNG" and "exif" not in img.info
        orientation = 1 if pixels_needed else img.getexif().get(EXIF_ORIENTATION, 1)
    return width, height, image_format, orientation


def read_headers(paths: Iterable[Path], workers: int = 8) -> Iterator[ImageHeader]:
    """Headers of many files, in input order; threads hide file-system latency."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from bounded_map(pool, read_image_header, paths)


def slugify(stem: str) -> str:
    """ASCII slug of a file stem: accents stripped, anything outside [A-Za-z0-9_-] becomes '_'."""
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_stem).strip("_")
    return (slug or "img")[:MAX_ID_STEM]


def hashed_id(stem: str, key: str) -> str:
    """slug(stem) + '-' + 8 hex digits of sha1(key): deterministic, unique, safe."""
    return f"{slugify(stem)}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"


def assign_image_ids(keys: list[str], taken: Iterable[str] = ()) -> list[str]:
    """Ids for new images, one per key (a path relative to the images root, POSIX form).

    The rule (the seeds' one, made safe): the file stem when it is a safe token
    ([A-Za-z0-9_-], at most 100 chars), not used by another new key and not already taken
    by an existing record; otherwise slug(stem)-<8 hex of sha1(key)>. Existing ids never
    change, so adding files later cannot rename anything already processed.
    """
    taken = set(taken)
    stems = [Path(key).stem for key in keys]
    stem_counts: dict[str, int] = {}
    for stem in stems:
        stem_counts[stem] = stem_counts.get(stem, 0) + 1
    ids = []
    for key, stem in zip(keys, stems, strict=True):
        if is_safe_id(stem) and stem_counts[stem] == 1 and stem not in taken:
            image_id = stem
        else:
            image_id = hashed_id(stem, key)
            salt = 0
            while image_id in taken:  # astronomically rare; keeps ids unique anyway
                salt += 1
                image_id = hashed_id(stem, f"{key}#{salt}")
        taken.add(image_id)
        ids.append(image_id)
    return ids


def relative_key(path: Path, root: Path) -> str:
    """The path relative to the images root in POSIX form: the input of the id hash."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
