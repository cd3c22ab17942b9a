"""Flux VAE stage: the bucket crop of an image -> its normalised posterior-mean latent, float16.

The stored latent is the posterior mean with Flux's shift and scale already applied,
`(z - shift_factor) * scaling_factor`, and `convention()` says so in the data: trainers
disagree on what a cached latent means and apply the transform twice when nobody says.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from prep import config
from prep.buckets import latent_shape, parse_bucket
from prep.options import opt
from prep.stages.base import IMAGE, Artifact, Encoder, ImageInput, ModelSpec, Output, Stage, to_eval

LATENT_KIND = "posterior_mean"
LATENT_TRANSFORM = "(z - shift_factor) * scaling_factor"

ARTIFACT = Artifact(
    kind="vae",
    folder="vae_latents",
    member="vae.npy",
    column="vae",
    dtype=np.dtype(np.float16),
    shape=lambda record: latent_shape(record["aspect_bucket"], config.VAE_LATENT_CHANNELS, config.VAE_DOWNSCALE),
    description="Flux VAE latent (normalised posterior mean) of the bucket crop, (16, H/8, W/8)",
    by_bucket=True,
)


class VAEEncoder(Encoder):
    """A loaded diffusers AutoencoderKL; only its encoder half is used."""

    def __init__(self, model, *, model_id: str, subfolder: str | None, device, dtype) -> None:
        super().__init__(model, device=device, dtype=dtype, model_id=model_id)
        self.subfolder = subfolder
        self.shift_factor = float(model.config.shift_factor or 0.0)
        self.scaling_factor = float(model.config.scaling_factor)
        self.channels_last = False
        self._pixel_table = None
        if getattr(self.device, "type", str(self.device)) == "cuda":
            self.use_channels_last()

    def use_channels_last(self) -> None:
        """NHWC weights and inputs: cuDNN's fast tensor-core convolutions (done on CUDA only: on
        a CPU oneDNN's NHWC kernels round differently, and CPU results stay as they were)."""
        import torch

        self.model.to(memory_format=torch.channels_last)
        self.channels_last = True

    def compile(self) -> bool:
        """Compile the encoder half, the only part that runs."""
        from prep.models import compile_module

        compile_module(self.model.encoder)
        return True

    @classmethod
    def load(
        cls, model_id: str, *, subfolder: str | None = None, device: str = "auto", dtype: str = "auto",
        revision: str | None = None,
    ) -> VAEEncoder:
        """`AutoencoderKL.from_pretrained` (Hub id or local dir; a local dir without `subfolder`
        but with a root config.json loads from its root)."""
        from pathlib import Path

        from diffusers import AutoencoderKL

        from prep.models import effective_subfolder, resolve_device, resolve_dtype

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        root = Path(model_id).expanduser()
        used = effective_subfolder(root, subfolder) if root.is_dir() else subfolder
        kwargs = {"subfolder": used} if used else {}
        if revision:
            kwargs["revision"] = revision
        model = AutoencoderKL.from_pretrained(model_id, torch_dtype=torch_dtype, **kwargs)
        return cls(to_eval(model, torch_device), model_id=model_id, subfolder=used, device=torch_device, dtype=torch_dtype)

    def encode(self, pixels) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) in [-1, 1] -> latents (B, 16, H/8, W/8) float16 and a per-item finite flag.

        An item is flagged non-finite when any value is inf/NaN in float32 or after the cast
        to float16 (values beyond fp16's range become inf on disk).
        """
        import torch

        from prep.models import finite_rows

        with torch.inference_mode():
            x = pixels.to(device=self.device, dtype=self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            mean = self.model.encode(x).latent_dist.mean.float()
            latents = (mean - self.shift_factor) * self.scaling_factor
            stored = latents.to(torch.float16)
            finite = finite_rows(latents) & finite_rows(stored)
            return stored.cpu().numpy(), finite

    def encode_uint8(self, crops) -> tuple[np.ndarray, np.ndarray]:
        """Like `encode`, for uint8 bucket crops (B, H, W, 3) as the workers make them.

        Only the uint8 bytes go to the device (stacked in pinned memory, copied without
        blocking); there a lookup table gives the exact float32 values of `to_vae_pixels`.
        """
        import torch

        from prep.models import stack_on_host

        if self._pixel_table is None:
            from prep.preprocess import vae_pixel_table

            self._pixel_table = vae_pixel_table(self.device)
        batch = stack_on_host(list(crops), self.device).to(self.device, non_blocking=True)
        pixels = self._pixel_table[batch.to(torch.int32)].permute(0, 3, 1, 2)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.encode(pixels.contiguous(memory_format=memory_format))

    def convention(self) -> dict:
        """How to read the stored latents; goes into prep_metadata.json and the dataset card."""
        return convention(self.shift_factor, self.scaling_factor, self.model_id, self.subfolder, self.dtype)


def convention(shift_factor: float, scaling_factor: float, model_id: str, subfolder: str | None, dtype) -> dict:
    """What the stored latents are (posterior mean, already shifted and scaled) and by which VAE."""
    return {
        "latent": LATENT_KIND,
        "transform": LATENT_TRANSFORM,
        "shift_factor": float(shift_factor),
        "scaling_factor": float(scaling_factor),
        "model_id": model_id,
        "subfolder": subfolder,
        "dtype": "float16 on disk",
        "compute_dtype": str(dtype).removeprefix("torch."),
    }


class VAEStage(Stage):
    name = "vae"
    reads = IMAGE
    artifact = ARTIFACT
    by_bucket = True
    model = ModelSpec(
        default=config.VAE_MODEL,
        subfolder=config.VAE_SUBFOLDER,
        help="Flux VAE (AutoencoderKL), Hub id or folder",
        license="FLUX.1 [dev] Non-Commercial License",
    )
    description = "Flux VAE latents of the bucket crops"

    def metadata(self, model, *, compute_dtype) -> dict:
        """The latent convention, from the VAE's config alone (recorded before any latent is written)."""
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(model.source, **model.from_pretrained_kwargs())
        return {self.name: convention(config.get("shift_factor") or 0.0, config["scaling_factor"], model.source,
                                      model.subfolder, compute_dtype)}

    def load(self, model, *, device, dtype: str, opts) -> VAEEncoder:
        return VAEEncoder.load(
            model.source, subfolder=model.subfolder, device=device, dtype=dtype, revision=model.load_revision
        )

    def image_input(self, encoder: VAEEncoder, bucket: str | None) -> ImageInput:
        width, height = parse_bucket(bucket)
        return ImageInput(functools.partial(vae_crop, width=width, height=height), draft_to=(width, height),
                          pixels=width * height)

    def encode(self, encoder: VAEEncoder, items: list) -> list[Output]:
        import torch

        crops = [torch.as_tensor(crop) for crop, _ in items]
        height, width = crops[0].shape[:2]
        bucket = f"{width}x{height}"
        arrays, finite = encoder.encode_uint8(crops)
        return [
            Output(
                array=np.array(array),
                inputs={"bucket": bucket, "crop_box": list(box)},
                error=None if ok else "non-finite output",
            )
            for array, (_, box), ok in zip(arrays, items, finite, strict=True)
        ]


def vae_crop(decoded, *, width: int, height: int):
    """Worker: the bucket crop of a decode, uint8 (H, W, 3), and its box (a numpy array travels through the
    loader's pipe, not /dev/shm, which containers often keep small)."""
    from prep.preprocess import bucket_crop

    return bucket_crop(decoded, width, height)


# ------------------------------------------------------------------ latents of mirrored crops
FLIP_ARTIFACT = Artifact(
    kind="vae_flip",
    folder="vae_latents_flip",
    member="vae_flip.npy",
    column="vae_flip",
    dtype=np.dtype(np.float16),
    shape=ARTIFACT.shape,
    description="Flux VAE latent of the horizontally mirrored bucket crop (flip augmentation), (16, H/8, W/8)",
    by_bucket=True,
)


@dataclass
class FlipOptions:
    flip_latents: bool = opt(
        False,
        "also store the latent of the horizontally mirrored crop (vae_latents_flip/, exported as {key}.vae_flip.npy) "
        "for flip augmentation without the VAE at training time; doubles the VAE cost",
        group="what to do",
    )


def mirrored_vae_crop(decoded, *, width: int, height: int):
    """Worker: the VAE's bucket crop of a decode, mirrored left to right (the box is the unmirrored one)."""
    crop, box = vae_crop(decoded, width=width, height=height)
    return np.ascontiguousarray(crop[:, ::-1]), box


class VAEFlipStage(VAEStage):
    """The latent of the mirrored crop (kohya's `latents_flipped`), with the VAE stage's model."""

    name = "vae_flip"
    artifact = FLIP_ARTIFACT
    model = None
    model_from = "vae"
    optional = True
    options = FlipOptions
    description = "Flux VAE latents of the mirrored bucket crops (--flip-latents)"

    def enabled(self, opts) -> bool:
        return self.stage_options(opts).flip_latents

    def settings(self, opts) -> dict:
        return {"flip": "horizontal"}

    def image_input(self, encoder: VAEEncoder, bucket: str | None) -> ImageInput:
        width, height = parse_bucket(bucket)
        return ImageInput(functools.partial(mirrored_vae_crop, width=width, height=height), draft_to=(width, height),
                          pixels=width * height)
