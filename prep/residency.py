"""Which models of an image pass can be resident together, decided before any is loaded.

An image pass runs its stages' models on the same batch, so all of them are loaded at once
(Gemma 3 4B + DINOv3 ViT-L + the Flux VAE take about 9.5 GB in bf16: one 80 GB GPU holds them
with room). When they do not fit, the stages run in consecutive groups that do (one model at a
time at worst), each group a pass of its own with its own decode of the images.

How we know before loading: a model's weights are counted from its checkpoint's safetensors
headers (shapes and dtypes, no tensor read) at the compute dtype; the budget is the device's
free memory (or --memory-budget-gb); a working reserve covers the activations of the largest
batch plus a fixed margin. The largest activations are a convolutional encoder's at full
resolution: about 6 tensors of its first block's width live at the peak (the Flux VAE: 128
channels, so 768 values per input pixel), read from the checkpoint's config.json.
A model whose checkpoint cannot be found locally (a Hub model not downloaded yet) is not
counted: it runs alone. CUDA out-of-memory on a batch is still retried in halves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("prep")

LIVE_TENSORS_AT_PEAK = 6  # full-resolution tensors a conv encoder's resnet block holds at once (on paper)
TRANSFORMER_VALUES_PER_PIXEL = 64  # ViT / VLM activations per input pixel: small next to a conv encoder's
FIXED_RESERVE_BYTES = 1 << 30  # allocator fragmentation, CUDA context, generate's KV cache


@dataclass(frozen=True)
class Footprint:
    """One stage's estimated weights in bytes (None: unknown, so it runs alone) and activations per input pixel."""

    name: str
    weights: int | None
    values_per_pixel: int = TRANSFORMER_VALUES_PER_PIXEL


def footprint(name: str, folder: Path | None, itemsize: int, *, has_model: bool = True) -> Footprint:
    """A stage's footprint from its checkpoint folder (weights and, for a conv net, its first width)."""
    if not has_model:
        return Footprint(name, 0, 0)
    return Footprint(name, weight_bytes(folder, itemsize), values_per_pixel(folder))


def values_per_pixel(folder: Path | None) -> int:
    """Peak activations per input pixel: a conv encoder's first width x live tensors, else a small default."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if folder else {}
    except (OSError, ValueError):
        config = {}
    widths = config.get("block_out_channels") if isinstance(config, dict) else None
    if isinstance(widths, list) and widths and isinstance(widths[0], int):
        return LIVE_TENSORS_AT_PEAK * widths[0]
    return TRANSFORMER_VALUES_PER_PIXEL


def weight_bytes(folder: Path | None, itemsize: int) -> int | None:
    """Bytes of a checkpoint's weights at a compute dtype of `itemsize` bytes, from its safetensors headers."""
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    piece = handle.get_slice(key)
                    numel = 1
                    for dim in piece.get_shape():
                        numel *= int(dim)
                    stored = piece.get_dtype()
                    floating = stored.startswith(("F", "BF"))
                    total += numel * (itemsize if floating else _stored_itemsize(stored))
    except (OSError, ValueError, RuntimeError) as exc:  # a broken checkpoint fails later, at load
        logger.debug("cannot read the safetensors headers in %s: %s", folder, exc)
        return None
    return total


def _stored_itemsize(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return max(1, int(digits) // 8) if digits else 1


def checkpoint_folder(model) -> Path | None:
    """The local folder holding a resolved model's weights (a folder, or its Hub cache snapshot)."""
    if model is None:
        return None
    if model.local:
        root = Path(model.source).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        where = f"{model.subfolder}/config.json" if model.subfolder else "config.json"
        found = try_to_load_from_cache(model.source, where, revision=model.revision)
        if not isinstance(found, str):
            return None
        return Path(found).parent
    return root / model.subfolder if model.subfolder else root


def memory_budget(device, budget_gb: float | None) -> int:
    """Bytes the pass's models may use: --memory-budget-gb, else the device's free memory now."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def working_reserve(footprints: list[Footprint], batch_pixels: int, itemsize: int) -> int:
    """Memory kept free for the activations of a batch of `batch_pixels` input pixels (the models run
    one after another on a batch, so the largest of them counts)."""
    per_pixel = max((item.values_per_pixel for item in footprints), default=0)
    return FIXED_RESERVE_BYTES + per_pixel * itemsize * batch_pixels


def resident_groups(footprints: list[Footprint], budget: int, reserve: int) -> list[list[str]]:
    """Consecutive stages (in run order) whose weights fit the budget together, leaving the reserve.

    Every stage belongs to exactly one group; a stage of unknown size, or one that does not fit
    even alone, forms a group of its own (its batches still halve on out-of-memory).
    """
    groups: list[list[str]] = []
    used = 0
    for item in footprints:
        fits = item.weights is not None and groups and groups[-1] and used + item.weights + reserve <= budget
        if fits and _known(groups[-1], footprints):
            groups[-1].append(item.name)
            used += item.weights
            continue
        groups.append([item.name])
        used = item.weights or 0
    return groups


def _known(group: list[str], footprints: list[Footprint]) -> bool:
    sizes = {item.name: item.weights for item in footprints}
    return all(sizes[name] is not None for name in group)
