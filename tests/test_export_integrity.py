"""Integrity of what the export ships: each side file is read once and checked (header, shape,
dtype, C order, exact size, finite values) before its bytes go into the tar; a failing sample is
skipped and counted, deterministically and across resumes; a header is never trusted before the
file size; a damaged index.json or sidecar is a one-line ValueError naming the file and the key."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest
from helpers_export import build_dataset, tar_bytes

from prep import store
from prep.buckets import latent_shape
from prep.cli import main
from prep.export import tarwriter
from prep.export import webdataset as wexp
from prep.export.resume import sidecar_path
from prep.export.webdataset import export_webdataset

F16 = np.dtype(np.float16)
VAE_64 = latent_shape("64x64")  # (16, 8, 8)


def _export(data, out, **kw):
    kw.setdefault("progress_every", 0)
    return export_webdataset(data["manifest"], data["derived"], out, **kw)


def _all_arrays(out):
    for path in sorted(out.rglob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".npy"):
                    yield member.name, np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)


def _npy_bytes(array: np.ndarray, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asfortranarray(array) if fortran else array, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> dict:
    """The usual dataset with non-finite values in three side files (headers fine: all ready)."""
    data = build_dataset(tmp_path_factory.mktemp("poisoned"), broken=False)
    vae = np.load(store.artifact_path(data["derived"], "vae", "img_0001"))
    vae[0, 0, 0] = np.nan
    store.save_artifact(data["derived"], "vae", "img_0001", vae)
    t5 = np.load(store.artifact_path(data["derived"], "t5", "img_0007"))
    t5[5, 5] = np.inf
    store.save_artifact(data["derived"], "t5", "img_0007", t5)
    dinov3 = np.load(store.artifact_path(data["derived"], "dinov3", "img_0012"))
    dinov3[3] = -np.inf
    store.save_artifact(data["derived"], "dinov3", "img_0012", dinov3)
    return data


def test_non_finite_samples_are_skipped_and_counted(poisoned, tmp_path):
    s = _export(poisoned, tmp_path / "out", shard_size=2)
    assert s.ready_records == 15 and s.written_samples == 12
    assert s.skipped_at_write == {
        "dinov3 invalid: non-finite values": 1, "t5 invalid: non-finite values": 1, "vae invalid: non-finite values": 1,
    }
    keys = set()
    for name, array in _all_arrays(tmp_path / "out"):
        keys.add(name.split(".")[0])
        assert np.isfinite(array).all(), name  # the export never ships a NaN/Inf array
    assert keys == {f"img_{i:04d}" for i in range(15)} - {"img_0001", "img_0007", "img_0012"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert stats["skipped_at_write"] == s.skipped_at_write and stats["written_samples"] == 12 == index["samples"]
    assert {b: e["samples"] for b, e in index["buckets"].items()} == {"64x64": 4, "64x128": 4, "128x64": 4}
    assert "not exported (side file failed the check while writing): vae invalid: non-finite values: 1" in (
        wexp.format_summary(s)
    )
    # deterministic, whatever the number of processes
    _export(poisoned, tmp_path / "again", shard_size=2, num_workers=1)
    assert tar_bytes(tmp_path / "again") == tar_bytes(tmp_path / "out")
    for name in ("index.json", "stats.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_skips_survive_resume_and_a_fixed_file_comes_back(poisoned, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    _export(poisoned, reference, shard_size=1)  # img_0001 alone in its shard: that shard has no file
    assert not (reference / "bucket_64x64" / "shard-000001.tar").exists()
    assert "bucket_64x64/shard-000001.tar" not in (reference / "index.json").read_text()

    out = tmp_path / "out"
    real, calls = tarwriter.sample_members, {"n": 0}

    def crash_at_the_ninth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(tarwriter, "sample_members", crash_at_the_ninth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _export(poisoned, out, shard_size=1, num_workers=1)
    monkeypatch.setattr(tarwriter, "sample_members", real)
    s = _export(poisoned, out, shard_size=1, resume=True)
    assert s.kept_shards == 8 and s.new_shards == 7  # the empty shard of img_0001 is kept too
    assert tar_bytes(out) == tar_bytes(reference)
    for name in ("index.json", "stats.json", "README.md"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name

    vae_path = store.artifact_path(poisoned["derived"], "vae", "img_0001")
    poisoned_bytes = vae_path.read_bytes()
    vae = np.load(vae_path)
    store.save_artifact(poisoned["derived"], "vae", "img_0001", np.nan_to_num(vae))
    try:
        s = _export(poisoned, out, shard_size=1, resume=True)
        assert (s.kept_shards, s.new_shards) == (14, 1)
        assert s.skipped_at_write == {"dinov3 invalid: non-finite values": 1, "t5 invalid: non-finite values": 1}
        assert (out / "bucket_64x64" / "shard-000001.tar").is_file()
    finally:
        vae_path.write_bytes(poisoned_bytes)


def test_a_file_broken_after_the_readiness_check_is_skipped(tmp_path, monkeypatch):
    data = build_dataset(tmp_path / "data", per_bucket=2, broken=False)
    real = wexp.readiness

    def then_break(*args, **kwargs):
        ready = real(*args, **kwargs)
        path = store.artifact_path(data["derived"], "vae", "img_0000")
        path.write_bytes(path.read_bytes()[:-10])  # truncated
        store.artifact_path(data["derived"], "t5", "img_0003").unlink()
        return ready

    monkeypatch.setattr(wexp, "readiness", then_break)
    s = _export(data, tmp_path / "out", num_workers=2)
    assert s.ready_records == 6 and s.written_samples == 4
    assert s.skipped_at_write == {"t5 missing": 1, "vae invalid: truncated payload": 1}


def _write(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def header_status(path: str, shape, dtype) -> str | None:
    """What readiness sees of a side file (its header and size, no data read)."""
    try:
        store.read_npy(path, shape, dtype, data=False)
    except FileNotFoundError:
        return "missing"
    except store.BadArray as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda a: _npy_bytes(a), None),
        (lambda a: _npy_bytes(np.ascontiguousarray(a.transpose(0, 2, 1)), fortran=True), "Fortran-order array"),
        (lambda a: _npy_bytes(a) + b"\x00" * 8, "trailing bytes after the array"),
        (lambda a: _npy_bytes(a)[:-2], "truncated payload"),
        (lambda a: _npy_bytes(a.astype(">f2")), "dtype >f2 != float16"),
        (lambda a: _npy_bytes(a.astype(np.float32)), "dtype float32 != float16"),
        (lambda a: _npy_bytes(a[:, :4]), "shape (16, 4, 8) != (16, 8, 8)"),
        (lambda a: _npy_bytes(np.where(a > 0, np.float16(np.nan), a)), "non-finite values"),
        (lambda a: b"\x93NUMPY\x01\x00" + b"\xff" * 300, "oversized .npy header"),
        (lambda a: b"not an npy file at all", "not a .npy file"),
        (lambda a: b"", "not a .npy file"),
    ],
    ids=["valid", "fortran", "trailing", "truncated", "big-endian", "float32", "shape", "nan", "bad-header",
         "not-npy", "empty"],
)
def test_side_file_checks(tmp_path, content, reason):
    array = np.random.default_rng(0).standard_normal(VAE_64).astype(F16)
    path = _write(tmp_path, "x.npy", content(array))
    data, why, st = tarwriter.read_side_file(path, VAE_64, F16)
    if reason is None:
        assert why == "" and data == (tmp_path / "x.npy").read_bytes() and st is not None
    else:
        assert data is None and why == f"invalid: {reason}"
    assert header_status(path, VAE_64, F16) == (None if reason in (None, "non-finite values") else reason)


def test_pickled_and_missing_files(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = _write(tmp_path, "obj.npy", buf.getvalue())
    assert tarwriter.read_side_file(path, (1,), F16)[1] == "invalid: object array (pickle) refused"
    assert tarwriter.read_side_file(str(tmp_path / "none.npy"), VAE_64, F16) == (None, "missing", None)
    assert header_status(str(tmp_path / "none.npy"), VAE_64, F16) == "missing"


def test_a_huge_claimed_shape_allocates_nothing(tmp_path):
    """A 4 KB file claiming (16, 100000, 100000): never sized by its header."""
    header = "{'descr': '<f2', 'fortran_order': False, 'shape': (16, 100000, 100000), }"
    header = header.ljust(118) + "\n"
    small = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 3968
    huge_claim = _write(tmp_path, "huge.npy", small)
    right_header_but_padded = _write(tmp_path, "padded.npy", _npy_bytes(np.zeros(VAE_64, F16)) + bytes(50 << 20))
    wrong_shape = "shape (16, 100000, 100000) != (16, 8, 8)"
    tracemalloc.start()
    try:
        assert header_status(huge_claim, VAE_64, F16) == wrong_shape
        assert tarwriter.read_side_file(huge_claim, VAE_64, F16)[1] == f"invalid: {wrong_shape}"
        # expected to be that shape: the size (4 KB) gives it away, nothing sized by the claim
        assert header_status(huge_claim, (16, 100000, 100000), F16) == "truncated payload"
        assert tarwriter.read_side_file(huge_claim, (16, 100000, 100000), F16)[1] == "invalid: truncated payload"
        # a 50 MB file is not read when no valid file of the expected shape can be that big
        assert tarwriter.read_side_file(right_header_but_padded, VAE_64, F16)[1] == "invalid: wrong file size"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_export_of_a_huge_claim_file_reports_it_not_ready(tmp_path):
    data = build_dataset(tmp_path / "data", per_bucket=1, broken=False)
    path = store.artifact_path(data["derived"], "vae", "img_0000")
    header = "{'descr': '<f2', 'fortran_order': False, 'shape': (16, 100000, 100000), }".ljust(118) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(3968))
    s = _export(data, tmp_path / "out")
    assert s.skipped_incomplete == {"vae invalid": 1} and s.written_samples == 2


# ------------------------------------------------------------------- damaged index files
@pytest.fixture
def finished(tmp_path) -> tuple[dict, object]:
    data = build_dataset(tmp_path / "data", per_bucket=2, broken=False)
    out = tmp_path / "out"
    _export(data, out, shard_size=1)
    return data, out


@pytest.mark.parametrize("key", ["path", "sha256", "bytes", "bucket", "samples"])
def test_index_without_a_key_is_a_one_line_error_on_resume(finished, key, capsys):
    data, out = finished
    index = json.loads((out / "index.json").read_text())
    del index["shards"][2][key]
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"index\.json: shard entry 2 has no '{key}' key"):
        _export(data, out, shard_size=1, resume=True)
    args = ["export", "webdataset", "--input-jsonl", str(data["manifest"]), "--derived-dir", str(data["derived"]),
            "--output-dir", str(out), "--shard-size", "1", "--progress-every", "0", "--resume"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("prep: error: ValueError") and f"'{key}'" in err and "index.json" in err
    assert "\n" not in err and "Traceback" not in err and "KeyError" not in err
    with pytest.raises(ValueError, match="index.json"):
        _export(data, out, shard_size=1, resume=True, dry_run=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda i: {"format": "x"}, "has no 'shards' list"),
        (lambda i: [1, 2], "not a JSON object"),
        (lambda i: {**i, "shards": [*i["shards"][:1], "x"]}, "shard entry 1 is not a JSON object"),
        (lambda i: {**i, "shards": [{**i["shards"][0], "samples": "3"}]}, "bad 'samples' value"),
    ],
)
def test_other_damaged_indexes(finished, damage, message):
    data, out = finished
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(damage(index)))
    with pytest.raises(ValueError, match=message):
        _export(data, out, shard_size=1, resume=True)
    (out / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        _export(data, out, shard_size=1, resume=True)


def test_sidecar_without_a_key_is_a_one_line_error(finished):
    data, out = finished
    side = sidecar_path(out, "bucket_64x128/shard-000001.tar")
    info = json.loads(side.read_text())
    del info["fingerprint"]
    side.write_text(json.dumps(info))
    (out / "index.json").unlink()  # an unfinished export: only the sidecars are read
    with pytest.raises(ValueError, match=r"shard-000001\.json: sidecar has no 'fingerprint' key"):
        _export(data, out, shard_size=1, resume=True, num_workers=2)


def test_index_sha_disagreeing_with_the_sidecar_rewrites_the_shard(finished):
    data, out = finished
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["sha256"] = hashlib.sha256(b"other").hexdigest()
    (out / "index.json").write_text(json.dumps(index))
    s = _export(data, out, shard_size=1, resume=True)
    assert (s.kept_shards, s.new_shards) == (5, 1)
