"""Tiny random models of the real classes, and generated test images.

Tests and smoke runs need every model offline and fast, yet the production code must load
them through the same `from_pretrained` path as the real checkpoints. So each tiny model is
an instance of the real architecture (Flux-configured AutoencoderKL, T5EncoderModel,
DINOv3ViTModel, Gemma3ForConditionalGeneration) with the real output dimensions, random
weights, and a tokenizer trained here on a few sentences; all saved with `save_pretrained`.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from prep import config

TINY_MODELS_VERSION = 1
TINY_MODELS_MARKER = ".tiny-models.json"
MODEL_NAMES = ("vae", "t5", "dinov3", "captioner")

# Caption-like sentences: the tokenizers are trained on them and tests may encode them.
TEST_CAPTIONS = (
    "a photo of a red cat sitting on a wooden table",
    "a watercolor painting of mountains at sunset, warm light",
    "close-up of a bowl of fruit in soft morning light",
    "an old stone bridge over a river in the fog",
    "a city street at night with neon signs and rain",
    "portrait of a woman in a blue coat, studio lighting",
    "a small boat on a calm lake under a cloudy sky",
    "pencil sketch of a dog running on the beach",
    "a bright kitchen with white cabinets and green plants",
    "aerial view of a forest road in autumn colors",
    "a macro shot of a bee on a yellow flower",
    "a snowy village with lit windows at dusk",
)

# The real facebook/dinov3-vitl16-pretrain-lvd1689m preprocessor_config.json, content for content.
DINOV3_PREPROCESSOR_CONFIG = {
    "crop_size": None,
    "data_format": "channels_first",
    "default_to_square": True,
    "device": None,
    "disable_grouping": None,
    "do_center_crop": None,
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225],
    "input_data_format": None,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "return_tensors": None,
    "size": {"height": 224, "width": 224},
}

# Gemma 3's chat template reduced to what a caption request uses: turns, text and images.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# Tiny sizes. Output dims stay real (16 latent channels, 1024-d T5 and DINOv3); the rest is small.
_VAE_BLOCK_OUT_CHANNELS = (8, 16, 32, 32)
_CAPTIONER_IMAGE_SIZE = 32
_CAPTIONER_PATCH_SIZE = 8
_CAPTIONER_TOKENS_PER_IMAGE = 4  # a square whose root divides image_size / patch_size


# --- tiny models ------------------------------------------------------------------------------


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write vae/, t5/, dinov3/ and captioner/ under out_dir; reuse them when already there.

    A marker file written last records the seed and version, so an interrupted build is
    redone and a finished one costs nothing the second time.
    """
    out = Path(out_dir)
    paths = {name: out / name for name in MODEL_NAMES}
    if _tiny_models_complete(out, seed):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    (out / TINY_MODELS_MARKER).unlink(missing_ok=True)  # a half-rebuilt set must never look complete
    builders = {
        "vae": _save_tiny_vae,
        "t5": _save_tiny_t5,
        "dinov3": _save_tiny_dinov3,
        "captioner": _save_tiny_captioner,
    }
    for offset, (name, build) in enumerate(builders.items()):
        with _seeded_torch(seed * 1000 + offset):
            build(paths[name])
    marker = {"version": TINY_MODELS_VERSION, "seed": seed, "models": list(MODEL_NAMES)}
    (out / TINY_MODELS_MARKER).write_text(json.dumps(marker) + "\n")
    return paths


def _tiny_models_complete(out: Path, seed: int) -> bool:
    marker = out / TINY_MODELS_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        recorded.get("version") == TINY_MODELS_VERSION
        and recorded.get("seed") == seed
        and all((out / name / "config.json").is_file() for name in MODEL_NAMES)
    )


@contextmanager
def _seeded_torch(seed: int) -> Iterator[None]:
    """Seed the weight init without disturbing the caller's global RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save_tiny_vae(path: Path) -> None:
    """AutoencoderKL in the Flux configuration (16 latent channels, no quant convs), tiny widths."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=config.VAE_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(path)


def _save_tiny_t5(path: Path) -> None:
    """T5EncoderModel with d_model 1024 (the real T5-Large width), one layer, and its tokenizer."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = _train_t5_tokenizer()
    model_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=config.T5_HIDDEN_DIM,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5EncoderModel(model_config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _train_t5_tokenizer():
    """A Unigram tokenizer in T5's layout: <pad>=0, </s>=1, <unk>=2, pieces with '▁'."""
    from transformers import T5Tokenizer

    return T5Tokenizer(
        vocab=_unigram_vocab(TEST_CAPTIONS), extra_ids=0, model_max_length=config.T5_MAX_LENGTH
    )


