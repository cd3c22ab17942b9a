"""The scan: which files count as images, their display size from the header alone, and their ids."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import imagegen as ig
import pytest
from PIL import Image, ImageFile

from prep.scan import (
    ImageHeader,
    assign_image_ids,
    hashed_id,
    iter_image_files,
    read_headers,
    read_image_header,
    relative_key,
    slugify,
)

SAFE = re.compile(r"[A-Za-z0-9_-]{1,100}")
HASHED = re.compile(r"[A-Za-z0-9_-]{1,80}-[0-9a-f]{8}")


# ----------------------------------------------------------------------------- iter_image_files


def test_iter_image_files_recursive_extensions_hidden_and_order(tmp_path):
    names = [
        "B.JPG", "a.jpg", "c.Jpeg", "d.png", "e.webp", "f.bmp", "g.gif", "h.tif", "i.TIFF", "j.PnG",
        "notes.txt", "README", "x.jpg.txt", "archive.tar.gz", "k.svg", "l.heic", ".hidden.jpg",
        "dir.jpg/k.png", "sub/z.png", "sub/.hidden.png", "sub/deeper/y.jpeg", ".cache/x.jpg",
        "sub/.git/objects/q.png",
    ]  # fmt: skip
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == [
        "B.JPG", "a.jpg", "c.Jpeg", "d.png", "e.webp", "f.bmp", "g.gif", "h.tif", "i.TIFF", "j.PnG",
        "dir.jpg/k.png", "sub/z.png", "sub/deeper/y.jpeg",
    ]  # fmt: skip
    assert all(p.is_file() for p in iter_image_files(tmp_path))  # "dir.jpg" itself is not an image
    assert list(iter_image_files(tmp_path)) == list(iter_image_files(str(tmp_path)))


def test_iter_image_files_order_does_not_depend_on_creation_order(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    for root, order in ((first, ["c", "a", "b"]), (second, ["b", "c", "a"])):
        for stem in order:
            (root / stem).mkdir(parents=True)
            (root / stem / f"{stem}.png").write_bytes(b"")
            (root / f"{stem}.jpg").write_bytes(b"")
    listing = [[p.relative_to(root).as_posix() for p in iter_image_files(root)] for root in (first, second)]
    assert listing[0] == listing[1] == ["a.jpg", "b.jpg", "c.jpg", "a/a.png", "b/b.png", "c/c.png"]


def test_iter_image_files_empty_and_missing(tmp_path):
    assert list(iter_image_files(tmp_path)) == []
    assert list(iter_image_files(tmp_path / "absent")) == []


# ----------------------------------------------------------------------------- read_image_header


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[Path, tuple[int, int] | None]]:
    """name -> (path, expected display size, or None for unreadable)."""
    d = tmp_path_factory.mktemp("headers")
    made = {
        "rgb_jpg": (ig.save_rgb(d / "rgb.jpg", 320, 240), (320, 240)),
        "rgb_png": (ig.save_rgb(d / "rgb.png", 123, 45), (123, 45)),
        "gray_png": (ig.save_gray(d / "gray.png", 64, 96), (64, 96)),
        "gray_jpg": (ig.save_gray(d / "gray.jpg", 96, 64), (96, 64)),
        "rgba_png": (ig.save_rgba(d / "rgba.png", 80, 60), (80, 60)),
        "palette_png": (ig.save_palette(d / "palette.png", 50, 70), (50, 70)),
        "cmyk_jpg": (ig.save_cmyk_jpeg(d / "cmyk.jpg", 150, 100), (150, 100)),
        "png16": (ig.save_png16(d / "deep16.png", 200, 100), (200, 100)),
        "webp": (ig.save_rgb(d / "pic.webp", 90, 30), (90, 30)),
        "bmp": (ig.save_rgb(d / "pic.bmp", 33, 44), (33, 44)),
        "tiff": (ig.save_rgb(d / "pic.tiff", 40, 20), (40, 20)),
        "gif": (ig.save_rgb(d / "pic.gif", 25, 35), (25, 35)),
        "animated_gif": (ig.save_animated_gif(d / "anim.gif", 48, 32), (48, 32)),
        "one_pixel": (ig.save_rgb(d / "one.png", 1, 1), (1, 1)),
        "one_by_5000": (ig.save_rgb(d / "tall.png", 1, 5000), (1, 5000)),
        "5000_by_one": (ig.save_rgb(d / "wide.jpg", 5000, 1), (5000, 1)),
        "jpeg_trailer": (ig.save_jpeg_with_trailer(d / "motion.jpg", 160, 120), (160, 120)),
        "truncated_jpg": (ig.save_truncated(d / "cut.jpg"), None),
        "truncated_png": (ig.save_truncated(d / "cut.png"), None),
        "zero_bytes": (ig.save_zero_bytes(d / "empty.jpg"), None),
        "text_jpg": (ig.save_text_as_image(d / "text.jpg"), None),
        "bomb_png": (ig.save_bomb_png(d / "bomb.png"), None),
        "missing": (d / "missing.jpg", None),
    }
    (d / "folder.png").mkdir()
    made["directory"] = (d / "folder.png", None)
    return made


READABLE = [
    "rgb_jpg", "rgb_png", "gray_png", "gray_jpg", "rgba_png", "palette_png", "cmyk_jpg", "png16", "webp",
    "bmp", "tiff", "gif", "animated_gif", "one_pixel", "one_by_5000", "5000_by_one", "jpeg_trailer",
]  # fmt: skip
UNREADABLE = ["truncated_jpg", "truncated_png", "zero_bytes", "text_jpg", "bomb_png", "missing", "directory"]


def test_fixture_images_are_what_they_claim(images):
    with Image.open(images["cmyk_jpg"][0]) as img:
        assert img.mode == "CMYK"
    with Image.open(images["png16"][0]) as img:
        assert img.mode.startswith("I")
    with Image.open(images["palette_png"][0]) as img:
        assert img.mode == "P"
    with Image.open(images["rgba_png"][0]) as img:
        assert img.mode == "RGBA"
    with Image.open(images["animated_gif"][0]) as img:
        assert img.n_frames == 3
    assert images["bomb_png"][0].stat().st_size < 200
    assert images["truncated_jpg"][0].read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.parametrize("name", READABLE)
def test_read_header_of_readable_images(images, name):
    path, size = images[name]
    header = read_image_header(path)
    assert header == ImageHeader(Path(path), width=size[0], height=size[1], error=None)


@pytest.mark.parametrize("name", UNREADABLE)
def test_read_header_of_unreadable_files_gives_one_line_error(images, name):
    path, _ = images[name]
    header = read_image_header(path)
    assert header.error, name
    assert "\n" not in header.error and len(header.error) < 300
    assert (header.width, header.height) == (0, 0)
    assert header.path == Path(path)


def test_unreadable_reasons_are_specific(images):
    assert read_image_header(images["zero_bytes"][0]).error == "empty file"
    assert read_image_header(images["text_jpg"][0]).error == "not a recognised image"
    assert read_image_header(images["truncated_jpg"][0]).error == "truncated file"
    assert "truncated" in read_image_header(images["truncated_png"][0]).error.lower()
    assert read_image_header(images["bomb_png"][0]).error.startswith("decompression bomb")
    assert read_image_header(str(images["missing"][0])).error.startswith("unreadable")


def test_bomb_limit_is_the_decoders_and_pillow_errors_are_caught(tmp_path, monkeypatch):
    """The scan refuses what the decoder would refuse (one limit), and Pillow's own error too."""
    import prep.scan as scan_module

    monkeypatch.setattr(scan_module, "MAX_IMAGE_PIXELS", 1000)
    over = ig.save_rgb(tmp_path / "over.png", 40, 40)  # 1600 px > our limit
    fine = ig.save_rgb(tmp_path / "fine.png", 30, 30)
    assert read_image_header(over).error.startswith("decompression bomb")
    assert read_image_header(fine) == ImageHeader(fine, 30, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow raises above 2x its own limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_image_header(over).error.startswith("decompression bomb")


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.95, 0.999])
def test_truncated_at_any_point(tmp_path, keep):
    for suffix in (".jpg", ".png"):
        path = ig.save_truncated(tmp_path / f"cut{suffix}", 400, 300, keep=keep)
        assert read_image_header(path).error, (suffix, keep)


