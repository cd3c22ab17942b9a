"""Provenance: every artifact records what made it and which file it is, so no foreign, stale or
tampered array is ever served.

A record carries `image_fingerprint` ({size, mtime_ns, sha256} of its image) and `provenance`
= {stage: stamp}. A stamp made by `prep` names the configuration (model id, resolved revision,
dtype, the stage's settings such as max_length or the prompt's hash), the input it was made
from (`image_sha256`, or `caption_sha256` for T5; the bucket and crop box for the VAE) and the
side file it vouches for: `file` = {size, mtime_ns, sha256} of the bytes written. The file
stamp is what makes an artifact belong to its record: a file written by another job, copied
in from elsewhere or edited after the fact no longer matches, and is recomputed.

An artifact is then `fresh`, `stale: <why>` or `unknown`. `unknown` is reserved for artifacts
an older manifest's own records vouch for (`origin: legacy` or `migrated`: made before `prep`
stamped anything); a record `prep` created (`provenance: {}` from the scan) vouches for
nothing it has not stamped. Size + mtime are a fast pre-check: a file is hashed only when
they change.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from prep.fsio import sha256_file

PROVENANCE_FORMAT = 2
FRESH, UNKNOWN = "fresh", "unknown"
LEGACY_ORIGINS = frozenset({"legacy", "migrated"})
# Stamp keys that describe the input or the file, not the configuration.
INPUT_KEYS = frozenset(
    {"image_sha256", "caption_sha256", "bucket", "crop_box", "input_size", "file", "source", "text_sha256",
     "origin", "format"}
)  # fmt: skip
CAPTION = "caption"
USER_SOURCES = frozenset({"sidecar", "user", "metadata", "filename", "instance_prompt", "dataset", "webdataset"})

__all__ = [
    "FRESH", "PROVENANCE_FORMAT", "UNKNOWN", "Expected", "artifact_status", "config_of", "config_stale_reason",
    "file_stamp", "file_state", "fingerprint", "is_stale", "unvouched_reason", "refresh_fingerprint", "sha256_file", "text_sha256",
]  # fmt: skip


def text_sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(path: str | Path) -> dict:
    """{size, mtime_ns, sha256} of a file (reads the whole file)."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def refresh_fingerprint(path: str | Path, previous: dict | None) -> dict | None:
    """The image's fingerprint, hashing only when size or mtime differ from `previous`.

    Any locator (a file, a tar member, a dataset row: `prep.sources.image_fingerprint`).
    None when the image is gone (the record keeps its old fingerprint then).
    """
    from prep.sources import image_fingerprint

    return image_fingerprint(str(path), previous)


def refresh_file_fingerprint(path: str | Path, previous: dict | None) -> dict | None:
    """A local file's fingerprint, hashing only when size or mtime differ from `previous`."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return unchanged_fingerprint(previous, stat) or {
        "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def unchanged_fingerprint(previous: dict | None, stat: os.stat_result) -> dict | None:
    """`previous` while the file's size and mtime still match it (no need to hash again), else None."""
    if (
        isinstance(previous, dict)
        and previous.get("size") == stat.st_size
        and previous.get("mtime_ns") == stat.st_mtime_ns
        and previous.get("sha256")
    ):
        return previous
    return None


