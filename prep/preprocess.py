"""Image decoding and resize-to-cover, shared by every pass that looks at pixels.

Everything here is pure CPU and made of top-level functions so it pickles into torch
DataLoader workers. One place decides how a file becomes 8-bit RGB (EXIF orientation,
alpha on white, 16-bit scaled rather than clipped, CMYK through its ICC profile) so the VAE,
DINOv3, the captioner and any report all see the same pixels.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from prep.fsio import NotARegularFile, open_regular
from prep.sources import SourceError, open_image

# Pillow's own default (about 89.5 MP). Checked here explicitly so a library that sets
# Image.MAX_IMAGE_PIXELS = None elsewhere in the process cannot switch bomb protection off.
MAX_IMAGE_PIXELS = 89_478_485

# A JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow draft) only while the decoded image
# still has at least this many pixels per output pixel, so LANCZOS keeps full quality.
DRAFT_OVERSAMPLE = 2.0

# Pillow resize(reducing_gap=...): an integer box-reduce before LANCZOS for big downscales.
# 3.0 is what Pillow documents as indistinguishable from a plain LANCZOS resize.
REDUCING_GAP = 3.0

# An image file read whole into memory (one read per image pass) may be at most this big;
# a bigger one is refused with a reason (Pillow's pixel limit stops real images well before).
MAX_FILE_BYTES = 1 << 30

WHITE = (255, 255, 255)

_EXIF_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_PILLOW_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    MemoryError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class ImageDecodeError(Exception):
    """The file cannot be turned into an RGB image; the message is a one-line reason."""


def open_rgb(path: str | Path, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode a file to a fully loaded 8-bit RGB image, upright as a viewer shows it.

    With `draft_to` (the size a model resizes to anyway) a big JPEG is decoded at a reduced
    DCT scale that still oversamples that size (see `_apply_jpeg_draft`): much faster.
    """
    return _decode(path, draft_to=draft_to).image


class Decoded(NamedTuple):
    """One decode of a file: what every stage's input is derived from."""

    image: Image.Image  # upright 8-bit RGB, possibly at a reduced JPEG draft scale; never mutate it
    original_size: tuple[int, int]  # upright full-resolution size
    scale: float  # decoded pixels per original pixel (1, 1/2, 1/4 or 1/8)


_Decoded = Decoded  # the name before it was public


