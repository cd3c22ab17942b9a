"""Side files: where each array lives, how it is written (atomically) and checked.

Layout under the output base dir: `dinov3/{id}.npy`, `vae_latents/{id}.npy`,
`t5_hidden/{id}.npy`, plus `prep_metadata.json` (the latent convention). This module is
the one place that decides whether an artifact is valid, so verify, the encoder passes'
`needs_*` filters and the exporter all agree.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tokenize
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
# What numpy raises on a bad .npy: a malformed header dict fails in its tokenizer or
# literal_eval (SyntaxError, TokenError), not only with ValueError.
_BAD_NPY = (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError)


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
        np.lib.format.write_array(_PythonWrites(f), data, allow_pickle=False)


class _PythonWrites:
    """A file seen through its `write` only, so numpy writes with Python's write, not C fwrite.

    numpy's fast path for real files reports a short write (full disk) as "78848 requested
    and 36800 written", without the errno; Python's write raises "[Errno 28] No space left
    on device", which the CLI prints as its one-line error.
    """

    def __init__(self, f):
        self.write = f.write


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
    except _BAD_NPY:
        return None


@functools.lru_cache(maxsize=256)
def _parse_npy_header(prefix: bytes, header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own header parser, cached: files of one kind and bucket share one header, and
    parsing (a literal_eval) costs more than the read itself."""
    f = io.BytesIO(prefix + header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), fortran, dtype


def _npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) or None (unreadable, pickled, Fortran order or truncated payload).

    Raises FileNotFoundError for a missing file, so callers can tell missing from broken.
    """
    with open(path, "rb") as f:
        first = f.read(12)
        if len(first) < 10 or not first.startswith(b"\x93NUMPY"):
            return None
        if first[6] == 1:  # version 1: 2-byte header length
            prefix, header_len = first[:10], int.from_bytes(first[8:10], "little")
            header = first[10:] + f.read(max(0, header_len - len(first[10:])))
        else:  # versions 2 and 3: 4-byte header length
            prefix, header_len = first, int.from_bytes(first[8:12], "little")
            header = f.read(header_len)
        if len(header) != header_len:
            return None
        size = os.fstat(f.fileno()).st_size
    try:
        shape, fortran, dtype = _parse_npy_header(prefix, header)
    except _BAD_NPY:
        return None
    if dtype.hasobject or fortran:
        return None
    if size < len(prefix) + header_len + int(np.prod(shape)) * dtype.itemsize:
        return None  # truncated payload
    return shape, dtype


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from the .npy header alone, or None if missing/unreadable/truncated."""
    try:
        return _npy_header(path)
    except OSError:
        return None


def check_artifact(base: str | Path, kind: str, record: dict, *, read_data: bool = True) -> str:
    """"valid", "missing" or "invalid: <reason>" for one artifact of one record.

    With `read_data=False` only the header is read (shape, dtype, full length): fast enough
    for readiness filters over millions of records. With it, the file is opened once and
    loaded, and its values must also be finite.
    """
    try:
        path = artifact_path(base, kind, record.get("image_id"))
        shape = expected_shape(kind, record)
    except (UnsafeIdError, KeyError, ValueError) as exc:
        return f"invalid: {exc}"
    dtype = ARTIFACTS[kind].dtype
    try:
        if read_data:
            with open(path, "rb") as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
            found = (array.shape, array.dtype)
        else:
            found = _npy_header(path)
    except FileNotFoundError:
        return MISSING
    except _BAD_NPY:
        return "invalid: unreadable"
    if found is None:
        return "invalid: unreadable"
    if found[0] != shape:
        return f"invalid: shape {found[0]} != {shape}"
    if found[1] != dtype:
        return f"invalid: dtype {found[1]} != {dtype}"
    if read_data and not np.isfinite(array).all():
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
