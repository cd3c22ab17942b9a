"""Aspect buckets: a fixed set of (width, height) targets and the nearest-aspect rule.

Every image is scaled to cover its bucket and centre-cropped, so all latents of a bucket
share one shape and a training batch can be drawn from one bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Bucket = tuple[int, int]

ASPECT_BUCKETS: list[Bucket] = [
    (1024, 1024),
    (832, 1216),
    (1216, 832),
    (768, 1280),
    (1280, 768),
    (704, 1344),
    (1344, 704),
]

BUCKET_MULTIPLE = 16  # Flux packs 8x-downsampled latents in 2x2 patches.


def format_bucket(width: int, height: int) -> str:
    """(832, 1216) -> "832x1216"."""
    return f"{width}x{height}"


def parse_bucket(text: str) -> Bucket:
    """"832x1216" -> (832, 1216); ValueError with a one-line reason for anything else."""
    parts = str(text).strip().lower().split("x")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"bad bucket {text!r}: expected WxH, e.g. 1024x1024")
    width, height = int(parts[0]), int(parts[1])
    if width <= 0 or height <= 0 or width % BUCKET_MULTIPLE or height % BUCKET_MULTIPLE:
        raise ValueError(f"bad bucket {text!r}: sides must be positive multiples of {BUCKET_MULTIPLE}")
    return width, height


def parse_bucket_list(items: str | Iterable[str]) -> list[Bucket]:
    """Parse "1024x1024,832x1216" (or a list of such strings) into buckets, keeping order."""
    if isinstance(items, str):
        items = items.split(",")
    buckets = [parse_bucket(item) for raw in items for item in str(raw).split(",") if item.strip()]
    if not buckets:
        raise ValueError("empty bucket list")
    if len(set(buckets)) != len(buckets):
        raise ValueError("duplicate bucket in list")
    return buckets


def compute_aspect_ratio(width: int, height: int) -> float:
    """Width / height; raises ValueError for non-positive sizes."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    return width / height


def assign_aspect_bucket(width: int, height: int, buckets: Sequence[Bucket] = ASPECT_BUCKETS) -> str:
    """Closest bucket by aspect ratio, compared in log space (2:1 and 1:2 are equally far from 1:1).

    Ties go to the bucket with the larger area, then to the earlier one in the list, so the
    answer never depends on floating-point noise or set ordering.
    """
    log_aspect = math.log(compute_aspect_ratio(width, height))

    def distance(item: tuple[int, Bucket]) -> tuple[float, int, int]:
        index, (bw, bh) = item
        return (round(abs(math.log(bw / bh) - log_aspect), 12), -(bw * bh), index)

    _, (bw, bh) = min(enumerate(buckets), key=distance)
    return format_bucket(bw, bh)


def latent_shape(bucket: str, channels: int = 16, downscale: int = 8) -> tuple[int, int, int]:
    """Shape of the stored VAE latent for a bucket: (16, H/8, W/8)."""
    width, height = parse_bucket(bucket)
    return (channels, height // downscale, width // downscale)
