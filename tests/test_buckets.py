"""Aspect buckets: nearest aspect in log space, deterministic ties, strict parsing, latent shapes."""

from __future__ import annotations

import pytest

from prep.buckets import (
    ASPECT_BUCKETS,
    BUCKET_MULTIPLE,
    assign_aspect_bucket,
    compute_aspect_ratio,
    format_bucket,
    latent_shape,
    parse_bucket,
    parse_bucket_list,
)


def test_default_buckets_are_seven_multiples_of_16_near_one_megapixel():
    assert len(ASPECT_BUCKETS) == 7
    assert len(set(ASPECT_BUCKETS)) == 7
    for width, height in ASPECT_BUCKETS:
        assert width % BUCKET_MULTIPLE == 0 and height % BUCKET_MULTIPLE == 0
        assert 0.9e6 <= width * height <= 1.1e6
    # every non-square bucket has its mirror
    assert {(h, w) for w, h in ASPECT_BUCKETS} == set(ASPECT_BUCKETS)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1024, 1024, "1024x1024"),
        (1, 1, "1024x1024"),  # a single pixel is square
        (4000, 4000, "1024x1024"),
        (1100, 1000, "1024x1024"),  # 1.1 is nearer 1.0 than 1.46
        (1000, 1100, "1024x1024"),
        (832, 1216, "832x1216"),
        (1216, 832, "1216x832"),
        (3000, 4000, "832x1216"),  # 3:4 portrait photo
        (4000, 3000, "1216x832"),  # 4:3 landscape photo
        (1080, 1920, "768x1280"),  # 9:16 phone screenshot
        (1920, 1080, "1280x768"),  # 16:9 video frame
        (1000, 2000, "704x1344"),  # 1:2
        (2000, 1000, "1344x704"),  # 2:1
        (100, 1000, "704x1344"),  # extreme 1:10 -> the tallest bucket
        (1000, 100, "1344x704"),  # extreme 10:1 -> the widest bucket
        (1, 5000, "704x1344"),
        (5000, 1, "1344x704"),
    ],
)
def test_assign_default_buckets(width, height, expected):
    assert assign_aspect_bucket(width, height) == expected


def test_log_space_is_symmetric():
    """2:1 and 1:2 are equally far from 1:1: with only those three, 2:1 must not fall to 1:1."""
    buckets = [(1024, 1024), (512, 1024), (1024, 512)]
    # sqrt(2):1 is the log-space midpoint between 1:1 and 2:1; just above it goes to 2:1.
    assert assign_aspect_bucket(1415, 1000, buckets) == "1024x512"
    assert assign_aspect_bucket(1000, 1415, buckets) == "512x1024"
    # 1.45:1 is nearer 1:1 on a linear scale (0.45 vs 0.55) but nearer 2:1 in log space
    # (log 1.45 = 0.372 from 1:1, 0.321 from 2:1): log space must win.
    assert assign_aspect_bucket(1450, 1000, buckets) == "1024x512"
    assert assign_aspect_bucket(1000, 1450, buckets) == "512x1024"
    assert assign_aspect_bucket(1400, 1000, buckets) == "1024x1024"
    assert assign_aspect_bucket(1000, 1400, buckets) == "1024x1024"


def test_mirror_images_get_mirror_buckets_for_every_aspect():
    for width in range(16, 4000, 37):
        height = 997
        wide = parse_bucket(assign_aspect_bucket(width, height))
        tall = parse_bucket(assign_aspect_bucket(height, width))
        assert tall == (wide[1], wide[0]), (width, height)


def test_tie_on_aspect_prefers_larger_area_whatever_the_order():
    small_first = [(512, 512), (1024, 1024)]
    assert assign_aspect_bucket(300, 300, small_first) == "1024x1024"
    assert assign_aspect_bucket(300, 300, list(reversed(small_first))) == "1024x1024"


def test_tie_on_aspect_and_area_goes_to_earlier_bucket():
    buckets = [(512, 1024), (1024, 512)]  # 1:1 is exactly as far from 1:2 as from 2:1
    assert assign_aspect_bucket(700, 700, buckets) == "512x1024"
    assert assign_aspect_bucket(700, 700, list(reversed(buckets))) == "1024x512"
    # repeated calls agree
    assert {assign_aspect_bucket(700, 700, buckets) for _ in range(20)} == {"512x1024"}


def test_compute_aspect_ratio():
    assert compute_aspect_ratio(1920, 1080) == pytest.approx(16 / 9)
    assert compute_aspect_ratio(1, 1) == 1.0
    for width, height in [(0, 10), (10, 0), (-5, 10), (10, -1)]:
        with pytest.raises(ValueError, match="bad image size"):
            compute_aspect_ratio(width, height)
    with pytest.raises(ValueError):
        assign_aspect_bucket(0, 100)


def test_format_and_parse_round_trip():
    for width, height in ASPECT_BUCKETS:
        text = format_bucket(width, height)
        assert text == f"{width}x{height}"
        assert parse_bucket(text) == (width, height)
    assert parse_bucket(" 512X768 ") == (512, 768)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1024",
        "1024x",
        "x1024",
        "1024x1024x16",
        "axb",
        "1024*1024",
        "1024 x 1024",
        "-16x16",
        "16x-16",
        "0x16",
        "16x0",
        "1000x1000",  # not a multiple of 16
        "1024x1000",
        "1.5x16",
        "16,16",
    ],
)
def test_parse_bucket_rejects(text):
    with pytest.raises(ValueError, match="bad bucket"):
        parse_bucket(text)


def test_parse_bucket_rejects_non_ascii_digits():
    for text in ["１０２４x1024", "²x16", "١٠٢٤x1024"]:
        with pytest.raises(ValueError, match="bad bucket"):
            parse_bucket(text)


def test_parse_bucket_error_is_one_line():
    with pytest.raises(ValueError) as info:
        parse_bucket("1000x1000")
    message = str(info.value)
    assert "\n" not in message and "16" in message and "1000x1000" in message


def test_parse_bucket_list():
    assert parse_bucket_list("1024x1024,832x1216") == [(1024, 1024), (832, 1216)]
    assert parse_bucket_list(" 832x1216 , 1024x1024 ,") == [(832, 1216), (1024, 1024)]
    assert parse_bucket_list(["1024x1024", "768x1280,1280x768"]) == [(1024, 1024), (768, 1280), (1280, 768)]
    with pytest.raises(ValueError, match="empty"):
        parse_bucket_list("")
    with pytest.raises(ValueError, match="empty"):
        parse_bucket_list([" , "])
    with pytest.raises(ValueError, match="duplicate"):
        parse_bucket_list("1024x1024,1024X1024")
    with pytest.raises(ValueError, match="bad bucket"):
        parse_bucket_list("1024x1024,1000x1000")


def test_latent_shape():
    assert latent_shape("1024x1024") == (16, 128, 128)
    assert latent_shape("832x1216") == (16, 152, 104)  # (C, H/8, W/8): height first
    assert latent_shape("1344x704") == (16, 88, 168)
    assert latent_shape("512x256", channels=4, downscale=16) == (4, 16, 32)
    with pytest.raises(ValueError):
        latent_shape("1000x1000")
