"""One image pass: each image read and decoded once for every image stage, output as per-stage passes give."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep import preprocess, stages
from prep.cli import build_parser
from prep.options import run_options_from
from prep.pipeline import run_job
from prep.stages import IMAGE, Artifact, Encoder, Output, Stage
from prep.stages.base import ImageInput
from prep.testing import model_flags, synthetic_rgb, without_file_stamps

BUCKETS = "64x64,64x128,128x64,96x96"
PER_STAGE = ("migrate", "caption", "dinov3", "vae", "t5")


def run_args(work: Path, images: Path, models: dict, *extra: str, batch: int = 3, workers: int = 0) -> list[str]:
    """Near duplicates are not judged here (with them DINOv3 runs first, alone: see the test of that)."""
    near = () if "--near-duplicate" in extra else ("--near-duplicate", "off")
    return ["--images", str(images), "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived"),
            "--buckets", BUCKETS, "--min-free-gb", "0", "--num-workers", str(workers), "--batch-size", str(batch),
            *model_flags(models, caption_max_new_tokens=6), *near, *extra]


def run(work: Path, images: Path, models: dict, *extra: str):
    """`prep run` in this process; the RunSummary (its PassStats say what each pass read and decoded)."""
    summary = run_job(run_options_from(build_parser().parse_args(["run", *run_args(work, images, models, *extra)])))
    assert summary.exit_code == 0
    return summary


def records(work: Path) -> list[dict]:
    lines = (work / "manifest.jsonl").read_text().splitlines()
    return sorted((without_file_stamps(json.loads(line)) for line in lines), key=lambda r: r["image_id"])


def side_files(work: Path) -> dict[str, bytes]:
    derived = work / "derived"
    return {str(p.relative_to(derived)): p.read_bytes() for p in sorted(derived.rglob("*.npy"))}


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """Count image decodes and file reads in this process (the runs use --num-workers 0)."""
    seen = {"decodes": 0, "reads": 0}
    load, read = preprocess._load_decode, preprocess.ImageSource.read.__func__

    def counting_load(*args, **kwargs):
        seen["decodes"] += 1
        return load(*args, **kwargs)

    def counting_read(cls, path):
        seen["reads"] += 1
        return read(cls, path)

    monkeypatch.setattr(preprocess, "_load_decode", counting_load)
    monkeypatch.setattr(preprocess.ImageSource, "read", classmethod(counting_read))
    return seen


@pytest.fixture(scope="module")
def big_images(tmp_path_factory, sample_images) -> Path:
    """The sample images plus big JPEGs, which the stages draft-decode at different scales."""
    folder = tmp_path_factory.mktemp("big_images")
    for path in sample_images:
        shutil.copy(path, folder / path.name)
    rng = np.random.default_rng(7)
    for index, (width, height) in enumerate([(1600, 1200), (1100, 2000), (1900, 1900)]):
        Image.fromarray(synthetic_rgb(width, height, rng)).save(folder / f"big{index}.jpg", quality=90)
    return folder


def test_pass_all_reads_and_decodes_each_image_once(tmp_path, tiny_models, sample_images, counted) -> None:
    summary = run(tmp_path, sample_images[0].parent, tiny_models)
    image_pass = summary.passes[0]
    assert image_pass.kind == "caption+dinov3+vae"
    assert image_pass.records == 14
    assert counted["reads"] == image_pass.reads == 14
    assert counted["decodes"] == image_pass.decodes == 14  # no draft difference among these small images
    assert {name: s["records"] for name, s in image_pass.stages.items()} == {"caption": 14, "dinov3": 14, "vae": 14}


def test_while_near_duplicates_are_judged_dinov3_runs_first(tmp_path, tiny_models, sample_images, counted) -> None:
    """DINOv3 alone, then the judging, then one pass for the captioner and the VAE (which skip what
    it flagged): two reads per image, and the decodes of a pass of each."""
    summary = run(tmp_path, sample_images[0].parent, tiny_models, "--near-duplicate", "0.99")
    assert [p.kind for p in summary.passes] == ["dinov3", "caption+vae", "t5"]
    assert counted["reads"] == 2 * 14 and counted["decodes"] == 2 * 14


def test_one_pass_writes_what_the_per_stage_passes_write(tmp_path, tiny_models, big_images, counted) -> None:
    fused, separate = tmp_path / "fused", tmp_path / "separate"
    # a checkpoint after every loader batch: the journal is folded while stages are half way
    summary = run(fused, big_images, tiny_models, "--checkpoint-minutes", "1e-9")
    fused_decodes = counted["decodes"]
    counted["decodes"] = 0
    for name in PER_STAGE:
        run(separate, big_images, tiny_models, "--pass", name)
    assert [json.dumps(r) for r in records(fused)] == [json.dumps(r) for r in records(separate)]  # key order too
    assert side_files(fused) == side_files(separate)  # byte for byte
    # each big JPEG: the captioner decodes in full, DINOv3 at 1/2 and the VAE at 1/4 or 1/8: 3 decodes
    assert summary.passes[0].records == 17 and fused_decodes == 14 + 3 * 3
    assert counted["decodes"] == 3 * 17  # per-stage passes: one decode per stage and image


def test_stages_that_agree_on_the_draft_scale_share_one_decode(tmp_path, tiny_models, big_images, counted) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in big_images.glob("big*.jpg"):
        shutil.copy(path, images / path.name)
        (images / f"{path.stem}.txt").write_text("a sidecar caption\n")  # no captioner work
    # a 224x224 bucket: the VAE asks for the draft DINOv3 asks for (its input is 224x224)
    summary = run(tmp_path / "work", images, tiny_models, "--buckets", "224x224")
    assert summary.passes[0].kind == "dinov3+vae"
    assert counted["decodes"] == counted["reads"] == 3


def test_a_record_is_given_only_to_the_stages_that_need_it(tmp_path, tiny_models, sample_images, monkeypatch) -> None:
    work = tmp_path / "work"
    run(work, sample_images[0].parent, tiny_models)
    before = records(work)
    ids = [r["image_id"] for r in before]
    (work / "derived" / "vae_latents" / f"{ids[0]}.npy").unlink()
    (work / "derived" / "dinov3" / f"{ids[1]}.npy").unlink()
    untouched = {p: p.stat().st_mtime_ns for p in (work / "derived").rglob("*.npy")}

    def no_captioner(*args, **kwargs):
        raise AssertionError("the captioner was loaded with no caption to make")

    monkeypatch.setattr(stages.get("caption"), "load", no_captioner)
    summary = run(work, sample_images[0].parent, tiny_models)
    image_pass = summary.passes[0]
    assert image_pass.kind == "dinov3+vae" and image_pass.records == 2
    assert {name: s["records"] for name, s in image_pass.stages.items()} == {"dinov3": 1, "vae": 1}
    assert records(work) == before
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in untouched.items())


def test_models_run_one_at_a_time_when_they_do_not_fit(tmp_path, tiny_models, sample_images, counted, caplog) -> None:
    together, apart = tmp_path / "together", tmp_path / "apart"
    run(together, sample_images[0].parent, tiny_models)
    counted["decodes"] = 0
    with caplog.at_level("INFO", logger="prep"):
        summary = run(apart, sample_images[0].parent, tiny_models, "--memory-budget-gb", "0")
    assert [p.kind for p in summary.passes] == ["caption", "dinov3", "vae", "t5"]
    assert counted["decodes"] == 3 * 14
    assert "models as caption | dinov3 | vae" in caplog.text
    assert records(together) == records(apart)
    assert side_files(together) == side_files(apart)


# --- an image stage of the older form (its own fn(path)) still works beside the others -------
def mean_rgb(path: str) -> np.ndarray:
    return np.asarray(preprocess.open_rgb(path), dtype=np.float32).reshape(-1, 3).mean(axis=0)


def mean_of_decode(decoded) -> np.ndarray:
    return np.asarray(decoded.image, dtype=np.float32).reshape(-1, 3).mean(axis=0)


class MeanStage(Stage):
    reads = IMAGE

    def load(self, model, *, device, dtype, opts) -> Encoder:
        return Encoder(None, device="cpu", dtype="float32", model_id="none")

    def encode(self, encoder, items) -> list[Output]:
        return [Output(array=np.asarray(item, dtype=np.float32)) for item in items]


class OwnDecodeStage(MeanStage):
    name = "owndecode"
    artifact = Artifact(kind="owndecode", folder="owndecode", member="owndecode.npy", column="owndecode",
                        dtype=np.dtype(np.float32), shape=lambda record: (3,), description="mean RGB")

    def worker_transform(self, encoder, bucket):
        return mean_rgb


class SharedDecodeStage(MeanStage):
    name = "shareddecode"
    artifact = Artifact(kind="shareddecode", folder="shareddecode", member="shareddecode.npy",
                        column="shareddecode", dtype=np.dtype(np.float32), shape=lambda record: (3,),
                        description="mean RGB")

    def image_input(self, encoder, bucket):
        return ImageInput(mean_of_decode)


@pytest.fixture
def extra_stages():
    registered = [stages.register(OwnDecodeStage(), before="t5"), stages.register(SharedDecodeStage(), before="t5")]
    try:
        yield registered
    finally:
        for stage in registered:
            stages.unregister(stage.name)


def test_an_older_stage_decodes_on_its_own_and_is_counted(tmp_path, tiny_models, sample_images, extra_stages,
                                                          counted) -> None:
    summary = run(tmp_path, sample_images[0].parent, tiny_models)
    image_pass = summary.passes[0]
    assert image_pass.kind == "caption+dinov3+vae+owndecode+shareddecode"
    assert image_pass.decodes == counted["decodes"] == 2 * 14  # the shared one, and the older stage's own
    derived = tmp_path / "derived"
    for record in records(tmp_path):
        own = np.load(derived / "owndecode" / f"{record['image_id']}.npy")
        shared = np.load(derived / "shareddecode" / f"{record['image_id']}.npy")
        np.testing.assert_array_equal(own, mean_rgb(record["image_path"]))
        np.testing.assert_array_equal(shared, own)


def test_a_failing_input_fails_only_its_stage(tmp_path, tiny_models, sample_images, monkeypatch) -> None:
    import prep.stages.dinov3 as dinov3

    calls = {"n": 0}

    def first_fails(processor, decoded):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("this input is refused")
        return dinov3.dinov3_input(processor, decoded)

    original = dinov3.DINOv3Stage.image_input

    def image_input(self, encoder, bucket):
        found = original(self, encoder, bucket)
        return ImageInput(functools.partial(first_fails, encoder.processor), found.draft_to, found.pixels)

    monkeypatch.setattr(dinov3.DINOv3Stage, "image_input", image_input)
    summary = run(tmp_path, sample_images[0].parent, tiny_models)
    assert summary.counts["failed"] == 1
    assert len(list((tmp_path / "derived" / "dinov3").glob("*.npy"))) == 13
    assert len(list((tmp_path / "derived" / "vae_latents").glob("*.npy"))) == 14
    assert all(r.get("caption") for r in records(tmp_path))


def test_one_rank_and_two_ranks_write_the_same_bytes(tmp_path, tiny_models, sample_images) -> None:
    """At batch size 1 every rank runs the same kernels on the same inputs: the same bits, whatever
    the number of ranks (each process uses --cpu-threads threads, 1 by default, not the launcher's)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    outputs = []
    for name, prefix in (("one", [sys.executable]), ("two", launcher)):
        work = tmp_path / name
        # buckets big enough for the CPU kernels to split their work between threads (with 2 threads in
        # one process and 1 per rank, these latents differ in their last bits)
        args = run_args(work, sample_images[0].parent, tiny_models, "--pass", "vae", "--buckets",
                        "192x192,128x256,256x128", batch=1, workers=1)
        proc = subprocess.run([*prefix, str(repo / "prep" / "run.py"), *args], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(side_files(work))
    assert outputs[0] and outputs[0] == outputs[1]
