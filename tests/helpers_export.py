"""Builders for export / loading tests: a manifest plus small random side files in several buckets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prep import store
from prep.buckets import latent_shape
from prep.config import DINOV3_DIM, T5_HIDDEN_DIM, T5_MAX_LENGTH

SMALL_BUCKETS = ("64x64", "64x128", "128x64")


def make_record(image_id: str, bucket: str, rng: np.random.Generator, **extra) -> dict:
    width, height = (int(v) for v in bucket.split("x"))
    n_tokens = int(rng.integers(3, T5_MAX_LENGTH))
    return {
        "image_id": image_id,
        "image_path": f"images/{image_id}.jpg",
        "caption": f"a test caption for {image_id}",
        "t5_attention_mask": [1] * n_tokens + [0] * (T5_MAX_LENGTH - n_tokens),
        "height": height,
        "width": width,
        "aspect_bucket": bucket,
        "format_version": 2,
        **extra,
    }


def write_artifacts(base: Path, record: dict, rng: np.random.Generator) -> None:
    image_id = record["image_id"]
    store.save_artifact(base, "dinov3", image_id, rng.standard_normal(DINOV3_DIM).astype(np.float32))
    store.save_artifact(base, "vae", image_id, rng.standard_normal(latent_shape(record["aspect_bucket"])))
    store.save_artifact(base, "t5", image_id, rng.standard_normal((T5_MAX_LENGTH, T5_HIDDEN_DIM)))


def write_manifest(path: Path, records: list[dict], extra_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def build_dataset(tmp: Path, *, per_bucket: int = 5, seed: int = 0, broken: bool = True) -> dict:
    """A manifest + side files; returns paths, the ready ids and the expected not-ready reasons.

    Ready records have an extra scalar `score` (float) and `source` (str) in all of them, a
    `rare` int in only some (exported as null where missing) and a `tags` list in some (dropped:
    not a scalar).
    """
    rng = np.random.default_rng(seed)
    derived = tmp / "derived"
    records, ready = [], []
    n = 0
    for bucket in SMALL_BUCKETS:
        for _ in range(per_bucket):
            extra = {"score": float(n) / 10, "source": "unit-test"}
            if n % 3 == 0:
                extra["tags"] = ["a", "b"]
            if n % 4 == 1:
                extra["rare"] = n
            record = make_record(f"img_{n:04d}", bucket, rng, **extra)
            write_artifacts(derived, record, rng)
            records.append(record)
            ready.append(record["image_id"])
            n += 1
    reasons = {}
    if broken:
        # missing VAE latent
        r = make_record("bad_missing", "64x64", rng, score=0.5, source="x")
        write_artifacts(derived, r, rng)
        store.artifact_path(derived, "vae", "bad_missing").unlink()
        records.append(r)
        # wrong VAE shape (latent of another bucket)
        r = make_record("bad_shape", "64x128", rng, score=0.5, source="x")
        write_artifacts(derived, r, rng)
        store.save_artifact(derived, "vae", "bad_shape", rng.standard_normal(latent_shape("64x64")))
        records.append(r)
        # empty caption
        r = make_record("bad_caption", "64x64", rng, score=0.5, source="x")
        r["caption"] = "  "
        write_artifacts(derived, r, rng)
        records.append(r)
        # bad mask (a 2 in it)
        r = make_record("bad_mask", "128x64", rng, score=0.5, source="x")
        r["t5_attention_mask"][0] = 2
        write_artifacts(derived, r, rng)
        records.append(r)
        # wrong dtype for DINOv3 (float16 on disk)
        r = make_record("bad_dtype", "128x64", rng, score=0.5, source="x")
        write_artifacts(derived, r, rng)
        store.save_npy(rng.standard_normal(DINOV3_DIM), store.artifact_path(derived, "dinov3", "bad_dtype"), "float16")
        records.append(r)
        reasons = {
            "vae missing": 1,
            "vae invalid": 1,
            "missing caption": 1,
            "bad t5_attention_mask": 1,
            "dinov3 invalid": 1,
        }
    manifest = write_manifest(
        tmp / "manifest.jsonl",
        records,
        extra_lines=['{"image_id": "../evil", "image_path": "x.jpg"}', "not json"] if broken else [],
    )
    return {"manifest": manifest, "derived": derived, "ready": ready, "reasons": reasons, "records": records}


def side_arrays(derived: Path, image_id: str) -> dict[str, np.ndarray]:
    return {
        "dinov3": np.load(store.artifact_path(derived, "dinov3", image_id)),
        "vae": np.load(store.artifact_path(derived, "vae", image_id)),
        "t5_hidden": np.load(store.artifact_path(derived, "t5", image_id)),
    }


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tar"))}
