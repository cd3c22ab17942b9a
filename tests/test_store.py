"""Side files: safe paths, atomic .npy writes, safe loads (never unpickle), artifact and readiness checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from prep import store
from prep.config import DINOV3_DIM, T5_HIDDEN_DIM, T5_MAX_LENGTH
from prep.fsio import TMP_MARK
from prep.store import (
    METADATA_FILE,
    MISSING,
    VALID,
    UnsafeIdError,
    artifact_dir,
    artifact_ok,
    artifact_path,
    check_artifact,
    ensure_dirs,
    expected_shape,
    file_artifacts,
    load_npy,
    read_metadata,
    read_npy_header,
    readiness_reasons,
    save_artifact,
    save_npy,
    sweep_stray_temp_files,
    update_metadata,
)

MASK = [1] * 5 + [0] * (T5_MAX_LENGTH - 5)


def record(**overrides) -> dict:
    base = {
        "image_id": "img_1",
        "image_path": "/images/img_1.jpg",
        "caption": "a cat",
        "t5_attention_mask": list(MASK),
        "height": 1216,
        "width": 832,
        "aspect_bucket": "832x1216",
        "format_version": 2,
    }
    base.update(overrides)
    return base


def valid_arrays(rec: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {kind: rng.standard_normal(expected_shape(kind, rec)).astype(np.float32) for kind in file_artifacts()}


def save_all(base: Path, rec: dict) -> None:
    ensure_dirs(base)
    for kind, array in valid_arrays(rec).items():
        save_artifact(base, kind, rec["image_id"], array)


# ----------------------------------------------------------------------------- paths


def test_layout_and_dtypes(tmp_path):
    assert {k: (s.folder, s.dtype) for k, s in file_artifacts().items()} == {
        "dinov3": ("dinov3", np.dtype("float32")),
        "vae": ("vae_latents", np.dtype("float16")),
        "t5": ("t5_hidden", np.dtype("float16")),
    }
    assert artifact_path(tmp_path, "vae", "abc-1_X") == tmp_path / "vae_latents" / "abc-1_X.npy"
    assert artifact_path(str(tmp_path), "dinov3", "a" * 100) == tmp_path / "dinov3" / ("a" * 100 + ".npy")
    ensure_dirs(tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["dinov3", "t5_hidden", "vae_latents"]


@pytest.mark.parametrize(
    "image_id",
    ["../../etc/x", "a/b", "a\\b", "a\x00b", "", ".", "..", "a.b", "x.npy", "a" * 101, " a", "é", None, 12, ["a"]],
)
def test_artifact_path_refuses_unsafe_ids(tmp_path, image_id):
    with pytest.raises(UnsafeIdError, match="unsafe image_id"):
        artifact_path(tmp_path, "dinov3", image_id)
    assert issubclass(UnsafeIdError, ValueError)


def test_expected_shapes():
    assert expected_shape("dinov3", {}) == (DINOV3_DIM,) == (1024,)
    assert expected_shape("t5", {}) == (T5_MAX_LENGTH, T5_HIDDEN_DIM) == (77, 1024)
    assert expected_shape("vae", {"aspect_bucket": "832x1216"}) == (16, 152, 104)
    with pytest.raises(KeyError):
        expected_shape("clip", {})


# ----------------------------------------------------------------------------- save / load


def test_save_npy_casts_and_round_trips(tmp_path):
    array = np.arange(12, dtype=np.float64).reshape(3, 4) / 3
    path = tmp_path / "a.npy"
    save_npy(array, path, np.float16)
    loaded = load_npy(path)
    assert loaded.dtype == np.float16 and loaded.shape == (3, 4)
    np.testing.assert_array_equal(loaded, array.astype(np.float16))
    assert read_npy_header(path) == ((3, 4), np.dtype(np.float16))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_save_npy_makes_c_contiguous_and_accepts_lists(tmp_path):
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    save_npy(fortran, tmp_path / "f.npy", "float32")
    assert read_npy_header(tmp_path / "f.npy") == ((2, 3), np.dtype("float32"))
    np.testing.assert_array_equal(load_npy(tmp_path / "f.npy"), fortran)
    save_npy([1.5, 2.5], tmp_path / "l.npy", np.float32)
    np.testing.assert_array_equal(load_npy(tmp_path / "l.npy"), [1.5, 2.5])


def test_save_npy_refuses_object_arrays(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_npy(np.array([{"a": 1}], dtype=object), tmp_path / "o.npy", object)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("crash_point", ["write_array", "replace"])
def test_save_npy_crash_keeps_old_file_and_no_temp(tmp_path, monkeypatch, crash_point):
    path = tmp_path / "x.npy"
    save_npy(np.ones(4), path, np.float32)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("simulated crash")

    if crash_point == "write_array":
        real_write = np.lib.format.write_array

        def half_then_boom(f, array, **kwargs):  # a torn write: part of the data, then death
            real_write(f, array[:1], **kwargs)
            boom()

        monkeypatch.setattr(np.lib.format, "write_array", half_then_boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_npy(np.full(1000, 7.0), path, np.float32)
    monkeypatch.undo()
    assert path.read_bytes() == before
    np.testing.assert_array_equal(load_npy(path), np.ones(4, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_load_npy_none_for_missing_and_truncated(tmp_path):
    assert load_npy(tmp_path / "absent.npy") is None
    path = tmp_path / "t.npy"
    save_npy(np.ones((64, 64)), path, np.float32)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 140, 60, 10, 0):
        path.write_bytes(data[:cut])
        assert load_npy(path) is None, cut
        assert read_npy_header(path) is None, cut
    path.write_bytes(b"this is not numpy at all")
    assert load_npy(path) is None
    assert load_npy(tmp_path) is None  # a directory


def test_load_npy_none_for_an_npz_archive(tmp_path):
    zipped = tmp_path / "z.npy"
    with open(zipped, "wb") as f:
        np.savez(f, a=np.zeros(3))
    assert load_npy(zipped) is None
    assert read_npy_header(zipped) is None


_side_effects: list[str] = []


def _record_side_effect(marker: str) -> str:
    _side_effects.append(marker)
    Path(marker).write_text("unpickled!")
    return marker


class Evil:
    """Unpickling this runs `_record_side_effect`: proof that a load executed pickled code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_record_side_effect, (self.marker,))


