"""Provenance: an edited image, an edited caption, another VAE or another bucket set rebuilds
exactly the affected artifacts; a run with nothing changed rebuilds and hashes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep import provenance
from prep.cli import main
from prep.testing import make_tiny_models, model_flags

BUCKETS = "64x64,64x128,128x64,96x96"


def job(
    work: Path, models: dict[str, Path], *extra: str, buckets: str = BUCKETS, vae: Path | None = None
) -> list[str]:
    return [
        "run",
        "--images",
        str(work / "images"),
        "--manifest",
        str(work / "manifest.jsonl"),
        "--output-base-dir",
        str(work / "derived"),
        "--buckets",
        buckets,
        "--min-free-gb",
        "0",
        "--num-workers",
        "0",
        *model_flags({**models, "vae": vae or models["vae"]}),
        *extra,
    ]


def side_file_times(work: Path) -> dict[str, int]:
    """The artifacts' mtimes (not `.prep/`, the run's own bookkeeping such as the near-duplicate cache)."""
    derived = work / "derived"
    return {f"{p.parent.name}/{p.stem}": p.stat().st_mtime_ns for p in derived.rglob("*.npy")
            if ".prep" not in p.relative_to(derived).parts}


def records(work: Path) -> dict[str, dict]:
    lines = (work / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["image_id"]: r for r in map(json.loads, lines)}


def changed_files(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {name for name in after if before.get(name) != after[name]}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_models, sample_images) -> Path:
    work = tmp_path_factory.mktemp("prov-base")
    shutil.copytree(sample_images[0].parent, work / "images")
    assert main(job(work, tiny_models)) == 0
    return work


@pytest.fixture
def work(base_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "work"
    shutil.copytree(base_run, target)  # copy2 keeps mtimes, so fingerprints stay valid
    manifest = target / "manifest.jsonl"
    manifest.write_text(manifest.read_text().replace(str(base_run), str(target)))
    return target


def test_every_artifact_is_stamped(base_run: Path) -> None:
    for record in records(base_run).values():
        prov = record["provenance"]
        assert set(prov) == {"caption", "t5", "dinov3", "vae"}
        assert prov["vae"]["bucket"] == record["aspect_bucket"] and len(prov["vae"]["crop_box"]) == 4
        assert prov["vae"]["revision"].startswith("sha256:")
        assert prov["t5"]["caption_sha256"] == provenance.text_sha256(record["caption"])
        assert prov["t5"]["max_length"] == 77
        assert prov["dinov3"]["input_size"] == [224, 224]
        assert prov["caption"]["source"] == "model" and prov["caption"]["max_new_tokens"] == 8
        assert record["image_fingerprint"]["sha256"] == provenance.sha256_file(record["image_path"])
        for kind in prov:
            assert provenance.artifact_status(kind, record) == provenance.FRESH


def test_nothing_changed_rebuilds_and_hashes_nothing(work: Path, tiny_models, monkeypatch, capsys) -> None:
    before = side_file_times(work)
    manifest_before = (work / "manifest.jsonl").read_bytes()
    calls = []
    real = provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda path: calls.append(path) or real(path))
    assert main(job(work, tiny_models)) == 0
    assert "14 skipped" in capsys.readouterr().out
    assert side_file_times(work) == before
    assert (work / "manifest.jsonl").read_bytes() == manifest_before
    assert calls == []


def test_image_edited_in_place_rebuilds_only_its_image_artifacts(work: Path, tiny_models, capsys) -> None:
    path = work / "images" / "rgb_landscape.jpg"
    with Image.open(path) as img:
        size = img.size
    Image.fromarray(np.full((size[1], size[0], 3), 17, np.uint8)).save(
        path, quality=95
    )  # same name, same size
    before, old = side_file_times(work), records(work)
    assert main(job(work, tiny_models)) == 0
    changed = changed_files(before, side_file_times(work))
    new = records(work)
    expected = {"dinov3/rgb_landscape", "vae_latents/rgb_landscape"}
    if new["rgb_landscape"]["caption"] != old["rgb_landscape"]["caption"]:
        expected.add("t5_hidden/rgb_landscape")  # a regenerated caption also refreshes its T5 states
    assert changed == expected
    assert (
        new["rgb_landscape"]["image_fingerprint"]["sha256"]
        != old["rgb_landscape"]["image_fingerprint"]["sha256"]
    )
    assert (
        new["rgb_landscape"]["provenance"]["caption"]["image_sha256"]
        == new["rgb_landscape"]["image_fingerprint"]["sha256"]
    )
    assert "refreshed:" in capsys.readouterr().out
    assert {k: v for k, v in new.items() if k != "rgb_landscape"} == {
        k: v for k, v in old.items() if k != "rgb_landscape"
    }


def test_touched_but_unchanged_image_is_rehashed_not_rebuilt(work: Path, tiny_models) -> None:
    path = work / "images" / "rgb_landscape.jpg"
    path.touch()
    before = side_file_times(work)
    assert main(job(work, tiny_models)) == 0
    assert side_file_times(work) == before
    assert records(work)["rgb_landscape"]["image_fingerprint"]["mtime_ns"] == path.stat().st_mtime_ns


def test_caption_edited_by_hand_refreshes_t5_only_and_is_kept(work: Path, tiny_models) -> None:
    manifest = work / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in lines:
        if record["image_id"] == "gray":
            record["caption"] = "a grey square, edited by hand"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = side_file_times(work)
    assert main(job(work, tiny_models)) == 0
    assert changed_files(before, side_file_times(work)) == {"t5_hidden/gray"}
    gray = records(work)["gray"]
    assert gray["caption"] == "a grey square, edited by hand"
    assert gray["provenance"]["t5"]["caption_sha256"] == provenance.text_sha256(gray["caption"])


def test_other_vae_rebuilds_every_latent_and_nothing_else(work: Path, tiny_models, tmp_path: Path) -> None:
    other = make_tiny_models(tmp_path / "other-models", seed=7)
    before = side_file_times(work)
    assert main(job(work, tiny_models, vae=other["vae"])) == 0
    changed = changed_files(before, side_file_times(work))
    assert changed == {name for name in before if name.startswith("vae_latents/")}
    assert all(r["provenance"]["vae"]["model_id"] == str(other["vae"]) for r in records(work).values())


def test_new_bucket_set_rebuilds_only_moved_records(work: Path, tiny_models) -> None:
    old = records(work)
    before = side_file_times(work)
    assert main(job(work, tiny_models, buckets="64x64,64x128,128x64,96x96,128x96")) == 0
    new = records(work)
    moved = {i for i in new if new[i]["aspect_bucket"] != old[i]["aspect_bucket"]}
    assert moved, "the test image set should have an image nearer to 128x96"
    assert changed_files(before, side_file_times(work)) == {f"vae_latents/{i}" for i in moved}


def test_keep_stale_keeps_and_verify_reports(work: Path, tiny_models, capsys) -> None:
    other_caption = work / "manifest.jsonl"
    lines = [json.loads(line) for line in other_caption.read_text().splitlines()]
    lines[0]["caption"] = "changed"
    other_caption.write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = side_file_times(work)
    assert main(job(work, tiny_models, "--keep-stale")) == 0
    assert side_file_times(work) == before
    capsys.readouterr()
    code = main(
        [
            "verify",
            "--manifest",
            str(work / "manifest.jsonl"),
            "--output-base-dir",
            str(work / "derived"),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["artifacts"]["t5"]["stale"] == 1
    assert any(p["reason"] == "stale: caption changed" for p in report["problems"])


def test_old_manifest_without_provenance_is_unknown_until_adopted(work: Path, tiny_models, capsys) -> None:
    manifest = work / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in lines:
        record.pop("provenance")
        record.pop("image_fingerprint")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = side_file_times(work)
    assert main(job(work, tiny_models)) == 0  # unknown is not stale: nothing is redone
    assert side_file_times(work) == before
    capsys.readouterr()
    args = ["verify", "--manifest", str(manifest), "--output-base-dir", str(work / "derived"), "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["artifacts"]["vae"]["unknown"] == 14
    assert main([*args, "--adopt"]) == 0
    assert json.loads(capsys.readouterr().out)["adopted"] == 14 * 3
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["artifacts"]["vae"]["unknown"] == 0 and report["artifacts"]["vae"]["stale"] == 0
    assert all("vae" in r["provenance"] for r in records(work).values())


def test_export_refuses_stale_artifacts_unless_allowed(work: Path, tiny_models, capsys) -> None:
    manifest = work / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[0]["caption"] = "edited, T5 not refreshed"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(job(work, tiny_models, "--keep-stale")) == 0
    capsys.readouterr()
    export = ["export", "webdataset", "--input-jsonl", str(manifest), "--derived-dir", str(work / "derived"), "--json"]
    assert main([*export, "--output-dir", str(work / "shards")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_incomplete"] == {"t5 stale": 1}
    assert summary["written_samples"] == 13
    assert main([*export, "--output-dir", str(work / "shards-all"), "--allow-stale"]) == 0
    assert json.loads(capsys.readouterr().out)["written_samples"] == 14