def _with_app15(jpeg: bytes, payload: bytes) -> bytes:
    segment = b"\xff\xef" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def test_jpeg_with_data_after_eoi_and_an_embedded_thumbnail(tmp_path):
    """An EOI inside a header segment (an embedded thumbnail) proves nothing; data after the real EOI is fine."""
    thumbnail = ig.save_rgb(tmp_path / "thumb.jpg", 8, 8).read_bytes()
    assert thumbnail.endswith(b"\xff\xd9")
    full = _with_app15(ig.save_rgb(tmp_path / "big.jpg", 400, 300).read_bytes(), b"THUMB\x00" + thumbnail)
    trailer = ig.save_jpeg_with_trailer(tmp_path / "t.jpg", 8, 8).read_bytes()[len(thumbnail):]
    assert len(trailer) > 4096 and b"\xff" not in trailer
    cases = {
        "complete.jpg": (full, (400, 300)),
        "complete_plus_video.jpg": (full + trailer, (400, 300)),
        "cut.jpg": (full[: len(full) // 2], None),
        "cut_plus_junk.jpg": (full[: len(full) // 2] + trailer, None),
    }
    for name, (data, size) in cases.items():
        (tmp_path / name).write_bytes(data)
        header = read_image_header(tmp_path / name)
        if size is None:
            assert header.error == "truncated file", name
        else:
            assert (header.width, header.height, header.error) == (*size, None), name


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation(tmp_path, orientation):
    path = ig.save_exif_jpeg(tmp_path / f"o{orientation}.jpg", 300, 200, orientation)
    with Image.open(path) as img:
        assert img.size == (300, 200) and img.getexif()[0x0112] == orientation
    header = read_image_header(path)
    assert header.error is None
    expected = (200, 300) if orientation >= 5 else (300, 200)
    assert (header.width, header.height) == expected


def test_exif_orientation_in_png_and_webp(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    png = tmp_path / "rot.png"
    ig.rgb_image(300, 200).save(png, exif=exif)
    webp = tmp_path / "rot.webp"
    ig.rgb_image(300, 200).save(webp, exif=exif)
    for path in (png, webp):
        header = read_image_header(path)
        assert (header.width, header.height, header.error) == (200, 300, None), path.name


def test_header_read_decodes_no_pixels(images, monkeypatch):
    """The scan reads headers only: no format may fully decode its pixels."""
    calls = []
    original = ImageFile.ImageFile.load

    def spying_load(self):
        calls.append(self.format)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spying_load)
    for name in ("rgb_jpg", "rgb_png", "rgba_png", "palette_png", "png16", "cmyk_jpg", "one_by_5000", "bmp"):
        assert read_image_header(images[name][0]).error is None
    assert calls == []


def test_read_header_never_raises_on_odd_input(tmp_path):
    bad_crc = bytearray(ig.save_rgb(tmp_path / "ok.png", 20, 20).read_bytes())
    bad_crc[29] ^= 0xFF  # inside the IHDR CRC
    (tmp_path / "crc.png").write_bytes(bytes(bad_crc))
    only_magic = tmp_path / "magic.png"
    only_magic.write_bytes(b"\x89PNG\r\n\x1a\n")
    soi_only = tmp_path / "soi.jpg"
    soi_only.write_bytes(b"\xff\xd8\xff")
    garbage_exif = tmp_path / "exif.jpg"
    jpeg = ig.save_rgb(tmp_path / "base.jpg", 20, 20).read_bytes()
    app1 = b"Exif\x00\x00" + b"\x13" * 40
    garbage_exif.write_bytes(jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg[2:])
    for path in (tmp_path / "crc.png", only_magic, soi_only, garbage_exif):
        header = read_image_header(path)  # must not raise
        assert isinstance(header, ImageHeader)
        assert header.error is None or "\n" not in header.error
    assert read_image_header(only_magic).error
    assert read_image_header(soi_only).error


def test_non_utf8_file_name_is_reported_not_scanned(tmp_path):
    """A name that is not UTF-8 cannot go into the JSON manifest; the scan reports it instead."""
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    try:
        with open(raw, "wb") as f:
            f.write(ig.png_bytes_claiming(4, 4))
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    ig.save_rgb(raw.decode("utf-8", "surrogateescape"), 10, 10)
    [path] = list(iter_image_files(tmp_path))
    header = read_image_header(path)
    assert header.error and "UTF-8" in header.error


def test_read_headers_keeps_input_order(images):
    names = READABLE + UNREADABLE
    paths = [images[name][0] for name in names]
    headers = list(read_headers(paths, workers=4))
    assert [h.path for h in headers] == [Path(p) for p in paths]
    assert [h.error is None for h in headers] == [name in READABLE for name in names]
    assert headers == [read_image_header(p) for p in paths]
    assert list(read_headers([], workers=0)) == []


# ----------------------------------------------------------------------------- ids


def test_safe_unique_stems_are_kept():
    keys = ["cat.jpg", "sub/dog_2.png", "a/b/Photo-01.webp", "x" * 100 + ".png"]
    assert assign_image_ids(keys) == ["cat", "dog_2", "Photo-01", "x" * 100]


def test_unsafe_stems_get_slug_and_hash():
    keys = ["my photo.jpg", "img.v2.final.png", "café.jpg", "日本語.png", "a b/c d.jpg", "x" * 101 + ".jpg"]
    ids = assign_image_ids(keys)
    assert ids[0] == "my_photo-" + hashed_id("my photo", "my photo.jpg").split("-")[-1]
    assert ids[0].startswith("my_photo-")
    assert ids[1].startswith("img_v2_final-")
    assert ids[2].startswith("cafe-")
    assert ids[3].startswith("img-")
    assert ids[4].startswith("c_d-")
    assert ids[5].startswith("x" * 80 + "-") and len(ids[5]) == 89
    for image_id in ids:
        assert HASHED.fullmatch(image_id), image_id
        assert SAFE.fullmatch(image_id) and "." not in image_id
    assert len(set(ids)) == len(ids)


def test_same_stem_in_two_folders_and_with_two_extensions():
    keys = ["a/cat.jpg", "b/cat.jpg", "dog.jpg", "dog.png", "solo.jpg"]
    ids = assign_image_ids(keys)
    assert ids[4] == "solo"
    for image_id in ids[:4]:
        assert HASHED.fullmatch(image_id)
    assert ids[0].startswith("cat-") and ids[1].startswith("cat-")
    assert ids[2].startswith("dog-") and ids[3].startswith("dog-")
    assert len(set(ids)) == 5


def test_ids_are_deterministic_and_hash_depends_on_key_only():
    keys = ["a/cat.jpg", "b/cat.jpg", "my photo.jpg"]
    assert assign_image_ids(keys) == assign_image_ids(list(keys))
    reordered = assign_image_ids(list(reversed(keys)))
    assert reordered == list(reversed(assign_image_ids(keys)))
    assert hashed_id("my photo", "my photo.jpg") == hashed_id("my photo", "my photo.jpg")
    assert hashed_id("my photo", "my photo.jpg") != hashed_id("my photo", "other/my photo.jpg")


def test_taken_ids_are_never_reused():
    taken = {"cat", "dog"}
    ids = assign_image_ids(["new/cat.jpg", "dog.png", "emu.jpg"], taken=taken)
    assert ids[0] != "cat" and ids[0].startswith("cat-")
    assert ids[1] != "dog" and ids[1].startswith("dog-")
    assert ids[2] == "emu"
    assert taken == {"cat", "dog"}  # the caller's set is not modified
    assert not set(ids) & taken


def test_taken_hashed_id_gets_another_one():
    first = hashed_id("my photo", "my photo.jpg")
    [image_id] = assign_image_ids(["my photo.jpg"], taken={first})
    assert image_id != first and HASHED.fullmatch(image_id)
    assert image_id.startswith("my_photo-")


def test_safe_stem_equal_to_another_files_hashed_id():
    """A file literally named like another file's hashed id must not collide with it."""
    hashed = hashed_id("my photo", "my photo.jpg")
    for keys in (["my photo.jpg", f"{hashed}.jpg"], [f"{hashed}.jpg", "my photo.jpg"]):
        ids = assign_image_ids(keys)
        assert len(set(ids)) == 2, keys
        assert all(SAFE.fullmatch(i) for i in ids)


def test_many_colliding_names_are_unique():
    keys = [f"d{i}/img.jpg" for i in range(500)] + [f"x{i}.jpg" for i in range(500)]
    ids = assign_image_ids(keys, taken={"x3", "x4"})
    assert len(set(ids)) == 1000
    assert all(SAFE.fullmatch(i) for i in ids)
    assert "x3" not in ids and "x5" in ids


def test_slugify():
    assert slugify("my photo (1)") == "my_photo_1"
    assert slugify("Crème Brûlée") == "Creme_Brulee"
    assert slugify("日本語") == "img"
    assert slugify("...") == "img"
    assert slugify("a" * 300) == "a" * 80
    assert slugify("keep-this_one") == "keep-this_one"


def test_relative_key(tmp_path):
    root = tmp_path / "images"
    assert relative_key(root / "a" / "b c.jpg", root) == "a/b c.jpg"
    outside = tmp_path / "elsewhere" / "x.jpg"
    assert relative_key(outside, root) == outside.as_posix()


def test_scan_to_ids_end_to_end(tmp_path):
    ig.save_rgb(tmp_path / "a" / "cat.jpg", 64, 48)
    ig.save_rgb(tmp_path / "b" / "cat.jpg", 48, 64, seed=1)
    ig.save_rgb(tmp_path / "dog.jpg", 32, 32)
    ig.save_rgb(tmp_path / "dog.png", 32, 32)
    ig.save_rgb(tmp_path / "summer 2024.v2.jpg", 40, 30)
    ig.save_rgb(tmp_path / "ünïcode 写真.png", 30, 40)
    ig.save_text_as_image(tmp_path / "broken.jpg")
    paths = list(iter_image_files(tmp_path))
    headers = [h for h in read_headers(paths) if h.error is None]
    assert len(paths) == 7 and len(headers) == 6
    ids = assign_image_ids([relative_key(h.path, tmp_path) for h in headers])
    assert len(set(ids)) == 6
    assert all(SAFE.fullmatch(i) and "." not in i for i in ids)
    by_name = dict(zip([h.path.relative_to(tmp_path).as_posix() for h in headers], ids, strict=True))
    assert by_name["summer 2024.v2.jpg"].startswith("summer_2024_v2-")
    assert by_name["ünïcode 写真.png"].startswith("unicode-")
    assert by_name == dict(
        zip(by_name, assign_image_ids([relative_key(tmp_path / k, tmp_path) for k in by_name]), strict=True)
    )
