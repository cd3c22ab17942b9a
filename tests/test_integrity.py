"""Integrity: no foreign artifact, no duplicated image, no hang, no lost record (issue "Integrity").

One test per case of the adversarial catalogue, named after it; the README's reliability table
lists the same cases. The hang cases run in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imagegen as ig
import numpy as np
import pytest
from PIL import Image

import prep
from prep import provenance
from prep.cli import main
from prep.stages.vae import VAEEncoder
from prep.store import artifact_path, load_npy
from prep.testing import model_flags, synthetic_rgb

REPO = Path(__file__).resolve().parent.parent
BUCKETS = "64x64,64x128,128x64,96x96"


def args(work: Path, images: Path | None, models: dict, *extra: str) -> list[str]:
    return [
        "run", *(["--images", str(images)] if images else []),
        "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived"),
        "--buckets", BUCKETS, "--min-free-gb", "0", "--num-workers", "0", *model_flags(models), *extra,
    ]  # fmt: skip


def records(manifest: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in map(json.loads, manifest.read_text(encoding="utf-8").splitlines())}


def verify(work: Path, *extra: str) -> int:
    return main(["verify", "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived"), *extra])


def three_images(folder: Path) -> Path:
    """Three different pictures (imagegen's share one gradient: near duplicates, which curation would flag)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (width, height), seed in (("p1.png", (64, 64), 1), ("p2.jpg", (96, 64), 2), ("p3.png", (64, 128), 3)):
        Image.fromarray(synthetic_rgb(width, height, np.random.default_rng(seed))).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_models) -> Path:
    """A finished run on three images; tests copy it (copytree keeps mtimes, so stamps hold)."""
    work = tmp_path_factory.mktemp("integrity")
    three_images(work / "imgs")
    assert main(args(work, work / "imgs", tiny_models)) == 0
    return work


@pytest.fixture
def work(done: Path, tmp_path: Path) -> Path:
    target = tmp_path / "work"
    shutil.copytree(done, target, symlinks=True)
    manifest = target / "manifest.jsonl"
    manifest.write_text(manifest.read_text().replace(str(done), str(target)))
    (target / "manifest.jsonl.cache.arrow").unlink(missing_ok=True)
    return target


def vae_of(path: Path, models: dict, bucket: str) -> np.ndarray:
    from prep.preprocess import load_bucket_crop, to_vae_pixels

    width, height = (int(v) for v in bucket.split("x"))
    crop, _ = load_bucket_crop(str(path), width, height)
    encoder = VAEEncoder.load(str(models["vae"]), device="cpu", dtype="float32")
    return encoder.encode(to_vae_pixels([crop]))[0][0]


