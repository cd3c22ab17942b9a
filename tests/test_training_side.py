"""Training side: the empty caption's T5 state for caption dropout, and latents of mirrored crops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import prep
from prep.cli import main
from prep.stages.t5 import UNCOND_FILE, T5Encoder
from prep.testing import model_flags

BUCKETS = "64x64,64x128,128x64,96x96"


def run_args(work: Path, images: Path, models: dict, *extra: str) -> list[str]:
    return ["run", "--images", str(images), "--manifest", str(work / "manifest.jsonl"), "--derived-dir",
            str(work / "derived"), "--buckets", BUCKETS, "--min-free-gb", "0", "--num-workers", "0",
            *model_flags(models), *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_models, sample_images) -> Path:
    work = tmp_path_factory.mktemp("training-side")
    images = work / "images"
    images.mkdir()
    for path in sample_images[:6]:
        shutil.copy2(path, images / path.name)
    assert main(run_args(work, images, tiny_models, "--flip-latents")) == 0
    assert main(["export", "webdataset", "--manifest", str(work / "manifest.jsonl"), "--derived-dir",
                 str(work / "derived"), "--output-dir", str(work / "shards"), "--shard-size", "2"]) == 0
    return work


def test_the_uncond_state_equals_a_direct_t5_call_on_the_empty_caption(dataset: Path, tiny_models) -> None:
    encoder = T5Encoder.load(str(tiny_models["t5"]), device="cpu", dtype="float32")
    hidden, masks, _ = encoder.encode([""])
    for source in (dataset / "derived", dataset / "shards", dataset / "shards" / UNCOND_FILE):
        uncond = prep.load_uncond(source)
        assert uncond["caption"] == ""
        np.testing.assert_array_equal(uncond["t5_hidden"], hidden[0])
        np.testing.assert_array_equal(uncond["t5_mask"], np.asarray(masks[0], np.uint8))
    index = json.loads((dataset / "shards" / "index.json").read_text())
    assert index["uncond"]["path"] == UNCOND_FILE
    assert "Caption dropout" in (dataset / "shards" / "README.md").read_text()
    loaded = prep.load_shards(dataset / "shards", uncond=True)
    np.testing.assert_array_equal(loaded.uncond["t5_hidden"], hidden[0])


def test_the_uncond_state_is_made_again_when_t5_changes(dataset: Path, tiny_models, tmp_path: Path) -> None:
    from prep.testing import make_tiny_models

    work = tmp_path / "work"
    shutil.copytree(dataset, work)
    manifest = work / "manifest.jsonl"
    manifest.write_text(manifest.read_text().replace(str(dataset), str(work)))
    before = (work / "derived" / UNCOND_FILE).read_bytes()
    assert main(run_args(work, work / "images", tiny_models, "--pass", "t5")) == 0
    assert (work / "derived" / UNCOND_FILE).read_bytes() == before  # nothing changed: kept
    other = make_tiny_models(tmp_path / "other", seed=1)
    assert main(run_args(work, work / "images", {**tiny_models, "t5": other["t5"]}, "--pass", "t5")) == 0
    assert (work / "derived" / UNCOND_FILE).read_bytes() != before
    hidden, _, _ = T5Encoder.load(str(other["t5"]), device="cpu", dtype="float32").encode([""])
    np.testing.assert_array_equal(prep.load_uncond(work / "derived")["t5_hidden"], hidden[0])


def test_flipped_latents_equal_the_vae_of_the_mirrored_crop(dataset: Path, tiny_models) -> None:
    from prep.preprocess import load_bucket_crop, to_vae_pixels
    from prep.stages.vae import VAEEncoder

    encoder = VAEEncoder.load(str(tiny_models["vae"]), device="cpu", dtype="float32")
    records = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        width, height = (int(v) for v in record["aspect_bucket"].split("x"))
        crop, _ = load_bucket_crop(record["image_path"], width, height)
        expected = encoder.encode(to_vae_pixels([np.ascontiguousarray(crop[:, ::-1])]))[0][0]
        stored = np.load(dataset / "derived" / "vae_latents_flip" / f"{record['image_id']}.npy")
        np.testing.assert_array_equal(stored, expected)
        assert record["provenance"]["vae_flip"]["flip"] == "horizontal"
    sample = next(iter(prep.load_shards(dataset / "shards")))
    assert sample["vae_flip"].shape == sample["vae"].shape and not np.array_equal(sample["vae_flip"], sample["vae"])
    row = prep.load_manifest(dataset / "manifest.jsonl", dataset / "derived", ready_only=True)[0]
    assert row["vae_flip"].shape == row["vae"].shape


def test_without_the_flag_no_flip_is_made_or_required(tmp_path: Path, tiny_models, sample_images, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy2(sample_images[0], images / sample_images[0].name)
    assert main(run_args(tmp_path, images, tiny_models)) == 0
    assert not (tmp_path / "derived" / "vae_latents_flip").exists() or not any((tmp_path / "derived" / "vae_latents_flip").iterdir())
    capsys.readouterr()
    assert main(["verify", "--manifest", str(tmp_path / "manifest.jsonl"), "--derived-dir", str(tmp_path / "derived"),
                 "--json"]) == 0
    assert "vae_flip" not in json.loads(capsys.readouterr().out)["artifacts"]
    assert main(["export", "webdataset", "--manifest", str(tmp_path / "manifest.jsonl"), "--derived-dir",
                 str(tmp_path / "derived"), "--output-dir", str(tmp_path / "shards")]) == 0
    sample = next(iter(prep.load_shards(tmp_path / "shards")))
    assert "vae_flip" not in sample
