"""What an export folder holds on disk, and the state that lets an interrupted export resume.

    OUT/README.md, OUT/stats.json, OUT/index.json (written last: an export without it is unfinished)
    OUT/bucket_{WxH}/shard-000000.tar
    OUT/.prep-export/bucket_{WxH}/shard-000000.json   per-shard "done" sidecar, local, never pushed

A sidecar is written after its shard was renamed into place; it holds the shard's index entry
(bucket, path, samples, bytes, sha256) plus the content fingerprint of the plan that made it.
Resume keeps a shard whose sidecar matches the planned fingerprint and whose bytes still hash
to the recorded sha256. Index files (index.json, sidecars) are validated when read: a missing
or mistyped key is a one-line ValueError naming the file and the key.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

from prep.fsio import TMP_MARK, atomic_write_text
from prep.provenance import sha256_file

INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
CARD_FILE = "README.md"
STATE_DIR = ".prep-export"
SHARD_RE = re.compile(r"shard-([0-9]{6})\.tar")
BUCKET_DIR_RE = re.compile(r"bucket_([1-9][0-9]*x[1-9][0-9]*)")

# key -> type of a shard's entry in index.json; a sidecar also has "fingerprint"
SHARD_ENTRY = {"bucket": str, "path": str, "samples": int, "bytes": int, "sha256": str}
SIDECAR_ENTRY = {**SHARD_ENTRY, "fingerprint": str}


def sidecar_path(out: Path, relpath: str) -> Path:
    return out / STATE_DIR / (relpath.removesuffix(".tar") + ".json")


def check_entry(entry: object, required: dict[str, type], source: Path, where: str) -> dict:
    """`entry` if it is a dict with every `required` key of the right type, else a one-line ValueError."""
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: {where} is not a JSON object")
    for key, kind in required.items():
        if key not in entry:
            raise ValueError(f"{source}: {where} has no {key!r} key")
        value = entry[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{source}: {where} has a bad {key!r} value: {str(value)[:80]!r}")
    return entry


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def read_index(path: Path) -> dict:
    """A validated index.json: a dict whose "shards" list holds complete shard entries."""
    index = _read_json(path)
    if not isinstance(index, dict):
        raise ValueError(f"{path}: not a JSON object")
    if not isinstance(index.get("shards"), list):
        raise ValueError(f"{path}: has no 'shards' list")
    for i, entry in enumerate(index["shards"]):
        check_entry(entry, SHARD_ENTRY, path, f"shard entry {i}")
    return index


def read_sidecar(out: Path, relpath: str) -> dict | None:
    """The validated sidecar of a shard, or None when it has none."""
    path = sidecar_path(out, relpath)
    if not path.is_file():
        return None
    info = check_entry(_read_json(path), SIDECAR_ENTRY, path, "sidecar")
    if not isinstance(info.get("skipped", []), list):
        raise ValueError(f"{path}: sidecar has a bad 'skipped' value")
    return info


def write_sidecar(out: Path, info: dict) -> None:
    side = sidecar_path(out, info["path"])
    side.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(side, json.dumps(info, separators=(",", ":")) + "\n")


def kept_shard(out: Path, relpath: str, fingerprint: str, *, verify: bool, listed: dict | None = None) -> dict | None:
    """The entry of a complete shard that matches the plan (with its "skipped"), or None: rewrite it.

    `listed`: the shard's entry in a previous index.json, when there is one; it must agree.
    A shard whose samples were all skipped has no file: it is kept when there is none.
    """
    info = read_sidecar(out, relpath)
    path = out / relpath
    if info is None or info["fingerprint"] != fingerprint or info["path"] != relpath:
        return None
    kept = {**{key: info[key] for key in SIDECAR_ENTRY}, "skipped": info.get("skipped", [])}
    if info["samples"] == 0:
        return kept if not path.exists() and listed is None else None
    if not path.is_file():
        return None
    if listed is not None and (listed["sha256"], listed["bytes"]) != (info["sha256"], info["bytes"]):
        return None
    if path.stat().st_size != info["bytes"]:
        return None
    if verify and sha256_file(path) != info["sha256"]:
        return None
    return kept


# ------------------------------------------------------------------ existing exports
def bucket_dirs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and BUCKET_DIR_RE.fullmatch(p.name))


def shard_files(out: Path) -> list[Path]:
    return [p for d in bucket_dirs(out) for p in sorted(d.iterdir()) if SHARD_RE.fullmatch(p.name)]


def existing_export(out: Path) -> str | None:
    """A short description of the export already in `out`, or None when there is none."""
    shards = shard_files(out)
    if shards or (out / INDEX_FILE).exists() or (out / STATE_DIR).exists():
        done = "complete" if (out / INDEX_FILE).exists() else "unfinished"
        return f"{len(shards)} shard(s), {done}"
    return None


def sweep_temps(out: Path) -> int:
    """Remove the temp files a killed export left (beside shards, in the folder, in the state dir)."""
    removed = 0
    for directory in [out, *bucket_dirs(out)]:
        for entry in directory.iterdir():
            if entry.name.endswith(TMP_MARK) and entry.is_file():
                entry.unlink()
                removed += 1
    state = out / STATE_DIR
    if state.is_dir():
        for entry in state.rglob(f"*{TMP_MARK}"):
            entry.unlink()
            removed += 1
    return removed


def remove_export(out: Path, keep: set[str] = frozenset()) -> int:
    """Delete the files of an export in `out` (only ours), except shards in `keep`; returns count."""
    removed = 0
    for path in shard_files(out):
        relpath = path.relative_to(out).as_posix()
        if relpath in keep:
            continue
        path.unlink()
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(out, relpath).unlink()
        removed += 1
    state = out / STATE_DIR
    if state.is_dir():
        for side in sorted(state.rglob("*.json")):
            if side.relative_to(state).as_posix().removesuffix(".json") + ".tar" not in keep:
                side.unlink()
        for directory in sorted((p for p in state.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        if not keep:
            shutil.rmtree(state, ignore_errors=True)
    for directory in bucket_dirs(out):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty
    return removed
