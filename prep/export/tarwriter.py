"""Deterministic, atomic shard writing: one tar per planned shard, then its done-sidecar.

Reproducible: fixed GNU tar headers (mtime 0, uid/gid 0, empty owner names, mode 0644,
fixed member order), so the same plan and inputs give byte-identical tars. Atomic: a shard
is written to a temp file beside its final name and renamed when complete (fsync); only
then is its sidecar written.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from prep import store
from prep.export.fields import check_key, json_member, mask_member
from prep.export.plan import ShardPlan
from prep.export.resume import write_sidecar
from prep.fsio import atomic_open

EXPORT_FORMAT = "prep-webdataset"
EXPORT_FORMAT_VERSION = 1
# member suffix -> side-file kind in prep.store.ARTIFACTS (order = order in the tar)
ARRAY_MEMBERS = {"dinov3.npy": "dinov3", "vae.npy": "vae", "t5h.npy": "t5"}
MASK_MEMBER = "t5m.npy"
MEMBERS = ("json", *ARRAY_MEMBERS, MASK_MEMBER)
COPY_BUFSIZE = 1 << 20


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingWriter:
    """File-object wrapper for tarfile: counts and sha256-hashes every byte written."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.count += len(data)
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.count


def add_sample(tar: tarfile.TarFile, record: dict, derived_dir: Path, extra_keys: list[str], fp) -> int:
    """Append one sample's five members; feed what identifies its content to `fp`. Returns bytes."""
    key = check_key(record.get("image_id"))
    data = json_member(record, extra_keys)
    fp.update(data)
    tar.addfile(_tarinfo(f"{key}.json", len(data)), io.BytesIO(data))
    size = len(data)
    for suffix, kind in ARRAY_MEMBERS.items():
        with open(store.artifact_path(derived_dir, kind, key), "rb") as f:
            st = os.fstat(f.fileno())
            fp.update(f"{kind}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            tar.addfile(_tarinfo(f"{key}.{suffix}", st.st_size), f)
            size += st.st_size
    mask = mask_member(record)
    fp.update(mask)
    tar.addfile(_tarinfo(f"{key}.{MASK_MEMBER}", len(mask)), io.BytesIO(mask))
    return size + len(mask)


def fingerprint_hasher():
    return hashlib.sha256(f"{EXPORT_FORMAT}/{EXPORT_FORMAT_VERSION}\n".encode())


def planned_fingerprint(
    shard: ShardPlan, record_of: Callable[[int], dict], derived_dir: Path, extra_keys: list[str]
) -> str:
    """The content fingerprint a shard written now would get (same as `write_shard` computes)."""
    fp = fingerprint_hasher()
    for row in shard.rows.tolist():
        record = record_of(row)
        key = check_key(record.get("image_id"))
        fp.update(json_member(record, extra_keys))
        for kind in ARRAY_MEMBERS.values():
            st = os.stat(store.artifact_path(derived_dir, kind, key))
            fp.update(f"{kind}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        fp.update(mask_member(record))
    return fp.hexdigest()


def write_shard(
    out: Path,
    shard: ShardPlan,
    record_of: Callable[[int], dict],
    derived_dir: Path,
    extra_keys: list[str],
    on_sample: Callable[[int], None],
) -> dict:
    """Write one shard atomically (temp + fsync + rename), then its done-sidecar; returns its info."""
    final = out / shard.relpath
    final.parent.mkdir(parents=True, exist_ok=True)
    fp = fingerprint_hasher()
    keys = []
    with atomic_open(final, "wb") as raw:
        writer = _HashingWriter(raw)
        # On an exception TarFile.__exit__ writes nothing more and atomic_open deletes the temp
        # file; on success close() writes the end-of-archive blocks before the rename.
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
            tar.copybufsize = COPY_BUFSIZE
            for row in shard.rows.tolist():
                record = record_of(row)
                on_sample(add_sample(tar, record, derived_dir, extra_keys, fp))
                keys.append(record["image_id"])
    info = {
        "bucket": shard.bucket,
        "path": shard.relpath,
        "samples": len(keys),
        "bytes": writer.count,
        "sha256": writer.sha.hexdigest(),
        "fingerprint": fp.hexdigest(),
    }
    write_sidecar(out, {**info, "keys": keys})  # only the sidecar keeps the key list: flat memory
    return info
