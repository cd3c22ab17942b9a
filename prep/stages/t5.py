"""T5 stage: a caption -> T5-Large encoder hidden states (77, 1024) float16 and its attention mask.

The mask is computed by the tokenizer alone, so a run that only needs masks (cheap) never
loads the model; hidden states are computed in bf16/fp32 and cast to fp16 at the end.
"""

from __future__ import annotations

import numpy as np

from prep import config
from prep.stages.base import CAPTION, Artifact, Encoder, ModelSpec, Output, Stage, to_eval

ARTIFACT = Artifact(
    kind="t5",
    folder="t5_hidden",
    member="t5h.npy",
    column="t5_hidden",
    dtype=np.dtype(np.float16),
    shape=lambda record: (config.T5_MAX_LENGTH, config.T5_HIDDEN_DIM),
    description="T5 encoder last hidden state of the caption, (77, 1024)",
)
MASK = Artifact(
    kind="t5_mask",
    folder=None,
    member="t5m.npy",
    column="t5_mask",
    dtype=np.dtype(np.uint8),
    shape=lambda record: (config.T5_MAX_LENGTH,),
    description="T5 attention mask of the caption (1 = real token), (77,)",
    record_field="t5_attention_mask",
    collate_dtype="bool",
)


class T5Encoder(Encoder):
    """A T5 tokenizer and (optionally) its encoder stack."""

    def __init__(self, tokenizer, model, *, model_id: str, device, dtype, max_length: int = config.T5_MAX_LENGTH):
        super().__init__(model, device=device, dtype=dtype, model_id=model_id)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def load(
        cls, model_id: str, *, device: str = "auto", dtype: str = "auto", max_length: int = config.T5_MAX_LENGTH,
        revision: str | None = None,
    ) -> T5Encoder:
        """`AutoTokenizer` + `T5EncoderModel.from_pretrained` (only the encoder weights are used)."""
        from transformers import T5EncoderModel

        from prep.models import resolve_device, resolve_dtype

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        tokenizer = load_t5_tokenizer(model_id, revision=revision)
        model = T5EncoderModel.from_pretrained(model_id, dtype=torch_dtype, **({"revision": revision} if revision else {}))
        return cls(tokenizer, to_eval(model, torch_device), model_id=model_id, device=torch_device, dtype=torch_dtype,
                   max_length=max_length)

    @classmethod
    def load_tokenizer_only(cls, model_id: str, *, max_length: int = config.T5_MAX_LENGTH) -> T5Encoder:
        """Masks without the model: a few MB and no GPU instead of a 1.4 GB encoder."""
        import torch

        return cls(load_t5_tokenizer(model_id), None, model_id=model_id, device=torch.device("cpu"),
                   dtype=torch.float32, max_length=max_length)

    def tokenize(self, captions: list[str]) -> dict:
        """Fixed-length batch: the training format stores exactly max_length positions."""
        return self.tokenizer(
            list(captions), max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        )

    def attention_masks(self, captions: list[str]) -> list[list[int]]:
        """One 0/1 list of length max_length per caption (tokenizer only)."""
        return self.tokenize(captions)["attention_mask"].tolist()

    def encode(self, captions: list[str]) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
        """Hidden states (B, max_length, d_model) float16, masks, and a per-item finite flag.

        Non-finite covers inf/NaN in the compute dtype and values that overflow the fp16 cast.
        """
        import torch

        from prep.models import finite_rows

        if self.model is None:
            raise RuntimeError("T5Encoder was loaded without its model (load_tokenizer_only)")
        batch = self.tokenize(captions)
        with torch.inference_mode():
            hidden = self.model(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
            ).last_hidden_state
            stored = hidden.to(torch.float16)
            finite = finite_rows(hidden) & finite_rows(stored)
            return stored.cpu().numpy(), batch["attention_mask"].tolist(), finite


def load_t5_tokenizer(model_id: str, revision: str | None = None):
    """`AutoTokenizer.from_pretrained` (T5 has no remote code, so none is trusted)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_id, **({"revision": revision} if revision else {}))


class T5Stage(Stage):
    name = "t5"
    reads = CAPTION
    artifact = ARTIFACT
    fields_column = "mask_ok"
    model = ModelSpec(default=config.T5_MODEL, help="T5 encoder, Hub id or folder", license="Apache-2.0")
    description = "T5-Large hidden states and attention masks of the captions"

    def settings(self, opts) -> dict:
        return {"max_length": config.T5_MAX_LENGTH}

    def batch_size(self, opts, device) -> int:
        return opts.text_batch_size

    def load(self, model, *, device, dtype: str, opts) -> T5Encoder:
        return T5Encoder.load(model.source, device=device, dtype=dtype, revision=model.load_revision)

    def finish(self, *, opts, model, device, config: dict) -> dict:
        """After the pass (main rank): the empty caption's T5 state, made again when T5 changed."""
        from prep.store import read_metadata

        if uncond_is_current(read_metadata(opts.derived_dir).get("uncond"), opts.derived_dir, config):
            return {}
        encoder = self.load(model, device=device, dtype=opts.dtype, opts=opts)
        try:
            return {"uncond": write_uncond(encoder, opts.derived_dir, {**config, "dtype": str(encoder.dtype)})}
        finally:
            encoder.unload()

    def encode(self, encoder: T5Encoder, items: list[str]) -> list[Output]:
        arrays, masks, finite = encoder.encode(items)
        return [
            Output(
                array=np.array(array),
                fields={"t5_attention_mask": [int(v) for v in mask]},
                error=None if ok else "non-finite output",
            )
            for array, mask, ok in zip(arrays, masks, finite, strict=True)
        ]


# ------------------------------------------------------------------ the unconditional state
UNCOND_FILE = "t5_uncond.safetensors"


def uncond_is_current(entry: dict | None, derived_dir, config: dict) -> bool:
    """Whether prep_metadata.json's `uncond` entry was made by this T5 configuration and its file is intact."""
    from pathlib import Path

    from prep.provenance import bytes_sha256, config_stale_reason

    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        return False
    if config_stale_reason(entry["config"], config) is not None:
        return False
    path = Path(derived_dir) / UNCOND_FILE
    try:
        return bytes_sha256(path.read_bytes()) == entry.get("sha256")
    except OSError:
        return False


def write_uncond(encoder: T5Encoder, derived_dir, config: dict) -> dict:
    """The T5 state of the empty caption (classifier-free guidance), saved beside the side files.

    Returns the prep_metadata.json entry: the file, its sha256, the caption ("") and the
    configuration that made it (it goes stale, and is made again, when T5 changes).
    """
    from pathlib import Path

    from safetensors.numpy import save

    from prep.fsio import atomic_write_bytes
    from prep.provenance import bytes_sha256

    hidden, masks, finite = encoder.encode([""])
    if not finite[0]:
        raise ValueError("the T5 state of the empty caption is not finite")
    data = save({"t5_hidden": np.ascontiguousarray(hidden[0]), "t5_mask": np.asarray(masks[0], dtype=np.uint8)})
    atomic_write_bytes(Path(derived_dir) / UNCOND_FILE, data)
    return {"path": UNCOND_FILE, "sha256": bytes_sha256(data), "caption": "", "config": config}
