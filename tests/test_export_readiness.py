"""The export's readiness fast path: where the projection and the stamped files vouch for a record
the judge (`store.readiness_reasons`) is not asked, and the answer is the judge's in every case.

Records as a real run writes them (tiny models), cloned under new ids, each clone damaged in one
way a user or an attacker could: the readiness of the whole manifest with the fast path must
equal the readiness with the judge asked about every record.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from prep import store
from prep.cli import main
from prep.export import readiness as ready_mod
from prep.manifest import read_manifest
from prep.testing import model_flags

KINDS = ("dinov3", "vae", "t5")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_models, sample_images) -> Path:
    work = tmp_path_factory.mktemp("ready-base")
    shutil.copytree(sample_images[0].parent, work / "images")
    args = ["run", "--images", str(work / "images"), "--manifest", str(work / "manifest.jsonl"),
            "--output-base-dir", str(work / "derived"), "--buckets", "64x64,64x128,128x64,96x96",
            "--min-free-gb", "0", "--num-workers", "0", *model_flags(tiny_models)]
    assert main(args) == 0
    return work


def _clone(derived: Path, record: dict, new_id: str) -> dict:
    """The record under `new_id`, with copies of its side files (same bytes and mtime: its stamps hold)."""
    for kind in KINDS:
        shutil.copy2(store.artifact_path(derived, kind, record["image_id"]), store.artifact_path(derived, kind, new_id))
    image = Path(record["image_path"])
    clone_path = image.with_name(f"{new_id}{image.suffix}")
    os.link(image, clone_path)  # a real run's clone: its own path, the same bytes (and fingerprint)
    return {**json.loads(json.dumps(record)), "image_id": new_id, "image_path": str(clone_path)}


def _rewrite_header(path: Path, shape: tuple[int, ...]) -> None:
    """Another shape with the same payload size, mtime kept: only a header read can tell."""
    st = path.stat()
    array = np.load(path)
    np.save(path, array.reshape(shape))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _damage(derived: Path, name: str, record: dict) -> dict:
    image_id = record["image_id"]
    path = {kind: store.artifact_path(derived, kind, image_id) for kind in KINDS}
    prov = record["provenance"]
    if name == "vae missing":
        path["vae"].unlink()
    elif name == "t5 truncated":
        path["t5"].write_bytes(path["t5"].read_bytes()[:-2])
    elif name == "dinov3 other bytes, same size":
        data = bytearray(path["dinov3"].read_bytes())
        data[-1] ^= 0xFF
        path["dinov3"].write_bytes(bytes(data))
    elif name == "dinov3 touched (same bytes)":
        os.utime(path["dinov3"], ns=(1, 1_000_000_000))
    elif name == "vae header of another shape, mtime kept":
        shape = np.load(path["vae"]).shape
        _rewrite_header(path["vae"], (shape[0], shape[2], shape[1]) if shape[1] != shape[2] else (shape[0] * 2, shape[1] // 2, shape[2]))
    elif name == "t5 header of another shape, mtime kept":
        _rewrite_header(path["t5"], (7, 11, 1024))
    elif name == "caption edited":
        record["caption"] = record["caption"] + " and more"
    elif name == "image edited":
        record["image_fingerprint"]["sha256"] = "0" * 64
    elif name == "no image fingerprint":
        del record["image_fingerprint"]
    elif name == "dinov3 stamp names another bucket":
        prov["dinov3"]["bucket"] = "64x64" if record["aspect_bucket"] != "64x64" else "96x96"
    elif name == "vae stamp of another bucket":
        prov["vae"]["bucket"] = "64x64" if record["aspect_bucket"] != "64x64" else "96x96"
    elif name == "t5 made by another model":
        prov["t5"]["revision"] = "sha256:" + "1" * 64
        prov["t5"]["model_id"] = "someone/else"
    elif name == "filtered":
        record["filtered"] = {"reason": "too small"}
    elif name == "filtered, reason not a string":
        record["filtered"] = {"reason": 5}
    elif name == "filtered, not a dict":
        record["filtered"] = True
    elif name == "legacy origin":
        prov["vae"]["origin"] = "legacy"
    elif name == "no provenance":
        del record["provenance"]
    elif name == "provenance not a dict":
        record["provenance"] = ["vae"]
    elif name == "old stamp format":
        prov["t5"]["format"] = 1
    elif name == "no file stamp":
        del prov["dinov3"]["file"]
    elif name == "bad mask":
        record["t5_attention_mask"][3] = 2
    elif name == "mask of bools":
        record["t5_attention_mask"] = [bool(v) for v in record["t5_attention_mask"]]
    elif name == "width zero":
        record["width"] = 0
    elif name == "height a bool":
        record["height"] = True
    elif name == "width a float":
        record["width"] = float(record["width"])
    elif name == "bad bucket":
        record["aspect_bucket"] = "064x64"
    elif name == "blank caption":
        record["caption"] = "   "
    elif name == "old format_version":
        record["format_version"] = 1
    elif name == "inline dinov3":
        record["dinov3_embedding"] = [0.0] * 4
    elif name == "vae symlinked to its own copy":
        target = path["vae"].with_name(f"{image_id}.target")
        os.replace(path["vae"], target)
        os.symlink(target, path["vae"])
    elif name == "t5 a directory":
        path["t5"].unlink()
        path["t5"].mkdir()
    elif name == "t5 a FIFO":
        path["t5"].unlink()
        os.mkfifo(path["t5"])
    elif name != "untouched":
        raise AssertionError(name)
    return record


DAMAGE = [
    "untouched", "vae missing", "t5 truncated", "dinov3 other bytes, same size", "dinov3 touched (same bytes)",
    "vae header of another shape, mtime kept", "t5 header of another shape, mtime kept", "caption edited",
    "image edited", "no image fingerprint", "dinov3 stamp names another bucket", "vae stamp of another bucket",
    "t5 made by another model", "filtered", "filtered, reason not a string", "filtered, not a dict",
    "legacy origin", "no provenance", "provenance not a dict", "old stamp format", "no file stamp", "bad mask",
    "mask of bools", "width zero", "height a bool", "width a float", "bad bucket", "blank caption",
    "old format_version", "inline dinov3", "vae symlinked to its own copy", "t5 a directory", "t5 a FIFO",
]  # fmt: skip


@pytest.fixture(scope="module")
def damaged(real_run: Path, tmp_path_factory) -> Path:
    """The real run's records, then one clone per kind of damage (twice each, from different templates)."""
    work = tmp_path_factory.mktemp("ready-damaged")
    shutil.copytree(real_run / "derived", work / "derived", symlinks=True)
    shutil.copytree(real_run / "images", work / "images")
    derived = work / "derived"
    text = (real_run / "manifest.jsonl").read_text().replace(str(real_run), str(work))
    templates = [json.loads(line) for line in text.splitlines()]
    records = list(templates)
    for n, name in enumerate(DAMAGE * 2):
        template = templates[n % len(templates)]
        records.append(_damage(derived, name, _clone(derived, template, f"clone_{n:03d}")))
    with open(work / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return work


def _readiness(work: Path, *, vouch: bool, monkeypatch, **options) -> tuple[ready_mod.Readiness, set[str]]:
    """(the readiness, the ids of the records the judge was asked about)."""
    asked = []
    judge = ready_mod.record_reasons
    monkeypatch.setattr(ready_mod, "record_reasons", lambda record, ctx: asked.append(record["image_id"]) or judge(record, ctx))
    manifest = read_manifest(work / "manifest.jsonl")
    result = ready_mod.readiness(manifest, work / "derived", field_roots=(), vouch=vouch, **options)
    return result, set(asked)


def _plain(result: ready_mod.Readiness) -> dict:
    return {**vars(result), "rows": result.rows.tolist(), "codes": result.codes.tolist()}


@pytest.mark.parametrize("options", [{}, {"allow_stale": True}, {"selected": {"64x128", "96x96"}}],
                         ids=["stale-judged", "allow-stale", "two-buckets"])
def test_fast_path_gives_the_judges_answer_for_every_damage(damaged: Path, monkeypatch, options) -> None:
    fast, asked_fast = _readiness(damaged, vouch=True, monkeypatch=monkeypatch, **options)
    slow, asked_slow = _readiness(damaged, vouch=False, monkeypatch=monkeypatch, **options)
    assert _plain(fast) == _plain(slow)
    assert len(asked_slow) == len(read_manifest(damaged / "manifest.jsonl")) - slow.excluded
    # the judge is asked about records the projection could not vouch for, never about the sound ones
    sound = {i for i in asked_slow if not i.startswith("clone_") or DAMAGE[int(i[6:]) % len(DAMAGE)] == "untouched"}
    assert len(sound) >= 10 and not sound & asked_fast
    assert len(slow.rows) > len(sound) and slow.not_ready > 0


def test_every_damage_that_makes_a_record_unready_is_caught(damaged: Path, monkeypatch) -> None:
    """Which clones are ready (with the stale check): what the judge forgives (a touched file with
    the same bytes, a symlink to the same file, a record or stamp from before file stamps) stays
    ready; a current stamp without its file part vouches for nothing."""
    result, _ = _readiness(damaged, vouch=True, monkeypatch=monkeypatch)
    manifest = read_manifest(damaged / "manifest.jsonl")
    ids = manifest.column("image_id")
    ready_clones = {DAMAGE[int(ids[row][6:]) % len(DAMAGE)] for row in result.rows if ids[row].startswith("clone_")}
    assert ready_clones == {
        "untouched", "dinov3 touched (same bytes)", "no image fingerprint", "no provenance", "legacy origin",
        "vae symlinked to its own copy", "filtered, not a dict", "old stamp format",
    }  # fmt: skip
