"""Side files: where each array lives, how it is written (atomically) and checked.

Layout under the output base dir: `dinov3/{id}.npy`, `vae_latents/{id}.npy`,
`t5_hidden/{id}.npy`, plus `prep_metadata.json` (the latent convention). This module is
the one place that decides whether an artifact is valid, so verify, the encoder passes'
`needs_*` filters and the exporter all agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prep.buckets import latent_shape
from prep.config import DINOV3_DIM, T5_HIDDEN_DIM, T5_MAX_LENGTH, VAE_DOWNSCALE, VAE_LATENT_CHANNELS
from prep.fsio import atomic_open, atomic_write_text, sweep_temp_files
from prep.provenance import Expected, artifact_status, is_stale
from prep.records import is_safe_id, validate_record

METADATA_FILE = "prep_metadata.json"


@dataclass(frozen=True)
class ArtifactSpec:
    """One kind of side file: its folder and on-disk dtype."""

    kind: str
    folder: str
    dtype: np.dtype


ARTIFACTS: dict[str, ArtifactSpec] = {
    "dinov3": ArtifactSpec("dinov3", "dinov3", np.dtype(np.float32)),
    "vae": ArtifactSpec("vae", "vae_latents", np.dtype(np.float16)),
    "t5": ArtifactSpec("t5", "t5_hidden", np.dtype(np.float16)),
}

VALID, MISSING = "valid", "missing"


class UnsafeIdError(ValueError):
    """An image_id that could escape the output directory or break a WebDataset key."""


def expected_shape(kind: str, record: dict) -> tuple[int, ...]:
    """The shape a valid artifact of `kind` has for `record` (the VAE's depends on its bucket)."""
    if kind == "dinov3":
        return (DINOV3_DIM,)
    if kind == "t5":
        return (T5_MAX_LENGTH, T5_HIDDEN_DIM)
    if kind == "vae":
        return latent_shape(record["aspect_bucket"], VAE_LATENT_CHANNELS, VAE_DOWNSCALE)
    raise KeyError(kind)


def artifact_dir(base: str | Path, kind: str) -> Path:
    return Path(base) / ARTIFACTS[kind].folder


def artifact_path(base: str | Path, kind: str, image_id: Any) -> Path:
    """`base/<folder>/<image_id>.npy`, refusing any id that is not a safe token."""
    if not is_safe_id(image_id):
        raise UnsafeIdError(f"unsafe image_id {image_id!r}: only [A-Za-z0-9_-], 1-100 characters")
    return artifact_dir(base, kind) / f"{image_id}.npy"


def ensure_dirs(base: str | Path) -> None:
    """Create the three artifact folders (and the base)."""
    for kind in ARTIFACTS:
        artifact_dir(base, kind).mkdir(parents=True, exist_ok=True)


def sweep_stray_temp_files(base: str | Path) -> int:
    """Delete temp files a killed run left in the artifact folders; return the count."""
    return sum(sweep_temp_files(artifact_dir(base, kind)) for kind in ARTIFACTS)


def save_npy(array: np.ndarray, path: str | Path, dtype: np.dtype | str) -> None:
    """Write `array` cast to `dtype` as .npy, atomically; object arrays are refused."""
    data = np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False))
    if data.dtype.hasobject:
        raise TypeError("refusing to save an object array")
    with atomic_open(path, "wb") as f:
        np.lib.format.write_array(f, data, allow_pickle=False)


def save_artifact(base: str | Path, kind: str, image_id: str, array: np.ndarray) -> Path:
    """Save one artifact in its on-disk dtype; returns the path."""
    path = artifact_path(base, kind, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(array, path, ARTIFACTS[kind].dtype)
    return path


def load_npy(path: str | Path) -> np.ndarray | None:
    """The array, or None when the file is missing, truncated, pickled or otherwise unreadable."""
    try:
        with open(path, "rb") as f:  # the .npy format only: np.load would also open .npz archives
            return np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from the .npy header alone, or None if missing/unreadable/truncated."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            data_offset = f.tell()
        if dtype.hasobject or fortran:
            return None
        if os.path.getsize(path) < data_offset + int(np.prod(shape)) * dtype.itemsize:
            return None  # truncated payload
        return tuple(shape), dtype
    except (OSError, ValueError, EOFError):
        return None


def check_artifact(base: str | Path, kind: str, record: dict, *, read_data: bool = True) -> str:
    """"valid", "missing" or "invalid: <reason>" for one artifact of one record.

    With `read_data=False` only the header is read (shape, dtype, full length): fast enough
    for readiness filters over millions of records. With it, values must also be finite.
    """
    try:
        path = artifact_path(base, kind, record.get("image_id"))
        shape = expected_shape(kind, record)
    except (UnsafeIdError, KeyError, ValueError) as exc:
        return f"invalid: {exc}"
    if not path.exists():
        return MISSING
    header = read_npy_header(path)
    if header is None:
        return "invalid: unreadable"
    if header[0] != shape:
        return f"invalid: shape {header[0]} != {shape}"
    if header[1] != ARTIFACTS[kind].dtype:
        return f"invalid: dtype {header[1]} != {ARTIFACTS[kind].dtype}"
    if read_data:
        array = load_npy(path)
        if array is None:
            return "invalid: unreadable"
        if not np.isfinite(array).all():
            return "invalid: non-finite values"
    return VALID


def artifact_ok(base: str | Path, kind: str, record: dict, *, read_data: bool = False) -> bool:
    return check_artifact(base, kind, record, read_data=read_data) == VALID


def read_metadata(base: str | Path) -> dict:
    """The dataset-level metadata (latent convention, models); {} when absent or unreadable."""
    try:
        metadata = json.loads((Path(base) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def update_metadata(base: str | Path, updates: dict) -> dict:
    """Merge `updates` into `prep_metadata.json` atomically; returns the new content."""
    metadata = read_metadata(base)
    metadata.update(updates)
    atomic_write_text(Path(base) / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return metadata


def readiness_reasons(
    record: dict, base: str | Path, *, read_data: bool = False, stale_against: Expected | None = None
) -> list[str]:
    """Why `record` cannot go into a training shard yet (empty list = ready).

    The record must be a valid v2 record and each of its three artifacts valid; by default
    only .npy headers are read, which is what readiness filters over millions of rows need.
    With `stale_against`, an artifact whose provenance is stale ("vae stale") is not ready either.
    """
    reasons = validate_record(record)
    if "missing image_id" in reasons or "unsafe image_id" in reasons:
        return reasons
    for kind in ARTIFACTS:
        if kind == "vae" and ("missing aspect_bucket" in reasons or "bad aspect_bucket" in reasons):
            continue
        status = check_artifact(base, kind, record, read_data=read_data)
        if status != VALID:
            reasons.append(f"{kind} {status.split(':')[0]}")
        elif stale_against is not None and is_stale(artifact_status(kind, record, stale_against)):
            reasons.append(f"{kind} stale")
    return reasons
