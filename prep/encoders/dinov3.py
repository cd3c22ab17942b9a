"""DINOv3 encoder: images -> the layer-normed CLS embedding (`pooler_output`), float32.

DINOv3's own image processor in transformers is torchvision-only. Where torchvision is not
usable, the PIL-backed `ViTImageProcessorPil` reads the same preprocessor_config.json (resize
to 224x224 bilinear, rescale 1/255, ImageNet mean/std) and matches it to about 0.02.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from prep.encoders.common import finite_rows, free_model, resolve_device, resolve_dtype


class DINOv3Encoder:
    """A DINOv3 ViT backbone and the image processor that feeds it."""

    def __init__(
        self,
        processor,
        model: torch.nn.Module,
        *,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.processor = processor
        self.model = model
        self.model_id = model_id
        self.device = device
        self.dtype = dtype

    @property
    def processor_name(self) -> str:
        """Which image processor class ran (provenance: the two backends differ by ~0.02)."""
        return type(self.processor).__name__

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> DINOv3Encoder:
        """`AutoModel.from_pretrained` plus the model's image processor (PIL fallback)."""
        from transformers import AutoModel

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        processor = load_dinov3_processor(model_id, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(model_id, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        model.to(torch_device).eval().requires_grad_(False)
        return cls(processor, model, model_id=model_id, device=torch_device, dtype=torch_dtype)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images of any size -> (B, 3, 224, 224) float32 normalised pixels."""
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(torch.float32)

    def encode(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(B, hidden) float32 pooled embeddings and a per-item finite flag."""
        return self.encode_pixels(self.preprocess(images))

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Like `encode`, for pixels already preprocessed (in DataLoader workers)."""
        with torch.inference_mode():
            pooled = self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output.float()
            return pooled.cpu().numpy(), finite_rows(pooled)

    def unload(self) -> None:
        """Free the weights before another pass loads its model."""
        model, self.model = self.model, None
        free_model(model)


def load_dinov3_processor(model_id: str, *, trust_remote_code: bool = False):
    """The model's AutoImageProcessor, or the PIL ViT processor on the same config without torchvision."""
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    try:
        return AutoImageProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except ImportError:
        return ViTImageProcessorPil.from_pretrained(model_id)
