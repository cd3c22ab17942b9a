"""Inputs where users' data already lives, end to end with the tiny models: an `imagefolder` with
metadata files, a `save_to_disk` dataset, a parquet folder, WebDataset tars (img2dataset's
layout). Each runs the whole pipeline, a rerun that does nothing, a changed source image that
is detected, and (parquet, tars) a SIGKILL mid-pass and a resume that ends as an uninterrupted
run does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import helpers_inputs as hi
import pytest
from test_pipeline_e2e import REPO, assert_same_outputs, read_records, subprocess_env, wait_for

from prep import hfdatasets, tars
from prep.cli import main
from prep.testing import model_flags

BUCKETS = "64x64,64x128,128x64,96x96"


def run_args(work: Path, models: dict, *inputs: str) -> list[str]:
    return [
        "run", *inputs,
        "--manifest", str(work / "manifest.jsonl"),
        "--derived-dir", str(work / "derived"),
        "--buckets", BUCKETS, "--min-free-gb", "0", "--batch-size", "2", "--num-workers", "1",
        *model_flags(models, caption_max_new_tokens=12),
    ]


def by_id(work: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in read_records(work)}


def verify_ok(work: Path) -> bool:
    return main(["verify", "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived")]) == 0


def refreshed_line(out: str) -> str:
    return next((line for line in out.splitlines() if line.startswith("refreshed:")), "")


# ------------------------------------------------------------------------------ imagefolder
def test_imagefolder_metadata_captions_edits_and_extras(tmp_path, tiny_models, capsys, monkeypatch) -> None:
    images = hi.make_imagefolder(tmp_path / "images")
    work = tmp_path / "work"
    args = run_args(work, tiny_models, "--images", str(images))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 metadata: names a missing file" in out
    records = by_id(work)
    assert records["img_1"]["caption"] == "metadata caption 1"
    stamp = records["img_1"]["provenance"]["caption"]
    assert stamp["source"] == "metadata" and stamp["file"]["size"] == (images / "metadata.jsonl").stat().st_size
    assert records["img_1"]["score"] == 0.5 and records["img_1"]["source_width"] == 1  # kept; `width` is prep's
    assert records["img_1"]["width"] == 64
    assert records["deep"]["caption"] == "a csv caption" and records["deep"]["photographer"] == "ann"
    assert records["img_3"]["provenance"]["caption"]["source"] == "model"  # no metadata row: the captioner
    assert verify_ok(work)

    def no_read(path):
        raise AssertionError(f"an unchanged metadata file was read again: {path}")

    monkeypatch.setattr("prep.captions.read_metadata_rows", no_read)
    assert main(args) == 0
    assert "0 new, 0 migrated, 0 enriched, 0 extracted, 5 skipped" in capsys.readouterr().out
    monkeypatch.undo()

    text = (images / "metadata.jsonl").read_text().replace("metadata caption 1", "an edited caption")
    (images / "metadata.jsonl").write_text(text)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "refreshed: 1 stale" in out and "t5" in refreshed_line(out)
    after = by_id(work)
    assert after["img_1"]["caption"] == "an edited caption"
    assert after["img_3"]["caption"] == records["img_3"]["caption"]  # the model's caption stays
    assert after["img_0"]["provenance"]["t5"] == records["img_0"]["provenance"]["t5"]
    assert verify_ok(work)


def test_caption_modes_filename_instance_prefix_and_extension(tmp_path, tiny_models, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "red_fox-at_dusk.jpg").write_bytes(hi.jpeg_bytes(96, 64, 1))
    (images / "owl.png").write_bytes(hi.png_bytes(64, 64, 2))
    (images / "owl.caption").write_text("an owl on a branch\n")
    base = run_args(tmp_path / "a", tiny_models, "--images", str(images), "--pass", "caption")
    assert main([*base, "--captions", "filename", "--caption-prefix", "sks, "]) == 0
    records = by_id(tmp_path / "a")
    assert records["red_fox-at_dusk"]["caption"] == "sks, red fox at dusk"
    assert records["red_fox-at_dusk"]["provenance"]["caption"]["source"] == "filename"
    assert main([*base, "--captions", "filename", "--caption-prefix", "zzt "]) == 0  # a new prefix applies
    assert by_id(tmp_path / "a")["owl"]["caption"] == "zzt owl"

    other = run_args(tmp_path / "b", tiny_models, "--images", str(images), "--pass", "caption")
    assert main([*other, "--captions", "sidecar", "--caption-extension", "caption"]) == 0
    records = by_id(tmp_path / "b")
    assert records["owl"]["caption"] == "an owl on a branch"
    assert records["red_fox-at_dusk"]["provenance"]["caption"]["source"] == "model"

    third = run_args(tmp_path / "c", tiny_models, "--images", str(images), "--pass", "caption")
    assert main([*third, "--captions", "instance", "--instance-prompt", "a photo of sks"]) == 0
    assert {r["caption"] for r in read_records(tmp_path / "c")} == {"a photo of sks"}
    assert {r["provenance"]["caption"]["source"] for r in read_records(tmp_path / "c")} == {"instance_prompt"}


# ------------------------------------------------------------------------------- datasets
def test_saved_dataset_runs_reruns_for_free_and_detects_a_changed_image(tmp_path, tiny_models, capsys, monkeypatch) -> None:
    from prep.report import sheet_entries

    folder = hi.make_saved_dataset(tmp_path / "saved")
    work = tmp_path / "work"
    args = run_args(work, tiny_models, "--dataset", str(folder), "--id-column", "uid")
    assert main(args) == 0
    records = by_id(work)
    odd = next(i for i in records if i.startswith("id_2-"))  # "id.2" is not a safe id: slug + hash
    assert sorted(records) == sorted(["row0", "row1", odd, "row3", "row4"])
    assert records[odd]["image_path"] == f"hfds://{folder}/train/2#image"
    assert records["row3"]["caption"] == "dataset caption 3" and records["row3"]["label"] == 3
    assert records["row3"]["provenance"]["caption"]["source"] == "dataset"
    assert verify_ok(work)
    entries = sheet_entries(list(records.values()), work / "derived", progress=False)
    assert all(e.original.image is not None and e.crop.image is not None for e in entries)

    def no_stream(source):
        raise AssertionError("an unchanged dataset was streamed again")

    monkeypatch.setattr(hfdatasets, "open_stream", no_stream)
    assert main(args) == 0
    assert "0 new, 0 migrated, 0 enriched, 0 extracted, 5 skipped" in capsys.readouterr().out
    monkeypatch.undo()

    hi.replace_saved_dataset(folder, changed=(3,))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 new" in out
    after = by_id(work)
    assert after["row3"]["image_fingerprint"]["sha256"] != records["row3"]["image_fingerprint"]["sha256"]
    assert after["row0"]["provenance"] == records["row0"]["provenance"]
    assert after["row3"]["provenance"]["vae"]["image_sha256"] == after["row3"]["image_fingerprint"]["sha256"]
    assert "dinov3" in refreshed_line(out) and "vae" in refreshed_line(out)
    assert verify_ok(work)


def kill_mid_vae_then_resume(work: Path, args: list[str]) -> None:
    """Start the job in a child, SIGKILL it when the first latent is written, run it again."""
    cmd = [sys.executable, str(REPO / "prep" / "run.py"), *args[1:]]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: any((work / "derived" / "vae_latents").glob("*.npy")))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_parquet_folder_survives_kill_and_detects_a_rewritten_file(tmp_path, tiny_models, capsys) -> None:
    folder = hi.make_parquet_folder(tmp_path / "parquet", n=5)
    reference = tmp_path / "reference"
    assert main(run_args(reference, tiny_models, "--dataset", str(folder))) == 0
    records = by_id(reference)
    assert sorted(records) == [f"train-{i}" for i in range(5)]
    assert records["train-4"]["image_path"] == f"hfds://{folder}/train/4#image"
    killed = tmp_path / "killed"
    kill_mid_vae_then_resume(killed, run_args(killed, tiny_models, "--dataset", str(folder)))
    assert_same_outputs(killed, reference)
    assert verify_ok(killed)

    hi.rewrite_parquet_row(folder, row=4)
    capsys.readouterr()
    assert main(run_args(reference, tiny_models, "--dataset", str(folder))) == 0
    out = capsys.readouterr().out
    after = by_id(reference)
    changed = [i for i in after if after[i]["image_fingerprint"]["sha256"] != records[i]["image_fingerprint"]["sha256"]]
    assert changed == ["train-4"]
    assert "vae" in refreshed_line(out)
    assert after["train-0"]["provenance"]["vae"] == records["train-0"]["provenance"]["vae"]


# ------------------------------------------------------------------------------ webdataset
def test_webdataset_tars_skips_kill_resume_and_changed_tar(tmp_path, tiny_models, capsys, monkeypatch) -> None:
    folder = hi.make_tars(tmp_path / "tars")
    pattern = str(folder / "{00000..00002}.tar")
    reference = tmp_path / "reference"
    assert main(run_args(reference, tiny_models, "--webdataset", pattern)) == 0
    out = capsys.readouterr().out
    for reason in ("duplicate key", "no image member", "not an image", "tar cut short or corrupt", "member unreadable"):
        assert f"1 webdataset: {reason}" in out
    records = by_id(reference)
    assert sorted(records) == ["000000000", "000000001", "000000002", "000010000", "000010001", "000010002",
                               "000020000"]
    first = records["000010000"]
    assert first["image_path"].startswith(f"tar://{folder}/00001.tar?offset=")
    assert first["caption"] == "tar caption 000010000" and first["url"].endswith("000010000.jpg")
    assert first["source_width"] == 96  # img2dataset's json `width` is kept beside prep's own
    assert records["000010001"]["provenance"]["caption"]["source"] == "model"  # no .txt member
    assert verify_ok(reference)

    killed = tmp_path / "killed"
    kill_mid_vae_then_resume(killed, run_args(killed, tiny_models, "--webdataset", pattern))
    assert_same_outputs(killed, reference)

    def no_read(*args, **kwargs):
        raise AssertionError("an unchanged tar was read again")

    monkeypatch.setattr(tars, "iter_tar_samples", no_read)
    capsys.readouterr()
    assert main(run_args(reference, tiny_models, "--webdataset", pattern)) == 0
    assert "0 new, 0 migrated, 0 enriched, 0 extracted, 7 skipped" in capsys.readouterr().out
    monkeypatch.undo()

    # img2dataset reruns shard 00001: a new first sample (every offset moves) and one image changed.
    samples = [hi.img2dataset_sample(7, 1)] + [hi.img2dataset_sample(i, 1, caption=i != 1) for i in range(3)]
    samples[2]["jpg"] = hi.jpeg_bytes(64, 96, 999)
    hi.write_tar(folder / "00001.tar", samples)
    assert main(run_args(reference, tiny_models)) == 0  # the manifest alone: members are found again by name
    out = capsys.readouterr().out
    after = by_id(reference)
    assert after["000010000"]["image_path"] != first["image_path"]  # moved: found again by member name
    assert after["000010000"]["provenance"]["vae"] == first["provenance"]["vae"]  # same bytes: not redone
    assert after["000010001"]["image_fingerprint"] != records["000010001"]["image_fingerprint"]
    # its DINOv3 and VAE, and its model-written caption (then its T5): the image it described changed
    assert refreshed_line(out) == "refreshed: 4 stale artifacts recomputed (caption 1, dinov3 1, t5 1, vae 1)"
    assert verify_ok(reference)
    assert main(run_args(reference, tiny_models, "--webdataset", pattern)) == 0  # the tar is read again
    assert "1 new" in capsys.readouterr().out
    assert by_id(reference)["000010007"]["caption"] == "tar caption 000010007"
    assert verify_ok(reference)


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case, words", [
    ("missing image column", "no column 'picture'"),
    ("not an image column", "is not an image column"),
    ("missing caption column", "no column 'caption'"),
    ("missing id column", "no column 'nope'"),
    ("unreachable dataset", "cannot be reached"),
    ("no tar", "no tar found"),
    ("compressed tar", "is compressed"),
    ("instance without prompt", "needs --instance-prompt"),
    ("metadata without file_name", "has no 'file_name'"),
    ("metadata mode without metadata", "no metadata.jsonl"),
    ("sidecar for a dataset", "does not apply to --dataset"),
])
def test_bad_inputs_are_one_line_errors(case, words, tmp_path, tiny_models, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = tmp_path / "saved"
    if "column" in case or "dataset" in case and "unreachable" not in case:
        hi.make_saved_dataset(saved, n=2)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(hi.jpeg_bytes(64, 64, 0))
    inputs = {
        "missing image column": ["--dataset", str(saved), "--image-column", "picture"],
        "not an image column": ["--dataset", str(saved), "--image-column", "text"],
        "missing caption column": ["--dataset", str(saved), "--captions", "metadata", "--caption-column", "caption"],
        "missing id column": ["--dataset", str(saved), "--id-column", "nope"],
        "unreachable dataset": ["--dataset", "nobody/no-such-dataset"],
        "no tar": ["--webdataset", str(tmp_path / "{00000..00003}.tar")],
        "compressed tar": ["--webdataset", str(tmp_path / "x.tar.gz")],
        "instance without prompt": ["--images", str(images), "--captions", "instance"],
        "metadata without file_name": ["--images", str(images)],
        "metadata mode without metadata": ["--images", str(images), "--captions", "metadata"],
        "sidecar for a dataset": ["--dataset", str(saved), "--captions", "sidecar"],
    }[case]
    if case == "compressed tar":
        (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b")
    if case == "metadata without file_name":
        (images / "metadata.jsonl").write_text('{"name": "a.jpg", "text": "x"}\n')
    capsys.readouterr()
    assert main(run_args(tmp_path / "work", tiny_models, *inputs)) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("prep: error:") and words in errors[0], errors
    assert not (tmp_path / "work" / "manifest.jsonl").exists()


def test_combined_sources_in_one_manifest(tmp_path, tiny_models, capsys) -> None:
    """A folder, a dataset and tars feed one manifest; ids stay unique across them."""
    images = hi.make_imagefolder(tmp_path / "images")
    saved = hi.make_saved_dataset(tmp_path / "saved", n=3)
    folder = hi.make_tars(tmp_path / "tars")
    work = tmp_path / "work"
    args = run_args(work, tiny_models, "--images", str(images), "--dataset", str(saved),
                    "--webdataset", str(folder), "--pass", "migrate")
    assert main(args) == 0
    records = read_records(work)
    assert len(records) == 5 + 3 + 7
    assert len({r["image_id"] for r in records}) == len(records)
    json.dumps(records)  # every extra field is JSON
    (work / "manifest.jsonl").unlink()  # a lost manifest: the inputs' read state must not hide them
    assert main(args) == 0
    assert len(read_records(work)) == 15
    assert main([*args, "--no-resume"]) == 0
    assert sorted(r["image_path"] for r in read_records(work)) == sorted(r["image_path"] for r in records)
    shutil.rmtree(work)


def test_two_ranks_on_tars_and_a_dataset_match_one_process(tmp_path, tiny_models) -> None:
    """Every rank's DataLoader workers read members and rows themselves (own tar handles, own readers)."""
    from test_pipeline_e2e import accelerate_cmd

    folder = hi.make_tars(tmp_path / "tars")
    saved = hi.make_saved_dataset(tmp_path / "saved", n=4)
    inputs = ("--webdataset", str(folder), "--dataset", str(saved))
    one = tmp_path / "one"
    assert main(run_args(one, tiny_models, *inputs)) == 0
    two = tmp_path / "two"
    cmd = [*accelerate_cmd(), str(REPO / "prep" / "run.py"), *run_args(two, tiny_models, *inputs)[1:]]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "11 new" in proc.stdout
    assert_same_outputs(two, one)


