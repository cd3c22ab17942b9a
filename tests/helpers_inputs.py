"""Inputs where users' data already lives, built offline as the tools that make them write them:
an `imagefolder` with metadata files, `Dataset.save_to_disk`, parquet files as `push_to_hub`
lays them out, and WebDataset tars written with `webdataset.TarWriter` like img2dataset's."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from prep.testing import synthetic_rgb

SIZES = [(96, 64), (64, 96), (80, 80), (128, 64), (72, 100), (100, 72)]


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(synthetic_rgb(width, height, rng)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(synthetic_rgb(width, height, rng)).save(buffer, "PNG")
    return buffer.getvalue()


def make_imagefolder(root: Path) -> Path:
    """images/: a metadata.jsonl at the root (one row names a missing file), a metadata.csv in a
    subfolder, one image with no metadata row (the captioner captions it)."""
    (root / "sub").mkdir(parents=True)
    rows = []
    for i, (w, h) in enumerate(SIZES[:4]):
        (root / f"img_{i}.jpg").write_bytes(jpeg_bytes(w, h, i))
        if i < 3:
            rows.append({"file_name": f"img_{i}.jpg", "text": f"metadata caption {i}", "score": i * 0.5,
                         "width": 1})
    rows.append({"file_name": "gone.jpg", "text": "names a missing file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sub" / "deep.png").write_bytes(png_bytes(*SIZES[4], 40))
    (root / "sub" / "metadata.csv").write_text("file_name,text,photographer\ndeep.png,a csv caption,ann\n")
    return root


def dataset_rows(n: int = 5, changed: tuple[int, ...] = ()) -> dict:
    """Columns of a dataset with embedded image bytes, a caption, an id and an extra column;
    the rows in `changed` get another picture of the same size."""
    return {
        "image": [{"bytes": png_bytes(*SIZES[i % len(SIZES)], i + 1000 * (i in changed)), "path": None}
                  for i in range(n)],
        "text": [f"dataset caption {i}" for i in range(n)],
        "uid": [f"id.{i}" if i == 2 else f"row{i}" for i in range(n)],
        "label": list(range(n)),
    }


def make_dataset(n: int = 5, changed: tuple[int, ...] = ()):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    return Dataset.from_dict(dataset_rows(n, changed)).cast_column("image", ImageFeature())


def make_saved_dataset(folder: Path, n: int = 5, changed: tuple[int, ...] = ()) -> Path:
    make_dataset(n, changed).save_to_disk(str(folder))
    return folder


def replace_saved_dataset(folder: Path, n: int = 5, changed: tuple[int, ...] = ()) -> None:
    """A new save of the dataset in the same place (save_to_disk cannot overwrite its own source)."""
    staging = folder.with_name(folder.name + ".new")
    make_saved_dataset(staging, n, changed)
    shutil.rmtree(folder)
    staging.rename(folder)


def write_parquet_files(folder: Path, n: int = 5, changed: tuple[int, ...] = ()) -> None:
    """data/train-0000X-of-00002.parquet, as push_to_hub lays a split out (row groups of 2)."""
    import pyarrow.parquet as pq

    dataset = make_dataset(n, changed)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    half = (n + 1) // 2
    for index, part in enumerate((dataset.select(range(half)), dataset.select(range(half, n)))):
        table = part.flatten_indices().data.table
        path = folder / "data" / f"train-{index:05d}-of-00002.parquet"
        pq.write_table(table, str(path) + ".tmp", row_group_size=2)
        os.replace(str(path) + ".tmp", path)


def make_parquet_folder(folder: Path, n: int = 5) -> Path:
    write_parquet_files(folder, n)
    return folder


def rewrite_parquet_row(folder: Path, row: int, n: int = 5) -> None:
    """The parquet files written again with one row's picture changed."""
    write_parquet_files(folder, n, changed=(row,))


def write_tar(path: Path, samples: list[dict]) -> None:
    """One tar with webdataset.TarWriter (img2dataset writes its shards with it)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def img2dataset_sample(index: int, shard: int, *, caption: bool = True, image: bytes | None = None) -> dict:
    key = f"{shard:05d}{index:04d}"
    w, h = SIZES[index % len(SIZES)]
    sample = {"__key__": key, "jpg": image if image is not None else jpeg_bytes(w, h, shard * 100 + index),
              "json": {"key": key, "url": f"https://example.com/{key}.jpg", "status": "success",
                       "width": w, "height": h, "caption": f"json caption {key}"}}
    if caption:
        sample["txt"] = f"tar caption {key}"
    return sample


def make_tars(folder: Path) -> Path:
    """Two good shards of 3 samples, plus the troubles: a member that is not an image, a sample
    without an image, a key seen before, and a third shard cut short."""
    folder.mkdir(parents=True)
    write_tar(folder / "00000.tar", [img2dataset_sample(i, 0) for i in range(3)]
              + [{"__key__": "000000009", "jpg": b"this is not a jpeg", "txt": "bad"},
                 {"__key__": "000000010", "txt": "a caption and no image"}])
    write_tar(folder / "00001.tar", [img2dataset_sample(i, 1, caption=i != 1) for i in range(3)]
              + [img2dataset_sample(0, 0)])  # a key that 00000.tar has already
    write_tar(folder / "00002.tar", [img2dataset_sample(i, 2) for i in range(2)])
    data = (folder / "00002.tar").read_bytes()
    (folder / "00002.tar").write_bytes(data[: len(data) // 2 + 100])
    return folder
