"""Which model a flag names, and which exact checkpoint gets loaded.

Every model flag (`--vae-model`, ...) takes a Hub id or a local folder. `resolve_model` decides
which, checks it before any pass starts (a typo must not surface after hours of other passes),
and pins the revision: for a Hub id the commit of the snapshot the config was read from (the
model then loads from that same commit), for a local folder a content hash. That revision is
what provenance records, so a stamp always names the checkpoint that really ran.

Also here: device and dtype choice (fp16 refused: the Flux VAE and T5 overflow), and freeing
a model's memory between passes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from prep.errors import UserError

# Files that define a checkpoint's outputs: weights, configs, tokenizer and processor files.
_REVISION_SUFFIXES = frozenset({".safetensors", ".bin", ".json", ".model", ".jinja", ".txt", ".py"})
_CHUNK = 1 << 20
_FULL_HASH_LIMIT = 256 << 20  # above this total size, hash each file's first and last MiB only
_REVISION_LENGTH = 12
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})")

_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_FP16_NAMES = frozenset({"float16", "fp16", "half"})


class ModelError(UserError):
    """A model flag that cannot be used: missing folder, bad id, gated, offline, no such revision."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model flag, checked: where to load from and the revision that will really be loaded."""

    flag: str  # "--vae-model", for messages
    source: str  # as the user gave it (Hub id or folder)
    local: bool
    subfolder: str | None  # the subfolder actually used (None: the folder itself)
    revision: str  # Hub commit, or "sha256:<12 hex>" of a local folder's files
    requested_revision: str | None = None

    @property
    def load_revision(self) -> str | None:
        """What `from_pretrained(revision=...)` gets: the pinned commit for a Hub id."""
        return None if self.local else self.revision

    @property
    def public_name(self) -> str:
        """A name safe to publish: the Hub id, or ORG/NAME of a cache snapshot, or a folder's name."""
        return public_model_name(self.source)

    def from_pretrained_kwargs(self) -> dict:
        kwargs: dict = {}
        if self.subfolder:
            kwargs["subfolder"] = self.subfolder
        if self.load_revision:
            kwargs["revision"] = self.load_revision
        return kwargs


def looks_like_path(source: str) -> bool:
    """True for what a user means as a folder: it exists, or starts like a path, or cannot be a Hub id."""
    if os.path.exists(os.path.expanduser(source)):
        return True
    if source.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", source):
        return True
    return source.count("/") > 1 or "\\" in source or not _HUB_ID.fullmatch(source)


def resolve_model(flag: str, source: str, *, revision: str | None = None, subfolder: str | None = None) -> ResolvedModel:
    """Check a model flag and pin its revision; ModelError (one line, naming the flag) when unusable."""
    if not source:
        raise ModelError(f"{flag} is empty")
    if looks_like_path(source):
        return _resolve_local(flag, source, subfolder)
    return _resolve_hub(flag, source, revision, subfolder)


@lru_cache(maxsize=64)
def _resolve_local(flag: str, source: str, subfolder: str | None) -> ResolvedModel:
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelError(f"{flag} {source}: no such folder")
    if not path.is_dir():
        raise ModelError(f"{flag} {source}: not a folder (a model folder holds config.json and weights)")
    used = effective_subfolder(path, subfolder)
    config_dir = path / used if used else path
    if not (config_dir / "config.json").is_file():
        raise ModelError(f"{flag} {source}: no config.json in {config_dir} (is this a model folder?)")
    return ResolvedModel(flag, source, True, used, local_dir_revision(path))


def effective_subfolder(path: Path, subfolder: str | None) -> str | None:
    """The subfolder to load from a local folder: None when it lacks one but has a root config."""
    if not subfolder:
        return None
    if not (path / subfolder).is_dir() and (path / "config.json").is_file():
        return None
    return subfolder


