"""What a sample's JSON member holds: image_path without the private part of the path (relative /
absolute / none), the user's metadata fields in every sample (null where a record has none, mixed
scalar types resolved or dropped with a reason), prep's bookkeeping left out silently; and the
export loads with `datasets.load_dataset("webdataset", ...)`."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers_export import make_record, write_artifacts, write_manifest

from prep import store
from prep.export.fields import FieldStats, choose_layout, images_roots, relative_image_path
from prep.export.webdataset import export_webdataset, format_summary, hf_features


# ------------------------------------------------------------------------ the path rule
@pytest.mark.parametrize(
    ("path", "roots", "base", "expected"),
    [
        ("/home/alice/secret/photos/a/b.jpg", ["/home/alice/secret/photos"], None, "a/b.jpg"),
        ("/data/photos/x.jpg", ["/data", "/data/photos"], None, "x.jpg"),  # the longest root wins
        ("/data/photos2/x.jpg", ["/data/photos"], "/data", "photos2/x.jpg"),  # a prefix is not a parent
        ("/data/photos2/x.jpg", ["/data/photos"], None, "x.jpg"),  # under nothing known: the file name
        ("/data/photos/./a/../b.jpg", ["/data/photos"], None, "b.jpg"),
        ("/mnt/usb/set1/y.png", [], "/mnt/usb", "set1/y.png"),
        ("/mnt/usb/set1/y.png", [], "/mnt/usb/set1", "y.png"),
        ("/one/file.jpg", ["/one/file.jpg"], None, "file.jpg"),  # a root that is the file itself
        ("images/sub/z.jpg", ["/abs/root"], "images", "sub/z.jpg"),  # relative paths: their common parent
        ("a/x.jpg", [], "", "a/x.jpg"),
        ("/home/alice/x.jpg", [], "/", "x.jpg"),  # only "/" in common: nothing above the file is safe
        ("../../home/alice/x.jpg", [], "", "x.jpg"),  # would climb out: the file name
        ("../photos/x.jpg", [], "..", "photos/x.jpg"),
        ("s3://bucket/private/a.jpg", ["/data"], "/data", "s3://bucket/private/a.jpg"),  # a URI stays
        ("https://example.org/a.jpg", [], None, "https://example.org/a.jpg"),
    ],
)
def test_relative_image_path(path, roots, base, expected):
    assert relative_image_path(path, roots, base) == expected


def test_images_roots_from_metadata():
    assert images_roots({}) == ()
    assert images_roots({"images_roots": "/data"}) == ()
    assert images_roots({"images_roots": ["/b/", "/a", "relative", 3, "/a/./", "/", "//"]}) == ("/a", "/b")


def test_common_parent_of_the_paths():
    stats = FieldStats()
    for path in ("/srv/u/x/1.jpg", "/srv/u/x/y/2.jpg", "/data/in/3.jpg", "rel/a/4.jpg", "rel/b/5.jpg",
                 "s3://b/6.jpg"):
        stats.add({"image_path": path}, ("/data",))
    assert (stats.abs_base, stats.rel_base) == ("/srv/u/x", "rel")
    layout = choose_layout(stats, roots=("/data",))
    assert [layout.image_path_of(p) for p in ("/srv/u/x/y/2.jpg", "/data/in/3.jpg", "rel/b/5.jpg", "s3://b/6.jpg")] == [
        "y/2.jpg", "in/3.jpg", "b/5.jpg", "s3://b/6.jpg"]
    with pytest.raises(ValueError, match="--image-path must be one of relative, absolute, none"):
        choose_layout(stats, image_path="home")


# ------------------------------------------------------------------------ a dataset
def _dataset(tmp: Path, per_bucket: int = 4, *, extra=None, paths=None, roots=None) -> dict:
    """Records in two buckets; `extra(i)` -> extra fields of record i; `paths(i)` -> its image_path."""
    rng = np.random.default_rng(1)
    derived, records = tmp / "derived", []
    for i in range(2 * per_bucket):
        bucket = ("64x64", "128x64")[i // per_bucket]
        record = make_record(f"img_{i:04d}", bucket, rng, **(extra(i) if extra else {}))
        if paths:
            record["image_path"] = paths(i)
        write_artifacts(derived, record, rng)
        records.append(record)
    if roots is not None:
        store.update_metadata(derived, {"images_roots": roots})
    return {"manifest": write_manifest(tmp / "manifest.jsonl", records), "derived": derived, "records": records}


def _export(data, out, **kw):
    kw.setdefault("progress_every", 0)
    return export_webdataset(data["manifest"], data["derived"], out, **kw)


def _json_members(out: Path) -> dict[str, dict]:
    members = {}
    for path in sorted(out.rglob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    members[m.name.split(".")[0]] = json.loads(tar.extractfile(m).read())
    return members


def _all_tar_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*.tar")))


# ------------------------------------------------------------------------ image_path
def test_case11_image_path_relative_by_default_absolute_or_none(tmp_path):
    home = tmp_path / "home" / "alice_private"
    data = _dataset(tmp_path / "d", paths=lambda i: str(home / "holiday" / f"set{i % 2}" / f"p{i}.jpg"),
                    roots=[str(home / "holiday")])
    members = _json_members(out := tmp_path / "relative")
    s = _export(data, out)
    members = _json_members(out)
    assert {k: m["image_path"] for k, m in members.items()} == {
        f"img_{i:04d}": f"set{i % 2}/p{i}.jpg" for i in range(8)}
    assert b"alice_private" not in _all_tar_bytes(out) and s.options["image_path"] == "relative"

    _export(data, out := tmp_path / "absolute", image_path="absolute")
    assert {m["image_path"] for m in _json_members(out).values()} == {r["image_path"] for r in data["records"]}

    s = _export(data, out := tmp_path / "none", image_path="none")
    assert all("image_path" not in m for m in _json_members(out).values())
    assert "image_path" not in s.json_fields and b"alice_private" not in _all_tar_bytes(out)
    assert "image_path" not in json.loads((out / "index.json").read_text())["json_field_types"]
    with pytest.raises(ValueError, match="--image-path"):
        _export(data, tmp_path / "bad", image_path="full")


def test_image_path_without_recorded_roots_and_with_several(tmp_path):
    private = tmp_path / "Users" / "bob" / "clients"
    data = _dataset(tmp_path / "d", paths=lambda i: str(private / ("acme" if i < 3 else "zeta") / f"{i}.jpg"))
    _export(data, out := tmp_path / "common")
    assert sorted(m["image_path"] for m in _json_members(out).values()) == [
        "acme/0.jpg", "acme/1.jpg", "acme/2.jpg", *(f"zeta/{i}.jpg" for i in range(3, 8))]
    assert b"bob" not in _all_tar_bytes(out)

    store.update_metadata(data["derived"], {"images_roots": [str(private / "acme"), str(private / "zeta")]})
    _export(data, out := tmp_path / "roots")
    assert sorted(m["image_path"] for m in _json_members(out).values()) == [f"{i}.jpg" for i in range(8)]


def test_uris_are_kept(tmp_path):
    data = _dataset(tmp_path / "d", paths=lambda i: f"s3://bucket/x/{i}.jpg" if i % 2 else f"/srv/me/{i}.jpg")
    _export(data, out := tmp_path / "out")
    assert {k: m["image_path"] for k, m in _json_members(out).items()} == {
        f"img_{i:04d}": f"s3://bucket/x/{i}.jpg" if i % 2 else f"{i}.jpg" for i in range(8)}


# ------------------------------------------------------------------------ user metadata
def _stage1_extra(i: int) -> dict:
    extra = {"source": "flickr"} if i % 3 == 0 else {}
    if i in (2, 5):
        extra["license"] = "cc-by-4.0"
    extra["score"] = 1 if i % 2 else 0.5  # ints and floats
    extra["weird"] = "x" if i == 4 else 3  # str and int: dropped
    extra["flag"] = True if i else 1  # bool and int: dropped
    extra["always_null"] = None
    # no `provenance` field: records of an older manifest, which vouch for their files
    extra["image_fingerprint"] = {"size": 1, "sha256": "ab"}
    return extra


def test_partial_and_mixed_fields(tmp_path, caplog):
    data = _dataset(tmp_path / "d", extra=_stage1_extra)
    with caplog.at_level(logging.WARNING):
        s = _export(data, out := tmp_path / "out")
    members = _json_members(out)
    for i in range(8):
        m = members[f"img_{i:04d}"]
        assert list(m)[7:] == ["always_null", "license", "score", "source"]
        assert m["source"] == ("flickr" if i % 3 == 0 else None)
        assert m["license"] == ("cc-by-4.0" if i in (2, 5) else None)
        assert m["score"] == (1.0 if i % 2 else 0.5) and isinstance(m["score"], float)
        assert m["always_null"] is None
        assert "provenance" not in m and "image_fingerprint" not in m
    assert s.dropped_fields == {"flag": "mixed types (bool, int)", "weird": "mixed types (int, str)"}
    assert s.field_notes == {
        "always_null": "null in 8 of 8 samples", "license": "null in 6 of 8 samples",
        "score": "ints written as floats (the field mixes int and float values)", "source": "null in 5 of 8 samples",
    }
    summary = format_summary(s)
    assert "provenance" not in summary and "image_fingerprint" not in summary and "provenance" not in caplog.text
    index = json.loads((out / "index.json").read_text())
    assert {k: index["json_field_types"][k] for k in ("always_null", "license", "score", "source")} == {
        "always_null": "null", "license": "string", "score": "float64", "source": "string"}
    assert index["dropped_fields"] == s.dropped_fields
    assert json.loads((out / "stats.json").read_text())["field_notes"] == s.field_notes


def test_fields_are_judged_on_the_exported_samples_only(tmp_path):
    # "license" only on records the --limit leaves out; "note" is a list only there
    data = _dataset(tmp_path / "d", extra=lambda i: {"license": "x", "note": [1]} if i >= 2 else {"note": "ok"})
    s = _export(data, out := tmp_path / "out", limit=2)
    assert s.written_samples == 2 and "license" not in s.json_fields and s.dropped_fields == {}
    assert [m["note"] for m in _json_members(out).values()] == ["ok", "ok"]


def test_datasets_loads_an_export_with_partial_fields(tmp_path):
    from datasets import load_dataset

    data = _dataset(tmp_path / "d", extra=_stage1_extra)
    _export(data, out := tmp_path / "out", shard_size=3)
    files = sorted(str(p) for p in (out / "bucket_64x64").glob("*.tar"))
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "c1"))
    rows = {row["__key__"]: row["json"] for row in ds}
    assert len(rows) == 4
    assert [rows[f"img_{i:04d}"]["source"] for i in range(4)] == ["flickr", None, None, "flickr"]
    assert [rows[f"img_{i:04d}"]["license"] for i in range(4)] == [None, None, "cc-by-4.0", None]
    assert [rows[f"img_{i:04d}"]["score"] for i in range(4)] == [0.5, 1.0, 0.5, 1.0]
    index = json.loads((out / "index.json").read_text())
    assert ds.features == hf_features(index)  # what the builder infers is what index.json declares

    # A field null in all of the first samples the builder looks at: it cannot infer its type,
    # the declared features load it.
    data = _dataset(tmp_path / "d2", per_bucket=8, extra=lambda i: {"license": "mit"} if i in (6, 7) else {})
    _export(data, out := tmp_path / "out2", shard_size=8, buckets="64x64")
    files = sorted(str(p) for p in (out / "bucket_64x64").glob("*.tar"))
    features = hf_features(json.loads((out / "index.json").read_text()))
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "c2"),
                      features=features)
    assert [row["json"]["license"] for row in ds] == [None] * 6 + ["mit", "mit"]
    arrays = ds.with_format("numpy")[0]
    stored = np.load(store.artifact_path(data["derived"], "vae", "img_0000"))
    np.testing.assert_array_equal(arrays["vae.npy"], stored)
    assert arrays["t5m.npy"].tolist() == data["records"][0]["t5_attention_mask"]


def test_mask_member_is_what_numpy_writes():
    from prep.export.fields import mask_member

    rng = np.random.default_rng(0)
    for n in (0, 3, 77):
        mask = [1] * n + [0] * (77 - n)
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asarray(mask, dtype=np.uint8), version=(1, 0), allow_pickle=False)
        assert mask_member({"t5_attention_mask": mask}) == buf.getvalue()
    short = rng.integers(0, 2, 5).tolist()  # never ready, but written like numpy would
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(short, dtype=np.uint8), version=(1, 0), allow_pickle=False)
    assert mask_member({"t5_attention_mask": short}) == buf.getvalue()


def test_paths_with_only_the_root_in_common_keep_their_file_name_only(tmp_path):
    data = _dataset(tmp_path / "d", paths=lambda i: f"/home/alice/p/{i}.jpg" if i % 2 else f"/mnt/bob_disk/{i}.jpg")
    _export(data, out := tmp_path / "out")
    assert sorted(m["image_path"] for m in _json_members(out).values()) == [f"{i}.jpg" for i in range(8)]
    assert b"alice" not in _all_tar_bytes(out) and b"bob_disk" not in _all_tar_bytes(out)


def test_local_uris_lose_their_private_folders_too() -> None:
    from prep.export.fields import relative_image_path

    tar = "tar:///home/alice/secret/shards/00001.tar?offset=1536&size=2048#000010012.jpg"
    assert relative_image_path(tar, ("/home/alice/secret",)) == "tar:shards/00001.tar#000010012.jpg"
    assert relative_image_path(tar, (), "/home/alice/secret/shards") == "tar:00001.tar#000010012.jpg"
    row = "hfds:///home/alice/secret/ds/train/12#image"
    assert relative_image_path(row, ("/home/alice/secret",)) == "hfds:ds/train/12#image"
    assert relative_image_path("hf://datasets/org/name@abc/train/12#image", ()) == "hf://datasets/org/name@abc/train/12#image"