def test_load_npy_never_unpickles(tmp_path):
    marker = tmp_path / "side_effect.txt"
    path = tmp_path / "evil.npy"
    np.save(path, np.array([Evil(str(marker))], dtype=object), allow_pickle=True)
    _side_effects.clear()
    assert load_npy(path) is None
    assert read_npy_header(path) is None
    assert not marker.exists() and _side_effects == []
    # the check can fail: an unsafe load does run the payload
    np.load(path, allow_pickle=True)
    assert marker.exists() and _side_effects == [str(marker)]


def test_check_artifact_never_unpickles(tmp_path):
    marker = tmp_path / "side_effect.txt"
    rec = record()
    ensure_dirs(tmp_path)
    np.save(artifact_path(tmp_path, "dinov3", rec["image_id"]), np.array([Evil(str(marker))] * 3, dtype=object))
    assert check_artifact(tmp_path, "dinov3", rec).startswith("invalid")
    assert check_artifact(tmp_path, "dinov3", rec, read_data=False).startswith("invalid")
    assert not marker.exists()


def test_case8_npy_header_reader_refuses_fortran_order_and_reads_versions(tmp_path):
    v1 = tmp_path / "v1.npy"
    np.save(v1, np.zeros((2, 5), dtype="<f2"))
    assert read_npy_header(v1) == ((2, 5), np.dtype("<f2"))
    v2 = tmp_path / "v2.npy"
    with open(v2, "wb") as f:
        np.lib.format.write_array(f, np.zeros(7, dtype=np.float32), version=(2, 0))
    assert read_npy_header(v2) == ((7,), np.dtype(np.float32))
    fortran = tmp_path / "fortran.npy"
    np.save(fortran, np.asfortranarray(np.zeros((3, 4), dtype=np.float32)))
    assert read_npy_header(fortran) is None
    assert read_npy_header(tmp_path / "absent.npy") is None
    scalar = tmp_path / "scalar.npy"
    np.save(scalar, np.float32(3))
    assert read_npy_header(scalar) == ((), np.dtype(np.float32))


# ----------------------------------------------------------------------------- check_artifact


def test_check_artifact_valid_and_missing(tmp_path):
    rec = record()
    for kind in file_artifacts():
        assert check_artifact(tmp_path, kind, rec) == MISSING
    save_all(tmp_path, rec)
    for kind in file_artifacts():
        assert check_artifact(tmp_path, kind, rec) == VALID
        assert check_artifact(tmp_path, kind, rec, read_data=False) == VALID
        assert artifact_ok(tmp_path, kind, rec)
    assert read_npy_header(artifact_path(tmp_path, "vae", "img_1")) == ((16, 152, 104), np.dtype(np.float16))


