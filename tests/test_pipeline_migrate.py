"""The main job without models: scan, migrate (v0/v1 -> v2), journals, --no-resume, input errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep import journal
from prep.cli import main
from prep.store import load_npy


def write_jsonl(path: Path, lines: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def run_cli(*args: str) -> int:
    return main(["run", "--min-free-gb", "0", *args])


@pytest.fixture
def stage1(tmp_path: Path) -> dict:
    """A v0 + v1 manifest with malformed lines, and its images."""
    images = tmp_path / "images"
    make_image(images / "cat.jpg", 300, 200, 1)
    make_image(images / "dog.png", 200, 300, 2)
    rng = np.random.default_rng(0)
    vec0, vec1 = rng.normal(size=1024).tolist(), rng.normal(size=1024).tolist()
    mask = [1] * 6 + [0] * 71
    lines = [
        {"image_path": str(images / "cat.jpg"), "dinov3_embedding": vec0, "caption": "a cat"},
        "{not json",
        '["a list"]',
        {"caption": "no path"},
        {
            "image_path": str(images / "dog.png"),
            "dinov3_embedding": vec1,
            "caption": "a dog",
            "t5_attention_mask": mask,
            "height": 300,
            "width": 200,
            "source": "user-field",
        },
        {"image_path": str(images / "short.jpg"), "dinov3_embedding": [0.0] * 10, "caption": "short"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    write_jsonl(manifest, lines)
    return {"tmp": tmp_path, "images": images, "manifest": manifest, "base": tmp_path / "derived", "vecs": (vec0, vec1)}


def test_migrate_v0_v1_to_v2(stage1: dict) -> None:
    m, base = stage1["manifest"], stage1["base"]
    assert run_cli("--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate") == 0
    records = read_jsonl(m)
    cat, dog, short = records
    prov = cat.pop("provenance")  # the old record vouches for its own vector (model unknown) and caption
    assert prov["dinov3"]["origin"] == "migrated" and prov["dinov3"]["file"]["size"] > 4096
    assert prov["caption"]["source"] == "user"
    assert cat == {
        "image_id": "cat",
        "image_path": str(stage1["images"] / "cat.jpg"),
        "caption": "a cat",
        "height": 200,
        "width": 300,
        "aspect_bucket": "1216x832",
        "format_version": 2,
    }
    assert dog["source"] == "user-field" and dog["t5_attention_mask"] == [1] * 6 + [0] * 71
    assert dog["aspect_bucket"] == "832x1216" and dog["format_version"] == 2 and "dinov3_embedding" not in dog
    for image_id, vec in zip(("cat", "dog"), stage1["vecs"], strict=True):
        stored = load_npy(base / "dinov3" / f"{image_id}.npy")
        assert stored.dtype == np.float32 and stored.shape == (1024,)
        np.testing.assert_array_equal(stored, np.asarray(vec, dtype=np.float32))
    # the wrong-length record is reported, kept unchanged, not migrated
    assert short["dinov3_embedding"] == [0.0] * 10 and "format_version" not in short
    rejected = read_jsonl(m.with_name(m.name + ".rejected.jsonl"))
    assert [r["line"] for r in rejected] == [2, 3, 4]
    assert rejected[0]["text"] == "{not json"


def test_migrate_twice_changes_nothing(stage1: dict) -> None:
    m, base = stage1["manifest"], stage1["base"]
    args = ("--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate")
    run_cli(*args)
    before = m.read_bytes()
    npy = base / "dinov3" / "cat.npy"
    mtime = npy.stat().st_mtime_ns
    rejected_before = m.with_name(m.name + ".rejected.jsonl").read_bytes()
    time.sleep(0.01)
    assert run_cli(*args) == 0
    assert m.read_bytes() == before
    assert npy.stat().st_mtime_ns == mtime
    assert m.with_name(m.name + ".rejected.jsonl").read_bytes() == rejected_before


def test_scan_adds_new_images_as_v2_records(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    make_image(images / "a.jpg", 64, 64)
    make_image(images / "sub" / "a.jpg", 128, 64)  # duplicate stem
    make_image(images / "photo.v2.png", 64, 128)  # dotted name
    (images / "broken.jpg").write_text("not an image")
    m, base = tmp_path / "m.jsonl", tmp_path / "derived"
    assert run_cli("--images", str(images), "--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate") == 0
    records = read_jsonl(m)
    assert len(records) == 3
    ids = [r["image_id"] for r in records]
    assert len(set(ids)) == 3 and all("." not in i for i in ids)
    assert {"image_id", "image_path", "width", "height", "aspect_bucket", "format_version", "provenance"} == set(records[0])
    assert records[0]["provenance"] == {}
    out = capsys.readouterr().out
    assert "3 new" in out and "1 unreadable" in out
    # a rerun finds nothing new and writes nothing
    before = m.read_bytes()
    assert run_cli("--images", str(images), "--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate") == 0
    assert m.read_bytes() == before
    assert "0 new" in capsys.readouterr().out


def test_generated_v1_manifest_of_1500_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    m, base = tmp_path / "m.jsonl", tmp_path / "derived"
    lines = []
    for i in range(1500):
        w, h = int(rng.integers(200, 2000)), int(rng.integers(200, 2000))
        lines.append(
            {
                "image_path": f"/data/images/img_{i:05d}.jpg",
                "dinov3_embedding": rng.normal(size=1024).round(5).tolist(),
                "caption": f"caption {i}",
                "t5_attention_mask": [1] * 10 + [0] * 67,
                "height": h,
                "width": w,
            }
        )
    write_jsonl(m, lines)
    started = time.perf_counter()
    assert run_cli("--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate") == 0
    elapsed = time.perf_counter() - started
    records = read_jsonl(m)
    assert len(records) == 1500 and all(r["format_version"] == 2 for r in records)
    assert len(list((base / "dinov3").glob("*.npy"))) == 1500
    assert main(["verify", "--manifest", str(m), "--output-base-dir", str(base)]) == 1  # no vae/t5 yet
    np.testing.assert_allclose(load_npy(base / "dinov3" / "img_00042.npy"), lines[42]["dinov3_embedding"], rtol=1e-6)
    assert elapsed < 60


def test_journal_of_a_killed_run_is_merged(stage1: dict) -> None:
    m, base = stage1["manifest"], stage1["base"]
    run_cli("--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate")
    j = journal.Journal(m, rank=1)
    j.append([{"image_id": "cat", "t5_attention_mask": [1] * 3 + [0] * 74}])
    j.close()
    with open(j.path, "a") as f:
        f.write('{"image_id": "dog", "capt')  # torn last line of a killed process
    run_cli("--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate")
    cat = read_jsonl(m)[0]
    assert cat["t5_attention_mask"] == [1] * 3 + [0] * 74
    assert read_jsonl(m)[1]["caption"] == "a dog"
    assert not journal.journal_dir(m).exists()


def test_no_resume_backs_up_manifest_and_clears_side_files(stage1: dict) -> None:
    m, base, images = stage1["manifest"], stage1["base"], stage1["images"]
    run_cli("--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate")
    old = m.read_bytes()
    assert run_cli("--images", str(images), "--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate", "--no-resume") == 0
    backups = list(m.parent.glob("manifest.jsonl.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == old
    assert not list((base / "dinov3").glob("*.npy"))
    records = read_jsonl(m)
    assert sorted(r["image_id"] for r in records) == ["cat", "dog"]
    assert all("caption" not in r for r in records)


@pytest.mark.parametrize(
    "case",
    ["missing_images", "manifest_is_dir", "no_space", "no_manifest_no_images", "bad_bucket", "unwritable"],
)
def test_expected_failures_are_one_line(tmp_path: Path, capsys, case: str) -> None:
    m, base = tmp_path / "m.jsonl", tmp_path / "derived"
    args = ["--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate"]
    if case == "missing_images":
        args += ["--images", str(tmp_path / "nope")]
    elif case == "manifest_is_dir":
        m.mkdir()
    elif case == "no_space":
        args = ["--min-free-gb", "1e12", *args, "--images", str(tmp_path)]
    elif case == "bad_bucket":
        args += ["--images", str(tmp_path), "--buckets", "1000x1000"]
    elif case == "unwritable":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        base = blocker / "derived"
        args = ["--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate", "--images", str(tmp_path)]
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("prep: error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not base.exists() or not any(base.rglob("*.npy"))


def test_verify_json_reports_each_problem(tmp_path: Path, capsys) -> None:
    from prep.store import save_artifact

    base, m = tmp_path / "derived", tmp_path / "m.jsonl"
    mask = [1] * 4 + [0] * 73
    rec = {"image_path": "x.jpg", "caption": "c", "t5_attention_mask": mask, "height": 64, "width": 64,
           "aspect_bucket": "64x64", "format_version": 2}
    write_jsonl(m, [{**rec, "image_id": i, "image_path": f"{i}.jpg"} for i in ("good", "nan", "shape", "gone")])
    for image_id in ("good", "nan", "shape"):
        save_artifact(base, "dinov3", image_id, np.ones(1024))
        save_artifact(base, "t5", image_id, np.ones((77, 1024)))
    save_artifact(base, "vae", "good", np.ones((16, 8, 8)))
    save_artifact(base, "vae", "nan", np.full((16, 8, 8), np.nan))
    save_artifact(base, "vae", "shape", np.ones((16, 8, 9)))
    assert main(["verify", "--manifest", str(m), "--output-base-dir", str(base), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["artifacts"]["vae"] == {"valid": 1, "invalid": 2, "missing": 1, "stale": 0, "unknown": 1}
    assert report["artifacts"]["dinov3"] == {"valid": 3, "invalid": 0, "missing": 1, "stale": 0, "unknown": 3}
    reasons = {(p["image_id"], p["kind"]): p["reason"] for p in report["problems"]}
    assert reasons[("nan", "vae")] == "invalid: non-finite values"
    assert reasons[("shape", "vae")].startswith("invalid: shape")
    assert reasons[("gone", "t5")] == "missing"


def test_verbose_logs_each_image(tmp_path: Path, caplog) -> None:
    images = tmp_path / "images"
    make_image(images / "a.jpg", 64, 64)
    with caplog.at_level("DEBUG", logger="prep"):
        run_cli("--images", str(images), "--manifest", str(tmp_path / "m.jsonl"), "--output-base-dir",
                str(tmp_path / "d"), "--pass", "migrate", "--verbose")
    assert any("new a:" in r.getMessage() for r in caplog.records)


def test_a_second_run_on_a_locked_manifest_is_refused(tmp_path: Path, capsys) -> None:
    from prep.fsio import acquire_lock, release_lock

    make_image(tmp_path / "a.jpg", 64, 64)
    m = tmp_path / "m.jsonl"
    held = acquire_lock(tmp_path / "m.jsonl.lock", "test")
    try:
        code = run_cli("--images", str(tmp_path), "--manifest", str(m), "--output-base-dir", str(tmp_path / "d"), "--pass", "migrate")
        err = capsys.readouterr().err
        assert code == 2 and "another prep job is using" in err and len(err.strip().splitlines()) == 1
    finally:
        release_lock(held)
    assert run_cli("--images", str(tmp_path), "--manifest", str(m), "--output-base-dir", str(tmp_path / "d"), "--pass", "migrate") == 0
