"""prep.load_manifest (lazy arrays) and prep.load_shards (decoding, batching per bucket, name checks, Hub URLs)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers_export import SMALL_BUCKETS, build_dataset, side_arrays

import prep
from prep import loading, store
from prep.export.webdataset import export_webdataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("loading")
    data = build_dataset(tmp, per_bucket=5)
    data["out"] = tmp / "shards"
    export_webdataset(data["manifest"], data["derived"], data["out"], shard_size=2, progress_every=0)
    return data


def test_load_manifest_lazy_arrays(data, monkeypatch):
    calls = []
    real = store.load_npy
    monkeypatch.setattr(store, "load_npy", lambda path: calls.append(path) or real(path))
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


def test_load_shards_samples(data):
    samples = list(prep.load_shards(data["out"], bucket="64x128"))
    assert [s["key"] for s in samples] == [f"img_{i:04d}" for i in range(5, 10)]
    by_id = {r["image_id"]: r for r in data["records"]}
    for s in samples:
        expected = side_arrays(data["derived"], s["key"])
        for name in ("dinov3", "vae", "t5_hidden"):
            assert s[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(s[name], expected[name])
        assert s["t5_mask"].dtype == np.uint8
        assert s["t5_mask"].tolist() == by_id[s["key"]]["t5_attention_mask"]
        assert s["json"]["aspect_bucket"] == "64x128"


@pytest.mark.parametrize("interleave", [False, True])
def test_load_shards_batches_never_mix_buckets(data, interleave):
    loader = prep.load_shards(data["out"], batch_size=2, shuffle=True, seed=3, shuffle_buffer=4, interleave=interleave)
    assert loader.buckets == sorted(SMALL_BUCKETS)
    keys = []
    for batch in loader:
        buckets = {j["aspect_bucket"] for j in batch["json"]}
        assert len(buckets) == 1
        bucket = buckets.pop()
        width, height = (int(v) for v in bucket.split("x"))
        assert batch["vae"].shape[1:] == (16, height // 8, width // 8) and batch["vae"].dtype == np.float16
        assert batch["t5_hidden"].shape[1:] == (77, 1024) and batch["dinov3"].shape[1:] == (1024,)
        assert len(batch["key"]) <= 2
        keys += batch["key"]
    assert sorted(keys) == sorted(data["ready"])
    # seeded: a fresh loader with the same seed gives the same order
    again = [k for b in prep.load_shards(data["out"], batch_size=2, shuffle=True, seed=3, shuffle_buffer=4,
                                         interleave=interleave) for k in b["key"]]
    assert again == keys
    dropped = list(prep.load_shards(data["out"], bucket="64x64", batch_size=2, drop_last=True))
    assert [len(b["key"]) for b in dropped] == [2, 2]


def _tar_with(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name in names:
            payload = b"{}" if name.endswith(".json") else _npy(np.zeros(3, np.float32))
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../evil.json", "/etc/evil.json", "a/../../evil.json"])
def test_member_name_check(tmp_path, name):
    with pytest.raises(ValueError, match="unsafe tar member name"):
        loading.check_member_name(name)
    bucket_dir = tmp_path / "bucket_64x64"
    bucket_dir.mkdir()
    _tar_with(bucket_dir / "shard-000000.tar", ["ok.json", name])
    with pytest.raises(ValueError, match="unsafe tar member name"):
        list(prep.load_shards(tmp_path))


def test_pickled_npy_member_refused(tmp_path):
    bucket_dir = tmp_path / "bucket_64x64"
    bucket_dir.mkdir()
    payloads = {"k.json": b"{}", "k.t5m.npy": _npy(np.zeros(77, np.uint8)), "k.t5h.npy": _npy(np.zeros(2)),
                "k.vae.npy": _npy(np.zeros(2))}
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    payloads["k.dinov3.npy"] = buf.getvalue()
    with tarfile.open(bucket_dir / "shard-000000.tar", "w") as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="not a plain .npy"):
        list(prep.load_shards(tmp_path))


class FakeHfFileSystem:
    """Stands in for huggingface_hub.HfFileSystem: glob over a local export, open by hf:// URL.

    Only the URL resolution and the opener are tested this way; the real Hub is unreachable here.
    """

    def __init__(self, root: Path, repo: str):
        self.root, self.repo, self.globbed, self.opened = root, repo, [], []

    def glob(self, pattern: str) -> list[str]:
        self.globbed.append(pattern)
        prefix = pattern.split("/bucket_")[0]
        return [f"{prefix}/{p.relative_to(self.root).as_posix()}" for p in sorted(self.root.rglob("*.tar"))]

    def open(self, url: str, mode: str = "rb"):
        self.opened.append(url)
        relative = url.split("/", 5)[5]  # hf://datasets/OWNER/NAME[@rev]/...
        return open(self.root / relative, mode)  # noqa: SIM115


def test_hub_id_resolution_with_fake_fs(data):
    fs = FakeHfFileSystem(data["out"], "me/data")
    urls = loading.resolve_shards("me/data", revision="refs/pr/1", fs=fs)
    assert fs.globbed == ["datasets/me/data@refs%2Fpr%2F1/bucket_*/*.tar"]
    assert urls["64x64"] == [f"hf://datasets/me/data@refs%2Fpr%2F1/bucket_64x64/shard-{i:06d}.tar" for i in range(3)]
    fs = FakeHfFileSystem(data["out"], "me/data")
    loader = prep.load_shards("hf://datasets/me/data", bucket="bucket_128x64", fs=fs)
    assert loader.urls == {"128x64": [f"hf://datasets/me/data/bucket_128x64/shard-{i:06d}.tar" for i in range(3)]}
    assert [s["key"] for s in loader] == [f"img_{i:04d}" for i in range(10, 15)]
    assert len(fs.opened) == 3


def test_resolve_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError):
        loading.resolve_shards(str(tmp_path / "not" / "a" / "hub id"))
    with pytest.raises(ValueError, match="no shards for bucket"):
        loading.resolve_shards(data["out"], "1024x1024")
    with pytest.raises(FileNotFoundError, match="no shards"):
        loading.resolve_shards(tmp_path)
    # a bucket folder and a single tar also work
    assert list(loading.resolve_shards(data["out"] / "bucket_64x64")) == ["64x64"]
    assert loading.resolve_shards(data["out"] / "bucket_64x64" / "shard-000000.tar")["64x64"][0].endswith(".tar")
