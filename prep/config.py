"""Settings and defaults in one place: model ids, artifact shapes, paths.

Every other module reads its defaults from here so a user can find (and a test can
override) any constant without hunting through the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 2

DEFAULT_MANIFEST = Path("data/manifest.jsonl")
DEFAULT_OUTPUT_BASE_DIR = Path("data/derived")
DEFAULT_SHARDS_DIR = Path("data/shards")
DEFAULT_MIN_FREE_GB = 20.0

# Default models (Hub ids; every one may be replaced by a local directory).
VAE_MODEL = "black-forest-labs/FLUX.1-dev"
VAE_SUBFOLDER = "vae"
T5_MODEL = "google-t5/t5-large"
DINOV3_MODEL = "facebook/dinov3-vitl16-pretrain-lvd1689m"
CAPTION_MODEL = "google/gemma-3-4b-it"
CAPTION_PROMPT = (
    "Describe this image in one detailed sentence for a text-to-image training caption. "
    "Mention the subject, setting, style and lighting. Answer with the caption only."
)
CAPTION_MAX_NEW_TOKENS = 77

# Artifact shapes (the training format; tests keep these real dims with tiny models).
T5_MAX_LENGTH = 77
T5_HIDDEN_DIM = 1024
DINOV3_DIM = 1024
VAE_LATENT_CHANNELS = 16
VAE_DOWNSCALE = 8

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

PASSES = ("migrate", "caption", "t5", "dinov3", "vae")
PASS_CHOICES = ("all", *PASSES)


@dataclass
class ModelConfig:
    """Which models the encoder passes use and how they run."""

    vae_model: str = VAE_MODEL
    vae_subfolder: str | None = VAE_SUBFOLDER
    t5_model: str = T5_MODEL
    dinov3_model: str = DINOV3_MODEL
    caption_model: str = CAPTION_MODEL
    caption_prompt: str = CAPTION_PROMPT
    caption_max_new_tokens: int = CAPTION_MAX_NEW_TOKENS
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 (never float16: Flux VAE and T5 overflow)
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)
