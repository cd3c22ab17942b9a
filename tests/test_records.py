"""The v2 record: validation reasons, version detection, inline-vector checks and the v0/v1 -> v2 step."""

from __future__ import annotations

import copy
import json
import math

import pytest

from prep.config import DINOV3_DIM, FORMAT_VERSION, T5_MAX_LENGTH
from prep.records import (
    INLINE_DINOV3_FIELD,
    V2_FIELDS,
    has_caption,
    inline_embedding_problem,
    is_safe_id,
    is_valid_mask,
    needs_migration,
    new_record,
    record_version,
    to_v2,
    validate_record,
)

MASK = [1] * 12 + [0] * (T5_MAX_LENGTH - 12)


def v2_record(**overrides) -> dict:
    record = {
        "image_id": "cat_01",
        "image_path": "/data/images/cat_01.jpg",
        "caption": "a red cat on a table",
        "t5_attention_mask": list(MASK),
        "height": 1216,
        "width": 832,
        "aspect_bucket": "832x1216",
        "format_version": 2,
    }
    record.update(overrides)
    return record


def v1_record() -> dict:
    return {
        "image_path": "/data/images/dog.png",
        "caption": "a dog running on the beach",
        INLINE_DINOV3_FIELD: [0.25] * DINOV3_DIM,
        "t5_attention_mask": list(MASK),
        "height": 600,
        "width": 800,
        "source": "crawl-7",
        "tags": ["dog", "beach"],
        "score": 0.93,
    }


def v0_record() -> dict:
    return {"image_path": "/data/images/x.jpg", INLINE_DINOV3_FIELD: [0.0] * DINOV3_DIM, "caption": "x"}


def test_complete_v2_record_is_valid():
    assert FORMAT_VERSION == 2
    assert validate_record(v2_record()) == []
    assert validate_record(v2_record(extra_field={"anything": [1, 2]})) == []


def without(record: dict, key: str) -> dict:
    record = dict(record)
    del record[key]
    return record


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (without(v2_record(), "image_id"), "missing image_id"),
        (v2_record(image_id="../etc/passwd"), "unsafe image_id"),
        (v2_record(image_id="a.b"), "unsafe image_id"),
        (v2_record(image_id=""), "unsafe image_id"),
        (v2_record(image_id=7), "unsafe image_id"),
        (v2_record(image_id="x" * 101), "unsafe image_id"),
        (without(v2_record(), "image_path"), "missing image_path"),
        (v2_record(image_path=""), "missing image_path"),
        (v2_record(image_path=["a.jpg"]), "missing image_path"),
        (without(v2_record(), "caption"), "missing caption"),
        (v2_record(caption="   \n"), "missing caption"),
        (v2_record(caption=None), "missing caption"),
        (v2_record(caption=42), "missing caption"),
        (without(v2_record(), "t5_attention_mask"), "missing t5_attention_mask"),
        (v2_record(t5_attention_mask=[1] * 76), "bad t5_attention_mask"),
        (v2_record(t5_attention_mask=[1] * 78), "bad t5_attention_mask"),
        (v2_record(t5_attention_mask=[2] + [1] * 76), "bad t5_attention_mask"),
        (v2_record(t5_attention_mask=[True] * 77), "bad t5_attention_mask"),
        (v2_record(t5_attention_mask=[1.0] * 77), "bad t5_attention_mask"),
        (v2_record(t5_attention_mask="1" * 77), "bad t5_attention_mask"),
        (without(v2_record(), "height"), "missing height"),
        (without(v2_record(), "width"), "missing width"),
        (v2_record(height=0), "bad height"),
        (v2_record(width=-3), "bad width"),
        (v2_record(width=832.0), "bad width"),
        (v2_record(width="832"), "bad width"),
        (v2_record(height=True), "bad height"),
        (without(v2_record(), "aspect_bucket"), "missing aspect_bucket"),
        (v2_record(aspect_bucket="832-1216"), "bad aspect_bucket"),
        (v2_record(aspect_bucket="0x1216"), "bad aspect_bucket"),
        (v2_record(aspect_bucket=[832, 1216]), "bad aspect_bucket"),
        (without(v2_record(), "format_version"), "not format_version 2"),
        (v2_record(format_version=1), "not format_version 2"),
        (v2_record(format_version="2"), "not format_version 2"),
        (v2_record(**{INLINE_DINOV3_FIELD: [0.0] * DINOV3_DIM}), "inline dinov3_embedding"),
    ],
)
def test_each_defect_has_exactly_its_reason(record, reason):
    assert validate_record(record) == [reason]


def test_not_an_object_and_several_defects():
    for value in (None, [], "x", 3):
        assert validate_record(value) == ["not an object"]
    assert validate_record({}) == [
        "missing image_id",
        "missing image_path",
        "missing caption",
        "missing t5_attention_mask",
        "missing height",
        "missing width",
        "missing aspect_bucket",
        "not format_version 2",
    ]


def test_small_predicates():
    assert is_safe_id("Abc_9-x") and is_safe_id("x" * 100)
    for bad in ("", "x" * 101, "a.b", "a/b", "a\\b", "a b", "é", "a\x00b", "a\n", None, 5, b"abc"):
        assert not is_safe_id(bad), bad
    assert is_valid_mask(MASK)
    assert is_valid_mask([1, 0], length=2)
    assert not is_valid_mask((1,) * 77)
    assert has_caption({"caption": " x "}) and not has_caption({"caption": ""}) and not has_caption({})


