"""sources: time per image to get an image's bytes from each kind of input, as the passes do.

The same images (img2dataset-sized JPEGs, 0.05-0.3 MP) are read from:

- files: a folder of `.jpg` (the baseline: one open per image);
- tars: WebDataset tars of 100 samples written with `webdataset.TarWriter` (img2dataset's
  layout), read by member offset after the header check;
- parquet rows: a local parquet folder (row groups of 100, `datasets`' size for images);
- save_to_disk rows: a memory-mapped Arrow dataset.

Per image, what a DataLoader worker does (`prep.loader.ImageRows`): `image_fingerprint(locator,
previous)` (a stat while nothing changed) and `open_image(locator)` read to the end; then the
same plus a full decode (`preprocess.open_rgb`); then a real DataLoader with 2 workers over
every image (decode). Page cache warm (each variant is read once before timing; best of
`repeat`). The scan (preparation) rate of a folder and of the tars is shown too.
"""

from __future__ import annotations

import os
from pathlib import Path

from prep.bench import data
from prep.bench.common import BenchResult, best_of

RUN_SIZES = {True: {"n_images": 400, "repeat": 5}, False: {"n_images": 2000, "repeat": 7}}
PER_TAR = 100


def build_inputs(images: list[Path], work: Path) -> dict[str, list[str]]:
    """The same images as files, tar members, parquet rows and save_to_disk rows (locators)."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    from prep import hfdatasets
    from prep.tars import iter_tar_samples

    work.mkdir(parents=True, exist_ok=True)
    locators: dict[str, list[str]] = {"files": [str(p) for p in images], "tars": []}
    tar_dir = work / "tars"
    tar_dir.mkdir(exist_ok=True)
    for start in range(0, len(images), PER_TAR):
        path = tar_dir / f"{start // PER_TAR:05d}.tar"
        write_tar(path, images[start : start + PER_TAR])
        locators["tars"] += [s.image.locator for s in iter_tar_samples(str(path)) if s.image is not None]
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in images]}
    dataset = Dataset.from_dict(rows).cast_column("image", ImageFeature())
    dataset.save_to_disk(str(work / "saved"))
    (work / "parquet" / "data").mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(dataset.data.table, work / "parquet" / "data" / "train-00000-of-00001.parquet",
                   row_group_size=100)
    for name, folder in (("parquet rows", work / "parquet"), ("save_to_disk rows", work / "saved")):
        source = hfdatasets.resolve_dataset(str(folder), "train", "image")
        locators[name] = [source.row(i).locator for i in range(len(images))]
    return locators


def write_tar(path: Path, images: list[Path]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for image in images:
            sink.write({"__key__": image.stem, "jpg": image.read_bytes(), "txt": f"caption of {image.stem}"})


def read_all(locators: list[str], fingerprints: list[dict]) -> int:
    """What a worker does before decoding: fingerprint (stat) + read the bytes."""
    from prep.sources import image_fingerprint, open_image

    total = 0
    for locator, previous in zip(locators, fingerprints, strict=True):
        image_fingerprint(locator, previous)
        with open_image(locator) as f:
            total += len(f.read())
    return total


def decode_all(locators: list[str], fingerprints: list[dict]) -> int:
    from prep.preprocess import open_rgb
    from prep.sources import image_fingerprint

    pixels = 0
    for locator, previous in zip(locators, fingerprints, strict=True):
        image_fingerprint(locator, previous)
        width, height = open_rgb(locator).size
        pixels += width * height
    return pixels


def decoded_size(decoded) -> tuple[int, int]:
    return decoded.image.size


def loader_pass(locators: list[str], fingerprints: list[dict], workers: int) -> int:
    """The image pass's DataLoader (`prep.loader`) over every locator: read, fingerprint and decode in workers."""
    from prep.loader import ImageRecords, ImageWork, make_image_loader
    from prep.stages.base import ImageInput

    n = len(locators)
    work = ImageWork([f"i{k}" for k in range(n)], list(locators), [None] * n, [("size",)] * n, list(fingerprints))
    records = ImageRecords(work, {("size", None): ImageInput(decoded_size, draft_to=None, pixels=1)})
    done = 0
    for batch in make_image_loader(records, batch_size=8, num_workers=workers):
        done += sum(1 for _, made, _, _ in batch if made["size"][1] is None)
    return done


