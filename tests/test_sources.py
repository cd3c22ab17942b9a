"""The one reader of image bytes (`prep.sources`): locators of files, tar members and dataset rows,
their safety checks, fingerprints, and the path forms an export may show."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import helpers_inputs as hi
import pytest
from PIL import Image

from prep import hfdatasets, sources
from prep.preprocess import ImageDecodeError, open_rgb
from prep.sources import SourceError, TarMember, image_fingerprint, open_image, parse_row, parse_tar
from prep.tars import iter_tar_samples


@pytest.fixture()
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "data dir" / "00000.tar"  # a space in the folder: locators quote it
    path.parent.mkdir()
    hi.write_tar(path, [hi.img2dataset_sample(i, 0) for i in range(3)])
    return path


def members(path: Path) -> list[TarMember]:
    return [s.image for s in iter_tar_samples(str(path)) if s.image is not None]


def test_tar_member_locator_round_trips_and_reads_by_offset(shard: Path) -> None:
    found = members(shard)
    assert [m.member for m in found] == ["000000000.jpg", "000000001.jpg", "000000002.jpg"]
    with tarfile.open(shard) as archive:
        for member in found:
            assert parse_tar(member.locator) == member
            assert " " not in member.locator and member.locator.startswith("tar:///")
            with open_image(member.locator) as f:
                assert f.read() == archive.extractfile(member.member).read()
    assert open_rgb(found[1].locator).size == (64, 96)


def test_tar_member_at_a_wrong_offset_is_refused_not_misread(shard: Path) -> None:
    first, second, _ = members(shard)
    moved = TarMember(first.tar, first.member, second.offset, first.size)  # another member's data
    with pytest.raises(SourceError, match="not '000000000.jpg'"):
        open_image(moved.locator)
    inside = TarMember(first.tar, first.member, first.offset + 512, first.size)  # inside the data: no header
    with pytest.raises(SourceError):
        open_image(inside.locator)
    with pytest.raises(ImageDecodeError, match="source"):
        open_rgb(moved.locator)
    huge = TarMember(first.tar, first.member, first.offset, 1 << 40)
    with pytest.raises(SourceError, match="over"):
        open_image(huge.locator)


def test_a_fifo_is_refused_as_an_image_and_as_a_tar(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        open_image(str(fifo))
    with pytest.raises(OSError, match="not a regular file"):
        open_image(TarMember(str(fifo), "a.jpg", 512, 10).locator)
    assert image_fingerprint(TarMember(str(fifo), "a.jpg", 512, 10).locator, None) is None


def test_tar_fingerprint_rehashes_only_when_the_tar_changes(shard: Path, monkeypatch) -> None:
    member = members(shard)[0]
    fresh = image_fingerprint(member.locator, None)
    assert fresh["size"] == member.size and fresh["mtime_ns"] == shard.stat().st_mtime_ns

    def no_read(locator):
        raise AssertionError("re-read although the tar did not change")

    monkeypatch.setattr(sources, "read_image_bytes", no_read)
    assert image_fingerprint(member.locator, fresh) is fresh
    monkeypatch.undo()
    os.utime(shard, ns=(1, 1))
    again = image_fingerprint(member.locator, fresh)
    assert again["sha256"] == fresh["sha256"] and again["mtime_ns"] == 1


def test_dataset_row_locators_and_reads(tmp_path: Path) -> None:
    folder = hi.make_parquet_folder(tmp_path / "parquet", n=5)
    source = hfdatasets.resolve_dataset(str(folder), "train", "image")
    stream = hfdatasets.open_stream(source)
    for index, example in hfdatasets.iter_rows(stream):
        locator = source.row(index).locator
        assert parse_row(locator) == source.row(index)
        with open_image(locator) as f:
            assert f.read() == example["image"]["bytes"]
    with pytest.raises(SourceError, match="out of range"):
        open_image(source.row(5).locator)
    hub = sources.DatasetRow("hf", "owner/name", "abc123", "train", 7, "image")
    assert hub.locator == "hf://datasets/owner/name@abc123/train/7#image"
    assert parse_row(hub.locator) == hub
    assert sources.identity_of(hub.locator) == "hf://datasets/owner/name/train/7#image"


def test_relative_locators_carry_no_absolute_path(shard: Path, tmp_path: Path) -> None:
    member = members(shard)[0]
    start = str(tmp_path)
    assert sources.relative_locator(member.locator, start) == "tar:data%20dir/00000.tar#000000000.jpg"
    row = sources.DatasetRow("hfds", str(tmp_path / "ds"), None, "train", 3, "image").locator
    assert sources.relative_locator(row, start) == "hfds:ds/train/3#image"
    assert sources.relative_locator(str(tmp_path / "a" / "b.jpg"), start) == "a/b.jpg"
    hub = "hf://datasets/owner/name@abc/train/1#image"
    assert sources.relative_locator(hub, start) == hub
    for text in (sources.relative_locator(member.locator, start), sources.relative_locator(row, start)):
        assert start not in text and "://" not in text


def test_header_of_bytes_matches_header_of_file(tmp_path: Path) -> None:
    from prep.scan import read_image_header, read_image_header_bytes

    data = hi.jpeg_bytes(90, 50, 3)
    (tmp_path / "a.jpg").write_bytes(data)
    by_file, by_bytes = read_image_header(tmp_path / "a.jpg"), read_image_header_bytes(data, "x")
    assert (by_file.width, by_file.height, by_file.error) == (by_bytes.width, by_bytes.height, None) == (90, 50, None)
    assert read_image_header_bytes(data[: len(data) // 2], "x").error == "truncated file"
    assert "recognised" in read_image_header_bytes(b"hello", "x").error
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "PNG")
    assert read_image_header_bytes(buffer.getvalue(), "x").width == 10


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_member_names_and_a_damaged_header(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "long.tar"
    name = "d" * 60 + "/" + "x" * 90 + ".jpg"
    data = hi.jpeg_bytes(40, 30, 5)
    with tarfile.open(path, "w", format=fmt) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    (sample,) = iter_tar_samples(str(path))
    assert sample.image.member == name
    assert open_image(sample.image.locator).read() == data
    damaged = bytearray(path.read_bytes())
    damaged[sample.image.offset - 512 + 3] ^= 0x01  # one bit of the member's own header
    path.write_bytes(bytes(damaged))
    with pytest.raises(SourceError, match="no tar header|not"):
        open_image(sample.image.locator)