class ImageSource:
    """One image file read once; its decodes cached by JPEG draft scale.

    Stages that share one image pass ask for their decode with their own `draft_to`; a decode
    is made only for a draft scale not made yet. Two requests that give the same scale give
    the same libjpeg call on the same bytes, so sharing that decode is exact: each stage gets
    the very pixels its own decode would have given (see `decode`). `decodes` counts decodes.
    """

    def __init__(self, data: bytes, name: str = "") -> None:
        self.data = data
        self.name = name
        self.decodes = 0
        self._cache: dict[float, Decoded | ImageDecodeError] = {}

    @classmethod
    def read(cls, path: str | Path) -> tuple[ImageSource, os.stat_result]:
        """Read a regular file whole (refusing FIFOs, devices and files over MAX_FILE_BYTES)."""
        try:
            with open_regular(path) as f:
                stat = os.fstat(f.fileno())
                if stat.st_size > MAX_FILE_BYTES:
                    raise ImageDecodeError(f"file of {stat.st_size} bytes is over the {MAX_FILE_BYTES} byte limit")
                data = f.read(MAX_FILE_BYTES + 1)
        except NotARegularFile as exc:
            raise ImageDecodeError(str(exc)) from exc
        except OSError as exc:
            raise ImageDecodeError(_reason(exc)) from exc
        if len(data) > MAX_FILE_BYTES:
            raise ImageDecodeError(f"file grew over the {MAX_FILE_BYTES} byte limit while read")
        return cls(data, str(path)), stat

    def decode(self, draft_to: tuple[int, int] | None = None) -> Decoded:
        """Upright RGB at the draft scale `draft_to` leads to (see `_apply_jpeg_draft`), decoded once."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(self.data)) as opened:
                    return self._decode_opened(opened, draft_to)
        except ImageDecodeError:
            raise
        except _PILLOW_ERRORS as exc:
            raise ImageDecodeError(_reason(exc)) from exc

    def _decode_opened(self, opened: Image.Image, draft_to: tuple[int, int] | None) -> Decoded:
        original_size, scale = _prepare_decode(opened, draft_to)
        cached = self._cache.get(scale)
        if isinstance(cached, ImageDecodeError):
            raise cached
        if cached is not None:
            return cached
        self.decodes += 1
        try:
            decoded = _load_decode(opened, original_size, scale)
        except ImageDecodeError as exc:
            self._cache[scale] = exc
            raise
        except _PILLOW_ERRORS as exc:
            self._cache[scale] = ImageDecodeError(_reason(exc))
            raise self._cache[scale] from exc
        self._cache[scale] = decoded
        return decoded


def cover_crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """The centred source region with the target aspect that a resize-to-cover keeps.

    Returned as integer (left, top, right, bottom) source pixels: resampling exactly this box
    to (dst_w, dst_h) is the resize-to-cover plus centre crop, and the box is the provenance.
    """
    _check_positive_size(src_w, src_h, "source")
    _check_positive_size(dst_w, dst_h, "target")
    if src_w * dst_h >= src_h * dst_w:  # source is wider than the target: crop the sides
        crop_w = min(src_w, max(1, round(src_h * dst_w / dst_h)))
        crop_h = src_h
    else:  # source is taller: crop top and bottom
        crop_w = src_w
        crop_h = min(src_h, max(1, round(src_w * dst_h / dst_w)))
    left = (src_w - crop_w) // 2
    top = (src_h - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def resize_to_cover(
    img: Image.Image,
    width: int,
    height: int,
    *,
    original_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale to cover (width, height) keeping aspect, centre-crop, LANCZOS antialiased.

    `original_size` is the full-resolution (post-EXIF) size when `img` was decoded at a
    reduced JPEG draft scale; the returned crop box is always in those original pixels.
    """
    orig_w, orig_h = original_size or img.size
    box = cover_crop_box(orig_w, orig_h, width, height)
    return _resample_box(img, box, (img.width / orig_w, img.height / orig_h), width, height), box