def _unigram_vocab(sentences: Sequence[str]) -> list[tuple[str, float]]:
    """Unigram pieces with log-frequency scores: the corpus words, plus single characters.

    Counted here rather than by the `tokenizers` Unigram trainer, whose scores vary in the
    last bits from run to run (hash-map order) and then reorder tied pieces: ids must not.
    """
    words = Counter(word for sentence in sentences for word in sentence.split())
    chars = Counter(char for sentence in sentences for char in sentence if not char.isspace())
    chars.update(string.ascii_letters + string.digits + string.punctuation)  # any ASCII caption
    total_words, total_chars = sum(words.values()), sum(chars.values())
    pieces = [("▁" + word, math.log(count / total_words)) for word, count in words.items()]
    pieces += [(char, math.log(count / total_chars) - 10.0) for char, count in chars.items()]
    pieces.append(("▁", -2.0))
    pieces.sort(key=lambda piece: (-piece[1], piece[0]))
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]


def _save_tiny_dinov3(path: Path) -> None:
    """DINOv3ViTModel with hidden size 1024 (ViT-L width), one layer, and the real preprocessor config."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    model_config = DINOv3ViTConfig(
        hidden_size=config.DINOV3_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16,
        patch_size=16,
        image_size=224,
        num_register_tokens=4,
        layerscale_value=1.0,  # the real 1e-5 would make a random model ignore its input
    )
    DINOv3ViTModel(model_config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR_CONFIG, indent=2) + "\n")


def _save_tiny_captioner(path: Path) -> None:
    """Gemma3ForConditionalGeneration (tiny Gemma3 text + SigLIP vision) and its Gemma3Processor."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )

    processor = _build_gemma3_processor()
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=256,  # longer than any test prompt + caption: batched == single
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=_CAPTIONER_IMAGE_SIZE,
        patch_size=_CAPTIONER_PATCH_SIZE,
    )
    model_config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=_CAPTIONER_TOKENS_PER_IMAGE,
        boi_token_index=token_id("<start_of_image>"),
        eoi_token_index=token_id("<end_of_image>"),
        image_token_index=token_id("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(model_config)
    with torch.no_grad():  # it starts at zero, and then a random model ignores the image
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, token_id("<end_of_turn>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _build_gemma3_processor():
    """Gemma3Processor with a small BPE tokenizer carrying Gemma 3's turn and image specials."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, GemmaTokenizer

    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(GEMMA3_SPECIAL_TOKENS), show_progress=False
    )
    backend.train_from_iterator([config.CAPTION_PROMPT, *TEST_CAPTIONS], trainer)
    trained = json.loads(backend.to_str())["model"]
    tokenizer = GemmaTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        add_bos_token=True,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, replace_extra_special_tokens=False
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": _CAPTIONER_IMAGE_SIZE, "width": _CAPTIONER_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=_CAPTIONER_TOKENS_PER_IMAGE,
    )


# --- test images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """One generated test image: file name (its extension picks the format), stored size, mode.

    `orientation` writes that EXIF orientation tag (JPEG/PNG/WebP/TIFF); `frames` > 1 makes an
    animation (GIF/WebP/PNG).
    """

    name: str
    width: int
    height: int
    mode: str = "RGB"
    orientation: int | None = None
    frames: int = 1


DEFAULT_IMAGE_SPECS: tuple[ImageSpec, ...] = (
    ImageSpec("rgb_landscape.jpg", 256, 160),
    ImageSpec("rgb_portrait.jpg", 120, 200),
    ImageSpec("rgb_square.png", 128, 128),
    ImageSpec("gray.png", 100, 150, mode="L"),
    ImageSpec("rgba.png", 160, 120, mode="RGBA"),
    ImageSpec("palette_transparent.png", 96, 96, mode="P"),
    ImageSpec("gray_alpha.png", 80, 80, mode="LA"),
    ImageSpec("gray16.png", 90, 60, mode="I;16"),
    ImageSpec("cmyk.jpg", 140, 100, mode="CMYK"),
    ImageSpec("exif_rotated.jpg", 160, 96, orientation=6),
    ImageSpec("wide.webp", 256, 64),
    ImageSpec("tall.bmp", 64, 200),
    ImageSpec("animated.gif", 64, 64, mode="P", frames=3),
    ImageSpec("photo.tiff", 72, 108),
)


def make_test_images(
    out_dir: str | Path, specs: Sequence[ImageSpec] | None = None, seed: int = 0
) -> list[Path]:
    """Write generated images (gradients + shapes + noise, so every encoder sees distinct input).

    Deterministic from `seed`; the default set mixes sizes, aspects, formats and modes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, spec in enumerate(specs or DEFAULT_IMAGE_SPECS):
        rng = np.random.default_rng([seed, index])
        path = out / spec.name
        _write_image(path, spec, rng)
        written.append(path)
    return written


def synthetic_rgb(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (height, width, 3) picture: random-direction gradients, a bright box, noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * x / max(width, 1) + np.sin(angle) * y / max(height, 1)) * 0.5 + 0.5
        channels.append(ramp * rng.uniform(120, 255))
    picture = np.stack(channels, axis=-1)
    top, left = rng.integers(0, max(1, height // 2)), rng.integers(0, max(1, width // 2))
    picture[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, size=3)
    picture += rng.normal(0, 12, size=picture.shape)
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8)


def _write_image(path: Path, spec: ImageSpec, rng: np.random.Generator) -> None:
    frames = [_spec_frame(spec, rng) for _ in range(spec.frames)]
    save_kwargs = _save_kwargs(path, spec)
    if spec.frames > 1:
        save_kwargs.update(save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(path, **save_kwargs)


def _spec_frame(spec: ImageSpec, rng: np.random.Generator) -> Image.Image:
    """One frame in the spec's mode, with real use of that mode (alpha holes, 16-bit range...)."""
    rgb = synthetic_rgb(spec.width, spec.height, rng)
    image = Image.fromarray(rgb)
    if spec.mode == "RGB":
        return image
    if spec.mode == "L":
        return image.convert("L")
    if spec.mode in ("RGBA", "LA"):
        return _with_alpha(image, spec.mode)
    if spec.mode == "P":
        return _palette_with_transparency(image)
    if spec.mode == "I;16":
        return _sixteen_bit_gray(spec.width, spec.height, rng)
    if spec.mode == "CMYK":
        return image.convert("CMYK")
    return image.convert(spec.mode)


def _with_alpha(image: Image.Image, mode: str) -> Image.Image:
    """Alpha ramps left to right, and the top-left 8x8 corner is fully transparent."""
    width, height = image.size
    alpha = np.tile(np.linspace(64, 255, width), (height, 1)).astype(np.uint8)
    alpha[:8, :8] = 0
    converted = image.convert(mode)
    converted.putalpha(Image.fromarray(alpha))
    return converted


def _palette_with_transparency(image: Image.Image) -> Image.Image:
    """A palette image whose top-left 8x8 corner uses a transparent palette entry."""
    paletted = image.quantize(colors=63)
    pixels = np.array(paletted)
    pixels[:8, :8] = 63
    result = Image.fromarray(pixels, mode="P")
    palette = paletted.getpalette()[: 63 * 3] + [0, 0, 0]
    result.putpalette(palette)
    result.info["transparency"] = 63
    return result


def _sixteen_bit_gray(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A 16-bit gradient over the full 0..65535 range (clipping to 255 would saturate it)."""
    ramp = np.tile(np.linspace(0, 65535, width), (height, 1))
    values = np.clip(ramp + rng.normal(0, 500, size=ramp.shape), 0, 65535).astype(np.uint16)
    return Image.fromarray(values)


def _save_kwargs(path: Path, spec: ImageSpec) -> dict:
    kwargs: dict = {}
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = 92
    if spec.mode == "P" and path.suffix.lower() == ".gif":
        kwargs["transparency"] = 63
    if spec.orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = spec.orientation
        kwargs["exif"] = exif.tobytes()
    return kwargs


def model_flags(models: dict[str, Path], caption_max_new_tokens: int = 8) -> list[str]:
    """`prep run` flags pointing every model at the dirs `make_tiny_models` wrote."""
    return [
        "--vae-model", str(models["vae"]),
        "--t5-model", str(models["t5"]),
        "--dinov3-model", str(models["dinov3"]),
        "--caption-model", str(models["captioner"]),
        "--caption-max-new-tokens", str(caption_max_new_tokens),
    ]  # fmt: skip


def without_file_stamps(record: dict, *, keep_hash: bool = False) -> dict:
    """A record with its side files' stamps (or just their mtimes) removed, for comparing two runs.

    Two runs that write the same arrays differ only in the files' mtimes; runs whose arrays may
    differ in the last bits (another batch size or rank count) differ in the hashes too.
    """
    out = dict(record)
    prov = out.get("provenance")
    if isinstance(prov, dict):
        out["provenance"] = {kind: _strip_file(stamp, keep_hash) for kind, stamp in prov.items()}
    return out


def _strip_file(stamp, keep_hash: bool):
    if not isinstance(stamp, dict) or not isinstance(stamp.get("file"), dict):
        return stamp
    stamp = dict(stamp)
    if keep_hash:
        stamp["file"] = {k: v for k, v in stamp["file"].items() if k != "mtime_ns"}
    else:
        del stamp["file"]
    return stamp
