"""Flux VAE encoder: pixels in [-1, 1] -> normalised posterior-mean latents, float16 on disk.

The stored latent is the posterior mean with Flux's shift and scale already applied,
`(z - shift_factor) * scaling_factor`, and `convention()` says so in the data: trainers
disagree on what a cached latent means and apply the transform twice when nobody says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prep.encoders.common import finite_rows, free_model, resolve_device, resolve_dtype

LATENT_KIND = "posterior_mean"
LATENT_TRANSFORM = "(z - shift_factor) * scaling_factor"
STORAGE_DTYPE = np.float16


class VAEEncoder:
    """A loaded diffusers AutoencoderKL; only its encoder half is used."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        model_id: str,
        subfolder: str | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.model_id = model_id
        self.subfolder = subfolder
        self.device = device
        self.dtype = dtype
        self.shift_factor = float(model.config.shift_factor or 0.0)
        self.scaling_factor = float(model.config.scaling_factor)

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        subfolder: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> VAEEncoder:
        """Load through `AutoencoderKL.from_pretrained` (Hub id or local dir).

        A local dir that lacks `subfolder` but holds a config.json at its root is loaded from
        the root, so both `--vae-model tiny/vae --vae-subfolder vae` and a standalone VAE dir
        work with the default subfolder.
        """
        from diffusers import AutoencoderKL

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        effective_subfolder = effective_vae_subfolder(model_id, subfolder)
        model = AutoencoderKL.from_pretrained(
            model_id, subfolder=effective_subfolder, torch_dtype=torch_dtype
        )
        model.to(torch_device).eval().requires_grad_(False)
        return cls(
            model, model_id=model_id, subfolder=effective_subfolder, device=torch_device, dtype=torch_dtype
        )

    def encode(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) in [-1, 1] -> latents (B, 16, H/8, W/8) float16 and a per-item finite flag.

        An item is flagged non-finite when any value is inf/NaN in float32 or after the cast
        to float16 (values beyond fp16's range become inf on disk).
        """
        with torch.inference_mode():
            x = pixels.to(device=self.device, dtype=self.dtype)
            mean = self.model.encode(x).latent_dist.mean.float()
            latents = (mean - self.shift_factor) * self.scaling_factor
            stored = latents.to(torch.float16)
            finite = finite_rows(latents) & finite_rows(stored)
            return stored.cpu().numpy(), finite

    def convention(self) -> dict:
        """How to read the stored latents; goes into every record's provenance and the dataset card."""
        return {
            "latent": LATENT_KIND,
            "transform": LATENT_TRANSFORM,
            "shift_factor": self.shift_factor,
            "scaling_factor": self.scaling_factor,
            "model_id": self.model_id,
            "subfolder": self.subfolder,
            "dtype": "float16 on disk",
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }

    def unload(self) -> None:
        """Free the weights (GPU memory included) before another pass loads its model."""
        model, self.model = self.model, None
        free_model(model)


def effective_vae_subfolder(model_id: str, subfolder: str | None) -> str | None:
    """The subfolder to load: None for a local dir without it but with a root config.json."""
    if not subfolder:
        return None
    root = Path(model_id).expanduser()
    if root.is_dir() and not (root / subfolder).is_dir() and (root / "config.json").is_file():
        return None
    return subfolder
