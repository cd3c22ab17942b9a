"""prep: images -> training-ready dataset for a text- and DINOv3-conditioned Flux-VAE diffusion model."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BucketBatchSampler", "__version__", "collate", "load_manifest", "load_shards", "load_uncond"]

# Lazy: `import prep` stays cheap (no torch / datasets import) for the CLI's --help.
_LAZY = {
    "load_manifest": "prep.loading",
    "load_shards": "prep.shards",
    "load_uncond": "prep.shards",
    "BucketBatchSampler": "prep.sampling",
    "collate": "prep.sampling",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
