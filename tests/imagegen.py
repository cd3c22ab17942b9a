"""Small image-making helpers for the scan / header tests: every file is built here, none is checked in.

Each function writes one file and returns its path. Pixel content is seeded noise plus a
gradient, so JPEGs are neither trivially small nor identical.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 array: a smooth gradient with a little seeded noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    base = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    noise = rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pixels(width, height, seed), "RGB")


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_rgb(path: str | Path, width: int, height: int, seed: int = 0, **save_kwargs) -> Path:
    """An RGB image in the format its suffix names (jpg, png, webp, bmp, gif, tif)."""
    path = _prepare(path)
    image = rgb_image(width, height, seed)
    if path.suffix.lower() == ".gif":
        image = image.convert("P")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        save_kwargs.setdefault("quality", 90)
    image.save(path, **save_kwargs)
    return path


def save_gray(path: str | Path, width: int, height: int, seed: int = 0) -> Path:
    path = _prepare(path)
    rgb_image(width, height, seed).convert("L").save(path)
    return path


def save_rgba(path: str | Path, width: int, height: int, seed: int = 0) -> Path:
    path = _prepare(path)
    image = rgb_image(width, height, seed).convert("RGBA")
    alpha = np.linspace(0, 255, width * height, dtype=np.float32).reshape(height, width).astype(np.uint8)
    image.putalpha(Image.fromarray(alpha, "L"))
    image.save(path)
    return path


def save_palette(path: str | Path, width: int, height: int, seed: int = 0) -> Path:
    path = _prepare(path)
    rgb_image(width, height, seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path)
    return path


def save_cmyk_jpeg(path: str | Path, width: int, height: int, seed: int = 0) -> Path:
    path = _prepare(path)
    image = rgb_image(width, height, seed).convert("CMYK")
    assert image.mode == "CMYK"
    image.save(path, "JPEG", quality=90)
    return path


def save_png16(path: str | Path, width: int, height: int) -> Path:
    """A 16-bit grayscale PNG (mode I;16 when read back)."""
    path = _prepare(path)
    ramp = np.linspace(0, 65535, width * height, dtype=np.float64).reshape(height, width).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    return path


def save_exif_jpeg(path: str | Path, width: int, height: int, orientation: int, seed: int = 0) -> Path:
    """A JPEG stored as `width` x `height` whose EXIF orientation tag (0x0112) is `orientation`."""
    path = _prepare(path)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    rgb_image(width, height, seed).save(path, "JPEG", quality=90, exif=exif)
    return path


def save_animated_gif(path: str | Path, width: int, height: int, frames: int = 3) -> Path:
    path = _prepare(path)
    images = [rgb_image(width, height, seed).convert("P") for seed in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)
    return path


def save_truncated(path: str | Path, width: int = 256, height: int = 192, keep: float = 0.5) -> Path:
    """A valid image (format from the suffix) cut to `keep` of its bytes."""
    path = _prepare(path)
    save_rgb(path, width, height)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def save_jpeg_with_trailer(path: str | Path, width: int, height: int, trailer_bytes: int = 20_000) -> Path:
    """A complete JPEG followed by extra bytes after its EOI (like a phone's 'motion photo' video)."""
    path = _prepare(path)
    save_rgb(path, width, height)
    rng = np.random.default_rng(1)
    trailer = b"ftypmp42" + rng.integers(0, 255, trailer_bytes, dtype=np.uint8).tobytes().replace(b"\xff", b"\x00")
    with open(path, "ab") as f:
        f.write(trailer)
    return path


def save_zero_bytes(path: str | Path) -> Path:
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def save_text_as_image(path: str | Path) -> Path:
    path = _prepare(path)
    path.write_text("this is not an image, only text with an image suffix\n", encoding="utf-8")
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR claims `width` x `height` (8-bit gray) but whose IDAT is tiny."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def save_bomb_png(path: str | Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A decompression-bomb PNG: a hand-made header claiming 100000 x 100000 pixels, a few bytes long."""
    path = _prepare(path)
    path.write_bytes(png_bytes_claiming(width, height))
    return path
