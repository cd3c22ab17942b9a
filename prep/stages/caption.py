"""Caption stage: a vision-language model (Gemma 3 by default) writes one caption per image, greedy.

Greedy decoding with left padding makes a batched caption equal the caption of the image
alone, so results do not depend on batch size or on which other images shared the batch.
A caption the user supplied is never overwritten: this stage only fills records without one
(or, with --recaption, replaces captions a model wrote).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from prep import config
from prep.options import opt
from prep.stages.base import IMAGE, Encoder, ImageInput, ModelSpec, Output, Stage, to_eval


@dataclass
class CaptionOptions:
    """Flags of the caption stage."""

    caption_prompt: str = opt(config.CAPTION_PROMPT, "prompt given to the captioner", group="captions")
    caption_max_new_tokens: int = opt(config.CAPTION_MAX_NEW_TOKENS, "longest caption, in tokens", group="captions")
    caption_batch_size: int = opt(4, "images per captioner batch", group="captions")


class Captioner(Encoder):
    """An image-text-to-text model, its processor, and the fixed caption request."""

    def __init__(
        self, processor, model, *, model_id: str, device, dtype, prompt: str = config.CAPTION_PROMPT,
        max_new_tokens: int = config.CAPTION_MAX_NEW_TOKENS,
    ) -> None:
        super().__init__(model, device=device, dtype=dtype, model_id=model_id)
        self.processor = processor
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.prompt_text = render_caption_request(processor, prompt)

    @classmethod
    def load(
        cls, model_id: str, *, device: str = "auto", dtype: str = "auto", prompt: str = config.CAPTION_PROMPT,
        max_new_tokens: int = config.CAPTION_MAX_NEW_TOKENS, trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> Captioner:
        """`AutoProcessor` + `AutoModelForImageTextToText`, tokenizer padding on the left."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from prep.models import resolve_device, resolve_dtype

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        extra = {"revision": revision} if revision else {}
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code, **extra)
        prepare_tokenizer_for_batched_generation(processor.tokenizer)
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
        return cls(processor, to_eval(model, torch_device), model_id=model_id, device=torch_device, dtype=torch_dtype,
                   prompt=prompt, max_new_tokens=max_new_tokens)

    def compile(self) -> bool:
        """Not compiled: `generate` grows its inputs every step, so a compiled forward would recompile."""
        return False

    def caption(self, images: list) -> list[str]:
        """One stripped caption per image; "" where the model produced nothing (a failure)."""
        return self.caption_requests([self.request(image) for image in images])

    def request(self, image) -> dict:
        """One image's model inputs (a batch of one), as a DataLoader worker makes them."""
        return caption_request(self.processor, self.prompt_text, image)

    def caption_requests(self, requests: list[dict]) -> list[str]:
        """Captions of prepared requests: left-padded into one batch, one greedy `generate` for all."""
        import torch

        if not requests:
            return []
        inputs = self._collate(requests)
        prompt_length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            generated = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _batch_inputs(self, images: list) -> dict:
        """The same rendered request once per image, left-padded, tensors on the model's device."""
        return self._collate([self.request(image) for image in images])

    def _collate(self, requests: list[dict]) -> dict:
        """Requests of one image each -> one batch: token fields left-padded by the tokenizer (as the
        processor pads a batch), image fields concatenated; tensors on the model's device."""
        import torch

        requests = [{key: torch.as_tensor(value) if hasattr(value, "dtype") else value for key, value in request.items()}
                    for request in requests]
        text_keys = [key for key in requests[0] if key in TOKEN_FIELDS]
        padded = self.processor.tokenizer.pad(
            [{key: request[key][0] for key in text_keys} for request in requests], padding=True, return_tensors="pt"
        )
        batch = {key: padded[key] for key in text_keys}
        for key in requests[0]:
            if key not in batch:
                values = [request[key] for request in requests]
                batch[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else sum(values, [])
        return {key: self._to_device(value) for key, value in batch.items()}

    def _to_device(self, value):
        import torch

        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return value.to(self.device, non_blocking=True).to(self.dtype)
        return value.to(self.device, non_blocking=True)


# The processor's fields that are per token (padded on the left in a batch); the rest are per image.
TOKEN_FIELDS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


def caption_request(processor, prompt_text: str, image) -> dict:
    """One image's inputs to the captioner (runs in DataLoader workers): the processor on one request."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    bos = getattr(processor.tokenizer, "bos_token", None)
    return dict(processor(
        text=[prompt_text],
        images=[[rgb]],
        return_tensors="pt",
        # the chat template already wrote <bos>; a second one would change the caption
        add_special_tokens=not (bos and prompt_text.startswith(bos)),
    ))


def caption_input(processor, prompt_text: str, decoded) -> dict:
    """Worker: the captioner's inputs from the pass's shared (full, undrafted) decode, as numpy arrays
    (they travel through the loader's pipe, not /dev/shm; `_collate` makes tensors of them again)."""
    request = caption_request(processor, prompt_text, decoded.image)
    return {key: value.numpy() if hasattr(value, "numpy") else value for key, value in request.items()}


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


class CaptionStage(Stage):
    name = "caption"
    reads = IMAGE
    artifact = None  # writes the record's `caption` field
    options = CaptionOptions
    model = ModelSpec(
        default=config.CAPTION_MODEL,
        help="Gemma 3 vision-language captioner, Hub id or folder",
        license="Gemma Terms of Use",
    )
    description = "captions for records that have none"

    def settings(self, opts) -> dict:
        own = self.stage_options(opts)
        return {
            "prompt_sha256": hashlib.sha256(own.caption_prompt.encode("utf-8")).hexdigest(),
            "max_new_tokens": own.caption_max_new_tokens,
        }

    def batch_size(self, opts, device) -> int:
        return self.stage_options(opts).caption_batch_size

    def batch_size_for(self, opts, device, pixels: int | None) -> int:
        return self.batch_size(opts, device)

    def load(self, model, *, device, dtype: str, opts) -> Captioner:
        own = self.stage_options(opts)
        return Captioner.load(
            model.source, device=device, dtype=dtype, prompt=own.caption_prompt,
            max_new_tokens=own.caption_max_new_tokens, trust_remote_code=opts.trust_remote_code,
            revision=model.load_revision,
        )

    def image_input(self, encoder: Captioner, bucket: str | None) -> ImageInput:
        return ImageInput(functools.partial(caption_input, encoder.processor, encoder.prompt_text))

    def encode(self, encoder: Captioner, items: list) -> list[Output]:
        captions = [c.strip() for c in encoder.caption_requests(items)]
        return [Output(fields={"caption": c}, error=None if c else "empty caption") for c in captions]

