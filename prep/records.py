"""The manifest record: the v2 schema, its validation, and the v0/v1 -> v2 migration.

One record per image, one JSON object per line. Unknown extra fields always survive
untouched: `prep` only adds or updates the fields it owns.
"""

from __future__ import annotations

import re
from typing import Any

from prep.config import DINOV3_DIM, FORMAT_VERSION, T5_MAX_LENGTH

V2_FIELDS = (
    "image_id",
    "image_path",
    "caption",
    "t5_attention_mask",
    "height",
    "width",
    "aspect_bucket",
    "format_version",
)
INLINE_DINOV3_FIELD = "dinov3_embedding"

SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
BUCKET = re.compile(r"[1-9][0-9]*x[1-9][0-9]*")
_FLOAT32_MAX = 3.4028234663852886e38  # larger values (and NaN, inf) are not finite once saved as float32


def is_safe_id(value: Any) -> bool:
    """True for ids usable as a file name and a WebDataset key: [A-Za-z0-9_-], 1..100 chars."""
    return isinstance(value, str) and SAFE_ID.fullmatch(value) is not None


def is_valid_mask(mask: Any, length: int = T5_MAX_LENGTH) -> bool:
    """A T5 attention mask: a list of exactly `length` ints, each 0 or 1."""
    return (
        isinstance(mask, list)
        and len(mask) == length
        and all(type(v) is int and v in (0, 1) for v in mask)
    )


def has_caption(record: dict) -> bool:
    """A usable caption is a non-empty, non-blank string."""
    caption = record.get("caption")
    return isinstance(caption, str) and caption.strip() != ""


MAX_SIDE = 1 << 31  # no real image is wider; larger values are garbage (and overflow Arrow int32 users)


def _is_positive_int(value: Any) -> bool:
    return type(value) is int and 0 < value < MAX_SIDE


def validate_record(record: Any) -> list[str]:
    """Every reason `record` is not a complete v2 record (empty list = valid).

    Reasons are short stable tokens ("missing caption", "bad t5_attention_mask", ...) so
    that verify, export and the report can count them.
    """
    if not isinstance(record, dict):
        return ["not an object"]
    reasons = []
    if "image_id" not in record:
        reasons.append("missing image_id")
    elif not is_safe_id(record["image_id"]):
        reasons.append("unsafe image_id")
    if not isinstance(record.get("image_path"), str) or not record.get("image_path"):
        reasons.append("missing image_path")
    if not has_caption(record):
        reasons.append("missing caption")
    if not is_valid_mask(record.get("t5_attention_mask")):
        reasons.append("bad t5_attention_mask" if "t5_attention_mask" in record else "missing t5_attention_mask")
    for key in ("height", "width"):
        if not _is_positive_int(record.get(key)):
            reasons.append(f"bad {key}" if key in record else f"missing {key}")
    bucket = record.get("aspect_bucket")
    if not (isinstance(bucket, str) and BUCKET.fullmatch(bucket)):
        reasons.append("bad aspect_bucket" if "aspect_bucket" in record else "missing aspect_bucket")
    if record.get("format_version") != FORMAT_VERSION:
        reasons.append("not format_version 2")
    if INLINE_DINOV3_FIELD in record:
        reasons.append("inline dinov3_embedding")
    return reasons


def record_version(record: dict) -> int:
    """0 (image_path + inline embedding + caption), 1 (the six Stage-1 fields) or 2."""
    if record.get("format_version") == FORMAT_VERSION:
        return 2
    if "t5_attention_mask" in record or "height" in record or "width" in record:
        return 1
    return 0


def needs_migration(record: dict) -> bool:
    """A record not yet in the v2 layout (old version or an inline embedding left over)."""
    return (
        record.get("format_version") != FORMAT_VERSION
        or INLINE_DINOV3_FIELD in record
        or "image_id" not in record
        or "aspect_bucket" not in record
    )


def inline_embedding_problem(record: dict) -> str | None:
    """Why the inline DINOv3 vector cannot be extracted, or None if it can (or is absent)."""
    if INLINE_DINOV3_FIELD not in record:
        return None
    vector = record[INLINE_DINOV3_FIELD]
    if not isinstance(vector, list):
        return "inline dinov3_embedding is not a list"
    if len(vector) != DINOV3_DIM:
        return f"inline dinov3_embedding has length {len(vector)}, expected {DINOV3_DIM}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _FLOAT32_MAX for v in vector):
        return "inline dinov3_embedding has non-numeric or non-finite values"
    return None


def to_v2(record: dict, *, image_id: str, width: int, height: int, aspect_bucket: str) -> dict:
    """The v2 form of `record`: adds image_id / size / bucket / version, drops the inline vector.

    Field order follows V2_FIELDS, then every other field in its original order; values the
    record already has (caption, mask, width, height) are kept as they are.
    """
    merged = dict(record)
    merged.pop(INLINE_DINOV3_FIELD, None)
    merged.setdefault("image_id", image_id)
    merged.setdefault("width", width)
    merged.setdefault("height", height)
    merged.setdefault("aspect_bucket", aspect_bucket)
    merged["format_version"] = FORMAT_VERSION
    ordered = {key: merged[key] for key in V2_FIELDS if key in merged}
    ordered.update({key: value for key, value in merged.items() if key not in ordered})
    return ordered


def new_record(*, image_id: str, image_path: str, width: int, height: int, aspect_bucket: str) -> dict:
    """A fresh v2 record from the scan; caption and mask come later from the encoder passes.

    `provenance` starts empty: a record `prep` created vouches only for what it stamped, so an
    old file that happens to sit at its id in the derived dir is never adopted.
    """
    return {
        "image_id": image_id,
        "image_path": image_path,
        "height": height,
        "width": width,
        "aspect_bucket": aspect_bucket,
        "format_version": FORMAT_VERSION,
        "provenance": {},
    }
