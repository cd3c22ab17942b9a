"""Curation: size and shape rules, exact and near duplicates, flags that follow thresholds, prune + kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep import curate, dedup
from prep.cli import main
from prep.errors import UserError
from prep.manifest import read_manifest, write_manifest
from prep.store import artifact_ok, artifact_path, load_npy
from prep.testing import make_test_images, model_flags, synthetic_rgb

REPO = Path(__file__).resolve().parent.parent
BUCKETS = "64x64,64x128,128x64,96x96"
FLUX = "1024x1024,832x1216,1216x832,768x1280,1280x768,704x1344,1344x704"


# ----------------------------------------------------------------------------- helpers
def v2(image_id: str, width: int, height: int, bucket: str, **extra) -> dict:
    return {"image_id": image_id, "image_path": f"/nowhere/{image_id}.jpg", "width": width, "height": height,
            "aspect_bucket": bucket, "format_version": 2, **extra}


def columns_for(tmp_path: Path, records: list[dict]) -> tuple[curate.Columns, object]:
    path = tmp_path / "m.jsonl"
    write_manifest(path, records)
    manifest = read_manifest(path)
    return curate.columns_of_manifest(manifest), manifest


def decided(tmp_path: Path, records: list[dict], **rules) -> dict[str, dict]:
    """{image_id: flag} of what the rules flag among `records` (none flagged before)."""
    columns, _ = columns_for(tmp_path, records)
    judgement = curate.judge(columns, curate.Rules(**rules))
    return {columns.ids[i]: flag for i, flag in judgement.changes.items() if flag is not None}


def read_records(work: Path) -> dict[str, dict]:
    lines = (work / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return {r.get("image_id") or r["image_path"]: r for r in map(json.loads, lines)}


def flags_of(work: Path) -> dict[str, str]:
    return {i: r["filtered"]["reason"] for i, r in read_records(work).items() if isinstance(r.get("filtered"), dict)}


# ----------------------------------------------------------------------------- size rules
def test_upscale_rule_on_crafted_sizes(tmp_path: Path) -> None:
    records = [
        v2("thumb", 300, 200, "1216x832"),  # the issue's thumbnail: 4.16x
        v2("gif", 14, 25, "192x320"),  # the report's GIF: 13.7x
        v2("photo", 1024, 683, "1216x832"),  # 1.22x: allowed by default
        v2("icon", 64, 64, "96x96"),  # 1.5x: allowed by default
        v2("big", 4000, 3000, "1216x832"),  # downscaled
    ]
    flags = decided(tmp_path, records)
    assert set(flags) == {"thumb", "gif"}
    assert flags["thumb"]["reason"] == "upscale" and flags["thumb"]["upscale"] == pytest.approx(832 / 200, abs=1e-3)
    assert "300x200 would be enlarged 4.16x to cover its bucket 1216x832 (--max-upscale 2)" in flags["thumb"]["detail"]
    assert flags["gif"]["upscale"] == pytest.approx(192 / 14, abs=1e-3) and flags["gif"]["by"] == "prep"
    assert set(decided(tmp_path, records, max_upscale=1.25)) == {"thumb", "gif", "icon"}
    assert set(decided(tmp_path, records, max_upscale=1.2)) == {"thumb", "gif", "icon", "photo"}
    assert decided(tmp_path, records, max_upscale=None) == {}


def test_aspect_rule_relative_to_the_bucket_set(tmp_path: Path) -> None:
    records = [
        v2("pano8", 4000, 500, "1344x704"),  # 8:1: even the widest bucket crops 76%
        v2("pano3", 3000, 1000, "1344x704"),  # 3:1: crops 36%, kept
        v2("wide4", 256, 64, "128x64"),  # 4:1 in a 2:1 bucket: crops exactly half, kept
        v2("strip", 1, 5000, "64x128"),  # 1:5000 (also enlarged 64x: that reason wins)
        v2("tall", 1000, 2400, "704x1344"),
    ]
    flags = decided(tmp_path, records, max_upscale=None)
    assert set(flags) == {"pano8", "strip"}
    assert flags["pano8"]["reason"] == "aspect" and flags["pano8"]["crop"] == pytest.approx(1 - (1344 / 704) / 8, abs=1e-3)
    assert "crops away 76% of the image" in flags["pano8"]["detail"]
    assert decided(tmp_path, records)["strip"]["reason"] == "upscale"  # priority: upscale before aspect
    explicit = decided(tmp_path, records, max_upscale=None, max_aspect=2.5)
    assert set(explicit) == {"pano8", "pano3", "wide4", "strip"}
    assert "aspect 3.00:1 exceeds --max-aspect 2.5" in explicit["pano3"]["detail"]
    assert decided(tmp_path, records, max_upscale=None, max_aspect=None) == {}


def test_min_side_and_min_pixels_and_what_is_not_judged(tmp_path: Path) -> None:
    records = [
        v2("small", 90, 60, "128x64"),
        v2("square", 64, 64, "64x64"),
        v2("fine", 256, 256, "96x96"),
        {"image_path": "/nowhere/v0.jpg", "caption": "v0", "dinov3_embedding": [0.0] * 4},  # waits for migration
        v2("nosize", 0, 0, "64x64"),
        v2("nobucket", 10, 10, "bogus"),
    ]
    assert set(decided(tmp_path, records, min_side=61)) == {"small"}
    flags = decided(tmp_path, records, min_pixels=5401)
    assert set(flags) == {"small", "square"} and "4096 pixels, under --min-pixels 5401" in flags["square"]["detail"]
    both = decided(tmp_path, records, min_side=100, max_upscale=1.0)
    assert both["small"]["reason"] == "too_small"  # too_small outranks upscale


def test_keep_ids_and_flags_set_by_others(tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("# force-keep\nthumb\n\n")
    records = [
        v2("thumb", 300, 200, "1216x832"),
        v2("theirs", 300, 200, "1216x832", filtered={"reason": "nsfw", "detail": "a moderator said so"}),
        v2("garbage", 300, 200, "1216x832", filtered="yes"),
        v2("stale", 1024, 1024, "1024x1024", filtered=curate.make_flag("upscale", "old threshold")),
    ]
    columns, manifest = columns_for(tmp_path, records)
    judgement = curate.judge(columns, curate.Rules(keep_ids=str(keep)))
    curate.apply_to_manifest(manifest, judgement)
    after = {r["image_id"]: r for r in read_manifest(tmp_path / "m.jsonl")}
    assert "filtered" not in after["thumb"]  # kept by --keep-ids
    assert after["theirs"]["filtered"] == records[1]["filtered"]  # not prep's: never touched
    assert after["garbage"]["filtered"] == "yes"
    assert "filtered" not in after["stale"]  # prep's own flag, lifted: 1024 px needs no upscale


def test_rule_values_are_checked_and_sticky(tmp_path: Path, capsys) -> None:
    rules = curate.resolve_rules({"max_upscale": "1.5"}, {"near_duplicate": 0.9, "max_aspect": "off"})
    assert (rules.max_upscale, rules.near_duplicate, rules.max_aspect) == (1.5, 0.9, None)
    assert curate.resolve_rules({}, rules.to_json()) == rules
    assert curate.resolve_rules({"near_duplicate": "off"}, rules.to_json()).near_duplicate is None
    for name, value in (("max_upscale", "0.5"), ("near_duplicate", "1.5"), ("max_aspect", "wide"), ("min_side", "-1"),
                        ("keep_ids", str(tmp_path / "none.txt"))):
        with pytest.raises(UserError) as err:
            curate.resolve_rules({name: value}, {})
        assert "\n" not in str(err.value) and f"--{name.replace('_', '-')}" in str(err.value)
    code = main(["curate", "--manifest", str(tmp_path / "m.jsonl"), "--max-upscale", "lots"])
    assert code == 2 and capsys.readouterr().err.startswith("prep: error: --max-upscale 'lots'")


def test_a_rule_replaces_its_own_flags_and_keeps_higher_ones_of_others() -> None:
    upscale = curate.make_flag("upscale", "x")
    aspect = curate.make_flag("aspect", "y")
    near = curate.make_flag("near_duplicate", "z")
    assert curate.settle(upscale, aspect, curate.SIZE_REASONS) == aspect  # its own: replaced
    assert curate.settle(upscale, None, curate.SIZE_REASONS) is None  # its own: lifted
    assert curate.settle(upscale, near, ("near_duplicate",)) == upscale  # another rule's, higher: stays
    assert curate.settle(near, aspect, curate.SIZE_REASONS) == aspect  # another rule's, lower: outranked
    assert curate.settle(near, None, curate.SIZE_REASONS) == near  # another rule's: not lifted
    theirs = {"reason": "upscale", "detail": "mine"}
    assert curate.settle(theirs, None, curate.SIZE_REASONS) == theirs


def stamped(image_id: str, width: int, embedding: np.ndarray | None, derived: Path, **extra) -> dict:
    """A v2 record whose DINOv3 file is stamped for its image (the file is written when `embedding` is given)."""
    from prep.store import save_artifact

    image_sha = hashlib.sha256(image_id.encode()).hexdigest()
    if embedding is not None:
        save_artifact(derived, "dinov3", image_id, embedding.astype(np.float32))
    stamp = {"format": 1, "image_sha256": image_sha, "file": {"size": 4224, "mtime_ns": 1, "sha256": "ab" * 32}}
    return v2(image_id, width, width, "64x64", image_fingerprint={"size": 1, "mtime_ns": 1, "sha256": image_sha},
              provenance={"dinov3": stamp}, **extra)


def test_near_duplicates_judge_only_records_with_an_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base, other = rng.normal(size=1024), rng.normal(size=1024)
    derived = tmp_path / "derived"
    records = [
        stamped("a", 64, base, derived),
        stamped("b", 48, base + rng.normal(scale=0.01, size=1024), derived),  # smaller: the duplicate
        stamped("c", 64, other, derived),
        v2("d", 64, 64, "64x64", filtered=curate.make_flag("near_duplicate", "an earlier run")),  # no embedding
        stamped("e", 64, None, derived),  # stamped, but its file is gone
    ]
    columns, manifest = columns_for(tmp_path, records)
    judgement = curate.judge(columns, curate.Rules(near_duplicate=0.99), derived_dir=derived, near=True, device="cpu")
    assert {columns.ids[i]: f["duplicate_of"] for i, f in judgement.changes.items() if f} == {"b": "a"}
    assert judgement.near.judged == 3 and judgement.near.not_judged == 2 and judgement.near.digest is None
    assert 3 not in judgement.changes  # not judged: its flag stays until its embedding exists
    curate.apply_to_manifest(manifest, judgement)
    (derived / "dinov3" / "e.npy").unlink(missing_ok=True)
    records[4] = stamped("e", 64, None, derived)
    columns, manifest = columns_for(tmp_path, [r for r in records if r["image_id"] != "e"])
    again = curate.judge(columns, curate.Rules(near_duplicate=0.99), derived_dir=derived, near=True, device="cpu")
    assert again.near.digest is not None
    columns = curate.columns_of_manifest(curate.apply_to_manifest(manifest, again))
    repeat = curate.judge(columns, curate.Rules(near_duplicate=0.99), derived_dir=derived, near=True, device="cpu",
                          previous_digest=again.near.digest)
    assert repeat.near.skipped and not repeat.changes  # nothing changed: nothing read, nothing computed


# ----------------------------------------------------------------------------- duplicate math
def reference_greedy(emb: np.ndarray, order: np.ndarray, threshold: float, keep=()) -> dict[int, int]:
    """The rule written out: in priority order, a row similar to a kept one duplicates the most similar."""
    sims = emb.astype(np.float64) @ emb.astype(np.float64).T
    kept, found = [], {}
    for row in order.tolist():
        similar = [k for k in kept if sims[row, k] >= threshold]
        if similar and row not in keep:
            found[row] = max(similar, key=lambda k: (sims[row, k], -kept.index(k)))
        else:
            kept.append(row)
    return found


def chain(*sims: float) -> np.ndarray:
    """Unit vectors in a plane whose neighbours have the given cosines (a -> b -> c ...)."""
    angles = np.concatenate([[0.0], np.cumsum(np.arccos(sims))])
    return np.stack([np.cos(angles), np.sin(angles), *np.zeros((6, len(angles)))], axis=1).astype(np.float32)


def test_greedy_keeps_the_largest_and_never_chains() -> None:
    emb = chain(0.995, 0.995)  # a ~ b, b ~ c, but a and c (0.98) are not: b duplicates a, c stays
    found = dedup.near_duplicates(emb, np.arange(3), 0.99)
    assert {k: v[0] for k, v in found.items()} == {1: 0}
    assert dedup.near_duplicates(emb, np.asarray([1, 0, 2]), 0.99).keys() == {0, 2}  # b first: a and c duplicate it
    kept_b = dedup.near_duplicates(emb, np.arange(3), 0.99, keep=np.asarray([False, True, False]))
    assert {k: v[0] for k, v in kept_b.items()} == {2: 1}  # b is force-kept: never flagged, and c duplicates it


def test_priority_is_the_largest_image_then_the_smallest_id() -> None:
    order = dedup.priority_order(["b", "a", "c", "d"], np.asarray([100, 100, 400, 1]))
    assert order.tolist() == [2, 1, 0, 3]


@pytest.mark.parametrize("blocks", [{"query_block": 64, "corpus_block": 100}, {}])
def test_near_duplicates_equal_the_rule_written_out(blocks) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(700, 64)).astype(np.float32)
    for a, b in ((3, 650), (10, 11), (64, 65), (99, 100), (500, 2), (650, 651), (11, 12)):  # across block edges
        emb[b] = emb[a] + rng.normal(scale=0.05, size=64)
    emb[200:260] = emb[199] + rng.normal(scale=0.01, size=(60, 64))  # a dense cluster: 61 near-identical images
    emb = dedup.normalize_rows(emb)
    order = rng.permutation(len(emb))
    keep = {int(order[300])}
    for threshold in (0.99, 0.95, 0.5):
        found = dedup.near_duplicates(emb, order, threshold, keep=np.isin(np.arange(len(emb)), list(keep)), **blocks)
        expected = reference_greedy(emb, order, threshold, keep)
        assert {k: v[0] for k, v in found.items()} == expected, threshold
        for row, (kept, similarity) in found.items():
            assert similarity == pytest.approx(float(emb[row] @ emb[kept]), abs=1e-5) and similarity >= threshold


def test_zero_and_non_finite_rows_are_never_duplicates() -> None:
    emb = np.ones((3, 8), np.float32)
    emb[1] = 0
    emb[2, 0] = np.nan
    assert dedup.near_duplicates(dedup.normalize_rows(emb), np.arange(3), 0.5) == {}


# ----------------------------------------------------------------------------- with tiny models
def run_args(work: Path, images: Path, models: dict, *extra: str) -> list[str]:
    return ["run", "--images", str(images), "--manifest", str(work / "manifest.jsonl"),
            "--derived-dir", str(work / "derived"), "--buckets", BUCKETS, "--min-free-gb", "0", "--batch-size", "4",
            "--num-workers", "0", *model_flags(models), *extra]  # fmt: skip


def curation_images(folder: Path) -> Path:
    """The sample set, plus: an exact copy, the same photo re-encoded and resized, a 20x20 icon, an 8:1 strip."""
    make_test_images(folder)
    shutil.copy(folder / "rgb_square.png", folder / "copy_square.png")
    with Image.open(folder / "rgb_landscape.jpg") as photo:
        photo.resize((200, 125), Image.Resampling.LANCZOS).save(folder / "landscape_small.jpg", quality=70)
    Image.fromarray(synthetic_rgb(20, 20, np.random.default_rng(5))).save(folder / "tiny.png")
    Image.fromarray(synthetic_rgb(400, 50, np.random.default_rng(6))).save(folder / "pano.png")
    return folder


EXPECTED = {"tiny": "upscale", "pano": "aspect", "rgb_square": "duplicate", "landscape_small": "near_duplicate"}


@pytest.fixture(scope="module")
def curated(tmp_path_factory, tiny_models) -> Path:
    """One full run with a hand-set near-duplicate threshold (the tiny DINOv3 is random: 0.995 separates
    the re-encoded copy, 0.9999 here, from every distinct sample image, at most 0.96)."""
    work = tmp_path_factory.mktemp("curated")
    curation_images(work / "images")
    assert main(run_args(work, work / "images", tiny_models, "--near-duplicate", "0.995")) == 0
    return work


@pytest.fixture
def copy(curated: Path, tmp_path: Path) -> Path:
    target = tmp_path / "work"
    shutil.copytree(curated, target, symlinks=True)
    return target


def test_a_run_flags_what_would_hurt_and_encodes_the_rest(curated: Path) -> None:
    records = read_records(curated)
    assert flags_of(curated) == EXPECTED
    assert records["rgb_square"]["filtered"]["duplicate_of"] == "copy_square"  # same size: the smaller id stays
    near = records["landscape_small"]["filtered"]
    assert near["duplicate_of"] == "rgb_landscape" and near["similarity"] >= 0.995
    derived = curated / "derived"
    for image_id, record in records.items():
        done = {kind: artifact_ok(derived, kind, record) for kind in ("dinov3", "vae", "t5")}
        if image_id in ("tiny", "pano"):  # flagged before any pass: no model ran on them
            assert done == {"dinov3": False, "vae": False, "t5": False} and "caption" not in record
        elif image_id in EXPECTED:  # flagged after the dinov3 pass, which runs first: no caption, VAE or T5
            assert done == {"dinov3": True, "vae": False, "t5": False} and "caption" not in record
        else:
            assert all(done.values()), image_id


def test_verify_export_and_report_count_flagged_records_apart(copy: Path, capsys) -> None:
    paths = ["--manifest", str(copy / "manifest.jsonl"), "--derived-dir", str(copy / "derived")]
    capsys.readouterr()
    assert main(["verify", *paths, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["filtered"] == {r: 1 for r in EXPECTED.values()}
    assert main(["export", "webdataset", *paths, "--output-dir", str(copy / "shards"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written_samples"] == 14
    assert summary["skipped_incomplete"] == {f"filtered: {r}": 1 for r in EXPECTED.values()}
    assert main(["report", *paths, "--out", str(copy / "report"), "--samples", "20", "--no-decode"]) == 0
    page = (copy / "report" / "index.html").read_text(encoding="utf-8")
    assert 'aria-label="filtered"' in page and (copy / "report" / "filtered_strip.png").is_file()
    for image_id, reason in EXPECTED.items():
        assert f'<td class="mono">{image_id}</td><td>{reason}</td>' in page
    assert "14 of 14 records sampled" in page  # the sheet shows the records used for training
    # the 64x64 GIF in its 96x96 bucket says it was enlarged; long caption tokens wrap inside their cell
    row = page[page.index('<td class="mono">animated</td>'):]
    assert row[: row.index("</tr>")].count('<td class="num warn">1.50×</td>') == 1
    assert "td.caption { max-width:520px; overflow-wrap:anywhere;" in page and ".wide-table { overflow-x:auto; }" in page


def test_a_new_threshold_flips_exactly_the_records_it_should(copy: Path, tiny_models) -> None:
    derived = copy / "derived"
    records = read_records(copy)
    pool = [i for i in records if i not in ("tiny", "pano", "rgb_square")]
    vectors = {i: load_npy(artifact_path(derived, "dinov3", i)).astype(np.float64) for i in pool}
    vectors = {i: v / np.linalg.norm(v) for i, v in vectors.items()}

    def expected(threshold: float) -> set[str]:  # the rule, written out: largest first, then smallest id
        order = sorted(pool, key=lambda i: (-records[i]["width"] * records[i]["height"], i))
        kept, flagged = [], set()
        for i in order:
            if any(vectors[i] @ vectors[k] >= threshold for k in kept):
                flagged.add(i)
            else:
                kept.append(i)
        return flagged

    loose = expected(0.95)
    assert "landscape_small" in loose and len(loose) >= 2  # the tiny random model finds more at 0.95
    images = Path(records["tiny"]["image_path"]).parent
    assert main(run_args(copy, images, tiny_models, "--near-duplicate", "0.95")) == 0
    assert {i for i, r in flags_of(copy).items() if r == "near_duplicate"} == loose
    assert main(run_args(copy, images, tiny_models, "--near-duplicate", "0.995")) == 0
    assert flags_of(copy) == EXPECTED
    after = read_records(copy)
    for image_id in loose - {"landscape_small"}:  # lifted again: now encoded in full
        assert "filtered" not in after[image_id]
        assert all(artifact_ok(derived, kind, after[image_id]) for kind in ("vae", "t5")), image_id


def test_loosened_size_rules_lift_flags_and_settings_are_sticky(copy: Path, tiny_models) -> None:
    images = Path(read_records(copy)["tiny"]["image_path"]).parent
    derived = copy / "derived"
    assert main(run_args(copy, images, tiny_models, "--max-upscale", "off", "--max-aspect", "off")) == 0
    assert flags_of(copy) == {"rgb_square": "duplicate", "landscape_small": "near_duplicate"}
    tiny = read_records(copy)["tiny"]
    assert tiny["caption"] and all(artifact_ok(derived, kind, tiny) for kind in ("dinov3", "vae", "t5"))
    assert main(run_args(copy, images, tiny_models)) == 0  # no flag given: the last values hold
    assert "tiny" not in flags_of(copy)
    meta = json.loads((derived / "prep_metadata.json").read_text())
    assert meta["curation"]["max_upscale"] == "off" and meta["curation"]["near_duplicate"] == 0.995
    assert main(run_args(copy, images, tiny_models, "--max-upscale", "2")) == 0
    assert flags_of(copy)["tiny"] == "upscale"
    assert artifact_path(derived, "vae", "tiny").is_file()  # flagged again: its files are kept, never deleted


def test_curate_command_dry_run_apply_and_idempotence(copy: Path, capsys) -> None:
    paths = ["--manifest", str(copy / "manifest.jsonl"), "--derived-dir", str(copy / "derived")]
    before = (copy / "manifest.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["curate", *paths, "--dry-run", "--max-upscale", "1.2"]) == 0
    out = capsys.readouterr().out
    assert "would flag 3 record(s):" in out and "gray16 [upscale] 90x60 would be enlarged 1.42x" in out
    assert "animated [upscale] 64x64 would be enlarged 1.50x" in out and "dry run: nothing written" in out
    assert "pano [upscale] 400x50 would be enlarged 1.28x" in out  # upscale outranks its aspect flag
    assert "tiny [" not in out and "(1 flag(s) keep their reason with a new detail)" in out
    assert (copy / "manifest.jsonl").read_bytes() == before
    assert main(["curate", *paths, "--max-upscale", "1.2"]) == 0
    assert flags_of(copy) == {**EXPECTED, "gray16": "upscale", "animated": "upscale", "pano": "upscale"}
    after = (copy / "manifest.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["curate", *paths]) == 0  # sticky 1.2, nothing left to do
    assert "nothing to change" in capsys.readouterr().out and (copy / "manifest.jsonl").read_bytes() == after
    assert main(["curate", *paths, "--max-upscale", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["lifted"]) == ["animated", "gray16"]
    assert [(f["image_id"], f["reason"]) for f in result["flagged"]] == [("pano", "aspect")]
    assert flags_of(copy) == EXPECTED
    keep = copy / "keep.txt"
    keep.write_text("# ours\ntiny\nrgb_square\n")
    assert main(["curate", *paths, "--keep-ids", str(keep)]) == 0
    assert flags_of(copy) == {"pano": "aspect", "landscape_small": "near_duplicate"}
    assert main(["curate", *paths]) == 0  # the keep file is remembered too
    assert "tiny" not in flags_of(copy)
    assert main(["curate", *paths, "--keep-ids", "none"]) == 0
    assert flags_of(copy) == EXPECTED


def test_curate_waits_for_no_one(copy: Path, capsys) -> None:
    from prep.fsio import acquire_lock, release_lock

    lock = acquire_lock(copy / "manifest.jsonl.lock", "test")
    try:
        code = main(["curate", "--manifest", str(copy / "manifest.jsonl"), "--derived-dir", str(copy / "derived")])
    finally:
        release_lock(lock)
    err = capsys.readouterr().err
    assert code == 2 and "another prep job is using" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- unmigratable, prune
@pytest.fixture
def stage1(tmp_path: Path) -> Path:
    """A Stage-1 manifest: a good v0 record, one with a ViT-B (768) vector, one whose image is gone."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("good.png", "vitb.png", "other.png"):
        Image.fromarray(synthetic_rgb(64, 64, np.random.default_rng(len(name)))).save(images / name)
    rng = np.random.default_rng(0)
    lines = [
        {"image_path": str(images / "good.png"), "dinov3_embedding": rng.normal(size=1024).tolist(), "caption": "g"},
        {"image_path": str(images / "vitb.png"), "dinov3_embedding": rng.normal(size=768).tolist(), "caption": "b"},
        {"image_path": str(images / "gone.png"), "dinov3_embedding": rng.normal(size=1024).tolist(), "caption": "x",
         "note": "kept"},
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path


def migrate(work: Path, *extra: str) -> int:
    return main(["run", "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived"),
                 "--pass", "migrate", "--min-free-gb", "0", "--buckets", BUCKETS, *extra])


