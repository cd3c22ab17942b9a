"""Faults of the environment: SIGKILL + resume (a CI-sized prep/bench/faults.py), a full disk, a
read-only output directory, paths of the wrong kind. Each ends with a clear one-line error and
a non-zero exit code (or, for a kill, with a rerun that gives the uninterrupted result), the
manifest intact and nothing lost.

A full disk and a read-only directory are real where this machine lets root mount (a tiny
tmpfs, a read-only bind mount); elsewhere the same failures are injected in-process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep import fsio, journal, manifest, store
from prep.bench.faults import compare, run_faults
from prep.cli import main
from prep.export import webdataset
from prep.testing import model_flags, synthetic_rgb

BUCKETS = "64x64,64x128,128x64,96x96"


# ------------------------------------------------------------------------ kill + resume
def test_sigkill_at_three_moments_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_models) -> None:
    report = run_faults(
        tmp_path / "faults",
        trials=3,
        n_images=5,
        scenarios=("time:caption", "event:manifest-pre", "event:shard-post"),
        models=tiny_models,
        verbose=False,
    )
    problems = {t.scenario: t.problems for t in report.trials if t.problems}
    assert report.survived == 3, problems
    assert all(t.killed and not t.killed.startswith("nothing") for t in report.trials), [t.killed for t in report.trials]
    assert all(t.runs + t.exports == 3 for t in report.trials)  # killed once, resumed once


# ----------------------------------------------------------------------------- helpers
def run_args(work: Path, images: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return [
        "run",
        "--images", str(images),
        "--manifest", str(work / "manifest.jsonl"),
        "--output-base-dir", str(work / "derived"),
        "--buckets", BUCKETS,
        "--min-free-gb", "0",
        "--batch-size", "1",
        "--text-batch-size", "1",
        "--caption-batch-size", "1",
        "--num-workers", "0",
        *model_flags(models),
        *extra,
    ]  # fmt: skip


def export_args(work: Path) -> list[str]:
    return ["export", "webdataset", "--input-jsonl", str(work / "manifest.jsonl"), "--derived-dir",
            str(work / "derived"), "--output-dir", str(work / "shards"), "--shard-size", "2", "--resume"]


def one_line_error(capsys) -> str:
    """The one `prep: error:` line that ends stderr (progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("prep: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    assert "Traceback" not in err
    return errors[0]


def manifest_lines_parse(path: Path) -> int:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for line in lines:
        assert isinstance(json.loads(line), dict)
    return len(lines)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"*{fsio.TMP_MARK}")]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault_images")
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80), (128, 64), (64, 64)]):
        # distinct pictures (imagegen's share one gradient: near duplicates, which curation would flag)
        Image.fromarray(synthetic_rgb(w, h, np.random.default_rng(i))).save(folder / f"img_{i}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images, tiny_models) -> Path:
    """An uninterrupted run + export with batch size 1 (byte-reproducible)."""
    work = tmp_path_factory.mktemp("fault_reference")
    assert main(run_args(work, images, tiny_models)) == 0
    assert main(export_args(work)) == 0
    return work


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path`, or None where mounting is not allowed (then nothing happens)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


class FullDisk:
    """In-process full disk: after `budget` writes, every write path of prep raises ENOSPC."""

    def __init__(self, monkeypatch, budget: int):
        self.left = budget
        original = fsio.atomic_open

        @contextlib.contextmanager
        def atomic_open(path, mode="wb"):
            with original(path, mode) as f:  # the temp file exists: the error must remove it
                self.spend(path)
                yield f

        def append(journal_self, updates):
            updates = list(updates)
            if updates:
                self.spend(journal_self.path)
            return real_append(journal_self, updates)

        real_append = journal.Journal.append
        for module in (fsio, store, manifest, webdataset):
            monkeypatch.setattr(module, "atomic_open", atomic_open)
        monkeypatch.setattr(journal.Journal, "append", append)

    def spend(self, path) -> None:
        self.left -= 1
        if self.left < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_the_harness_sees_one_changed_byte_of_a_side_file(tmp_path, reference) -> None:
    """The trials' verdict compares digests (the reference's cached): it must still see a flipped byte."""
    work = tmp_path / "copy"
    shutil.copytree(reference, work)
    assert compare(reference, work) == []
    victim = sorted((work / "derived" / "dinov3").glob("*.npy"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1  # the last byte of the array, the header stays valid
    victim.write_bytes(bytes(data))
    assert any(p.startswith(f"derived/dinov3/{victim.name} differs") for p in compare(reference, work))


# ---------------------------------------------------------------------------- full disk
# the 6th write is prep_metadata.json as the image pass loads its models; the 10th a journal line of
# the image pass; the 18th one of the T5 pass (5 records, batch size 1)
@pytest.mark.parametrize("budget", [5, 9, 17])
def test_full_disk_mid_run_is_one_line_and_a_rerun_completes(tmp_path, images, tiny_models, reference, monkeypatch,
                                                            capsys, budget) -> None:
    work = tmp_path / "work"
    disk = FullDisk(monkeypatch, budget)
    assert main(run_args(work, images, tiny_models)) == 1
    assert disk.left < 0
    assert "No space left on device" in one_line_error(capsys)
    manifest_lines_parse(work / "manifest.jsonl")  # intact: the last complete checkpoint
    assert not temp_files(tmp_path)
    monkeypatch.undo()  # space is back
    assert main(run_args(work, images, tiny_models)) == 0
    assert main(export_args(work)) == 0
    assert compare(reference, work) == []


def test_the_side_file_folders_are_swept_only_after_a_run_that_did_not_end_well(tmp_path, images, tiny_models,
                                                                              monkeypatch) -> None:
    """Listing the side-file folders for temp files costs a directory entry per file (three
    million at a million records): a run skips it after a run that ended well, and a run that
    dies (here: a rename that fails mid-pass) leaves its temp files and no mark, so the next
    run sweeps them."""
    work = tmp_path / "work"
    subset = tmp_path / "images"
    subset.mkdir()
    for path in sorted(images.iterdir())[:3]:
        os.link(path, subset / path.name)
    assert main(run_args(work, subset, tiny_models)) == 0
    derived = work / "derived"
    mark = derived / store.LEFT_CLEAN_FILE
    assert mark.is_file()
    listed = []
    real_sweep = fsio.sweep_temp_files
    monkeypatch.setattr(store, "sweep_temp_files", lambda d, prefix="": listed.append(Path(d).name) or real_sweep(d, prefix))
    for path in sorted(images.iterdir())[3:]:  # new work for the next run
        os.link(path, subset / path.name)
    real_publish = store.publish
    monkeypatch.setattr(store, "publish", lambda tmp, path: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    assert main(run_args(work, subset, tiny_models)) != 0
    assert listed == []  # the folders were left clean: not listed
    assert temp_files(derived) and not mark.exists()  # a dead run: its temps stay, and no mark
    monkeypatch.setattr(store, "publish", real_publish)
    assert main(run_args(work, subset, tiny_models)) == 0
    assert {"dinov3", "vae_latents", "t5_hidden"} <= set(listed)  # swept
    assert not temp_files(derived) and mark.is_file()
    assert main(["verify", "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(derived)]) == 0


def test_full_tmpfs_during_run_and_export(tmp_path, images, tiny_models, reference, capsys) -> None:
    """A real full disk: a 300 KiB tmpfs fills in the T5 pass (154 KiB per file), then grows."""
    with mounted_tmpfs(tmp_path / "disk", "300k") as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (the in-process full-disk test still runs)")
        work = disk / "work"
        assert main(run_args(work, images, tiny_models)) == 1
        assert "No space left on device" in one_line_error(capsys)
        assert manifest_lines_parse(work / "manifest.jsonl") == 5 and not temp_files(disk)
        # still full: a run that only folds the journal in either manages or fails cleanly
        if main(run_args(work, images, tiny_models, "--pass", "caption")) != 0:
            one_line_error(capsys)
        assert manifest_lines_parse(work / "manifest.jsonl") == 5 and not temp_files(disk)
        remount(disk, "size=1100k")  # the run needs about 0.85 MB, the export as much again
        assert main(run_args(work, images, tiny_models)) == 0
        capsys.readouterr()
        assert main(export_args(work)) == 1
        one_line_error(capsys)
        assert not temp_files(disk) and not (work / "shards" / "index.json").exists()
        remount(disk, "size=8m")
        assert main(export_args(work)) == 0
        assert compare(reference, work) == []


# ------------------------------------------------------------------ read-only, wrong kinds
@contextlib.contextmanager
def read_only(path: Path, monkeypatch):
    """`path` read-only for root too: a read-only bind mount, else refused writes injected in-process."""
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "--bind", str(path), str(path)],
                                                   capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        mounted = False
    if not mounted:
        real_access, real_mkstemp = os.access, fsio.tempfile.mkstemp

        def inside(p) -> bool:
            return Path(os.path.abspath(p)).is_relative_to(path)

        def access(p, mode, **kwargs):
            return False if inside(p) and mode & os.W_OK else real_access(p, mode, **kwargs)

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and inside(dir):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(fsio.tempfile, "mkstemp", mkstemp)
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        monkeypatch.undo()


def test_read_only_output_directory(tmp_path, images, tiny_models, reference, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "derived").mkdir()
    before = sorted(p.name for p in work.rglob("*"))
    with read_only(work / "derived", monkeypatch):
        assert main(run_args(work, images, tiny_models)) != 0
        assert "not writable" in one_line_error(capsys)
    assert sorted(p.name for p in work.rglob("*")) == before  # nothing written, not even the manifest
    assert main(run_args(work, images, tiny_models)) == 0  # writable again: it runs
    capsys.readouterr()
    with read_only(work, monkeypatch):  # the manifest's folder (and everything) read-only
        assert main(run_args(work, images, tiny_models, "--pass", "caption")) != 0
        one_line_error(capsys)
    shards = tmp_path / "shards"
    shards.mkdir()
    with read_only(shards, monkeypatch):
        code = main(["export", "webdataset", "--input-jsonl", str(work / "manifest.jsonl"), "--derived-dir",
                     str(work / "derived"), "--output-dir", str(shards)])
        assert code != 0
        one_line_error(capsys)
    assert not [p for p in shards.rglob("*") if p.is_file()]


@pytest.mark.parametrize("case", ["images_is_a_file", "output_is_a_file", "manifest_parent_is_a_file",
                                  "export_manifest_missing", "export_derived_missing", "export_output_is_a_file",
                                  "verify_manifest_is_a_dir"])
def test_paths_of_the_wrong_kind_are_one_line(tmp_path, case: str, capsys) -> None:
    a_file = tmp_path / f"file-{uuid.uuid4().hex[:6]}"
    a_file.write_text("x")
    m, base = tmp_path / "m.jsonl", tmp_path / "derived"
    run = ["run", "--manifest", str(m), "--output-base-dir", str(base), "--pass", "migrate", "--min-free-gb", "0"]
    export = ["export", "webdataset", "--input-jsonl", str(m), "--derived-dir", str(base), "--output-dir",
              str(tmp_path / "shards")]
    if case.startswith("export") and case != "export_manifest_missing":
        m.write_text("")
    if case == "export_output_is_a_file":
        base.mkdir()
        export[-1] = str(a_file)
    argv = {
        "images_is_a_file": [*run, "--images", str(a_file)],
        "output_is_a_file": ["run", "--images", str(tmp_path), "--manifest", str(m), "--output-base-dir",
                             str(a_file), "--pass", "migrate", "--min-free-gb", "0"],
        "manifest_parent_is_a_file": ["run", "--images", str(tmp_path), "--manifest", str(a_file / "m.jsonl"),
                                      "--output-base-dir", str(base), "--pass", "migrate", "--min-free-gb", "0"],
        "export_manifest_missing": export,
        "export_derived_missing": export,
        "export_output_is_a_file": export,
        "verify_manifest_is_a_dir": ["verify", "--manifest", str(tmp_path), "--output-base-dir", str(base)],
    }[case]
    assert main(argv) != 0
    one_line_error(capsys)
    assert a_file.read_text() == "x"

