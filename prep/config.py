"""Settings and defaults in one place: model ids, artifact shapes, paths.

Every other module reads its defaults from here so a user can find (and a test can
override) any constant without hunting through the code.
"""

from __future__ import annotations

from pathlib import Path

FORMAT_VERSION = 2

DEFAULT_MANIFEST = Path("data/manifest.jsonl")
DEFAULT_DERIVED_DIR = Path("data/derived")
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

# Caption files beside the images are read up to this size (a caption, not a book).
MAX_CAPTION_FILE_BYTES = 64 * 1024