def test_check_artifact_truncated(tmp_path):
    rec = record()
    save_all(tmp_path, rec)
    path = artifact_path(tmp_path, "t5", "img_1")
    path.write_bytes(path.read_bytes()[:-2])
    assert check_artifact(tmp_path, "t5", rec) == "invalid: truncated payload"
    assert check_artifact(tmp_path, "t5", rec, read_data=False) == "invalid: truncated payload"
    assert not artifact_ok(tmp_path, "t5", rec)


def test_check_artifact_wrong_shape(tmp_path):
    rec = record()
    save_all(tmp_path, rec)
    save_npy(np.zeros(768), artifact_path(tmp_path, "dinov3", "img_1"), np.float32)
    assert check_artifact(tmp_path, "dinov3", rec) == "invalid: shape (768,) != (1024,)"
    # a latent of another bucket is the wrong shape for this record
    other = record(aspect_bucket="1216x832")
    assert check_artifact(tmp_path, "vae", other, read_data=False).startswith("invalid: shape (16, 152, 104)")


def test_check_artifact_wrong_dtype(tmp_path):
    rec = record()
    save_all(tmp_path, rec)
    save_npy(np.zeros(1024), artifact_path(tmp_path, "dinov3", "img_1"), np.float16)
    assert check_artifact(tmp_path, "dinov3", rec, read_data=False) == "invalid: dtype float16 != float32"
    save_npy(np.zeros((77, 1024)), artifact_path(tmp_path, "t5", "img_1"), np.float32)
    assert check_artifact(tmp_path, "t5", rec).startswith("invalid: dtype float32")
    big_endian = artifact_path(tmp_path, "dinov3", "img_1")
    np.save(big_endian, np.zeros(1024, dtype=">f4"))
    assert check_artifact(tmp_path, "dinov3", rec).startswith("invalid: dtype")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", list(file_artifacts()))
