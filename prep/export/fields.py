"""The JSON member of a sample: which record fields it holds, and its bytes.

The member holds the v2 fields image_id, image_path, caption, height, width, aspect_bucket,
format_version, then the user's metadata: every other field of the exported records (e.g.
`source`, `license` from a Stage-1 manifest), in sorted order, present in every sample, null
where a record has no value. The HF `webdataset` builder needs the same keys in every
sample; values may be null. The record's `provenance` and `image_fingerprint` are prep's
bookkeeping, not user metadata, and are left out.

A user field is exported when its values are scalars of one JSON type (null aside). Ints
mixed with floats are written as floats (the builder would otherwise cast later floats to the
first sample's int, or fail), unless an int is too large for a float. Any other mix (e.g. str
and int, bool and int), a list or dict, a NaN or an int beyond int64 drops the field from
every sample, with the reason in stats.json and index.json.

`image_path` (the exported value, see `relative_image_path`): "relative" to the images root
(the `images_roots` the pipeline records in prep_metadata.json; else the common parent folder
of the exported paths; the file name alone when that parent is "/" or the path climbs out
with ".."), "absolute" (as in the record), or "none" (no image_path key). A URI ("://") is
kept as it is. Absolute paths tell user names and private folder names: relative is the
default.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prep import store
from prep.records import INLINE_DINOV3_FIELD, V2_FIELDS, is_safe_id

JSON_FIELDS = ("image_id", "image_path", "caption", "height", "width", "aspect_bucket", "format_version")
# record fields that are not the user's metadata (the mask is its own member)
NOT_USER_FIELDS = frozenset({*V2_FIELDS, INLINE_DINOV3_FIELD, "provenance", "image_fingerprint"})
IMAGE_PATH_MODES = ("relative", "absolute", "none")
V2_TYPES = {"image_id": "string", "image_path": "string", "caption": "string", "height": "int64",
            "width": "int64", "aspect_bucket": "string", "format_version": "int64"}
_HF_TYPE = {"bool": "bool", "int": "int64", "big": "int64", "float": "float64", "str": "string"}
_EXACT_FLOAT_INT = 2**53


def check_key(key: Any) -> str:
    """The sample key (image_id), refused unless it is a safe token without dots or slashes."""
    if not is_safe_id(key):
        raise store.UnsafeIdError(
            f"refusing to export image_id {str(key)[:120]!r}: a WebDataset key must match [A-Za-z0-9_-]{{1,100}}"
        )
    return key


# ------------------------------------------------------------------------ image_path
def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def relative_image_path(path: str, roots: Sequence[str] = (), base: str | None = None) -> str:
    """`path` without the private part: relative to the longest of `roots` holding it, else to `base`.

    A local URI (a tar member `tar://`, a saved dataset's row `hfds://`) gets the same treatment
    for its file part (`tar:REL/00001.tar#key.jpg`); any other URI (a Hub row, s3://) is public
    and returned as it is. A path under neither, or whose only common parent is
    the filesystem root, or that would still climb out with "..", is reduced to its file name
    (what is above an images folder is exactly what must not leak). `roots` are absolute,
    normalised folders; `base` the common parent folder of the paths (absolute or relative,
    like `path`). The result uses "/" separators.
    """
    if "://" in path:
        return _relative_local_uri(path, roots, base)
    norm = os.path.normpath(path)
    root = max((r for r in roots if _under(norm, r)), key=len, default=None)
    if root is None and base is not None and os.path.isabs(base) == os.path.isabs(norm):
        usable = base in ("", ".") or (_under(norm, base) and os.path.dirname(base) != base)
        root = base if usable else None
    if root is None or norm == root:
        relative = os.path.basename(norm)
    elif root in ("", "."):
        relative = norm
    else:
        relative = norm[len(root.rstrip(os.sep)) + 1 :]  # _under(norm, root): a prefix, then a separator
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        relative = os.path.basename(norm)
    return relative.replace(os.sep, "/")


def _relative_local_uri(uri: str, roots: Sequence[str], base: str | None) -> str:
    from prep import sources

    kind = sources.scheme_of(uri)
    if kind == sources.TAR:
        member = sources.parse_tar(uri)
        return f"tar:{relative_image_path(member.tar, roots, base)}#{member.member}"
    if kind == sources.LOCAL_DATASET:
        row = sources.parse_row(uri)
        return f"hfds:{relative_image_path(row.dataset, roots, base)}/{row.split}/{row.row}#{row.column}"
    return uri


def _local_part(path: str) -> str | None:
    """The local file a path names (a tar's or a saved dataset's for their URIs), or None (public URI)."""
    if "://" not in path:
        return path
    from prep import sources

    kind = sources.scheme_of(path)
    if kind == sources.TAR:
        return sources.parse_tar(path).tar
    if kind == sources.LOCAL_DATASET:
        return sources.parse_row(path).dataset
    return None


def images_roots(metadata: dict) -> tuple[str, ...]:
    """The absolute images roots recorded in prep_metadata.json (`images_roots`), normalised.

    The filesystem root is left out: a path relative to "/" is the whole path.
    """
    roots = metadata.get("images_roots")
    if not isinstance(roots, list):
        return ()
    norm = {os.path.normpath(r) for r in roots if isinstance(r, str) and os.path.isabs(r)}
    return tuple(sorted(r for r in norm if os.path.dirname(r) != r))


def _common(a: str | None, b: str) -> str:
    return b if a is None else os.path.commonpath([a, b]) if (a and b) else ""


# --------------------------------------------------------------------- field statistics
def _kind(value: Any) -> str:
    """The JSON kind of a user field's value; "bad: <why>" when it cannot be exported."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            return "bad: integer outside int64"
        return "int" if abs(value) <= _EXACT_FLOAT_INT else "big"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else "bad: NaN or infinite number"
    if isinstance(value, str):
        return "str"
    return "bad: not a scalar (list or dict)"


@dataclass
class FieldStats:
    """What the exported records hold, for choosing the JSON layout; mergeable across chunks."""

    records: int = 0
    present: Counter = field(default_factory=Counter)  # user field -> records with a non-null value
    kinds: dict[str, set[str]] = field(default_factory=dict)  # user field -> kinds of its values
    abs_base: str | None = None  # common parent of absolute image paths under no images root
    rel_base: str | None = None  # ... of relative image paths

    def add(self, record: dict, roots: Sequence[str]) -> None:
        self.records += 1
        for key, value in record.items():
            if key not in NOT_USER_FIELDS:
                kind = _kind(value)
                self.kinds.setdefault(key, set()).add(kind)
                self.present[key] += kind != "null"
        path = _local_part(record.get("image_path")) if isinstance(record.get("image_path"), str) else None
        if path is not None:
            norm = os.path.normpath(path)
            if not any(_under(norm, r) for r in roots):
                parent = os.path.dirname(norm)
                if os.path.isabs(norm):
                    self.abs_base = _common(self.abs_base, parent)
                else:
                    self.rel_base = _common(self.rel_base, parent)

    def merge(self, other: FieldStats) -> None:
        self.records += other.records
        self.present.update(other.present)
        for key, kinds in other.kinds.items():
            self.kinds.setdefault(key, set()).update(kinds)
        if other.abs_base is not None:
            self.abs_base = _common(self.abs_base, other.abs_base)
        if other.rel_base is not None:
            self.rel_base = _common(self.rel_base, other.rel_base)


def field_stats(records: Iterable[dict], roots: Sequence[str]) -> FieldStats:
    stats = FieldStats()
    for record in records:
        stats.add(record, roots)
    return stats


# ------------------------------------------------------------------------ the layout
def _decide(kinds: set[str]) -> tuple[str | None, str]:
    """(how to write the field: "as is" / "float", or None to drop it; the reason or a note)."""
    bad = sorted(k.removeprefix("bad: ") for k in kinds if k.startswith("bad: "))
    if bad:
        return None, bad[0]
    values = kinds - {"null"}
    if values == {"int", "float"}:
        return "float", "ints written as floats (the field mixes int and float values)"
    if {"big", "float"} <= values and values <= {"int", "big", "float"}:
        return None, "mixed int and float values, with ints too large for a float"
    types = sorted({"int" if v == "big" else v for v in values})
    if len(types) > 1:
        return None, f"mixed types ({', '.join(types)})"
    return "as is", ""


@dataclass(frozen=True)
class JsonLayout:
    """How every sample's JSON member is written (the same keys in each); picklable for the workers."""

    fields: tuple[str, ...]  # the v2 fields of the member, in order
    extra: tuple[tuple[str, str], ...] = ()  # (user field, "as is" / "float"), sorted
    image_path: str = "relative"
    roots: tuple[str, ...] = ()
    abs_base: str | None = None
    rel_base: str | None = None
    dropped: tuple[tuple[str, str], ...] = ()  # (user field, reason)
    notes: tuple[tuple[str, str], ...] = ()  # (user field, note: ints as floats, null in some samples)
    types: tuple[tuple[str, str], ...] = ()  # (JSON key, HF dtype: string, int64, float64, bool, null)

    @property
    def keys(self) -> list[str]:
        return [*self.fields, *(key for key, _ in self.extra)]

    def image_path_of(self, path: str) -> str:
        if self.image_path == "absolute" or not isinstance(path, str):
            return path
        base = self.abs_base if os.path.isabs(os.path.normpath(path)) else self.rel_base
        return relative_image_path(path, self.roots, base)

    def member(self, record: dict) -> bytes:
        obj = {key: record[key] for key in self.fields}
        if "image_path" in obj:
            obj["image_path"] = self.image_path_of(obj["image_path"])
        for key, how in self.extra:
            value = record.get(key)
            obj[key] = float(value) if how == "float" and value is not None else value
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def choose_layout(stats: FieldStats, *, image_path: str = "relative", roots: Sequence[str] = ()) -> JsonLayout:
    """The JSON layout of an export from what its records hold (see the module doc)."""
    if image_path not in IMAGE_PATH_MODES:
        raise ValueError(f"--image-path must be one of {', '.join(IMAGE_PATH_MODES)}, got {image_path!r}")
    fields = tuple(f for f in JSON_FIELDS if image_path != "none" or f != "image_path")
    extra, dropped, notes, types = [], [], [], [(f, V2_TYPES[f]) for f in fields]
    for key in sorted(stats.kinds):
        how, why = _decide(stats.kinds[key])
        if how is None:
            dropped.append((key, why))
            continue
        extra.append((key, how))
        values = sorted(stats.kinds[key] - {"null"})
        types.append((key, "float64" if how == "float" else _HF_TYPE[values[0]] if values else "null"))
        missing = stats.records - stats.present[key]
        note = "; ".join(n for n in (why, f"null in {missing} of {stats.records} samples" if missing else "") if n)
        if note:
            notes.append((key, note))
    return JsonLayout(fields, tuple(extra), image_path, tuple(roots), stats.abs_base, stats.rel_base,
                      tuple(dropped), tuple(notes), tuple(types))


# ------------------------------------------------------------------------ the mask


_NPY_HEADERS: dict[tuple, bytes] = {}


def record_array_member(artifact, record: dict) -> bytes:
    """An array made from a record field (the T5 mask) as a version 1.0 .npy, as numpy writes it."""
    array = np.asarray(record[artifact.record_field], dtype=artifact.dtype)
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(array.shape, array.dtype), version=(1, 0), allow_pickle=False)
        header = _NPY_HEADERS[key] = buf.getvalue()[: len(buf.getvalue()) - array.nbytes]
    return header + array.tobytes()


def mask_member(record: dict) -> bytes:
    """The T5 attention mask as a uint8 (77,) .npy (version 1.0), as numpy writes it."""
    from prep import stages

    return record_array_member(stages.artifacts()["t5_mask"], record)