def test_hub_dataset_rows_are_pinned_to_a_commit_and_read_through_fsspec(tmp_path, tiny_models, capsys,
                                                                          monkeypatch) -> None:
    """The Hub is out of reach here: its three doors (commit, data files, stream) open onto a local
    parquet folder; everything behind them (locators, row reads through fsspec, a new commit) is real."""
    import datasets

    from prep.sources import open_image

    folder = hi.make_parquet_folder(tmp_path / "parquet", n=5)
    files = sorted(str(p) for p in (folder / "data").glob("*.parquet"))
    commit = {"sha": "c0ffee1"}
    real_load = datasets.load_dataset
    monkeypatch.setattr(hfdatasets, "hub_commit", lambda name, revision: commit["sha"])
    monkeypatch.setattr(hfdatasets, "hub_data_files", lambda name, revision, split: files)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: real_load(str(folder), **{**kw, "revision": None}))
    work = tmp_path / "work"
    args = run_args(work, tiny_models, "--dataset", "owner/pictures", "--pass", "migrate")
    assert main(args) == 0
    records = by_id(work)
    assert records["train-3"]["image_path"] == "hf://datasets/owner/pictures@c0ffee1/train/3#image"
    assert "mtime_ns" in records["train-3"]["image_fingerprint"] and records["train-3"]["image_fingerprint"]["mtime_ns"] is None
    stream = list(real_load(str(folder), split="train", streaming=True).cast_column("image", datasets.Image(decode=False)))
    for index, example in enumerate(stream):
        with open_image(records[f"train-{index}"]["image_path"]) as f:
            assert f.read() == example["image"]["bytes"]
    commit["sha"] = "beef002"  # a new commit: streamed again, rows matched by position, nothing duplicated
    assert main(args) == 0
    after = by_id(work)
    assert sorted(after) == sorted(records)
    assert after["train-3"]["image_path"].endswith("@beef002/train/3#image")
    assert after["train-3"]["image_fingerprint"] == records["train-3"]["image_fingerprint"]