def test_records_that_cannot_migrate_are_flagged_and_verify_counts_them_apart(stage1: Path, capsys) -> None:
    assert migrate(stage1) == 0
    out = capsys.readouterr().out
    assert " 0 failed " in out and "filtered: 2 records flagged" in out
    records = read_records(stage1)
    vitb = records[str(stage1 / "images" / "vitb.png")]
    gone = records[str(stage1 / "images" / "gone.png")]
    assert vitb["filtered"]["reason"] == "unmigratable" and "length 768" in vitb["filtered"]["detail"]
    assert gone["filtered"]["reason"] == "image_missing" and gone["note"] == "kept"
    assert len(vitb["dinov3_embedding"]) == 768  # everything else kept as it was
    paths = ["--manifest", str(stage1 / "manifest.jsonl"), "--derived-dir", str(stage1 / "derived"), "--json"]
    main(["verify", *paths])
    report = json.loads(capsys.readouterr().out)
    assert report["filtered"] == {"image_missing": 1, "unmigratable": 1}
    assert not any(p.get("image_id", "").startswith(("vitb", "gone")) for p in report["problems"])
    # the image comes back: the record migrates and loses its flag
    shutil.copy(stage1 / "images" / "other.png", stage1 / "images" / "gone.png")
    assert migrate(stage1) == 0
    back = read_records(stage1)["gone"]
    assert back["format_version"] == 2 and "filtered" not in back and back["note"] == "kept"


