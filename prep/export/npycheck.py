"""Strict checks of a side file's .npy bytes, without trusting its header.

A side file is valid for the export when its header is a plain (not pickled, C-order)
.npy header with exactly the expected shape and dtype, and the file is exactly header +
payload bytes long. The claimed shape is compared with the expected one (and the file size)
before anything is sized by it, so a small file claiming a huge shape allocates nothing.
With the payload at hand, its float values must also be finite (checked on the bit
patterns: an all-ones exponent is inf or NaN).
"""

from __future__ import annotations

import functools
import io
import math
import os
import tokenize

import numpy as np

from prep import store

MAGIC = b"\x93NUMPY"
HEAD_READ = 4096  # one read gets the header of any side file of ours (numpy writes 128 bytes)
# numpy refuses larger header dicts by default (max_header_size), and so do we
MAX_HEADER_LEN = 10_000
_BAD_NPY = (ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError)

# reason tokens (a skipped sample is counted as "<kind> invalid: <reason>")
UNREADABLE = "unreadable header"
FORTRAN = "Fortran order"
WRONG_SHAPE = "wrong shape"
WRONG_DTYPE = "wrong dtype"
WRONG_SIZE = "wrong file size"
NON_FINITE = "non-finite values"

# dtype -> (unsigned view, exponent mask) for the finiteness check on bit patterns
_EXPONENT = {
    np.dtype("<f2"): (np.dtype("<u2"), 0x7C00),
    np.dtype("<f4"): (np.dtype("<u4"), 0x7F800000),
    np.dtype("<f8"): (np.dtype("<u8"), 0x7FF0000000000000),
}


@functools.lru_cache(maxsize=256)
def _parse_header(prefix: bytes, header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own parser (literal_eval, no pickle), cached: files of one kind and bucket share a header."""
    f = io.BytesIO(prefix + header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(int(n) for n in shape), bool(fortran), dtype


def header_span(head: bytes) -> tuple[bytes, int] | None:
    """(magic + version + length prefix, total header bytes incl. prefix) or None when not .npy."""
    if len(head) < 10 or not head.startswith(MAGIC) or head[6] not in (1, 2, 3) or head[7] != 0:
        return None
    if head[6] == 1:
        prefix, header_len = head[:10], int.from_bytes(head[8:10], "little")
    else:
        if len(head) < 12:
            return None
        prefix, header_len = head[:12], int.from_bytes(head[8:12], "little")
    if header_len > MAX_HEADER_LEN:
        return None
    return prefix, len(prefix) + header_len


def check_header(head: bytes, file_size: int, shape: tuple[int, ...], dtype: np.dtype) -> tuple[str | None, int]:
    """(reason the file is invalid or None, payload offset) from its first bytes and its size."""
    span = header_span(head)
    if span is None or span[1] > len(head):
        return UNREADABLE, 0
    prefix, offset = span
    try:
        found_shape, fortran, found_dtype = _parse_header(prefix, head[len(prefix) : offset])
    except _BAD_NPY:
        return UNREADABLE, 0
    if found_dtype.hasobject:
        return UNREADABLE, 0
    if fortran:
        return FORTRAN, 0
    if found_shape != tuple(shape):
        return WRONG_SHAPE, 0
    if found_dtype != dtype:
        return WRONG_DTYPE, 0
    if file_size != offset + math.prod(shape) * dtype.itemsize:
        return WRONG_SIZE, 0
    return None, offset


def max_file_size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The largest size a valid file of this shape and dtype can have (longest header allowed)."""
    return 12 + MAX_HEADER_LEN + math.prod(shape) * dtype.itemsize


def header_status(path: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """None (valid header and size), "missing", or the reason it is invalid; one read of the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return UNREADABLE
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, HEAD_READ)
    except OSError:
        return UNREADABLE
    finally:
        os.close(fd)
    return check_header(head, size, shape, dtype)[0]


def all_finite(payload: memoryview | bytes, dtype: np.dtype) -> bool:
    """True when no value of a float payload is inf or NaN (exponent bits not all ones)."""
    if dtype not in _EXPONENT:  # not a dtype of ours: numpy's check
        return dtype.kind not in "fc" or bool(np.isfinite(np.frombuffer(payload, dtype=dtype)).all())
    view, mask = _EXPONENT[dtype]
    bits = np.frombuffer(payload, dtype=view)
    return bits.size == 0 or int(np.bitwise_and(bits, mask).max()) != mask


def side_file(derived: str, kind: str, key: str) -> str:
    """`derived/<folder>/<key>.npy` (the key must already be a safe id)."""
    return f"{derived}{os.sep}{store.ARTIFACTS[kind].folder}{os.sep}{key}.npy"


@functools.lru_cache(maxsize=64)
def _vae_shape(bucket: str) -> tuple[int, ...]:
    return store.expected_shape("vae", {"aspect_bucket": bucket})


def expected_shape(kind: str, record: dict) -> tuple[int, ...]:
    """`store.expected_shape`, cached per bucket (it parses the bucket string)."""
    return _vae_shape(record["aspect_bucket"]) if kind == "vae" else store.expected_shape(kind, record)