def interleaved(variants: dict, repeat: int) -> dict[str, float]:
    """Best time of each variant, the variants taking turns (a load spike hits them alike)."""
    best = {name: float("inf") for name in variants}
    for _ in range(repeat):
        for name, (fn, *args) in variants.items():
            best[name] = min(best[name], best_of(lambda fn=fn, args=args: fn(*args), 1))
    return best


def run_sources_bench(n_images: int, repeat: int, cache: Path, work: Path) -> BenchResult:
    from prep.scan import read_headers
    from prep.sources import image_fingerprint
    from prep.tars import iter_tar_samples

    result = BenchResult("sources")
    infos = data.make_image_folder(cache / f"sources-images-{n_images}", n_images, seed=7, min_mp=0.05, max_mp=0.3,
                                   png_fraction=0.0, exif_fraction=0.0, captions=False)
    images = [i.path for i in infos]
    inputs = build_inputs(images, work / "sources")
    prints = {name: [image_fingerprint(loc, None) for loc in locs] for name, locs in inputs.items()}
    mean_kb = sum(p.stat().st_size for p in images) / len(images) / 1024
    result.params = {"images": n_images, "repeat": repeat, "mean_image_kb": round(mean_kb, 1),
                     "samples_per_tar": PER_TAR, "page_cache": "warm"}
    for name, locs in inputs.items():
        read_all(locs, prints[name])  # warm the page cache and the readers
    reads = interleaved({name: (read_all, inputs[name], prints[name]) for name in inputs}, repeat)
    for name, seconds in reads.items():
        result.add(f"{name}: fingerprint + read", 1e6 * seconds / n_images, "us/img",
                   baseline=None if name == "files" else "files: fingerprint + read", invert=True)
    decodes = interleaved({name: (decode_all, inputs[name], prints[name]) for name in ("files", "tars", "parquet rows")},
                          repeat)
    for name, seconds in decodes.items():
        result.add(f"{name}: fingerprint + read + decode", 1e6 * seconds / n_images, "us/img",
                   baseline=None if name == "files" else "files: fingerprint + read + decode", invert=True)
    loaders = interleaved({name: (loader_pass, inputs[name], prints[name], 2) for name in ("files", "tars")},
                          max(1, repeat // 2))
    for name, seconds in loaders.items():
        result.add(f"{name}: DataLoader 2 workers, decode", n_images / seconds, "img/s",
                   baseline=None if name == "files" else "files: DataLoader 2 workers, decode")
    scan_files = best_of(lambda: list(read_headers(images)), 1)
    tar_paths = sorted({loc.split("?")[0][len("tar://"):] for loc in inputs["tars"]})
    scan_tars = best_of(lambda: [s for t in tar_paths for s in iter_tar_samples(t)], 1)
    result.add("scan: file headers", n_images / scan_files, "img/s")
    result.add("scan: tar samples (headers not parsed)", n_images / scan_tars, "img/s")
    ratio = result.row("tars: fingerprint + read").ratio
    result.goal("tars vs files, fingerprint + read (files time / tars time)", ratio, ">= 1.0 (no slower)",
                None if ratio is None else ratio >= 1.0)
    decode_ratio = result.row("tars: fingerprint + read + decode").ratio
    result.goal("tars vs files, with decode", decode_ratio, ">= 0.95 (decode dominates)",
                None if decode_ratio is None else decode_ratio >= 0.95)
    result.notes.append(f"{os.cpu_count()} cores; a file costs a stat (fingerprint) and an open + fstat + read + close; "
                        "a tar member a stat (fingerprint), a stat (the open tar is still that file) and two preads "
                        "(header, data); a parquet row its row group (100 images) once per process")
    return result


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    sizes = RUN_SIZES[quick]
    return run_sources_bench(sizes["n_images"], sizes["repeat"], cache, work)