def test_check_artifact_non_finite_only_when_reading_data(tmp_path, kind, bad):
    rec = record()
    save_all(tmp_path, rec)
    array = valid_arrays(rec)[kind]
    array.flat[array.size // 2] = bad
    save_artifact(tmp_path, kind, "img_1", array)
    assert check_artifact(tmp_path, kind, rec, read_data=True) == "invalid: non-finite values"
    assert check_artifact(tmp_path, kind, rec, read_data=False) == VALID  # header only: shape and dtype fine


def test_save_artifact_float16_overflow_is_caught(tmp_path):
    """A float32 latent too large for float16 turns into inf on disk; the data check sees it."""
    rec = record()
    save_all(tmp_path, rec)
    latent = valid_arrays(rec)["vae"]
    latent[0, 0, 0] = 1e6
    with np.errstate(over="ignore"):
        save_artifact(tmp_path, "vae", "img_1", latent)
    assert check_artifact(tmp_path, "vae", rec, read_data=False) == VALID
    assert check_artifact(tmp_path, "vae", rec) == "invalid: non-finite values"


def test_check_artifact_bad_record(tmp_path):
    assert check_artifact(tmp_path, "dinov3", record(image_id="../x")).startswith("invalid: unsafe image_id")
    assert check_artifact(tmp_path, "vae", record(aspect_bucket="1000x1000")).startswith("invalid: bad bucket")
    assert check_artifact(tmp_path, "vae", {"image_id": "a"}).startswith("invalid")


def test_check_artifact_directory_in_place_of_file(tmp_path):
    rec = record()
    ensure_dirs(tmp_path)
    artifact_path(tmp_path, "dinov3", "img_1").mkdir()
    assert check_artifact(tmp_path, "dinov3", rec) == "invalid: a directory"


# ----------------------------------------------------------------------------- readiness


def test_readiness_reasons(tmp_path):
    rec = record()
    assert readiness_reasons(rec, tmp_path) == ["dinov3 missing", "vae missing", "t5 missing"]
    save_all(tmp_path, rec)
    assert readiness_reasons(rec, tmp_path, stamps=False) == []
    assert readiness_reasons(rec, tmp_path, read_data=True, stamps=False) == []

    latent = valid_arrays(rec)["vae"]
    latent[1, 2, 3] = np.nan
    save_artifact(tmp_path, "vae", "img_1", latent)
    assert readiness_reasons(rec, tmp_path, stamps=False) == []  # header only
    assert readiness_reasons(rec, tmp_path, read_data=True, stamps=False) == ["vae invalid"]

    os.remove(artifact_path(tmp_path, "t5", "img_1"))
    assert readiness_reasons(rec, tmp_path, read_data=True, stamps=False) == ["vae invalid", "t5 missing"]


def test_readiness_needs_the_records_own_stamp(tmp_path):
    """A valid file at the id of a record prep made is not ready unless the record stamped that very file."""
    from prep.prepare import adopt_record_artifacts

    made_by_prep = {**record(), "provenance": {}}
    save_all(tmp_path, made_by_prep)
    assert readiness_reasons(made_by_prep, tmp_path) == [
        "dinov3 not stamped for this record", "vae not stamped for this record", "t5 not stamped for this record"
    ]
    legacy = record()  # an older manifest's record (no provenance field) vouches for the files at its id
    assert readiness_reasons(legacy, tmp_path) == []
    assert adopt_record_artifacts(legacy, tmp_path, legacy=True) == 3  # adopted: now their bytes are stamped
    assert readiness_reasons(legacy, tmp_path) == []
    save_artifact(tmp_path, "dinov3", "img_1", valid_arrays(legacy)["dinov3"] + 1)  # replaced behind its back
    assert readiness_reasons(legacy, tmp_path) == ["dinov3 not stamped for this record"]


def test_readiness_reasons_record_defects(tmp_path):
    save_all(tmp_path, record())
    no_caption = record()
    del no_caption["caption"]
    assert readiness_reasons(no_caption, tmp_path, stamps=False) == ["missing caption"]
    assert readiness_reasons(record(image_id="../../etc/passwd"), tmp_path) == ["unsafe image_id"]
    no_id = record()
    del no_id["image_id"]
    assert readiness_reasons(no_id, tmp_path) == ["missing image_id"]
    # without a bucket the latent cannot be checked: only the record reason is given for it
    no_bucket = record()
    del no_bucket["aspect_bucket"]
    assert readiness_reasons(no_bucket, tmp_path, stamps=False) == ["missing aspect_bucket"]
    # the bucket changed: the stored latent no longer fits
    assert readiness_reasons(record(aspect_bucket="1024x1024"), tmp_path, stamps=False) == ["vae invalid"]


# ----------------------------------------------------------------------------- temp files, metadata


def test_sweep_stray_temp_files(tmp_path):
    ensure_dirs(tmp_path)
    for kind in file_artifacts():
        (artifact_dir(tmp_path, kind) / f".x.npy.abc{TMP_MARK}").write_bytes(b"torn")
    save_artifact(tmp_path, "dinov3", "keep", np.zeros(1024))
    (tmp_path / f"outside{TMP_MARK}").write_bytes(b"not an artifact folder")
    assert sweep_stray_temp_files(tmp_path) == 3
    assert [p.name for p in artifact_dir(tmp_path, "dinov3").iterdir()] == ["keep.npy"]
    assert (tmp_path / f"outside{TMP_MARK}").exists()
    assert sweep_stray_temp_files(tmp_path / "nothing") == 0


def test_metadata_read_update_merge(tmp_path):
    assert read_metadata(tmp_path) == {}
    assert update_metadata(tmp_path, {"latent": {"scale": 0.3611, "shift": 0.1159}}) == {
        "latent": {"scale": 0.3611, "shift": 0.1159}
    }
    merged = update_metadata(tmp_path, {"vae_model": "x/y", "ü": "ñ"})
    assert merged == {"latent": {"scale": 0.3611, "shift": 0.1159}, "vae_model": "x/y", "ü": "ñ"}
    assert read_metadata(tmp_path) == merged
    assert json.loads((tmp_path / METADATA_FILE).read_text(encoding="utf-8")) == merged
    assert update_metadata(tmp_path, {"vae_model": "z"})["vae_model"] == "z"
    assert read_metadata(tmp_path)["latent"] == {"scale": 0.3611, "shift": 0.1159}


def test_metadata_unreadable_reads_empty(tmp_path):
    (tmp_path / METADATA_FILE).write_text("{not json")
    assert read_metadata(tmp_path) == {}
    for content in ("[1, 2]", '"text"', "null", "3"):
        (tmp_path / METADATA_FILE).write_text(content)
        assert read_metadata(tmp_path) == {}, content
        assert update_metadata(tmp_path, {"a": 1}) == {"a": 1}


def test_metadata_update_crash_keeps_old(tmp_path, monkeypatch):
    update_metadata(tmp_path, {"a": 1})
    before = (tmp_path / METADATA_FILE).read_bytes()

    def boom(*args):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        update_metadata(tmp_path, {"b": 2})
    monkeypatch.undo()
    assert (tmp_path / METADATA_FILE).read_bytes() == before
    assert read_metadata(tmp_path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [METADATA_FILE]


def test_store_module_exports_used_constants():
    assert store.VALID == "valid" and store.MISSING == "missing"
