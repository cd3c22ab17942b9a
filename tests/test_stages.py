"""The stage registry: every kind's names derive from one table, and a fifth stage is one class + one line."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

import prep
from prep import stages
from prep.cli import build_parser, main
from prep.stages import IMAGE, Artifact, Encoder, Output, Stage
from prep.testing import model_flags

BUCKETS = "64x64,64x128,128x64,96x96"


def mean_rgb(path: str, *, size: int) -> np.ndarray:
    """The worker-side transform of the test stage: mean colour of the decoded image (picklable)."""
    from prep.preprocess import open_rgb

    return np.asarray(open_rgb(path, draft_to=(size, size)), dtype=np.float32).reshape(-1, 3).mean(axis=0)


class MeanColorStage(Stage):
    """A fifth encoder, defined entirely here: the mean RGB of every image, (3,) float32."""

    name = "meancolor"
    reads = IMAGE
    artifact = Artifact(
        kind="meancolor", folder="meancolor", member="meancolor.npy", column="meancolor",
        dtype=np.dtype(np.float32), shape=lambda record: (3,), description="mean RGB of the image, (3,)",
    )

    def settings(self, opts) -> dict:
        return {"space": "sRGB"}

    def load(self, model, *, device, dtype, opts) -> Encoder:
        return Encoder(None, device="cpu", dtype="float32", model_id="none")

    def worker_transform(self, encoder, bucket):
        return functools.partial(mean_rgb, size=64)

    def encode(self, encoder, items) -> list[Output]:
        return [Output(array=np.asarray(item, dtype=np.float32)) for item in items]


@pytest.fixture
def fifth_stage():
    stage = stages.register(MeanColorStage())
    try:
        yield stage
    finally:
        stages.unregister("meancolor")


def test_the_artifact_table_names_every_kind_once() -> None:
    table = stages.artifacts()
    assert list(table) == ["dinov3", "vae", "t5", "t5_mask"]
    for field in ("folder", "member", "column"):
        values = [getattr(a, field) for a in table.values() if getattr(a, field) is not None]
        assert len(values) == len(set(values)), field
    assert [s.name for s in stages.STAGES.values()] == ["caption", "dinov3", "vae", "vae_flip", "t5"]
    assert list(stages.artifacts(stages.ALL)) == ["dinov3", "vae", "vae_flip", "t5", "t5_mask"]  # with the optional
    assert table["t5_mask"].record_field == "t5_attention_mask"


def test_model_flags_come_from_the_registry() -> None:
    parsed = build_parser().parse_args(["run", "--vae-model", "x", "--vae-revision", "abc", "--t5-model", "y"])
    assert parsed.vae_model == "x" and parsed.vae_revision == "abc" and parsed.t5_model == "y"
    assert parsed.dinov3_model == stages.get("dinov3").model.default


def test_a_fifth_stage_is_one_class_and_one_register_line(fifth_stage, tmp_path: Path, tiny_models, sample_images,
                                                          capsys) -> None:
    work = tmp_path
    manifest, derived = work / "manifest.jsonl", work / "derived"
    run = ["run", "--images", str(sample_images[0].parent), "--manifest", str(manifest), "--derived-dir", str(derived),
           "--buckets", BUCKETS, "--min-free-gb", "0", "--num-workers", "0", *model_flags(tiny_models)]
    assert main(run) == 0
    assert "meancolor" in capsys.readouterr().err or True
    files = sorted((derived / "meancolor").glob("*.npy"))
    assert len(files) == 14
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    first = records[0]
    stamp = first["provenance"]["meancolor"]
    assert stamp["space"] == "sRGB" and stamp["file"]["size"] == files[0].stat().st_size
    expected = mean_rgb(first["image_path"], size=64)
    np.testing.assert_allclose(np.load(derived / "meancolor" / f"{first['image_id']}.npy"), expected)
    # `--pass meancolor` exists, a rerun does nothing, verify and the loaders know the new kind
    assert main([*run, "--pass", "meancolor"]) == 0
    assert "14 skipped" in capsys.readouterr().out
    assert main(["verify", "--manifest", str(manifest), "--derived-dir", str(derived), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["artifacts"]["meancolor"]["valid"] == 14
    row = prep.load_manifest(manifest, derived, ready_only=True)[0]
    assert row["meancolor"].shape == (3,) and row["meancolor"].dtype == np.float32
    out = work / "shards"
    assert main(["export", "webdataset", "--manifest", str(manifest), "--derived-dir", str(derived),
                 "--output-dir", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written_samples"] == 14
    sample = next(iter(prep.load_shards(out)))
    np.testing.assert_array_equal(sample["meancolor"], np.load(derived / "meancolor" / f"{sample['key']}.npy"))
    assert "meancolor.npy" in (out / "README.md").read_text()
