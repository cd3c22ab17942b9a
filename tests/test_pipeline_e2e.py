"""The whole job with tiny models: single process, 2 ranks under accelerate, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prep import stages
from prep.cli import main
from prep.store import file_artifacts, load_npy
from prep.testing import model_flags, without_file_stamps

REPO = Path(__file__).resolve().parent.parent
BUCKETS = "64x64,64x128,128x64,96x96"


def model_args(models: dict[str, Path]) -> list[str]:
    return model_flags(models, caption_max_new_tokens=12)


def job_args(work: Path, images: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--images", str(images),
        "--manifest", str(work / "manifest.jsonl"),
        "--output-base-dir", str(work / "derived"),
        "--buckets", BUCKETS,
        "--min-free-gb", "0",
        "--batch-size", "2",
        "--num-workers", "1",
        *model_args(models),
        *extra,
    ]


def read_records(work: Path) -> list[dict]:
    lines = (work / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: r["image_id"])


def assert_same_outputs(a: Path, b: Path, atol: float = 2e-3) -> None:
    """Same records and the same side files (arrays equal up to fp16 rounding of different batchings)."""
    assert [without_file_stamps(r) for r in read_records(a)] == [without_file_stamps(r) for r in read_records(b)]
    for spec in file_artifacts().values():
        names_a = sorted(p.name for p in (a / "derived" / spec.folder).glob("*.npy"))
        names_b = sorted(p.name for p in (b / "derived" / spec.folder).glob("*.npy"))
        assert names_a == names_b and names_a
        for name in names_a:
            x, y = load_npy(a / "derived" / spec.folder / name), load_npy(b / "derived" / spec.folder / name)
            assert x.dtype == y.dtype == spec.dtype and x.shape == y.shape
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=atol, rtol=1e-2)
    leftovers = [p for p in (a / "derived").rglob("*") if p.name.endswith(".prep-tmp")]
    assert not leftovers


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models, sample_images) -> Path:
    """One uninterrupted single-process run of the whole job, shared by the comparisons below."""
    work = tmp_path_factory.mktemp("reference")
    images = sample_images[0].parent
    assert main(["run", *job_args(work, images, tiny_models)]) == 0
    return work


def test_full_run_is_complete_and_verified(reference: Path, capsys) -> None:
    records = read_records(reference)
    assert len(records) == 14
    for record in records:
        assert record["caption"].strip()
        assert len(record["t5_attention_mask"]) == 77
    assert main(["verify", "--manifest", str(reference / "manifest.jsonl"), "--output-base-dir", str(reference / "derived")]) == 0
    metadata = json.loads((reference / "derived" / "prep_metadata.json").read_text())
    assert metadata["vae"]["shift_factor"] == pytest.approx(0.1159)
    assert metadata["vae"]["scaling_factor"] == pytest.approx(0.3611)
    assert metadata["vae"]["latent"] == "posterior_mean"
    assert set(metadata["models"]) == {"caption", "t5", "dinov3", "vae"}


def test_second_run_loads_no_model_and_writes_nothing(reference: Path, tiny_models, sample_images, monkeypatch, capsys) -> None:
    work = reference.parent / "idempotent"
    shutil.copytree(reference, work)
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded on a run with nothing to do")

    for stage in stages.STAGES.values():
        monkeypatch.setattr(stage, "load", no_model)
    assert main(["run", *job_args(work, sample_images[0].parent, tiny_models)]) == 0
    assert "0 new, 0 migrated, 0 enriched, 0 extracted, 14 skipped, 0 failed (total: 14)" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert after == before


def test_failing_image_does_not_stop_the_run(tmp_path: Path, tiny_models, sample_images, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(sample_images[0].parent, images)
    work = tmp_path / "work"
    work.mkdir()
    assert main(["run", *job_args(work, images, tiny_models), "--pass", "migrate"]) == 0
    victim = next(images.glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:40])  # the header survives, the pixels do not
    (images / "photo.txt").write_text("a sidecar caption\n")
    assert main(["run", *job_args(work, images, tiny_models)]) == 0
    out = capsys.readouterr().out
    assert "1 failed (total: 14)" in out
    records = {r["image_id"]: r for r in read_records(work)}
    assert records["photo"]["caption"] == "a sidecar caption"
    ok = [r for r in records.values() if r["image_path"] != str(victim)]
    assert all((work / "derived" / "vae_latents" / f"{r['image_id']}.npy").exists() for r in ok)


def accelerate_cmd() -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_two_ranks_under_accelerate_match_one_process(reference: Path, tmp_path: Path, tiny_models, sample_images) -> None:
    work = tmp_path / "two"
    work.mkdir()
    cmd = [*accelerate_cmd(), str(REPO / "prep" / "run.py"), *job_args(work, sample_images[0].parent, tiny_models)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 new" in proc.stdout
    assert_same_outputs(work, reference)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


@pytest.mark.parametrize("moment", ["caption", "vae"])
def test_sigkill_mid_pass_then_resume_gives_same_outputs(
    moment: str, reference: Path, tmp_path: Path, tiny_models, sample_images
) -> None:
    work = tmp_path / "killed"
    work.mkdir()
    cmd = [sys.executable, str(REPO / "prep" / "run.py"), *job_args(work, sample_images[0].parent, tiny_models)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        if moment == "caption":
            journal_file = work / "manifest.jsonl.journal" / "rank-00000.jsonl"
            wait_for(lambda: journal_file.exists() and journal_file.stat().st_size > 0)
        else:
            wait_for(lambda: any((work / "derived" / "vae_latents").glob("*.npy")))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    vae_done = len(list((work / "derived" / "vae_latents").glob("*.npy")))
    assert vae_done < 14, "the run finished before it was killed"
    resumed = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_outputs(work, reference)
    assert not (work / "manifest.jsonl.journal").exists()
