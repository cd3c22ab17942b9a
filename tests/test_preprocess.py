"""Decoding every mode to RGB the way a viewer shows it, rejecting bad files, resize-to-cover."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prep import preprocess as pp
from prep.preprocess import (
    ImageDecodeError,
    cover_crop_box,
    load_bucket_crop,
    load_bucket_image,
    open_rgb,
    resize_to_cover,
    to_vae_pixels,
)
from prep.testing import synthetic_rgb


def _pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(synthetic_rgb(width, height, np.random.default_rng(seed)))


# --- modes ------------------------------------------------------------------------------------


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[0, 0] = (10, 20, 30, 0)  # fully transparent: white, whatever its colour
    pixels[0, 1] = (0, 0, 0, 128)  # half-transparent black: mid grey
    pixels[0, 2] = (200, 100, 50, 255)  # opaque: unchanged
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, mode="RGBA").save(path)

    image = open_rgb(path)

    assert image.mode == "RGB"
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in _pixel(image, (1, 0)))
    assert _pixel(image, (2, 0)) == (200, 100, 50)


def test_gray_alpha_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("LA", (3, 3), (40, 255))
    image.putpixel((0, 0), (40, 0))
    path = tmp_path / "la.png"
    image.save(path)

    decoded = open_rgb(path)

    assert _pixel(decoded, (0, 0)) == (255, 255, 255)
    assert _pixel(decoded, (1, 1)) == (40, 40, 40)


def test_palette_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    decoded = open_rgb(path)

    assert _pixel(decoded, (0, 0)) == (255, 255, 255)
    assert _pixel(decoded, (1, 1)) == (200, 30, 30)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")

    decoded = np.asarray(open_rgb(path))

    assert decoded.dtype == np.uint8
    assert decoded[0, :, 0].tolist() == [0, 100, 255, 128]
    assert (decoded[..., 0] == decoded[..., 2]).all()


def test_cmyk_jpeg_comes_back_as_its_colours(tmp_path: Path) -> None:
    original = _photo(64, 48)
    path = tmp_path / "cmyk.jpg"
    original.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"

    decoded = np.asarray(open_rgb(path), dtype=np.int16)

    assert decoded.shape == (48, 64, 3)
    assert np.abs(decoded - np.asarray(original, dtype=np.int16)).mean() < 8


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    _photo(30, 20).convert("L").save(path)

    decoded = np.asarray(open_rgb(path))

    assert decoded.shape == (20, 30, 3)
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()


def test_exif_orientation_6_is_rotated_upright(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left edge ends up on top
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    image = open_rgb(path)

    assert image.size == (20, 40)
    top, bottom = _pixel(image, (10, 5)), _pixel(image, (10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3

    image = open_rgb(path)

    red, green, blue = _pixel(image, (8, 8))
    assert red > 200 and green < 50 and blue < 50


def test_every_sample_image_decodes_to_rgb(sample_images: list[Path]) -> None:
    for path in sample_images:
        image = open_rgb(path)
        assert image.mode == "RGB", path.name
        image.tobytes()  # fully loaded: no lazy file access left


def test_open_rgb_releases_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _photo(8, 8).save(path)
    open_rgb(path)
    path.unlink()  # would fail on some systems if a handle were still open
    assert not path.exists()


# --- bad files --------------------------------------------------------------------------------


def _truncated_jpeg(path: Path) -> Path:
    full = path.with_name("full.jpg")
    _photo(200, 150).save(full, quality=95)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_bad_file",
    [
        pytest.param(lambda p: _written(p, b""), id="zero-byte"),
        pytest.param(lambda p: _written(p, b"this is not an image\n"), id="text-as-jpg"),
        pytest.param(lambda p: _written(p, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), id="corrupt"),
        pytest.param(_truncated_jpeg, id="truncated"),
        pytest.param(lambda p: p.with_name("missing.jpg"), id="missing"),
    ],
)
def test_unreadable_files_raise_image_decode_error(tmp_path: Path, make_bad_file) -> None:
    path = make_bad_file(tmp_path / "bad.jpg")

    with pytest.raises(ImageDecodeError) as caught:
        open_rgb(path)

    reason = str(caught.value)
    assert reason and "\n" not in reason and len(reason) <= 200
    with pytest.raises(ImageDecodeError):
        load_bucket_image(path, 32, 32)


def test_decompression_bomb_is_rejected_even_if_pillow_limit_is_off(tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 64 * 63)

    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        open_rgb(path)


def test_pillow_bomb_warning_is_an_error(tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 > 3000: Pillow only warns

    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        open_rgb(path)


def test_decode_error_pickles_for_dataloader_workers() -> None:
    error = pickle.loads(pickle.dumps(ImageDecodeError("broken PNG file")))
    assert str(error) == "broken PNG file"
    assert pickle.loads(pickle.dumps(load_bucket_image)) is load_bucket_image


# --- resize to cover --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "box"),
    [
        ((400, 200), (100, 100), (100, 0, 300, 200)),
        ((200, 400), (100, 100), (0, 100, 200, 300)),
        ((300, 200), (150, 100), (0, 0, 300, 200)),
        ((101, 100), (64, 64), (0, 0, 100, 100)),
        ((1000, 100), (64, 128), (475, 0, 525, 100)),
        ((50, 40), (256, 128), (0, 7, 50, 32)),
    ],
)
def test_cover_crop_box_is_the_centred_target_aspect(src, dst, box) -> None:
    assert cover_crop_box(*src, *dst) == box


def test_cover_crop_box_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError):
        cover_crop_box(0, 10, 8, 8)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 48), (48, 128), (256, 192)])
def test_resize_to_cover_gives_exact_size_and_centred_box(width: int, height: int) -> None:
    source = _photo(300, 180)

    crop, box = resize_to_cover(source, width, height)

    assert crop.size == (width, height) and crop.mode == "RGB"
    assert all(isinstance(v, int) for v in box)
    left, top, right, bottom = box
    assert left >= 0 and top >= 0 and right <= 300 and bottom <= 180
    assert abs(left - (300 - right)) <= 1 and abs(top - (180 - bottom)) <= 1
    assert abs((right - left) / (bottom - top) - width / height) < 0.02
    assert right - left == 300 or bottom - top == 180  # covers: one side is kept whole


def test_resize_to_cover_equals_crop_then_lanczos() -> None:
    source = _photo(640, 400, seed=3)

    crop, box = resize_to_cover(source, 128, 128)
    reference = source.crop(box).resize((128, 128), Image.Resampling.LANCZOS)

    diff = np.abs(np.asarray(crop, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 1.0


def test_resize_to_cover_keeps_the_centre() -> None:
    source = Image.new("RGB", (400, 200), (0, 0, 0))
    source.paste((255, 255, 255), (190, 90, 210, 110))  # white dot in the middle

    crop, _ = resize_to_cover(source, 100, 100)

    assert _pixel(crop, (50, 50)) == (255, 255, 255)
    assert _pixel(crop, (5, 5)) == (0, 0, 0)


def test_load_bucket_image_shapes_for_every_sample(sample_images: list[Path]) -> None:
    for path in sample_images:
        array = load_bucket_image(path, 64, 48)
        assert array.shape == (48, 64, 3) and array.dtype == np.uint8, path.name


def test_big_jpeg_draft_decode_matches_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    _photo(1603, 1201, seed=5).save(path, quality=92)
    full = open_rgb(path)
    reference, reference_box = resize_to_cover(full, 128, 96)

    array, box = load_bucket_crop(path, 128, 96)

    assert box == reference_box == cover_crop_box(1603, 1201, 128, 96)
    diff = np.abs(array.astype(np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 1.5


def test_big_jpeg_is_drafted_to_at_least_twice_the_target(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    _photo(1600, 1200).save(path)
    with Image.open(path) as image:
        pp._apply_jpeg_draft(image, image.size, (128, 96))
        image.load()
        assert image.size == (400, 300)  # 1/4 scale: still >= 2x the 128x96 target


def test_exif_rotated_big_jpeg_box_is_in_upright_pixels(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(1200, 800).save(path, exif=exif.tobytes())

    array, box = load_bucket_crop(path, 64, 96)

    assert array.shape == (96, 64, 3)
    assert box == cover_crop_box(800, 1200, 64, 96)
    reference, _ = resize_to_cover(open_rgb(path), 64, 96)
    assert np.abs(array.astype(np.int16) - np.asarray(reference, dtype=np.int16)).mean() < 1.5


# --- VAE pixels -------------------------------------------------------------------------------


def test_to_vae_pixels_maps_uint8_nhwc_to_nchw_minus_one_one() -> None:
    batch = np.zeros((2, 4, 6, 3), dtype=np.uint8)
    batch[0, 0, 0] = (0, 128, 255)

    pixels = to_vae_pixels(batch)

    assert pixels.shape == (2, 3, 4, 6) and pixels.dtype == torch.float32
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1.0, 1.0], abs=1e-6)
    assert pixels.is_contiguous()
    assert torch.equal(to_vae_pixels([batch[0], batch[1]]), pixels)


def test_to_vae_pixels_refuses_non_uint8() -> None:
    with pytest.raises(ValueError):
        to_vae_pixels(np.zeros((1, 4, 4, 3), dtype=np.float32))
