"""Side files: where each array lives, how it is written (atomically) and read (safely).

Layout under the derived dir: one folder per artifact of the stage registry (`dinov3/`,
`vae_latents/`, `t5_hidden/`), each holding `{image_id}.npy`, plus `prep_metadata.json`.
This module is the one place that decides whether a file is a valid array for its record,
so verify, the passes' `needs` filters, the exporter and the loaders all agree:

- a `.npy` header is parsed (bounded) and compared with the shape and dtype the record
  expects and with the file's size *before* any data is read, so a 4 KB file claiming a
  298 GiB shape allocates nothing; Fortran order, object dtypes and pickles are invalid;
- with `read_data`, values must be finite.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import secrets
import stat
import tokenize
from pathlib import Path
from typing import Any

import numpy as np

from prep.fsio import atomic_open, atomic_write_text, fsync_dir, sweep_temp_files
from prep.records import is_safe_id, validate_record

METADATA_FILE = "prep_metadata.json"
LOCK_FILE = ".prep.lock"
MAX_NPY_HEADER = 10_000  # numpy refuses longer headers by default (max_header_size); ours are 128 bytes
# What numpy raises on a bad .npy: a malformed header dict fails in its tokenizer or
# literal_eval (SyntaxError, TokenError), not only with ValueError.
_BAD_NPY = (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError, MemoryError, OverflowError)

VALID, MISSING = "valid", "missing"


class UnsafeIdError(ValueError):
    """An image_id that could escape the output directory or break a WebDataset key."""


class BadArray(ValueError):
    """A .npy that is not a plain array of the expected shape and dtype; the message says why."""


# --------------------------------------------------------------------------- the table
def file_artifacts(active=None) -> dict:
    """{kind: Artifact} of the side files, from the stage registry: optional stages only when named
    in `active` (see `active_stages`) or with `active=stages.ALL`."""
    from prep import stages

    return stages.file_artifacts(active)


def active_stages(base: str | Path) -> frozenset[str]:
    """The optional stages a dataset ran (`prep_metadata.json` "optional_stages"): their artifacts
    belong to it (a flipped latent per record, once `--flip-latents` ran).

    Asked once per record by readiness checks over millions of records: the parsed answer is
    kept while the file is the same (same inode, size and mtime: it is only ever replaced)."""
    try:
        st = os.stat(Path(base) / METADATA_FILE)
        key = (str(base), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(base), None, None, None)
    found = _ACTIVE_CACHE.get(key)
    if found is None:
        names = read_metadata(base).get("optional_stages")
        found = frozenset(n for n in names if isinstance(n, str)) if isinstance(names, list) else frozenset()
        if len(_ACTIVE_CACHE) > 64:
            _ACTIVE_CACHE.clear()
        _ACTIVE_CACHE[key] = found
    return found


_ACTIVE_CACHE: dict[tuple, frozenset[str]] = {}


def dataset_artifacts(base: str | Path) -> dict:
    """{kind: Artifact} of the side files this dataset has (optional ones only when it ran them)."""
    return file_artifacts(active_stages(base))


def artifact_spec(kind: str):
    from prep import stages

    return stages.file_artifacts(stages.ALL)[kind]


def expected_shape(kind: str, record: dict) -> tuple[int, ...]:
    """The shape a valid artifact of `kind` has for `record` (the VAE's depends on its bucket)."""
    from prep import stages

    return stages.artifacts(stages.ALL)[kind].shape_for(record)


def artifact_dir(base: str | Path, kind: str) -> Path:
    return Path(base) / artifact_spec(kind).folder


def artifact_path(base: str | Path, kind: str, image_id: Any) -> Path:
    """`base/<folder>/<image_id>.npy`, refusing any id that is not a safe token."""
    if not is_safe_id(image_id):
        raise UnsafeIdError(f"unsafe image_id {str(image_id)[:120]!r}: only [A-Za-z0-9_-], 1-100 characters")
    return artifact_dir(base, kind) / f"{image_id}.npy"


def ensure_dirs(base: str | Path) -> None:
    """Create the artifact folders (and the base)."""
    for kind in dataset_artifacts(base):
        artifact_dir(base, kind).mkdir(parents=True, exist_ok=True)


def sweep_stray_temp_files(base: str | Path) -> int:
    """Delete temp files a killed run left in the artifact folders; return the count.

    Skipped (0) when the last run left them clean (`LEFT_CLEAN_FILE`): listing the folders costs
    a directory entry per side file, three million at a million records, at every start."""
    from prep import stages

    if (Path(base) / LEFT_CLEAN_FILE).is_file():
        return 0
    return sum(sweep_temp_files(artifact_dir(base, kind)) for kind in file_artifacts(stages.ALL))


LEFT_CLEAN_FILE = ".prep/left-clean"  # no run has written a side file here since the last one ended well


def mark_left_clean(base: str | Path) -> None:
    """After a run that ended well (every temp file renamed or removed): the next run need not
    sweep. Only its presence counts: created when missing (a run with nothing to do writes
    nothing); lost in a crash, the next run sweeps."""
    mark = Path(base) / LEFT_CLEAN_FILE
    with contextlib.suppress(OSError):  # a read-only folder: the next run sweeps
        if not mark.exists():
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()


def unmark_left_clean(base: str | Path) -> None:
    """Before writing a side file: the mark goes, durably, so a run killed from here on leaves none
    and the next run sweeps (one failed unlink per batch once it is gone)."""
    mark = Path(base) / LEFT_CLEAN_FILE
    try:
        mark.unlink()
    except FileNotFoundError:
        return
    fsync_dir(mark.parent)


# ------------------------------------------------------------------------------ writing
def npy_bytes(array: np.ndarray, dtype: np.dtype | str) -> bytes:
    """The .npy file content of `array` cast to `dtype` (C order, no pickle)."""
    data = np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False))
    if data.dtype.hasobject:
        raise TypeError("refusing to save an object array")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, data, allow_pickle=False)
    return buf.getvalue()