def load_bucket_crop(
    path: str | Path, width: int, height: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decode + resize-to-cover one file; uint8 (height, width, 3) and its crop box (provenance)."""
    return bucket_crop(_decode(path, draft_to=(width, height)), width, height)


def bucket_crop(decoded: Decoded, width: int, height: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize-to-cover + centre crop of a decode; uint8 (height, width, 3) and the crop box in original pixels."""
    box = cover_crop_box(*decoded.original_size, width, height)
    crop = _resample_box(decoded.image, box, (decoded.scale, decoded.scale), width, height)
    return np.asarray(crop, dtype=np.uint8).copy(), box


def load_bucket_image(path: str | Path, width: int, height: int) -> np.ndarray:
    """Decode + resize-to-cover one file to a uint8 (height, width, 3) array."""
    array, _ = load_bucket_crop(path, width, height)
    return array


def to_vae_pixels(batch: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1], the range the Flux VAE was trained on."""
    array = np.stack(batch) if isinstance(batch, list) else np.asarray(batch)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3), got {array.dtype} {array.shape}")
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).to(torch.float32)
    return (pixels / 127.5 - 1.0).contiguous()


def vae_pixel_table(device=None) -> torch.Tensor:
    """The 256 values `to_vae_pixels` maps uint8 to, as a float32 lookup table on `device`.

    Indexing it with uint8 pixels on a GPU gives bit for bit what `to_vae_pixels` computes on
    the CPU, while only the uint8 crop (a quarter of the bytes) crosses the bus.
    """
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    return to_vae_pixels(levels.permute(0, 2, 3, 1).numpy())[0, 0].reshape(256).to(device)


def _resample_box(
    img: Image.Image,
    box: tuple[int, int, int, int],
    scale: tuple[float, float],
    width: int,
    height: int,
) -> Image.Image:
    """LANCZOS-resample `box` (original pixels; `scale` = image px per original px) to (width, height)."""
    sx, sy = scale
    source_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return img.resize((width, height), Image.Resampling.LANCZOS, box=source_box, reducing_gap=REDUCING_GAP)


# --- decoding ---------------------------------------------------------------------------------


def _decode(path: str | Path, draft_to: tuple[int, int] | None) -> Decoded:
    """Decode to upright RGB, keeping the full-resolution size so crop boxes stay in original pixels.

    `path` is any locator (a file, a tar member, a dataset row): `prep.sources.open_image` reads it.

    With `draft_to` a big JPEG may be decoded at a reduced scale (see `_apply_jpeg_draft`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(str(path)) as f, Image.open(f) as opened:
                return _load_decode(opened, *_prepare_decode(opened, draft_to))
    except ImageDecodeError:
        raise
    except NotARegularFile as exc:
        raise ImageDecodeError(str(exc)) from exc
    except SourceError as exc:
        raise ImageDecodeError(f"source: {exc}"[:300]) from exc
    except _PILLOW_ERRORS as exc:
        raise ImageDecodeError(_reason(exc)) from exc


def _prepare_decode(opened: Image.Image, draft_to: tuple[int, int] | None) -> tuple[tuple[int, int], float]:
    """Checks and JPEG draft set-up before any pixel is decoded: (upright size, draft scale)."""
    _reject_bomb(opened.size)
    _select_first_frame(opened)
    original_size = _upright_size(opened)
    scale = _apply_jpeg_draft(opened, original_size, draft_to) if draft_to else 1.0
    return original_size, scale


def _load_decode(opened: Image.Image, original_size: tuple[int, int], scale: float) -> Decoded:
    opened.load()
    return Decoded(_to_rgb8(ImageOps.exif_transpose(opened)), original_size, scale)


def _reject_bomb(size: tuple[int, int]) -> None:
    """Refuse decompression bombs before decoding, whatever Image.MAX_IMAGE_PIXELS says."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"empty image size {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"decompression bomb: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")


def _select_first_frame(image: Image.Image) -> None:
    """Animated GIF/WebP/APNG and multi-page TIFF: the dataset uses the first frame."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)


def _apply_jpeg_draft(image: Image.Image, upright_size: tuple[int, int], target: tuple[int, int]) -> float:
    """Let libjpeg decode at 1/2..1/8 scale when that still oversamples the target 2x.

    About twice as fast for big photos going to small buckets, with a mean difference under
    half a grey level. Only JPEGs support draft; otherwise, or for an upscale, nothing
    changes. Returns decoded pixels per original pixel.
    """
    if image.format != "JPEG":
        return 1.0
    box = cover_crop_box(*upright_size, *target)
    needed = DRAFT_OVERSAMPLE * target[0] / (box[2] - box[0])  # decoded px needed per original px
    if needed > 0.5:
        return 1.0
    stored_w, stored_h = image.size
    drafted = image.draft(None, (math.ceil(stored_w * needed), math.ceil(stored_h * needed)))
    if drafted is None:
        return 1.0
    _, decoded_box = drafted  # (0, 0, stored_w / s, stored_h / s) for a 1/s decode
    return decoded_box[2] / stored_w


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation is applied (orientations 5-8 swap width and height)."""
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation tag, 1 when absent (unreadable EXIF fails later, in exif_transpose)."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except _PILLOW_ERRORS:
        return 1


def _reason(exc: BaseException) -> str:
    """A one-line reason from a Pillow exception (it names the problem, not the traceback)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {text}"[:200]
    return f"{type(exc).__name__}: {text}"[:200]


# --- mode conversion --------------------------------------------------------------------------


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, the way a person looking at the file would see it."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _scale_sixteen_bit(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    if mode == "F":
        return _scale_float(image)
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    return image.convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, as on a white page (black would invent dark edges)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_sixteen_bit(image: Image.Image) -> Image.Image:
    """16-bit gray (Pillow 'I;16*' or 'I') -> 8 bit by value/257; Pillow's convert would clip."""
    values = np.asarray(image).astype(np.int64)  # numpy honours I;16B's byte order
    eight_bit = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def _scale_float(image: Image.Image) -> Image.Image:
    """32-bit float gray: values in [0, 1] are scaled to 8 bit, anything else is clipped to 0..255."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the embedded ICC profile when there is one; Pillow's naive formula otherwise."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return image.convert("RGB")


def _check_positive_size(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} size must be positive, got {width}x{height}")