# ------------------------------------------------------------- 1. foreign side files
def test_case1_deleted_manifest_and_replaced_image_never_adopt_the_old_latent(work: Path, tiny_models, capsys) -> None:
    (work / "manifest.jsonl").unlink()
    ig.save_rgb(work / "imgs" / "p1.png", 64, 64, seed=99)  # a different picture, same name and size
    old = load_npy(work / "derived" / "vae_latents" / "p1.npy")
    assert main(args(work, work / "imgs", tiny_models)) == 0
    new = load_npy(work / "derived" / "vae_latents" / "p1.npy")
    bucket = records(work / "manifest.jsonl")["p1"]["aspect_bucket"]
    np.testing.assert_allclose(new.astype(np.float32), vae_of(work / "imgs" / "p1.png", tiny_models, bucket), atol=2e-3)
    assert not np.array_equal(new, old)
    capsys.readouterr()
    assert verify(work, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert all(counts["unknown"] == 0 for counts in report["artifacts"].values())


def test_case1_a_second_manifest_on_one_derived_dir_is_refused(work: Path, tiny_models, capsys) -> None:
    other = work / "other.jsonl"
    ig.save_rgb(work / "imgs_b" / "p1.png", 64, 64, seed=42)  # B's own p1: other pixels, the same id
    cmd = [*args(work, work / "imgs_b", tiny_models), "--manifest", str(other)]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "belongs to the manifest" in err and len(err.strip().splitlines()) == 1
    assert not other.exists()
    # told explicitly (--rebind), B gets its own artifacts; A's stamps then no longer match
    assert main([*cmd, "--rebind"]) == 0
    capsys.readouterr()
    assert verify(work, "--json") == 1
    assert "not the one its record stamped" in capsys.readouterr().out


def test_case1_a_second_job_never_sweeps_the_derived_dir_of_a_running_one(work: Path, tiny_models, capsys) -> None:
    from prep.fsio import acquire_lock, release_lock

    temp = work / "derived" / "vae_latents" / ".p9.npy.abc.prep-tmp"
    temp.write_bytes(b"another job's write in flight")
    held = acquire_lock(work / "derived" / ".prep.lock", "a running job")
    try:
        other = work / "elsewhere.jsonl"
        assert main([*args(work, work / "imgs", tiny_models), "--manifest", str(other)]) == 2
        assert "another prep job is using the derived dir" in capsys.readouterr().err
    finally:
        release_lock(held)
    assert temp.exists()


# ----------------------------------------------------------- 2. the same image twice
def test_case2_a_symlinked_images_folder_adds_no_record(work: Path, tiny_models, capsys) -> None:
    link = work / "imgs_link"
    link.symlink_to(work / "imgs")
    assert main(args(work, link, tiny_models)) == 0
    out = capsys.readouterr().out
    assert "0 new" in out and "(total: 3)" in out
    assert len(records(work / "manifest.jsonl")) == 3


def test_case2_a_rerun_from_another_folder_finds_every_image(work: Path, tiny_models, capsys, monkeypatch) -> None:
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(args(work, Path("..") / "imgs", tiny_models)) == 0
    out = capsys.readouterr().out
    assert "0 new" in out and "3 skipped" in out and "0 failed" in out


def test_case2_legacy_relative_paths_are_resolved_once_and_stored_absolute(work: Path, tiny_models, monkeypatch) -> None:
    manifest = work / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in lines:
        record["image_path"] = os.path.relpath(record["image_path"], work)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.chdir(work)
    assert main(args(work, Path("imgs"), tiny_models)) == 0
    now = records(manifest)
    assert len(now) == 3 and all(os.path.isabs(r["image_path"]) for r in now.values())


# ---------------------------------------------------------- 3. NaN side file repaired
def test_case3_a_nan_side_file_is_listed_by_verify_redone_by_the_next_run_and_never_served(
    work: Path, tiny_models, capsys
) -> None:
    path = work / "derived" / "vae_latents" / "p2.npy"
    stat = path.stat()
    latent = load_npy(path)
    latent[0, 0, 0] = np.nan
    with open(path, "r+b") as f:  # same size; the mtime is put back: a size/mtime check cannot see it
        f.seek(path.stat().st_size - latent.nbytes)
        f.write(latent.tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ready = prep.load_manifest(work / "manifest.jsonl", work / "derived")
    assert next(r for r in ready if r["image_id"] == "p2")["vae"] is None  # never served, even before verify
    assert verify(work) == 1
    assert "the next `prep run` redoes" in capsys.readouterr().out
    ready = prep.load_manifest(work / "manifest.jsonl", work / "derived", ready_only=True)
    assert sorted(ready.with_format(None)["image_id"]) == ["p1", "p3"]
    assert main(args(work, None, tiny_models)) == 0
    assert np.isfinite(load_npy(path)).all()
    assert verify(work) == 0


# ------------------------------------------------------- 4. malformed manifest lines
@pytest.mark.parametrize(
    ("case", "line", "reason"),
    [
        ("long_integer", '{"image_path": "/x/a.jpg", "n": ' + "9" * 4301 + "}", "bad JSON"),
        ("deep_nesting", '{"image_path": "/x/a.jpg", "n": ' + "[" * 1000 + "]" * 1000 + "}", "nested deeper"),
        ("height_2_pow_63", '{"image_path": "/x/a.jpg", "height": 9223372036854775808}', "64 bits"),
    ],
)
def test_case4_one_malformed_line_is_set_aside_and_nothing_stops(work: Path, tiny_models, case, line, reason) -> None:
    manifest = work / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + line + "\n")
    assert main(args(work, None, tiny_models)) == 0
    assert verify(work) == 0  # the line is in the side file now: the manifest itself is clean
    assert len(prep.load_manifest(manifest, work / "derived")) == 3
    rejected = [json.loads(x) for x in (work / "manifest.jsonl.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and reason in rejected[0]["reason"] and rejected[0]["text"] == line
    out = work / "shards"
    assert main(["export", "webdataset", "--manifest", str(manifest), "--derived-dir", str(work / "derived"),
                 "--output-dir", str(out)]) == 0


# ---------------------------------------------------------- 5. FIFOs and devices hang
def run_with_timeout(cli_args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "prep", *cli_args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_case5_dev_zero_fifo_images_and_a_fifo_caption_never_hang(work: Path, tiny_models) -> None:
    manifest = work / "manifest.jsonl"
    fifo = work / "pipe.png"
    os.mkfifo(fifo)
    os.mkfifo(work / "imgs" / "p9.txt")  # a FIFO where a caption file would be
    ig.save_rgb(work / "imgs" / "p9.png", 64, 64, seed=9)
    extra = [json.dumps({"image_id": "zero", "image_path": "/dev/zero", "format_version": 2, "width": 64,
                         "height": 64, "aspect_bucket": "64x64", "provenance": {}}),
             json.dumps({"image_id": "fifo", "image_path": str(fifo), "format_version": 2, "width": 64,
                         "height": 64, "aspect_bucket": "64x64", "provenance": {}})]
    manifest.write_text(manifest.read_text() + "\n".join(extra) + "\n")
    started = time.monotonic()
    ran = run_with_timeout(args(work, work / "imgs", tiny_models)[0:] + [])
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert time.monotonic() - started < 120
    assert "2 failed" in ran.stdout and "not a regular file" in ran.stderr
    assert "p9" in records(manifest) and "caption" in records(manifest)["p9"]  # captioned by the model instead


# --------------------------------------------------- 6. a header claiming 298 GiB
def test_case6_a_header_claiming_a_huge_shape_allocates_nothing(work: Path, tiny_models, capsys) -> None:
    path = work / "derived" / "vae_latents" / "p1.npy"
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.float16))
    header["shape"] = (16, 100000, 100000)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 4096)
    code = run_with_timeout(["verify", "--manifest", str(work / "manifest.jsonl"), "--derived-dir",
                             str(work / "derived"), "--json"], timeout=60)
    assert code.returncode == 1 and "shape (16, 100000, 100000)" in code.stdout, code.stderr[-2000:]
    row = next(r for r in prep.load_manifest(work / "manifest.jsonl", work / "derived") if r["image_id"] == "p1")
    assert row["vae"] is None
    report = run_with_timeout(["report", "--manifest", str(work / "manifest.jsonl"), "--derived-dir",
                               str(work / "derived"), "--output-dir", str(work / "report"), "--no-decode"], timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]


# -------------------------------------------------------------------- 8. minor
def test_case8_a_directory_in_place_of_a_side_file_is_moved_aside_and_redone(work: Path, tiny_models) -> None:
    path = work / "derived" / "dinov3" / "p1.npy"
    path.unlink()
    path.mkdir()
    (path / "user-file").write_text("kept")
    assert main(args(work, None, tiny_models)) == 0
    assert path.is_file() and load_npy(path).shape == (1024,)
    aside = [p for p in path.parent.iterdir() if p.name.startswith("p1.npy.not-a-file")]
    assert len(aside) == 1 and (aside[0] / "user-file").read_text() == "kept"


# ---------------------------------------------------------------------- 9. locks
def test_case9_a_manifest_reached_through_a_symlink_is_locked_and_rewritten_at_its_target(
    work: Path, tiny_models, capsys
) -> None:
    from prep.fsio import acquire_lock, release_lock

    link = work / "link.jsonl"
    link.symlink_to(work / "manifest.jsonl")
    held = acquire_lock(work / "manifest.jsonl.lock", "a running job")
    try:
        assert main([*args(work, work / "imgs", tiny_models), "--manifest", str(link), "--rebind"]) == 2
        assert "another prep job is using the manifest" in capsys.readouterr().err
    finally:
        release_lock(held)
    ig.save_rgb(work / "imgs" / "p4.png", 64, 64, seed=4)
    assert main([*args(work, work / "imgs", tiny_models), "--manifest", str(link)]) == 0
    assert link.is_symlink() and len(records(work / "manifest.jsonl")) == 4


def test_case10_verify_adopt_takes_the_manifest_lock(work: Path, capsys) -> None:
    from prep.fsio import acquire_lock, release_lock

    before = (work / "manifest.jsonl").read_bytes()
    held = acquire_lock(work / "manifest.jsonl.lock", "a running job")
    try:
        assert verify(work, "--adopt") == 2
        assert "another prep job is using the manifest" in capsys.readouterr().err
    finally:
        release_lock(held)
    assert (work / "manifest.jsonl").read_bytes() == before


# ----------------------------------------------------------- 13-15. a new user's first tries
def _pids_holding(path: Path) -> list[int]:
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == str(path):
                    holders.append(int(entry))
        except OSError:
            continue
    return holders


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_case13_kill_9_of_the_job_leaves_no_worker_holding_the_lock(tmp_path: Path, tiny_models) -> None:
    images = tmp_path / "imgs"
    for i in range(24):
        ig.save_rgb(images / f"i{i:02d}.png", 128, 128, seed=i)
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "prep" / "run.py"), *args(work, images, tiny_models)[1:], "--pass", "vae",
           "--num-workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any((work / "derived" / "vae_latents").glob("*.npy")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers must not outlive it
    proc.wait()
    lock = (work / "manifest.jsonl.lock").resolve()
    deadline = time.monotonic() + 20
    while _pids_holding(lock) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids_holding(lock) == []
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]


def test_case14_verify_of_a_missing_manifest_is_an_error(tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["verify", "--manifest", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["verify"]) == 2


def test_case15_an_empty_images_folder_is_an_error_and_creates_nothing(tmp_path: Path, tiny_models, capsys,
                                                                      monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--images", "empty", "--min-free-gb", "0", *model_flags(tiny_models)]) == 2
    assert "no image found under empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_provenance_status_of_a_record_prep_made_without_a_stamp_is_stale(tmp_path: Path) -> None:
    record = {"image_id": "a", "aspect_bucket": "64x64", "provenance": {}}
    assert provenance.artifact_status("vae", record).startswith("stale: not made for this record")
    legacy = {"image_id": "a", "aspect_bucket": "64x64"}
    assert provenance.artifact_status("vae", legacy) == provenance.UNKNOWN
    assert artifact_path(tmp_path, "vae", "a").name == "a.npy"
