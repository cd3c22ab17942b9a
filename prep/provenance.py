"""Provenance: every artifact records what made it, so a stale one is never served.

A record carries `image_fingerprint` ({size, mtime_ns, sha256} of its image file) and
`provenance` = {kind: stamp} for caption, t5, dinov3 and vae. A stamp names the model id
and resolved revision, the dtype, the preprocessing that matters (bucket and crop box for
the VAE, input size for DINOv3, max_length for T5, prompt and max_new_tokens for captions),
the code's format version and a fingerprint of the input (the image's sha256; for T5 the
caption's sha256).

An artifact is then `fresh`, `stale: <why>` (its inputs or the configuration changed) or
`unknown` (made before provenance existed). Size + mtime are a fast pre-check: a file is
hashed only when those change, so a run with nothing changed hashes nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

PROVENANCE_FORMAT = 1
FRESH, UNKNOWN = "fresh", "unknown"
KINDS = ("caption", "t5", "dinov3", "vae")
IMAGE_KINDS = ("caption", "dinov3", "vae")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(path: str | Path) -> dict:
    """{size, mtime_ns, sha256} of a file (reads the whole file)."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def refresh_fingerprint(path: str | Path, previous: dict | None) -> dict | None:
    """The file's fingerprint, hashing only when size or mtime differ from `previous`.

    None when the file is gone (the record keeps its old fingerprint then).
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if (
        isinstance(previous, dict)
        and previous.get("size") == stat.st_size
        and previous.get("mtime_ns") == stat.st_mtime_ns
        and previous.get("sha256")
    ):
        return previous
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


@dataclass
class Expected:
    """What the current configuration expects of each kind's stamp (fields that must match).

    A value of None (e.g. an unresolvable Hub revision, or dtype "auto") is not judged.
    """

    by_kind: dict[str, dict] = field(default_factory=dict)

    def get(self, kind: str) -> dict:
        return self.by_kind.get(kind, {})


def stamp_matches(stamp: dict, expected: dict) -> str | None:
    """The first configuration field that differs, or None."""
    for key, want in expected.items():
        if want is None:
            continue
        have = stamp.get(key)
        if have is None or have == "unknown":
            continue
        if have != want:
            return f"{key} changed ({have} -> {want})"
    return None


def artifact_status(kind: str, record: dict, expected: Expected | None = None) -> str:
    """FRESH, UNKNOWN or "stale: <why>" for one artifact of one record (its file is not checked here)."""
    provenance = record.get("provenance")
    stamp = provenance.get(kind) if isinstance(provenance, dict) else None
    if not isinstance(stamp, dict):
        return UNKNOWN
    if kind == "caption":
        return caption_status(stamp, record, expected)
    if stamp.get("format") != PROVENANCE_FORMAT:
        return f"stale: format {stamp.get('format')} != {PROVENANCE_FORMAT}"
    if kind in IMAGE_KINDS:
        image_sha = (record.get("image_fingerprint") or {}).get("sha256")
        if image_sha and stamp.get("image_sha256") and image_sha != stamp["image_sha256"]:
            return "stale: image changed"
    if kind == "vae" and stamp.get("bucket") != record.get("aspect_bucket"):
        return f"stale: bucket changed ({stamp.get('bucket')} -> {record.get('aspect_bucket')})"
    if kind == "t5" and stamp.get("caption_sha256") != text_sha256(record.get("caption")):
        return "stale: caption changed"
    reason = stamp_matches(stamp, expected.get(kind) if expected else {})
    return f"stale: {reason}" if reason else FRESH


def caption_status(stamp: dict, record: dict, expected: Expected | None) -> str:
    """A caption is stale only when a model wrote it and neither the user nor a sidecar touched it since."""
    if stamp.get("source") != "model":
        return FRESH  # the user's caption (sidecar or hand-written): never regenerated
    if stamp.get("text_sha256") != text_sha256(record.get("caption")):
        return FRESH  # edited by hand after generation: now the user's decision
    image_sha = (record.get("image_fingerprint") or {}).get("sha256")
    if image_sha and stamp.get("image_sha256") and image_sha != stamp["image_sha256"]:
        return "stale: image changed"
    reason = stamp_matches(stamp, expected.get("caption") if expected else {})
    return f"stale: {reason}" if reason else FRESH


def is_stale(status: str) -> bool:
    return status.startswith("stale")


def expected_from_metadata(metadata: dict) -> Expected:
    """What the last run's models were (prep_metadata.json): the yardstick when no flags are given."""
    models = metadata.get("models") or {}
    return Expected(
        {
            kind: {"model_id": entry.get("model_id"), "revision": entry.get("revision")}
            for kind, entry in models.items()
            if isinstance(entry, dict)
        }
    )


def updated_provenance(record: dict, kind: str, stamp: dict) -> dict:
    """The record's provenance dict with `kind` replaced (a new dict; the record is not touched)."""
    provenance = dict(record.get("provenance") or {})
    provenance[kind] = stamp
    return provenance
