"""prep: images -> training-ready dataset for a text- and DINOv3-conditioned Flux-VAE diffusion model."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_manifest", "load_shards"]


def __getattr__(name: str):
    # Lazy: `import prep` stays cheap (no torch / datasets import) for the CLI's --help.
    if name in ("load_manifest", "load_shards"):
        from prep import loading

        return getattr(loading, name)
    raise AttributeError(name)
