"""Vision-language captioner (Gemma 3 by default): images -> one caption each, greedy.

Greedy decoding with left padding makes a batched caption equal the caption of the image
alone, so results do not depend on batch size or on which other images shared the batch.
"""

from __future__ import annotations

import torch
from PIL import Image

from prep import config
from prep.encoders.common import free_model, resolve_device, resolve_dtype


class Captioner:
    """An image-text-to-text model, its processor, and the fixed caption request."""

    def __init__(
        self,
        processor,
        model: torch.nn.Module,
        *,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
        prompt: str = config.CAPTION_PROMPT,
        max_new_tokens: int = config.CAPTION_MAX_NEW_TOKENS,
    ) -> None:
        self.processor = processor
        self.model = model
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.prompt_text = render_caption_request(processor, prompt)

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prompt: str = config.CAPTION_PROMPT,
        max_new_tokens: int = config.CAPTION_MAX_NEW_TOKENS,
        trust_remote_code: bool = False,
    ) -> Captioner:
        """`AutoProcessor` + `AutoModelForImageTextToText`, tokenizer padding on the left."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        prepare_tokenizer_for_batched_generation(processor.tokenizer)
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        model.to(torch_device).eval().requires_grad_(False)
        return cls(
            processor,
            model,
            model_id=model_id,
            device=torch_device,
            dtype=torch_dtype,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
        )

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One stripped caption per image; "" where the model produced nothing (a failure)."""
        if not images:
            return []
        inputs = self._batch_inputs(images)
        prompt_length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens
            )
        new_tokens = generated[:, prompt_length:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _batch_inputs(self, images: list[Image.Image]) -> dict:
        """The same rendered request once per image, left-padded, tensors on the model's device."""
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        batch = self.processor(
            text=[self.prompt_text] * len(rgb),
            images=[[image] for image in rgb],
            padding=True,
            return_tensors="pt",
            # the chat template already wrote <bos>; a second one would change the caption
            add_special_tokens=not (bos and self.prompt_text.startswith(bos)),
        )
        return {key: self._to_device(value) for key, value in batch.items()}

    def _to_device(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return value.to(self.device, self.dtype)
        return value.to(self.device)

    def unload(self) -> None:
        """Free the weights before another pass loads its model."""
        model, self.model = self.model, None
        free_model(model)


def render_caption_request(processor, prompt: str) -> str:
    """The chat-template text of one user turn holding an image and the prompt, ready for the answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return rendered[0] if isinstance(rendered, list) else rendered


def prepare_tokenizer_for_batched_generation(tokenizer) -> None:
    """Left padding (new tokens follow every prompt directly) and a pad token to pad with."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
