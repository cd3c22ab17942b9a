"""prep.load_manifest (lazy arrays). The shard reader (prep.load_shards) is tested in test_shards.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_export import build_dataset, side_arrays

import prep
from prep import store


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("loading")
    return build_dataset(tmp, per_bucket=5)


def test_load_manifest_lazy_arrays(data, monkeypatch):
    calls = []
    real = store.load_npy
    monkeypatch.setattr(store, "load_npy", lambda path, *a: calls.append(path) or real(path, *a))
    ds = prep.load_manifest(data["manifest"], data["derived"])
    assert calls == []  # nothing read when the dataset is built
    # valid v2 records: 15 ready + missing/wrong-shape/wrong-dtype artifacts (the record itself is valid)
    assert len(ds) == 18
    assert ds.column_names[:8] == ["image_id", "image_path", "caption", "t5_attention_mask", "height", "width",
                                   "aspect_bucket", "format_version"]
    # metadata columns without reading arrays (a plain ds["caption"] formats every row in datasets>=4)
    assert len(list(ds.with_format(None)["caption"])) == 18
    assert len(list(ds.select_columns(["caption", "aspect_bucket"])[:])) == 2
    assert calls == []

    row = ds[0]
    assert len(calls) == 3
    expected = side_arrays(data["derived"], row["image_id"])
    for name in ("dinov3", "vae", "t5_hidden"):
        assert row[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(row[name], expected[name])
    assert json.loads(row["extra"])["source"] == "unit-test"
    assert len(row["t5_attention_mask"]) == 77

    batch = ds[:4]
    assert [a.shape for a in batch["vae"]] == [(16, 8, 8)] * 4
    missing = next(r for r in ds if r["image_id"] == "bad_missing")
    assert missing["vae"] is None and missing["dinov3"] is not None

    ready = prep.load_manifest(data["manifest"], data["derived"], ready_only=True)
    assert sorted(ready["image_id"]) == sorted(data["ready"])