def test_prune_moves_flagged_records_aside_and_a_scan_does_not_bring_them_back(stage1: Path, capsys) -> None:
    assert migrate(stage1) == 0
    lines = (stage1 / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    assert main(["prune", "--manifest", str(stage1 / "manifest.jsonl"), "--reason", "unmigratable"]) == 0
    assert "moved 1 record(s) (unmigratable 1)" in capsys.readouterr().out
    assert main(["prune", "--manifest", str(stage1 / "manifest.jsonl")]) == 0
    side = (stage1 / "manifest.jsonl.pruned.jsonl").read_bytes().splitlines(keepends=True)
    main_lines = (stage1 / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    assert sorted(side + main_lines) == sorted(lines) and len(side) == 2  # byte for byte, nothing lost
    assert main(["prune", "--manifest", str(stage1 / "manifest.jsonl")]) == 0
    assert "no flagged record" in capsys.readouterr().out
    assert migrate(stage1, "--images", str(stage1 / "images")) == 0
    now = read_records(stage1)
    assert str(stage1 / "images" / "vitb.png") not in {r["image_path"] for r in now.values()}
    assert "other" in now  # a file never seen before is still scanned


KILLER = """
import contextlib, os, signal, sys
import prep.manifest, prep.prune
manifest, point = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def killing(module, name_part):
    real = module.atomic_open
    @contextlib.contextmanager
    def wrapper(path, mode="wb"):
        with real(path, mode) as f:
            yield f
            if str(path).endswith(name_part):
                f.flush()
                die()  # the temp file is complete, not yet renamed
    module.atomic_open = wrapper

if point == "between":
    prep.prune.rewrite = lambda *a, **k: die()
elif point == "side-temp":
    killing(prep.prune, ".pruned.jsonl")
elif point == "manifest-temp":
    killing(prep.manifest, "manifest.jsonl")
prep.prune.prune(manifest)
print("not killed")
"""


@pytest.mark.parametrize("point", ["side-temp", "between", "manifest-temp"])
def test_prune_killed_at_any_moment_loses_nothing_and_duplicates_nothing(stage1: Path, point: str) -> None:
    assert migrate(stage1) == 0
    manifest = stage1 / "manifest.jsonl"
    original = manifest.read_bytes().splitlines(keepends=True)
    flagged = [line for line in original if b'"filtered"' in line]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(manifest), point], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    survived = manifest.read_bytes().splitlines(keepends=True)
    side_path = stage1 / "manifest.jsonl.pruned.jsonl"
    side = side_path.read_bytes().splitlines(keepends=True) if side_path.exists() else []
    assert set(original) <= set(survived) | set(side)  # nothing lost at the moment of the kill
    assert main(["prune", "--manifest", str(manifest)]) == 0  # the rerun finishes the job
    side = side_path.read_bytes().splitlines(keepends=True)
    main_lines = manifest.read_bytes().splitlines(keepends=True)
    assert sorted(side) == sorted(flagged) and len(set(side)) == len(side)
    assert sorted(main_lines + side) == sorted(original)
    assert not [p.name for p in stage1.iterdir() if p.name.endswith(".prep-tmp")]  # the rerun swept the kill's temp


def test_planted_near_duplicates_are_found_in_random_embeddings() -> None:
    """The benchmark's own check, small: planted pairs at cosine ~0.99 among random 1024-d vectors."""
    from prep.bench.curate_bench import measure, planted_embeddings, run_curate_bench

    emb, planted = planted_embeddings(3000, 1024, pairs=20, seed=1)
    found = dedup.near_duplicates(emb, np.arange(3000), 0.98)
    assert {(min(k, v[0]), max(k, v[0])) for k, v in found.items()} == planted
    assert all(0.98 <= s < 0.999 for _, s in found.values())
    run = measure(9000, None, "cpu")
    assert run["planted_found"] == run["planted_expected"] == 100 and run["false_flags"] == 0
    assert run["products"] == run["total_products"]
    result = run_curate_bench((3000, 20000), device="cpu")  # the benchmark itself, tiny: children, rows, goal
    assert result.status == "ok" and [g.met for g in result.goals] == [True]
    assert result.value("20,000 embeddings: near-duplicate search") > 0 and "extrapolated" in result.row(
        "20,000 embeddings: near-duplicate search").note


@pytest.mark.parametrize("screen", ["bfloat16", "float32"])
def test_screened_best_matches_equal_the_exact_ones_at_the_threshold(monkeypatch, screen: str) -> None:
    """`best_matches(threshold=...)` screens in bf16 and confirms in float32: every query whose exact
    best match reaches the threshold gets that match (the first row, on a tie, across chunks too) and
    its float32 similarity; the others none. Planted pairs sit just above and just below it."""
    from prep import nearcache

    monkeypatch.setattr(dedup, "screen_dtype", lambda device: screen)
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((5000, 256)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    corpus = corpus.astype(np.float16)
    corpus[4100] = corpus[17]  # a tie across chunks: the first row wins
    queries = rng.standard_normal((60, 256)).astype(np.float32)
    for q, (row, cos) in enumerate([(17, 0.999), (900, 0.9905), (901, 0.9895), (4999, 0.9915), (2500, 0.95)]):
        target = corpus[row].astype(np.float32)
        noise = queries[q] - (queries[q] @ target) * target
        queries[q] = cos * target + np.sqrt(1 - cos**2) * noise / np.linalg.norm(noise)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_best, exact_score = nearcache.best_matches(queries, corpus, chunk=1024)
    best, score = nearcache.best_matches(queries, corpus, chunk=1024, threshold=0.99)
    wanted = exact_score >= 0.99
    assert wanted[[0, 1, 3]].all() and wanted.sum() == 3 and exact_best[0] == 17  # 0.999, 0.9905, 0.9915
    assert (best[wanted] == exact_best[wanted]).all()
    np.testing.assert_allclose(score[wanted], exact_score[wanted], rtol=0, atol=1e-6)
    assert (best[~wanted] == -1).all() and np.isneginf(score[~wanted]).all()
    many = np.concatenate([np.repeat(corpus[17:18], 3000, axis=0), corpus])
    three = np.repeat(queries[:1], 3, axis=0)  # 3 x 1024 candidates in a chunk of 1024 rows: the chunk is done exactly
    exact_best, exact_score = nearcache.best_matches(three, many, chunk=1024)
    whole_chunks, best_exact = [], nearcache._best_exact
    monkeypatch.setattr(nearcache, "_best_exact", lambda *args: (whole_chunks.append(1), best_exact(*args))[1])
    best, score = nearcache.best_matches(three, many, chunk=1024, threshold=0.99)
    assert whole_chunks and best.tolist() == exact_best.tolist() == [0, 0, 0]
    np.testing.assert_allclose(score, exact_score, rtol=0, atol=1e-6)


def test_a_run_judges_only_new_images_against_the_cached_kept_embeddings(tmp_path: Path, monkeypatch) -> None:
    """Adding images to a big dataset compares them with the kept images' cached embeddings, reading
    no other side file; decisions made before stand (a new larger copy is flagged, not the old one)."""
    from prep import nearcache

    rng = np.random.default_rng(5)
    derived = tmp_path / "derived"
    vectors = {name: rng.normal(size=1024) for name in ("a", "c", "f")}
    records = [stamped("a", 64, vectors["a"], derived), stamped("c", 64, vectors["c"], derived),
               stamped("b", 48, vectors["a"] + rng.normal(scale=0.01, size=1024), derived)]
    rules = curate.Rules(near_duplicate=0.99)
    columns, manifest = columns_for(tmp_path, records)
    first = curate.judge(columns, rules, derived_dir=derived, near=True, device="cpu", incremental=True)
    assert {columns.ids[i]: f["duplicate_of"] for i, f in first.changes.items() if f} == {"b": "a"}
    assert nearcache.load(derived).ids == ["a", "c"]  # the full judgement wrote the kept embeddings
    manifest = curate.apply_to_manifest(manifest, first)
    records = [manifest.record(row) for row in range(len(manifest))]
    records += [stamped("d", 96, vectors["c"] + rng.normal(scale=0.01, size=1024), derived),  # larger copy of c
                stamped("f", 64, vectors["f"], derived), stamped("g", 32, vectors["f"], derived)]
    read = []
    real = curate.load_embeddings
    monkeypatch.setattr(curate, "load_embeddings", lambda base, ids, **k: read.extend(ids) or real(base, ids, **k))
    columns, manifest = columns_for(tmp_path, records)
    second = curate.judge(columns, rules, derived_dir=derived, near=True, device="cpu", incremental=True,
                          previous_digest=first.near.digest)
    assert sorted(read) == ["d", "f", "g"]  # only the new images' files
    flags = {columns.ids[i]: f["duplicate_of"] for i, f in second.changes.items() if f}
    assert flags == {"d": "c", "g": "f"}  # c stays kept; the new pair keeps the larger (f)
    assert sorted(nearcache.load(derived).ids) == ["a", "c", "f"]
    full = curate.judge(columns, rules, derived_dir=derived, near=True, device="cpu")  # `prep curate`: from scratch
    assert {columns.ids[i]: f["duplicate_of"] for i, f in full.changes.items() if f}["c"] == "d"
