"""Deterministic benchmark inputs: a folder of photo-like images, and synthetic manifests.

Images: JPEGs (most) and PNGs of 0.3-4 MP, aspect ratios log-uniform between 1:3 and 3:1,
some JPEGs carrying an EXIF orientation (3, 6 or 8). Content is smooth colour fields plus
grain, so JPEG sizes and decode costs resemble photos rather than flat test cards. The same
seed always gives the same files; a finished folder is reused (a marker is written last).

Manifests: v2 records of any count written as text (a million lines in a few seconds), and
valid side files (.npy) for a prefix of them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from prep.buckets import ASPECT_BUCKETS, Bucket, assign_aspect_bucket, format_bucket, latent_shape
from prep.config import DINOV3_DIM, FORMAT_VERSION, T5_HIDDEN_DIM, T5_MAX_LENGTH
from prep.store import artifact_dir, file_artifacts, mark_left_clean

SMALL_BUCKETS: list[Bucket] = [(w // 4, h // 4) for w, h in ASPECT_BUCKETS]  # 256^2-class, multiples of 16
DATA_VERSION = 2
MARKER = ".bench-images.json"

CAPTION_WORDS = (
    "a photo of a red cat on a wooden table in warm light",
    "a watercolor painting of mountains at sunset with soft clouds",
    "close-up of a bowl of fruit in morning light on linen",
    "an old stone bridge over a river in the fog at dawn",
    "a city street at night with neon signs and rain puddles",
)


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int  # upright (after EXIF orientation)
    height: int
    orientation: int | None


def image_plan(n: int, seed: int, min_mp: float, max_mp: float, png_fraction: float,
               exif_fraction: float) -> list[dict]:
    """Sizes, formats and orientations of the n images (cheap; no pixels)."""
    plan = []
    for index in range(n):
        rng = np.random.default_rng([seed, index, 1])
        megapixels = rng.uniform(min_mp, max_mp)
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        width = max(16, round(math.sqrt(megapixels * 1e6 * aspect)))
        height = max(16, round(megapixels * 1e6 / width))
        png = rng.random() < png_fraction
        orientation = None
        if not png and rng.random() < exif_fraction:
            orientation = int(rng.choice([3, 6, 8]))
        plan.append({"index": index, "width": width, "height": height, "png": png, "orientation": orientation})
    return plan


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth random colour fields (bicubic-upsampled coarse noise) plus fine grain."""
    coarse = rng.integers(0, 256, size=(max(2, height // 96), max(2, width // 96), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-10, 11, size=(height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def make_image_folder(out_dir: str | Path, n: int, *, seed: int = 0, min_mp: float = 0.3, max_mp: float = 4.0,
                      png_fraction: float = 0.2, exif_fraction: float = 0.25,
                      captions: bool = True) -> list[ImageInfo]:
    """Write (or reuse) n images and, with `captions`, an `<stem>.txt` sidecar caption for each."""
    out = Path(out_dir)
    params = {"version": DATA_VERSION, "n": n, "seed": seed, "min_mp": min_mp, "max_mp": max_mp,
              "png_fraction": png_fraction, "exif_fraction": exif_fraction, "captions": captions}
    plan = image_plan(n, seed, min_mp, max_mp, png_fraction, exif_fraction)
    infos = [_info(out, item) for item in plan]
    marker = out / MARKER
    if marker.is_file() and _read_json(marker) == params and all(i.path.is_file() for i in infos):
        return infos
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for item, info in zip(plan, infos, strict=True):
        rng = np.random.default_rng([seed, item["index"], 2])
        stored_w, stored_h = item["width"], item["height"]
        if item["orientation"] in (6, 8):  # stored sideways; a viewer shows width x height
            stored_w, stored_h = stored_h, stored_w
        image = photo_like(stored_w, stored_h, rng)
        if item["png"]:
            image.save(info.path, compress_level=3)
        else:
            kwargs: dict = {"quality": 90}
            if item["orientation"]:
                exif = Image.Exif()
                exif[0x0112] = item["orientation"]
                kwargs["exif"] = exif.tobytes()
            image.save(info.path, **kwargs)
        if captions:
            words = CAPTION_WORDS[item["index"] % len(CAPTION_WORDS)]
            info.path.with_suffix(".txt").write_text(f"{words}, picture {item['index']}\n", encoding="utf-8")
    marker.write_text(json.dumps(params) + "\n")
    return infos


def _info(out: Path, item: dict) -> ImageInfo:
    suffix = ".png" if item["png"] else ".jpg"
    return ImageInfo(out / f"img{item['index']:05d}{suffix}", item["width"], item["height"], item["orientation"])


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def buckets_of(infos: list[ImageInfo], buckets: list[Bucket]) -> list[tuple[int, int]]:
    """The (width, height) bucket of each image (by upright aspect, as the pipeline assigns)."""
    out = []
    for info in infos:
        text = assign_aspect_bucket(info.width, info.height, buckets)
        w, h = text.split("x")
        out.append((int(w), int(h)))
    return out


# ----------------------------------------------------------------------------- manifests
def _mask_texts() -> list[str]:
    """The 78 possible T5 masks (k ones then zeros) as JSON text, built once."""
    return [json.dumps([1] * k + [0] * (T5_MAX_LENGTH - k), separators=(",", ":")) for k in range(T5_MAX_LENGTH + 1)]


def synthetic_record_line(index: int, masks: list[str], buckets: list[Bucket]) -> str:
    """One compact v2 record (JSON text) with caption, mask, size and bucket."""
    width, height = buckets[index % len(buckets)]
    width, height = width + (index % 7) * 3, height + (index % 5) * 2  # sizes vary, bucket fixed by aspect
    bucket = format_bucket(*buckets[index % len(buckets)])
    caption = json.dumps(f"{CAPTION_WORDS[index % len(CAPTION_WORDS)]}, number {index}")
    tokens = 8 + index % 40
    return (
        f'{{"image_id":"img{index:08d}","image_path":"/data/images/{index // 1000:04d}/{index:08d}.jpg",'
        f'"caption":{caption},"t5_attention_mask":{masks[tokens]},"height":{height},"width":{width},'
        f'"aspect_bucket":"{bucket}","format_version":{FORMAT_VERSION},"source":"bench"}}'
    )


def write_synthetic_manifest(path: str | Path, n: int, *, buckets: list[Bucket] | None = None) -> Path:
    """A manifest of n complete v2 records (reused when it already has exactly that content size)."""
    path = Path(path)
    buckets = list(buckets or ASPECT_BUCKETS)
    marker = path.with_name(path.name + ".bench.json")
    params = {"version": DATA_VERSION, "n": n, "buckets": [list(b) for b in buckets]}
    if path.is_file() and _read_json(marker) == params:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    masks = _mask_texts()
    with open(path, "w", encoding="utf-8") as f:
        chunk = []
        for index in range(n):
            chunk.append(synthetic_record_line(index, masks, buckets))
            if len(chunk) >= 10_000:
                f.write("\n".join(chunk) + "\n")
                chunk.clear()
        if chunk:
            f.write("\n".join(chunk) + "\n")
    marker.write_text(json.dumps(params) + "\n")
    return path


def write_side_files(base: str | Path, n: int, *, buckets: list[Bucket] | None = None, seed: int = 0) -> int:
    """Valid dinov3 / vae / t5 .npy files for records 0..n-1 of `write_synthetic_manifest`.

    Written with plain np.save (not the pipeline's fsync'ed atomic writes: this is set-up,
    not the thing measured). One random array per shape is reused, so writing is disk-bound.
    Returns the number of files.
    """
    base = Path(base)
    buckets = list(buckets or ASPECT_BUCKETS)
    marker = base / ".bench-side-files.json"
    params = {"version": DATA_VERSION, "n": n, "buckets": [list(b) for b in buckets], "seed": seed}
    if _read_json(marker) == params:
        return 3 * n
    rng = np.random.default_rng(seed)
    for kind in file_artifacts():
        artifact_dir(base, kind).mkdir(parents=True, exist_ok=True)
    dinov3 = rng.standard_normal(DINOV3_DIM).astype(file_artifacts()["dinov3"].dtype)
    t5 = rng.standard_normal((T5_MAX_LENGTH, T5_HIDDEN_DIM)).astype(file_artifacts()["t5"].dtype)
    latents = {
        b: rng.standard_normal(latent_shape(format_bucket(*b))).astype(file_artifacts()["vae"].dtype) for b in buckets
    }
    for index in range(n):
        image_id = f"img{index:08d}"
        np.save(artifact_dir(base, "dinov3") / f"{image_id}.npy", dinov3)
        np.save(artifact_dir(base, "t5") / f"{image_id}.npy", t5)
        np.save(artifact_dir(base, "vae") / f"{image_id}.npy", latents[buckets[index % len(buckets)]])
    marker.write_text(json.dumps(params) + "\n")
    return 3 * n


# -------------------------------------------------------------- datasets as a real run writes them
LINKS_PER_INODE = 60_000  # ext4 allows 65,000 hard links per inode: start a fresh copy before that
REAL_BUCKETS = "64x64,64x128,128x64,96x96"


def template_run(folder: Path, models: dict[str, Path], templates: int, caption_tokens: int = 40) -> Path:
    """The real pipeline (tiny models) on `templates` generated images, once (reused)."""
    import shutil

    from prep.cli import main
    from prep.testing import make_test_images, model_flags

    if (folder / ".done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for extra in make_test_images(folder / "images")[templates:]:
        extra.unlink()
    code = main(["run", "--images", str(folder / "images"), "--manifest", str(folder / "manifest.jsonl"),
                 "--derived-dir", str(folder / "derived"), "--buckets", REAL_BUCKETS, "--min-free-gb", "0",
                 "--num-workers", "0", *model_flags(models, caption_max_new_tokens=caption_tokens)])
    if code != 0:
        raise RuntimeError(f"the template run failed ({code})")
    (folder / ".done").write_text("ok\n")
    return folder


class HardLinker:
    """Hard links to template files, starting a fresh copy (same bytes and mtime) every 60,000 links."""

    def __init__(self) -> None:
        self.current: dict[Path, Path] = {}  # template file -> the copy that takes new links
        self.counts: dict[Path, int] = {}

    def link(self, src: Path, dst: Path) -> None:
        import shutil

        copy = self.current.get(src)
        if copy is None or self.counts[copy] >= LINKS_PER_INODE:
            copy = dst.with_name(f".copy-{len(self.counts)}{src.suffix}")
            shutil.copy2(src, copy)  # same bytes and mtime: the records' stamps hold
            self.current[src], self.counts[copy] = copy, 0
        os.link(copy, dst)
        self.counts[copy] += 1

    def close(self) -> None:
        for copy in self.counts:
            copy.unlink()  # the links keep the inodes; a .copy file would look like a stray side file


def build_real_dataset(root: str | Path, n: int, models: dict[str, Path], *, templates: int = 4,
                       progress: bool = True, caption_tokens: int = 40) -> dict[str, Path]:
    """A finished dataset of `n` records exactly as a real run writes them, cheap on disk.

    The real pipeline (tiny models) runs once on `templates` images; its records (fingerprint,
    four provenance stamps with file stamps, a 77-int mask, a caption: about 1.8 KB each) are
    replicated with new ids and image paths, and every image and side file of a replica is a
    hard link to the template's. Reused when `root` already holds a dataset of that size.
    """
    import shutil

    root = Path(root)
    marker = root / ".bench-real.json"
    params = {"version": DATA_VERSION, "n": n, "templates": templates, "caption_tokens": caption_tokens,
              "models": sorted(str(p) for p in models.values())}
    paths = {"manifest": root / "manifest.jsonl", "derived": root / "derived", "images": root / "images"}
    if _read_json(marker) == params:
        mark_left_clean(paths["derived"])  # (a fixture built before the mark existed)
        return paths
    shutil.rmtree(root, ignore_errors=True)
    seed_dir = template_run(root.parent / f"real-templates-{templates}-{caption_tokens}", models, templates,
                            caption_tokens)
    _copy_metadata(seed_dir, paths)
    _replicate(seed_dir, paths, n, progress)
    _finish_curation(paths, n)
    mark_left_clean(paths["derived"])  # as the run that finished it would leave it
    marker.write_text(json.dumps(params) + "\n")
    return paths


def _copy_metadata(seed_dir: Path, paths: dict[str, Path]) -> None:
    for artifact in file_artifacts().values():
        (paths["derived"] / artifact.folder).mkdir(parents=True, exist_ok=True)
    meta = _read_json(seed_dir / "derived" / "prep_metadata.json")
    meta.update(manifest="../manifest.jsonl", images_roots=[str(paths["images"])])
    paths["derived"].joinpath("prep_metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    uncond = seed_dir / "derived" / "t5_uncond.safetensors"
    if uncond.exists():
        os.link(uncond, paths["derived"] / uncond.name)


def _replicate(seed_dir: Path, paths: dict[str, Path], n: int, progress: bool) -> None:
    import orjson
    from tqdm.auto import tqdm

    templates = [orjson.loads(line) for line in (seed_dir / "manifest.jsonl").read_bytes().splitlines()]
    folders = [a.folder for a in file_artifacts().values()]
    linker = HardLinker()
    with open(paths["manifest"], "wb") as out:
        for i in tqdm(range(n), desc="build dataset", unit="rec", disable=not progress, mininterval=2):
            template = templates[i % len(templates)]
            image_id = f"img{i:08d}"
            src_image = Path(template["image_path"])
            image = paths["images"] / f"{i // 10_000:04d}" / f"{image_id}{src_image.suffix}"
            if i % 10_000 == 0:
                image.parent.mkdir(parents=True, exist_ok=True)
            linker.link(src_image, image)
            for folder in folders:
                linker.link(seed_dir / "derived" / folder / f"{template['image_id']}.npy",
                            paths["derived"] / folder / f"{image_id}.npy")
            out.write(orjson.dumps(_replica(template, image_id, str(image), i)) + b"\n")
    linker.close()


def _replica(template: dict, image_id: str, image_path: str, i: int) -> dict:
    """The template record as another photo: new id and path, and an image hash of its own (the
    files are hard links of a few templates, but a real dataset holds distinct images: without
    this every replica would be an exact duplicate). prep hashes a file only when its size or
    mtime changed, so the stand-in hash stands."""
    import hashlib

    old = template["image_fingerprint"]["sha256"]
    new = hashlib.sha256(f"{old}/{i}".encode()).hexdigest()
    record = dict(template, image_id=image_id, image_path=image_path)
    record["image_fingerprint"] = dict(template["image_fingerprint"], sha256=new)
    record["provenance"] = {
        kind: dict(stamp, image_sha256=new) if stamp.get("image_sha256") == old else stamp
        for kind, stamp in template["provenance"].items()
    }
    return record


def _finish_curation(paths: dict[str, Path], n: int) -> None:
    """What a finished run leaves for curation: its state (nothing changed since the last judgement)
    and the kept images' embeddings (distinct unit vectors, as distinct photos have)."""
    from prep import curate, nearcache
    from prep.manifest import read_manifest

    manifest = read_manifest(paths["manifest"])
    rules = curate.rules_for(None, paths["derived"])
    judgement = curate.judge(curate.columns_of_manifest(manifest), rules)  # the size rules, as a run applies them
    if judgement.changes:
        manifest = curate.apply_to_manifest(manifest, judgement)
    columns = curate.columns_of_manifest(manifest)
    keep: set[str] = set()
    pool = curate.near_pool(columns, list(columns.flags))
    curate.write_state(paths["derived"], curate.near_digest(columns, pool, list(columns.flags),
                                                            rules.near_duplicate, keep))
    index = np.flatnonzero(pool)
    nearcache.save(paths["derived"], nearcache.settings_key(rules.near_duplicate, keep),
                   [columns.ids[i] for i in index.tolist()], columns.embedding_stamp[index],
                   _unit_rows(len(index), DINOV3_DIM), DINOV3_DIM)


def _unit_rows(n: int, dim: int, chunk: int = 65536):
    """`n` random unit float16 rows (distinct photos' embeddings), a chunk at a time."""
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        yield (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float16)
