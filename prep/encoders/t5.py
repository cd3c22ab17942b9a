"""T5 encoder: captions -> last hidden states (77, 1024) float16 plus attention masks.

The mask is computed by the tokenizer alone so a pass that only needs masks (cheap) never
loads the model; the hidden states are computed in bf16/fp32 and cast to fp16 at the end.
"""

from __future__ import annotations

import numpy as np
import torch

from prep import config
from prep.encoders.common import finite_rows, free_model, resolve_device, resolve_dtype


class T5Encoder:
    """A T5 tokenizer and (optionally) its encoder stack."""

    def __init__(
        self,
        tokenizer,
        model: torch.nn.Module | None,
        *,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int = config.T5_MAX_LENGTH,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.max_length = max_length

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = config.T5_MAX_LENGTH,
    ) -> T5Encoder:
        """`AutoTokenizer` + `T5EncoderModel.from_pretrained` (only the encoder weights are used)."""
        from transformers import T5EncoderModel

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        tokenizer = load_t5_tokenizer(model_id)
        model = T5EncoderModel.from_pretrained(model_id, dtype=torch_dtype)
        model.to(torch_device).eval().requires_grad_(False)
        return cls(
            tokenizer, model, model_id=model_id, device=torch_device, dtype=torch_dtype, max_length=max_length
        )

    @classmethod
    def load_tokenizer_only(cls, model_id: str, *, max_length: int = config.T5_MAX_LENGTH) -> T5Encoder:
        """Masks without the model: a few MB and no GPU instead of a 1.4 GB encoder."""
        tokenizer = load_t5_tokenizer(model_id)
        return cls(
            tokenizer,
            None,
            model_id=model_id,
            device=torch.device("cpu"),
            dtype=torch.float32,
            max_length=max_length,
        )

    def tokenize(self, captions: list[str]) -> dict:
        """Fixed-length batch: the training format stores exactly max_length positions."""
        return self.tokenizer(
            list(captions),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )

    def attention_masks(self, captions: list[str]) -> list[list[int]]:
        """One 0/1 list of length max_length per caption (tokenizer only)."""
        return self.tokenize(captions)["attention_mask"].tolist()

    def encode(self, captions: list[str]) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
        """Hidden states (B, max_length, d_model) float16, masks, and a per-item finite flag.

        Non-finite covers inf/NaN in the compute dtype and values that overflow the fp16 cast.
        """
        if self.model is None:
            raise RuntimeError("T5Encoder was loaded without its model (load_tokenizer_only)")
        batch = self.tokenize(captions)
        with torch.inference_mode():
            hidden = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            ).last_hidden_state
            stored = hidden.to(torch.float16)
            finite = finite_rows(hidden) & finite_rows(stored)
            return stored.cpu().numpy(), batch["attention_mask"].tolist(), finite

    def unload(self) -> None:
        """Free the encoder weights; the tokenizer stays usable for masks."""
        model, self.model = self.model, None
        free_model(model)


def load_t5_tokenizer(model_id: str):
    """`AutoTokenizer.from_pretrained` (T5 has no remote code, so none is trusted)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_id)