def save_npy(array: np.ndarray, path: str | Path, dtype: np.dtype | str) -> None:
    """Write `array` cast to `dtype` as .npy, atomically; object arrays are refused."""
    data = npy_bytes(array, dtype)
    clear_the_way(Path(path))
    with atomic_open(path, "wb") as f:
        f.write(data)


def save_artifact(base: str | Path, kind: str, image_id: str, array: np.ndarray) -> Path:
    """Save one artifact in its on-disk dtype; returns the path."""
    unmark_left_clean(base)
    path = artifact_path(base, kind, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(array, path, artifact_spec(kind).dtype)
    return path


def clear_the_way(path: Path) -> None:
    """A directory where a side file belongs is moved aside (never deleted), so the file can be written."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f"{path.name}.not-a-file-{secrets.token_hex(4)}")
        os.replace(path, aside)
        import logging

        logging.getLogger(__name__).warning("moved the directory %s aside to %s: a side file belongs there", path, aside)


def write_temp(path: Path, data: bytes) -> Path:
    """Write `data` durably to a temp file beside `path` (the caller renames it into place)."""
    from prep.fsio import TMP_MARK

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_MARK}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def publish(tmp: Path, path: Path) -> None:
    """Rename a written temp file into place (the directory entry is made durable by the caller)."""
    clear_the_way(path)
    os.replace(tmp, path)


def fsync_dirs(paths) -> None:
    for directory in {Path(p).parent for p in paths}:
        fsync_dir(directory)


# ------------------------------------------------------------------------------ reading
@functools.lru_cache(maxsize=256)
def _parse_npy_header(prefix: bytes, header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own header parser, cached: files of one kind and bucket share one header, and
    parsing (a literal_eval) costs more than the read itself."""
    f = io.BytesIO(prefix + header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f, max_header_size=MAX_NPY_HEADER)
    return tuple(int(n) for n in shape), fortran, dtype


def parse_npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from the first bytes of a .npy; BadArray if it is not a
    plain C-order array (pickled objects and Fortran order included)."""
    if len(head) < 10 or not head.startswith(b"\x93NUMPY"):
        raise BadArray("not a .npy file")
    if head[6] == 1:
        prefix, header_len = head[:10], int.from_bytes(head[8:10], "little")
    elif head[6] in (2, 3) and len(head) >= 12:
        prefix, header_len = head[:12], int.from_bytes(head[8:12], "little")
    else:
        raise BadArray(f"unsupported .npy version {head[6]}")
    if header_len > MAX_NPY_HEADER:
        raise BadArray("oversized .npy header")
    end = len(prefix) + header_len
    if len(head) < end:
        raise BadArray("truncated .npy header")
    try:
        shape, fortran, dtype = _parse_npy_header(prefix, head[len(prefix) : end])
    except _BAD_NPY as exc:
        raise BadArray(f"bad .npy header ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise BadArray("object array (pickle) refused")
    if fortran and len(shape) > 1:
        raise BadArray("Fortran-order array")
    return shape, dtype, end


def payload_size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * dtype.itemsize


def check_npy_bytes_layout(
    shape: tuple[int, ...], dtype: np.dtype, data_offset: int, total: int,
    expect_shape: tuple[int, ...] | None, expect_dtype: np.dtype | None,
) -> None:
    """Shape and dtype as expected, and exactly header + payload bytes; BadArray otherwise."""
    if expect_shape is not None and shape != tuple(expect_shape):
        raise BadArray(f"shape {shape} != {tuple(expect_shape)}")
    if expect_dtype is not None and dtype != np.dtype(expect_dtype):
        raise BadArray(f"dtype {dtype} != {np.dtype(expect_dtype)}")
    need = data_offset + payload_size(shape, dtype)
    if total < need:
        raise BadArray("truncated payload")
    if total > need:
        raise BadArray("trailing bytes after the array")


def read_npy(
    path: str | Path, shape: tuple[int, ...] | None = None, dtype: np.dtype | None = None, *, data: bool = True
) -> np.ndarray | tuple[tuple[int, ...], np.dtype]:
    """Read a side file safely: header first, compared with `shape`/`dtype` and the file size.

    Returns the array (or, with `data=False`, (shape, dtype)). Raises FileNotFoundError for a
    missing file and BadArray (with the reason) for anything else that is not that array.
    """
    from prep.fsio import NotARegularFile, open_regular

    try:
        f = open_regular(path)
    except NotARegularFile as exc:
        raise BadArray(str(exc).split(" is ", 1)[-1]) from None
    except IsADirectoryError:
        raise BadArray("a directory") from None
    with f:
        head = f.read(4096)
        found_shape, found_dtype, offset = parse_npy_header(_whole_header(f, head))
        total = os.fstat(f.fileno()).st_size
        check_npy_bytes_layout(found_shape, found_dtype, offset, total, shape, dtype)
        if not data:
            return found_shape, found_dtype
        f.seek(offset)
        raw = f.read(total - offset)
    return np.frombuffer(raw, dtype=found_dtype).reshape(found_shape).copy()


def _whole_header(f, head: bytes) -> bytes:
    """`head` extended to hold the whole (bounded) header when it is longer than the first read."""
    if len(head) >= 12 and head.startswith(b"\x93NUMPY") and head[6] in (2, 3):
        need = 12 + int.from_bytes(head[8:12], "little")
        if len(head) < need <= 12 + MAX_NPY_HEADER:
            head += f.read(need - len(head))
    return head


def read_npy_bytes(
    data: bytes, shape: tuple[int, ...] | None = None, dtype: np.dtype | None = None
) -> np.ndarray:
    """Like `read_npy` for an in-memory .npy (an export member): layout checked before decoding."""
    found_shape, found_dtype, offset = parse_npy_header(bytes(data[: 12 + MAX_NPY_HEADER]))
    check_npy_bytes_layout(found_shape, found_dtype, offset, len(data), shape, dtype)
    return np.frombuffer(data, dtype=found_dtype, offset=offset).reshape(found_shape).copy()


# dtype -> (unsigned view, exponent mask): inf and NaN have every exponent bit set
_EXPONENT = {
    np.dtype("<f2"): (np.dtype("<u2"), 0x7C00),
    np.dtype("<f4"): (np.dtype("<u4"), 0x7F800000),
    np.dtype("<f8"): (np.dtype("<u8"), 0x7FF0000000000000),
}


def all_finite(payload, dtype: np.dtype) -> bool:
    """True when no value of a payload is inf or NaN, checked on the bit patterns (no float copy)."""
    dtype = np.dtype(dtype)
    if dtype not in _EXPONENT:
        return dtype.kind not in "fc" or bool(np.isfinite(np.frombuffer(payload, dtype=dtype)).all())
    view, mask = _EXPONENT[dtype]
    bits = np.frombuffer(payload, dtype=view)
    return bits.size == 0 or int(np.bitwise_and(bits, mask).max()) != mask


def read_side_file(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A side file's bytes in one read, once they proved a valid array: the header matches `shape`
    and `dtype`, the size is exactly header + payload (nothing is read from a file too large to be
    valid) and every value is finite. FileNotFoundError when missing, BadArray (why) otherwise."""
    dtype = np.dtype(dtype)
    largest = 12 + MAX_NPY_HEADER + payload_size(tuple(shape), dtype)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadArray("not a regular file")
        if st.st_size > largest:
            raise BadArray("wrong file size")
        data = os.read(fd, st.st_size + 1)  # +1 sees a file that grew since fstat
    finally:
        os.close(fd)
    found_shape, found_dtype, offset = parse_npy_header(data[: 12 + MAX_NPY_HEADER])
    check_npy_bytes_layout(found_shape, found_dtype, offset, len(data), shape, dtype)
    if not all_finite(memoryview(data)[offset:], found_dtype):
        raise BadArray("non-finite values")
    return data


def load_npy(path: str | Path, shape: tuple[int, ...] | None = None, dtype: np.dtype | None = None) -> np.ndarray | None:
    """The array, or None when the file is missing, truncated, pickled or not as expected."""
    try:
        return read_npy(path, shape, dtype)
    except (FileNotFoundError, BadArray, *_BAD_NPY):
        return None


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from the .npy header alone, or None if missing/unreadable/truncated."""
    try:
        return read_npy(path, data=False)
    except (FileNotFoundError, BadArray, *_BAD_NPY):
        return None


def check_artifact(base: str | Path, kind: str, record: dict, *, read_data: bool = True) -> str:
    """"valid", "missing" or "invalid: <reason>" for the file of one artifact of one record.

    With `read_data=False` only the header and the size are checked: fast enough for
    readiness filters over millions of records. With it, values must also be finite.
    """
    try:
        path = artifact_path(base, kind, record.get("image_id"))
        shape = expected_shape(kind, record)
    except (UnsafeIdError, KeyError, ValueError, TypeError) as exc:
        return f"invalid: {exc}"
    try:
        array = read_npy(path, shape, artifact_spec(kind).dtype, data=read_data)
    except FileNotFoundError:
        return MISSING
    except BadArray as exc:
        return f"invalid: {exc}"
    except _BAD_NPY as exc:
        return f"invalid: unreadable ({type(exc).__name__})"
    if read_data and not np.isfinite(array).all():
        return "invalid: non-finite values"
    return VALID


def artifact_ok(base: str | Path, kind: str, record: dict, *, read_data: bool = False) -> bool:
    return check_artifact(base, kind, record, read_data=read_data) == VALID


# ----------------------------------------------------------------------------- metadata
def read_metadata(base: str | Path) -> dict:
    """The dataset-level metadata (latent convention, models, bound manifest); {} when absent."""
    from prep.fsio import read_capped_text

    try:
        metadata = json.loads(read_capped_text(Path(base) / METADATA_FILE, 16 << 20))
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def update_metadata(base: str | Path, updates: dict) -> dict:
    """Merge `updates` into `prep_metadata.json` atomically; returns the new content."""
    metadata = read_metadata(base)
    metadata.update(updates)
    atomic_write_text(Path(base) / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return metadata


# ---------------------------------------------------------------------------- readiness
def readiness_reasons(
    record: dict, base: str | Path, *, read_data: bool = False, stale_against=None, stamps: bool = True,
) -> list[str]:
    """Why `record` cannot go into a training shard yet (empty list = ready).

    The record must be a valid v2 record, not filtered out, and each side file valid (header
    and size; `read_data` also reads the values) and the one its record stamped. With
    `stale_against` (an `Expected`), an artifact whose configuration or inputs changed is not
    ready either ("vae stale").
    """
    from prep import provenance

    if isinstance(record.get("filtered"), dict):  # one reason: counted by why it was said no to
        reason = record["filtered"].get("reason")
        return [f"filtered: {reason if isinstance(reason, str) else 'unknown'}"]
    reasons = validate_record(record)
    if "missing image_id" in reasons or "unsafe image_id" in reasons:
        return reasons
    from prep import stages

    no_bucket = "missing aspect_bucket" in reasons or "bad aspect_bucket" in reasons
    for stage in stages.artifact_stages(active_stages(base)):
        kind = stage.name
        if stage.by_bucket and no_bucket:
            continue  # the array's shape follows the bucket: only the record reason is given
        status = check_artifact(base, kind, record, read_data=read_data)
        if status != VALID:
            reasons.append(f"{kind} {status.split(':')[0]}")
            continue
        if not stamps:
            continue
        path = artifact_path(base, kind, record["image_id"])
        if provenance.unvouched_reason(kind, record, path):
            reasons.append(f"{kind} not stamped for this record")
        elif stale_against is not None and provenance.is_stale(provenance.artifact_status(kind, record, stale_against)):
            reasons.append(f"{kind} stale")
    return reasons