# ------------------------------------------------------------------------------ file stamps
def file_stamp(data: bytes, stat: os.stat_result) -> dict:
    """What a stamp records of the side file it vouches for."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": bytes_sha256(data)}


MATCH, MOVED, CHANGED, GONE = "match", "moved", "changed", "gone"


def file_state(path: str | Path, stamped: dict | None) -> tuple[str, dict | None]:
    """Does the file at `path` hold the bytes `stamped` vouches for?

    (MATCH, None): size and mtime as stamped. (MOVED, new stamp): same bytes with another
    mtime (a copy that did not keep times): the stamp should be refreshed. (CHANGED, None):
    other bytes, or no stamp. (GONE, None): no regular file there.
    """
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return GONE, None
    if not os.path.isfile(path):
        return GONE, None
    if not isinstance(stamped, dict):
        return CHANGED, None
    if stat.st_size != stamped.get("size"):
        return CHANGED, None
    if stat.st_mtime_ns == stamped.get("mtime_ns"):
        return MATCH, None
    try:
        digest = sha256_file(path)
    except OSError:
        return GONE, None
    if digest != stamped.get("sha256"):
        return CHANGED, None
    return MOVED, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}


# -------------------------------------------------------------------------- configuration
@dataclass
class Expected:
    """What the current configuration expects of each stage's stamp (fields that must match).

    A value of None (an unresolvable Hub revision, or dtype "auto") is not judged.
    """

    by_kind: dict[str, dict] = field(default_factory=dict)

    def get(self, kind: str) -> dict:
        return self.by_kind.get(kind, {})


def config_of(stamp: dict) -> dict:
    """The configuration part of a stamp (what `Expected` is compared with)."""
    return {key: value for key, value in stamp.items() if key not in INPUT_KEYS}


def config_stale_reason(config: dict, expected: dict) -> str | None:
    """The first configuration field that differs, or None.

    A revision both sides know decides alone (the same checkpoint under another path or id is
    the same model); otherwise the model id is compared.
    """
    have_rev, want_rev = config.get("revision"), expected.get("revision")
    revisions_known = have_rev not in (None, "unknown") and want_rev not in (None, "unknown")
    for key, want in expected.items():
        if want is None or (key == "model_id" and revisions_known):
            continue
        have = config.get(key)
        if have is None or have == "unknown":
            continue
        if have != want:
            return f"{key} changed ({have} -> {want})"
    return None


def is_stale(status: str) -> bool:
    return status.startswith("stale")


def stamp_of(record: dict, kind: str) -> dict | None:
    provenance = record.get("provenance")
    stamp = provenance.get(kind) if isinstance(provenance, dict) else None
    return stamp if isinstance(stamp, dict) else None


def inputs_stale_reason(kind: str, stamp: dict, record: dict, reads_caption: bool) -> str | None:
    """Why the stamp's inputs no longer match the record (image edited, caption edited, bucket moved)."""
    if reads_caption:
        want = stamp.get("caption_sha256")
        if want is not None and want != text_sha256(record.get("caption")):
            return "caption changed"
    else:
        image_sha = (record.get("image_fingerprint") or {}).get("sha256")
        if image_sha and stamp.get("image_sha256") and image_sha != stamp["image_sha256"]:
            return "image changed"
    if "bucket" in stamp and stamp.get("bucket") != record.get("aspect_bucket"):
        return f"bucket changed ({stamp.get('bucket')} -> {record.get('aspect_bucket')})"
    return None


def unvouched_reason(kind: str, record: dict, path: str | Path | None = None) -> str | None:
    """Why the record does not vouch for its `kind` artifact (None: it does).

    A record `prep` made (it has a `provenance` field) vouches only for files it stamped: no
    stamp means the file was not made for it, and with `path` the file must be the one its
    stamp describes (not written by another job, copied in or edited). A record of an older
    manifest (no `provenance` field at all) vouches for the files at its id, unchecked
    (provenance `unknown`); so do stamps of the first format, which had no file stamp.
    """
    if "provenance" not in record:
        return None
    stamp = stamp_of(record, kind)
    if stamp is None:
        return "not made for this record (no stamp)"
    if stamp.get("format") != PROVENANCE_FORMAT or path is None:
        return None
    if file_state(path, stamp.get("file"))[0] == CHANGED:
        return "file is not the one its record stamped"
    return None


def artifact_status(
    kind: str, record: dict, expected: Expected | None = None, *, reads_caption: bool | None = None,
    path: str | Path | None = None,
) -> str:
    """FRESH, UNKNOWN or "stale: <why>" for one artifact of one record.

    With `path` (the side file), the file must also be the one the stamp vouches for.
    """
    if reads_caption is None:
        reads_caption = kind == "t5"
    if kind == CAPTION:
        return caption_status(record, expected)
    reason = unvouched_reason(kind, record, path)
    if reason:
        return f"stale: {reason}"
    stamp = stamp_of(record, kind)
    if stamp is None:
        return UNKNOWN  # a record of an older manifest, before provenance
    reason = inputs_stale_reason(kind, stamp, record, reads_caption)
    if reason:
        return f"stale: {reason}"
    if stamp.get("origin") in LEGACY_ORIGINS:
        return UNKNOWN
    reason = config_stale_reason(config_of(stamp), expected.get(kind) if expected else {})
    return f"stale: {reason}" if reason else FRESH


def caption_status(record: dict, expected: Expected | None) -> str:
    """A caption is stale only when a model wrote it and neither the user nor a sidecar touched it since."""
    stamp = stamp_of(record, CAPTION) or {}
    if stamp.get("source") != "model":
        return FRESH  # the user's caption (sidecar, metadata, hand-written): never regenerated
    if stamp.get("text_sha256") != text_sha256(record.get("caption")):
        return FRESH  # edited by hand after generation: now the user's decision
    image_sha = (record.get("image_fingerprint") or {}).get("sha256")
    if image_sha and stamp.get("image_sha256") and image_sha != stamp["image_sha256"]:
        return "stale: image changed"
    reason = config_stale_reason(config_of(stamp), expected.get(CAPTION) if expected else {})
    return f"stale: {reason}" if reason else FRESH


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