@lru_cache(maxsize=64)
def _resolve_hub(flag: str, repo_id: str, revision: str | None, subfolder: str | None) -> ResolvedModel:
    from huggingface_hub import errors, hf_hub_download

    try:
        config = hf_hub_download(repo_id, "config.json", subfolder=subfolder or None, revision=revision)
    except errors.GatedRepoError:
        raise ModelError(
            f"{flag} {repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} "
            "and log in with `hf auth login` (or set HF_TOKEN)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelError(
            f"{flag} {repo_id}: no such model on the Hub (or it is private: log in with `hf auth login`); "
            "a local folder must exist"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelError(f"{flag} {repo_id}: no revision {revision!r} on the Hub") from None
    except errors.EntryNotFoundError as exc:
        if isinstance(exc, errors.LocalEntryNotFoundError):
            raise ModelError(
                f"{flag} {repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
                "(no network, or HF_HUB_OFFLINE=1): download it once on a connected machine "
                f"(`hf download {repo_id}`) or pass a local folder"
            ) from None
        where = f"{subfolder}/config.json" if subfolder else "config.json"
        raise ModelError(f"{flag} {repo_id} has no {where}: is it the right model (or --*-subfolder)?") from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ModelError(f"{flag} {repo_id}: cannot download its config ({one_line(exc)})") from None
    match = _SNAPSHOT.search(str(config))
    commit = match.group("commit") if match else (revision or "unknown")
    return ResolvedModel(flag, repo_id, False, subfolder or None, commit, revision)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def public_model_name(source: str) -> str:
    """Hub ids as they are; local folders never leak their path (see ResolvedModel.public_name)."""
    match = _SNAPSHOT.search(source)
    if match:
        return f"{match.group('owner')}/{match.group('name')}"
    if not looks_like_path(source):
        return source
    return f"local folder {Path(source).expanduser().name or source}"


def local_dir_revision(path: Path) -> str:
    """A content hash of a model folder's defining files (names, sizes and bytes)."""
    files = sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix in _REVISION_SUFFIXES and ".cache" not in f.parts
    )
    whole = sum(f.stat().st_size for f in files) <= _FULL_HASH_LIMIT
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with file.open("rb") as handle:
            if whole or size <= 2 * _CHUNK:
                for chunk in iter(lambda: handle.read(_CHUNK), b""):
                    digest.update(chunk)
            else:  # big checkpoints: first and last MiB, with names and sizes
                digest.update(handle.read(_CHUNK))
                handle.seek(size - _CHUNK)
                digest.update(handle.read(_CHUNK))
    return "sha256:" + digest.hexdigest()[:_REVISION_LENGTH]


def known_revision(source: str, subfolder: str | None = None) -> str:
    """The revision of a model without failing (for judging staleness offline): "unknown" if unresolvable."""
    try:
        return resolve_model("model", source, subfolder=subfolder).revision
    except UserError:
        return "unknown"


# ------------------------------------------------------------------------ device and dtype
def resolve_device(name: str):
    """'auto' -> the first CUDA GPU when there is one, else the CPU; anything else as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    """'auto' -> bfloat16 on CUDA, float32 on CPU. float16 is refused: it overflows these models."""
    import torch

    key = str(name).strip().lower().removeprefix("torch.")
    if key in _FP16_NAMES:
        raise ValueError("float16 is not supported: the Flux VAE and T5 overflow in fp16; use bfloat16 or float32")
    if key == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32 or bfloat16")
    return getattr(torch, _DTYPE_NAMES[key])


# ------------------------------------------------------------------------ feeding the device
COMPILE_OPTIONS: dict = {}  # torch.compile keyword arguments (tests use {"backend": "eager"})


def compile_module(module) -> None:
    """`torch.compile` a module's forward in place (`nn.Module.compile`): same object, same weights."""
    module.compile(**COMPILE_OPTIONS)


def stack_on_host(items: list, device):
    """Stack a batch's tensors on the host, in pinned (page-locked) memory when it goes to a GPU,
    so that `.to(device, non_blocking=True)` copies it asynchronously."""
    import torch

    pinned = torch.device(device).type == "cuda"
    first = torch.as_tensor(items[0])
    batch = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=pinned)
    return torch.stack([torch.as_tensor(item) for item in items], out=batch)


def cpu_features() -> dict:
    """What the CPU offers that decides the models' speed there: torch's kernel level and bf16 support.

    `native_bf16` (avx512_bf16 or amx_bf16) makes bf16 about 2.5x faster than fp32 for the VAE
    on a CPU; without it bf16 is emulated and about 10x slower than fp32.
    """
    import torch

    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [flag for flag in wanted if flag in flags],
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "threads": torch.get_num_threads(),
    }


def free_model(model) -> None:
    """Release a model's memory now, before the next pass loads a different one."""
    import torch

    if model is not None and hasattr(model, "to"):
        with contextlib.suppress(RuntimeError, NotImplementedError, TypeError, ValueError):
            model.to("meta")  # frees the storage even while other references remain
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finite_rows(values):
    """Per item of a batch (first axis): True when every value of that item is finite."""
    import numpy as np
    import torch

    if isinstance(values, torch.Tensor):
        return torch.isfinite(values).flatten(1).all(dim=1).cpu().numpy()
    return np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and per-load chatter (prep shows one bar per pass).

    Environment variables for libraries not imported yet (importing diffusers costs seconds),
    their switches for those already imported.
    """
    import logging
    import sys

    for name, value in (
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(name, value)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
        sys.modules["transformers"].logging.set_verbosity_error()
    if "diffusers" in sys.modules:
        sys.modules["diffusers"].utils.logging.disable_progress_bar()
        sys.modules["diffusers"].logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    for name in ("httpx", "urllib3", "filelock", "PIL", "datasets", "huggingface_hub", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
