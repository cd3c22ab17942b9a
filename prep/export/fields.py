"""The JSON member of a sample: which record fields it holds, and its bytes.

The member holds the v2 fields image_id, image_path, caption, height, width, aspect_bucket,
format_version, plus every extra field that is a scalar (str, int, float, bool; never null
or NaN) of one type in *every* exported sample. Any other extra field is dropped from the
whole export (and listed in stats.json / index.json with the reason), so all samples share
one key set without nulls, which `datasets` needs to infer one schema.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from prep import store
from prep.records import INLINE_DINOV3_FIELD, V2_FIELDS, is_safe_id

JSON_FIELDS = ("image_id", "image_path", "caption", "height", "width", "aspect_bucket", "format_version")


def check_key(key: Any) -> str:
    """The sample key (image_id), refused unless it is a safe token without dots or slashes."""
    if not is_safe_id(key):
        raise store.UnsafeIdError(
            f"refusing to export image_id {str(key)[:120]!r}: a WebDataset key must match [A-Za-z0-9_-]{{1,100}}"
        )
    return key


def json_member(record: dict, extra_keys: Iterable[str]) -> bytes:
    obj = {key: record[key] for key in JSON_FIELDS}
    for key in extra_keys:
        obj[key] = record[key]
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def mask_member(record: dict) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(
        buf, np.asarray(record["t5_attention_mask"], dtype=np.uint8), version=(1, 0), allow_pickle=False
    )
    return buf.getvalue()


def _scalar_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return "float" if math.isfinite(value) else None
    if isinstance(value, str):
        return "str"
    return None


def choose_extra_fields(records: Iterable[dict]) -> tuple[list[str], dict[str, str]]:
    """(extra keys kept, {dropped key: reason}) over every exported record (see module doc)."""
    types: dict[str, str] = {}
    dropped: dict[str, str] = {}
    first = True
    for record in records:
        extras = {k: v for k, v in record.items() if k not in V2_FIELDS and k != INLINE_DINOV3_FIELD}
        if first:
            first = False
            for key, value in extras.items():
                kind = _scalar_type(value)
                if kind is None:
                    dropped[key] = "not a scalar (list, dict, null, NaN or out-of-int64 value)"
                else:
                    types[key] = kind
            continue
        for key in list(types):
            if key not in extras:
                dropped[key] = "missing in some samples"
                del types[key]
            elif _scalar_type(extras[key]) != types[key]:
                kind = _scalar_type(extras[key])
                dropped[key] = "not a scalar in some samples" if kind is None else "mixed types"
                del types[key]
        for key in extras:
            if key not in types and key not in dropped:
                dropped[key] = "missing in some samples"
    return sorted(types), dict(sorted(dropped.items()))