def test_record_version():
    assert record_version(v0_record()) == 0
    assert record_version(v1_record()) == 1
    assert record_version(v2_record()) == 2
    assert record_version({"image_path": "a.jpg", "width": 5}) == 1
    assert record_version({"image_path": "a.jpg"}) == 0
    assert record_version({**v1_record(), "format_version": 1}) == 1


def test_needs_migration():
    assert needs_migration(v0_record())
    assert needs_migration(v1_record())
    assert not needs_migration(v2_record())
    assert needs_migration(v2_record(**{INLINE_DINOV3_FIELD: [0.0] * DINOV3_DIM}))
    assert needs_migration(without(v2_record(), "image_id"))
    assert needs_migration(without(v2_record(), "aspect_bucket"))
    # a caption-less v2 record is incomplete but does not need migration
    assert not needs_migration(without(v2_record(), "caption"))


def test_inline_embedding_problem():
    assert inline_embedding_problem(v2_record()) is None  # absent
    assert inline_embedding_problem(v1_record()) is None
    assert inline_embedding_problem({INLINE_DINOV3_FIELD: list(range(DINOV3_DIM))}) is None  # ints are fine
    assert "not a list" in inline_embedding_problem({INLINE_DINOV3_FIELD: "0.1,0.2"})
    assert "not a list" in inline_embedding_problem({INLINE_DINOV3_FIELD: None})
    assert "not a list" in inline_embedding_problem({INLINE_DINOV3_FIELD: {"0": 1.0}})
    short = inline_embedding_problem({INLINE_DINOV3_FIELD: [0.1] * 768})
    assert short == f"inline dinov3_embedding has length 768, expected {DINOV3_DIM}"
    assert "length 1025" in inline_embedding_problem({INLINE_DINOV3_FIELD: [0.1] * 1025})
    assert "length 0" in inline_embedding_problem({INLINE_DINOV3_FIELD: []})


@pytest.mark.parametrize(
    "bad_value",
    [math.nan, math.inf, -math.inf, "0.5", None, True, [0.5], 1e39, -1e39, 10**400],
)
def test_inline_embedding_bad_values(bad_value):
    """Non-finite, non-numeric, and values a float32 file cannot hold (1e39 -> inf) are refused, never raised."""
    vector = [0.5] * DINOV3_DIM
    vector[500] = bad_value
    problem = inline_embedding_problem({INLINE_DINOV3_FIELD: vector})
    assert problem is not None and "non-finite" in problem


def test_inline_embedding_nan_parsed_from_json():
    text = '{"dinov3_embedding": [' + ", ".join(["0.1"] * 1023 + ["NaN"]) + "]}"
    assert "non-finite" in inline_embedding_problem(json.loads(text))


def test_to_v2_from_v1_keeps_other_fields_and_values():
    original = v1_record()
    snapshot = copy.deepcopy(original)
    migrated = to_v2(original, image_id="dog", width=1, height=1, aspect_bucket="1216x832")
    assert original == snapshot  # the input is not modified
    assert INLINE_DINOV3_FIELD not in migrated
    assert migrated["format_version"] == 2
    assert migrated["image_id"] == "dog"
    assert migrated["aspect_bucket"] == "1216x832"
    # values the record already had win over the arguments
    assert (migrated["width"], migrated["height"]) == (800, 600)
    for key, value in original.items():
        if key != INLINE_DINOV3_FIELD:
            assert migrated[key] == value, key
    assert set(migrated) == (set(original) - {INLINE_DINOV3_FIELD}) | {"image_id", "aspect_bucket", "format_version"}
    assert validate_record(migrated) == []
    # field order: the v2 fields first, then the others in their original order
    assert list(migrated) == [*V2_FIELDS, "source", "tags", "score"]


def test_to_v2_from_v0_takes_the_arguments():
    migrated = to_v2(v0_record(), image_id="x", width=640, height=480, aspect_bucket="1216x832")
    assert migrated == {
        "image_id": "x",
        "image_path": "/data/images/x.jpg",
        "caption": "x",
        "height": 480,
        "width": 640,
        "aspect_bucket": "1216x832",
        "format_version": 2,
    }


def test_to_v2_overrides_old_format_version_and_keeps_existing_id():
    record = {**v1_record(), "format_version": 1, "image_id": "kept"}
    migrated = to_v2(record, image_id="other", width=1, height=1, aspect_bucket="1024x1024")
    assert migrated["format_version"] == 2
    assert migrated["image_id"] == "kept"


def test_to_v2_is_idempotent():
    once = to_v2(v1_record(), image_id="dog", width=800, height=600, aspect_bucket="1216x832")
    twice = to_v2(once, image_id="zzz", width=5, height=5, aspect_bucket="1024x1024")
    assert twice == once
    assert list(twice) == list(once)
    record = v2_record(extra=1)
    assert to_v2(record, image_id="q", width=2, height=2, aspect_bucket="1024x1024") == record


def test_new_record_is_v2_without_caption_yet():
    record = new_record(image_id="a", image_path="/x/a.jpg", width=832, height=1216, aspect_bucket="832x1216")
    assert record == {
        "image_id": "a",
        "image_path": "/x/a.jpg",
        "height": 1216,
        "width": 832,
        "aspect_bucket": "832x1216",
        "format_version": 2,
        "provenance": {},  # a record prep made vouches only for what it stamps
    }
    assert record_version(record) == 2
    assert not needs_migration(record)
    assert validate_record(record) == ["missing caption", "missing t5_attention_mask"]
