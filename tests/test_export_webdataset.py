"""`prep export webdataset`: readiness counts, layout, read-back with three readers, reproducibility,
shuffle/limit, overwrite/resume after an interruption, dry run, unsafe ids, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers_export import SMALL_BUCKETS, build_dataset, side_arrays, tar_bytes

from prep import store
from prep.cli import main
from prep.export import tarwriter
from prep.export import webdataset as wexp
from prep.export.webdataset import export_webdataset

MEMBER_SUFFIXES = ["json", "dinov3.npy", "vae.npy", "t5h.npy", "t5m.npy"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return build_dataset(tmp_path_factory.mktemp("export_data"))


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory) -> tuple[Path, wexp.ExportSummary]:
    """An uninterrupted export with 2 samples per shard (3 shards per bucket)."""
    out = tmp_path_factory.mktemp("baseline") / "shards"
    summary = export_webdataset(data["manifest"], data["derived"], out, shard_size=2, progress_every=0)
    return out, summary


def _export(data, out, **kw):
    kw.setdefault("progress_every", 0)
    return export_webdataset(data["manifest"], data["derived"], out, **kw)


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _samples_by_key(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.rglob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def _check_arrays(derived: Path, image_id: str, dinov3, vae, t5h, t5m, mask_record=None) -> None:
    expected = side_arrays(derived, image_id)
    np.testing.assert_array_equal(np.asarray(dinov3, dtype=np.float32), expected["dinov3"])
    np.testing.assert_array_equal(np.asarray(vae, dtype=np.float16), expected["vae"])
    np.testing.assert_array_equal(np.asarray(t5h, dtype=np.float16), expected["t5_hidden"])
    if mask_record is not None:
        np.testing.assert_array_equal(np.asarray(t5m), np.asarray(mask_record, dtype=np.uint8))


def test_counts_layout_and_members(data, baseline):
    out, s = baseline
    assert s.total_records == len(data["records"])
    assert s.rejected_lines == 2  # "../evil" and a non-JSON line
    assert s.ready_records == len(data["ready"]) == s.written_samples
    assert s.skipped_incomplete == data["reasons"]
    assert s.skipped_records == 5
    assert s.written_shards == 9 and s.new_shards == 9 and s.kept_shards == 0
    assert {b: e["samples"] for b, e in s.buckets.items()} == dict.fromkeys(SMALL_BUCKETS, 5)

    index = json.loads((out / "index.json").read_text())
    assert [sh["path"] for sh in index["shards"]] == [
        f"bucket_{b}/shard-{i:06d}.tar" for b in sorted(SMALL_BUCKETS) for i in range(3)
    ]
    for shard in index["shards"]:
        path = out / shard["path"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert sum(sh["samples"] for sh in index["shards"]) == 15
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped_incomplete"] == data["reasons"] and stats["written_samples"] == 15

    # member names, order and fixed headers
    members = _members(out / "bucket_64x64" / "shard-000000.tar")
    assert [m.name for m in members] == [f"img_0000.{s}" for s in MEMBER_SUFFIXES] + [
        f"img_0001.{s}" for s in MEMBER_SUFFIXES
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    assert not list(out.rglob("*.prep-tmp"))

    # JSON members: one key set in every sample; a user field missing in some records is null
    # there (rare), a list field is dropped (tags); image_path relative to the common parent
    samples = _samples_by_key(out)
    assert sorted(samples) == sorted(data["ready"])
    keysets = set()
    by_id = {r["image_id"]: r for r in data["records"]}
    for key, sample in samples.items():
        assert sorted(sample) == sorted(MEMBER_SUFFIXES)
        obj = json.loads(sample["json"])
        keysets.add(tuple(obj))
        assert obj["image_id"] == key and obj["caption"] == by_id[key]["caption"]
        assert obj["image_path"] == f"{key}.jpg" and obj["rare"] == by_id[key].get("rare")
        assert sample["dinov3.npy"] == store.artifact_path(data["derived"], "dinov3", key).read_bytes()
        assert sample["vae.npy"] == store.artifact_path(data["derived"], "vae", key).read_bytes()
        assert sample["t5h.npy"] == store.artifact_path(data["derived"], "t5", key).read_bytes()
        mask = np.load(io.BytesIO(sample["t5m.npy"]), allow_pickle=False)
        assert mask.dtype == np.uint8 and mask.tolist() == by_id[key]["t5_attention_mask"]
    assert keysets == {
        ("image_id", "image_path", "caption", "height", "width", "aspect_bucket", "format_version", "rare", "score",
         "source")
    }
    assert s.dropped_fields == {"tags": "not a scalar (list or dict)"}
    assert s.field_notes == {"rare": "null in 11 of 15 samples"}
    card = (out / "README.md").read_text()
    assert "config_name: bucket_64x64" in card and "path: bucket_64x64/*.tar" in card
    assert "(z - shift_factor) * scaling_factor" in card


def test_read_back_with_webdataset(data, baseline):
    import webdataset as wds

    out, _ = baseline
    by_id = {r["image_id"]: r for r in data["records"]}
    urls = [str(p) for p in sorted(out.rglob("*.tar"))]
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
            key = sample["__key__"]
            seen.append(key)
            assert sample["json"]["image_id"] == key
            _check_arrays(
                data["derived"], key, sample["dinov3.npy"], sample["vae.npy"], sample["t5h.npy"],
                sample["t5m.npy"], by_id[key]["t5_attention_mask"],
            )
            assert sample["vae.npy"].dtype == np.float16 and sample["dinov3.npy"].dtype == np.float32
    assert sorted(seen) == sorted(data["ready"])


def test_read_back_with_datasets(data, baseline, tmp_path):
    from datasets import load_dataset

    out, _ = baseline
    by_id = {r["image_id"]: r for r in data["records"]}
    files = sorted(str(p) for p in (out / "bucket_64x128").glob("*.tar"))
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "c1"))
    assert len(ds) == 5
    for row in ds:
        key = row["__key__"]
        _check_arrays(data["derived"], key, row["dinov3.npy"], row["vae.npy"], row["t5h.npy"], row["t5m.npy"],
                      by_id[key]["t5_attention_mask"])

    # The export folder is a dataset repo: one config per bucket from the card's YAML.
    ds = load_dataset(str(out), name="bucket_64x64", split="train", cache_dir=str(tmp_path / "c2"))
    assert sorted(ds["__key__"]) == [f"img_{i:04d}" for i in range(5)]
    for row in ds:
        key = row["__key__"]
        assert row["json"]["aspect_bucket"] == "64x64"
        _check_arrays(data["derived"], key, row["dinov3.npy"], row["vae.npy"], row["t5h.npy"], row["t5m.npy"],
                      by_id[key]["t5_attention_mask"])


def test_reproducible_and_shuffle_limit(data, tmp_path):
    a = _export(data, tmp_path / "a", shard_size=3, shuffle=True, seed=7, limit=10)
    b = _export(data, tmp_path / "b", shard_size=3, shuffle=True, seed=7, limit=10)
    assert tar_bytes(tmp_path / "a") == tar_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    assert a.written_samples == b.written_samples == 10

    order = list(range(len(data["ready"])))
    random.Random(7).shuffle(order)
    chosen = [data["ready"][i] for i in order[:10]]
    bucket_of = {r["image_id"]: r["aspect_bucket"] for r in data["records"]}
    expected = [k for bucket in sorted(SMALL_BUCKETS) for k in chosen if bucket_of[k] == bucket]
    got = []
    for path in sorted((tmp_path / "a").rglob("*.tar")):
        got += [m.name.split(".")[0] for m in _members(path) if m.name.endswith(".json")]
    assert got == expected
    # each shard holds one bucket only, at most 3 samples
    for shard in json.loads((tmp_path / "a" / "index.json").read_text())["shards"]:
        assert shard["samples"] <= 3
        assert shard["path"].startswith(f"bucket_{shard['bucket']}/")

    _export(data, tmp_path / "c", shard_size=3, shuffle=True, seed=8, limit=10)
    assert tar_bytes(tmp_path / "c") != tar_bytes(tmp_path / "a")


def test_bucket_selection(data, tmp_path):
    s = _export(data, tmp_path / "out", shard_size=10, buckets=["64x64,128x64"])
    assert sorted(s.buckets) == ["128x64", "64x64"]
    assert s.excluded_by_bucket == 5 + 1  # 64x128 ready + bad_shape
    assert [p.name for p in sorted((tmp_path / "out").glob("bucket_*"))] == ["bucket_128x64", "bucket_64x64"]
    with pytest.raises(ValueError, match="bad bucket"):
        _export(data, tmp_path / "bad", buckets=["64x65"])


def test_existing_export_needs_overwrite(data, baseline, tmp_path):
    out = tmp_path / "out"
    _export(data, out, shard_size=1)
    assert len(list(out.rglob("*.tar"))) == 15
    with pytest.raises(FileExistsError, match="--overwrite"):
        _export(data, out, shard_size=2)
    s = _export(data, out, shard_size=2, overwrite=True)
    assert s.written_shards == 9
    assert tar_bytes(out) == tar_bytes(baseline[0])  # old 1-sample shards are gone
    with pytest.raises(ValueError, match="exclude"):
        _export(data, out, overwrite=True, resume=True)


def test_interrupted_export_then_resume(data, baseline, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = tarwriter.sample_members
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # 2nd sample of the 4th shard (shards of 2, 2, 1 per bucket)
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(tarwriter, "sample_members", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _export(data, out, shard_size=2, num_workers=1)
    monkeypatch.setattr(tarwriter, "sample_members", real)

    assert not (out / "index.json").exists()
    assert not list(out.rglob("*.prep-tmp"))  # the half-written shard's temp file is gone
    done = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar"))
    assert done == ["bucket_128x64/shard-000000.tar", "bucket_128x64/shard-000001.tar", "bucket_128x64/shard-000002.tar"]
    for rel in done:  # complete shards only, identical to the uninterrupted export
        assert (out / rel).read_bytes() == (baseline[0] / rel).read_bytes()

    # What a SIGKILL would leave: a stray temp file, and a final-named tar with no done-sidecar.
    (out / "bucket_64x128").mkdir(exist_ok=True)
    (out / "bucket_64x128" / ".shard-000001.tar.abc.prep-tmp").write_bytes(b"partial")
    (out / "bucket_64x128" / "shard-000000.tar").write_bytes(b"truncated")
    # A shard from an older plan that the new plan does not have.
    (out / "bucket_64x64").mkdir(exist_ok=True)
    (out / "bucket_64x64" / "shard-000009.tar").write_bytes(b"stale")

    with pytest.raises(FileExistsError):
        _export(data, out, shard_size=2)
    dry = _export(data, out, shard_size=2, resume=True, dry_run=True)
    assert dry.kept_shards == 3
    s = _export(data, out, shard_size=2, resume=True)
    assert s.kept_shards == 3 and s.new_shards == 6 and s.removed_stale_shards == 1
    assert tar_bytes(out) == tar_bytes(baseline[0])
    assert (out / "index.json").read_bytes() == (baseline[0] / "index.json").read_bytes()
    assert not list(out.rglob("*.prep-tmp"))

    # A side file re-encoded after the export: resume rewrites exactly the shard holding it.
    vae = np.load(store.artifact_path(data["derived"], "vae", "img_0011"))
    store.save_artifact(data["derived"], "vae", "img_0011", vae + 1)
    try:
        s = _export(data, out, shard_size=2, resume=True)
        assert (s.kept_shards, s.new_shards) == (8, 1)
        assert json.loads((out / "index.json").read_text())["shards"][0]["sha256"] != json.loads(
            (baseline[0] / "index.json").read_text()
        )["shards"][0]["sha256"]
    finally:
        store.save_artifact(data["derived"], "vae", "img_0011", vae)


def test_dry_run_writes_nothing(data, tmp_path):
    out = tmp_path / "out"
    s = _export(data, out, shard_size=4, dry_run=True)
    assert not out.exists()
    assert s.dry_run and s.planned_samples == 15 and s.planned_shards == 6 and s.written_samples == 0
    assert s.skipped_incomplete == data["reasons"]


def test_unsafe_id_refused(data, tmp_path):
    for bad in ("../evil", "a.b", "/abs", "", None):
        with pytest.raises(ValueError, match="refusing to export image_id"):
            wexp.check_key(bad)
    record = dict(data["records"][0], image_id="x.y")
    ctx = tarwriter.WriteContext(str(tmp_path), str(data["derived"]))
    with pytest.raises(ValueError, match="x.y"):
        tarwriter.sample_members(ctx, record, hashlib.sha256())


def test_empty_export(tmp_path):
    data = build_dataset(tmp_path, per_bucket=0)
    s = _export(data, tmp_path / "out")
    assert s.written_samples == 0 and s.ready_records == 0
    assert json.loads((tmp_path / "out" / "index.json").read_text())["shards"] == []


def test_cli(data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["export", "webdataset", "--input-jsonl", str(data["manifest"]), "--derived-dir", str(data["derived"]),
            "--output-dir", str(out), "--shard-size", "4", "--progress-every", "0"]
    assert main([*args, "--dry-run", "--bucket", "64x64", "--bucket", "128x64"]) == 0
    printed = capsys.readouterr().out
    assert "would write 10 samples in 4 shards" in printed and not out.exists()
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written_samples"] == 15
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("prep: error: FileExistsError") and "\n" not in err
    assert main([*args, "--resume"]) == 0
    with pytest.raises(SystemExit):
        main(["export", "webdataset", "--help"])
    helptext = capsys.readouterr().out
    for flag in ("--input-jsonl", "--derived-dir", "--output-dir", "--limit", "--shard-size", "--shuffle", "--seed",
                 "--bucket", "--overwrite", "--resume", "--dry-run", "--progress-every"):
        assert flag in helptext


def test_card_from_metadata(tmp_path):
    import yaml

    data = build_dataset(tmp_path, per_bucket=1, broken=False)
    store.update_metadata(data["derived"], {
        "vae": {"latent": "posterior_mean", "transform": "(z - shift_factor) * scaling_factor",
                "shift_factor": 0.1159, "scaling_factor": 0.3611, "model_id": "black-forest-labs/FLUX.1-dev",
                "subfolder": "vae"},
        "models": {"vae": {"model_id": "black-forest-labs/FLUX.1-dev", "revision": "abc123"},
                   "t5": {"model_id": "google-t5/t5-large", "revision": "unknown"}},
    })
    out = tmp_path / "out"
    _export(data, out)
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["configs"][0]["config_name"] == "all" and header["configs"][0]["default"] is True
    assert [{k: c[k] for k in ("config_name", "data_files")} for c in header["configs"][1:]] == [
        {"config_name": f"bucket_{b}", "data_files": [{"split": "train", "path": f"bucket_{b}/*.tar"}]}
        for b in sorted(SMALL_BUCKETS)
    ]
    for text in ("posterior_mean", "0.1159", "0.3611", "`black-forest-labs/FLUX.1-dev`", "abc123",
                 "google-t5/t5-large", "| `bucket_64x128` | (16, 16, 8) | 1 | 1 |"):
        assert text in card
