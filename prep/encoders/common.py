"""What every encoder shares: device and dtype choice, unloading, and a model revision.

The revision goes into the provenance of every artifact, so a stale embedding from another
checkpoint can be detected later (a common failure of caching pipelines).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from pathlib import Path

import numpy as np
import torch

_DTYPE_ALIASES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_FP16_NAMES = frozenset({"float16", "fp16", "half"})

# Files that define a checkpoint's outputs: weights, configs, tokenizer and processor files.
_REVISION_SUFFIXES = frozenset({".safetensors", ".bin", ".json", ".model", ".jinja", ".txt", ".py"})
_CHUNK = 1 << 20
# Above this total size only each file's first and last MiB are hashed (with names and sizes).
_FULL_HASH_LIMIT = 256 << 20
_REVISION_LENGTH = 12


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA GPU when there is one, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU. float16 is refused: it overflows these models."""
    key = name.strip().lower()
    if key in _FP16_NAMES:
        raise ValueError(
            "float16 is not supported: the Flux VAE and T5 overflow in fp16; use bfloat16 or float32"
        )
    if key == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32 or bfloat16")
    return _DTYPE_ALIASES[key]


def free_model(model: torch.nn.Module | None) -> None:
    """Release a model's memory now, before the next pass loads a different one.

    The caller must drop its own references too; this moves weights off the GPU, collects
    garbage and returns cached CUDA blocks so the next model finds the memory free.
    """
    if model is not None and hasattr(model, "to"):
        with contextlib.suppress(RuntimeError, NotImplementedError, TypeError, ValueError):
            model.to("meta")  # frees the storage even while other references remain
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finite_rows(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per item of a batch (first axis): True when every value of that item is finite."""
    if isinstance(values, torch.Tensor):
        return torch.isfinite(values).flatten(1).all(dim=1).cpu().numpy()
    return np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)


def model_revision(model_id: str) -> str:
    """A short id of the exact checkpoint: content hash for a local dir, commit for a Hub id.

    Offline-safe: a Hub id is only looked up in the local HF cache; "unknown" when absent.
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        return _local_dir_revision(path)
    return _hub_cache_revision(model_id)


def _local_dir_revision(path: Path) -> str:
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and f.suffix in _REVISION_SUFFIXES and ".cache" not in f.parts
    )
    whole = sum(f.stat().st_size for f in files) <= _FULL_HASH_LIMIT
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        _hash_file(digest, file, size, whole)
    return "sha256:" + digest.hexdigest()[:_REVISION_LENGTH]


def _hash_file(digest: hashlib._Hash, file: Path, size: int, whole: bool) -> None:
    """The whole file in 1 MiB chunks, or only its first and last MiB for big checkpoints."""
    with file.open("rb") as handle:
        if whole or size <= 2 * _CHUNK:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
            return
        digest.update(handle.read(_CHUNK))
        handle.seek(size - _CHUNK)
        digest.update(handle.read(_CHUNK))


def _hub_cache_revision(model_id: str) -> str:
    """The commit of the cached snapshot of a Hub repo, read from the cache folder (no network)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:
        return "unknown"
    try:
        repo_dir = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model_id, repo_type="model")
    except ValueError:  # not a valid repo id either
        return "unknown"
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        commit = main_ref.read_text().strip()
        if commit:
            return commit
    snapshots = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    return snapshots[0] if len(snapshots) == 1 else "unknown"
