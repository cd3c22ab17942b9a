"""preprocess: images/s of decode + EXIF + RGB + resize + centre crop to the record's bucket.

Compares, on the same files and the same bucket per file:

- bare: `Image.open(p).convert("RGB").resize((w, h))` (Pillow's default BICUBIC, no crop,
  no EXIF): the floor any pipeline is measured against;
- pipeline: `prep.preprocess.load_bucket_image` (draft + EXIF + RGB + LANCZOS box resize);
- the pipeline with its switches (module constants DRAFT_OVERSAMPLE, REDUCING_GAP) changed;
- local variants of the same work ("lean": EXIF rotation applied to the small output instead
  of the full image, no full-size copy), with their mean difference from the pipeline output;
- multiprocessing Pools of 1 and 2 processes (scaling across cores);
- the DINOv3 pass's transform (full decode + 224x224 resize) with and without a JPEG draft.

Both bucket classes are measured: the default 1024^2-class buckets and the 256^2-class set.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bench import data
from bench.common import BenchResult, Timer
from prep import preprocess
from prep.buckets import ASPECT_BUCKETS

RUN_SIZES = {True: {"n_images": 48, "repeat": 2}, False: {"n_images": 200, "repeat": 3}}

_ORIENTATION = 0x0112


# ------------------------------------------------------------------------------ variants
def bare(path: str, width: int, height: int) -> np.ndarray:
    """What a naive script does: decode, RGB, resize to the bucket size (no crop, no EXIF)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((width, height)))


def pipeline(path: str, width: int, height: int) -> np.ndarray:
    return preprocess.load_bucket_image(path, width, height)


def lean(path: str, width: int, height: int, *, resample: int = Image.Resampling.LANCZOS,
         oversample: float = preprocess.DRAFT_OVERSAMPLE, reducing_gap: float | None = preprocess.REDUCING_GAP,
         ) -> np.ndarray:
    """The pipeline's output (same crop box, filter, draft rule) without full-size work:

    the EXIF rotation is applied to the small resized crop (the box is mapped to stored
    coordinates) instead of to the full image, and nothing is copied at full size.
    Orientations other than 1/3/6/8 fall back to transposing first.
    """
    with Image.open(path) as image:
        orientation = int(image.getexif().get(_ORIENTATION, 1) or 1)
        stored_w, stored_h = image.size
        swap = orientation in (5, 6, 7, 8)
        upright = (stored_h, stored_w) if swap else (stored_w, stored_h)
        box = preprocess.cover_crop_box(*upright, width, height)
        scale = 1.0
        if image.format == "JPEG":
            needed = oversample * width / (box[2] - box[0])
            if needed <= 0.5:
                drafted = image.draft("RGB", (math.ceil(stored_w * needed), math.ceil(stored_h * needed)))
                if drafted is not None:
                    scale = drafted[1][2] / stored_w
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if orientation in (1, 3, 6, 8):
            stored_box, out_size, method = _stored_box(orientation, box, stored_w, stored_h, width, height)
            src = tuple(v * scale for v in stored_box)
            out = rgb.resize(out_size, resample, box=src, reducing_gap=reducing_gap)
            if method is not None:
                out = out.transpose(method)
        else:
            upright_img = ImageOps.exif_transpose(rgb)
            src = tuple(v * scale for v in box)
            out = upright_img.resize((width, height), resample, box=src, reducing_gap=reducing_gap)
        return np.asarray(out)


def _stored_box(orientation: int, box: tuple[int, int, int, int], sw: int, sh: int, width: int, height: int):
    """The upright crop box in stored pixels, the size to resample it to, and the transpose after."""
    left, top, right, bottom = box
    if orientation == 3:
        return (sw - right, sh - bottom, sw - left, sh - top), (width, height), Image.Transpose.ROTATE_180
    if orientation == 6:  # displayed rotated 90 degrees clockwise
        return (top, sh - right, bottom, sh - left), (height, width), Image.Transpose.ROTATE_270
    if orientation == 8:  # displayed rotated 90 degrees counter-clockwise
        return (sw - bottom, left, sw - top, right), (height, width), Image.Transpose.ROTATE_90
    return box, (width, height), None


def decode_only(path: str, width: int, height: int) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


def dinov3_transform(processor, path: str, draft: bool = False):
    """The DINOv3 pass's worker transform; with `draft`, JPEGs decode at >= 2x of 224 px."""
    if not draft:
        return processor(images=[preprocess.open_rgb(path)], return_tensors="np")["pixel_values"][0]
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (448, 448))  # the smallest 1/2^k decode still >= 448 on both sides
        image.load()
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return processor(images=[rgb], return_tensors="np")["pixel_values"][0]


# ------------------------------------------------------------------------------- running
def _call(task: tuple) -> tuple:
    """Pool worker: run one named variant on one file; returns the output shape only."""
    name, path, width, height = task
    out = VARIANTS[name](path, width, height)
    return getattr(out, "shape", None)


VARIANTS: dict[str, Callable] = {
    "bare": bare,
    "pipeline": pipeline,
    "lean": lean,
    "decode_only": decode_only,
}


def _noop(_: int) -> int:
    return 0


def time_loop(fn: Callable, tasks: list[tuple[str, int, int]], repeat: int, keep: bool = False):
    """Best-of-`repeat` seconds for running fn over all tasks in this process (+ outputs if keep)."""
    best, outputs = math.inf, None
    for _ in range(repeat):
        results = []
        with Timer() as t:
            for path, width, height in tasks:
                out = fn(path, width, height)
                if keep:
                    results.append(out)
        if t.seconds < best:
            best, outputs = t.seconds, results
    return best, outputs


def time_pool(name: str, tasks: list[tuple[str, int, int]], processes: int, repeat: int) -> float:
    """Best-of-`repeat` seconds over all tasks in a forked Pool (started and warmed up beforehand)."""
    ctx = multiprocessing.get_context("fork")
    best = math.inf
    with ctx.Pool(processes) as pool:
        pool.map(_noop, range(processes * 2))
        jobs = [(name, *task) for task in tasks]
        for _ in range(repeat):
            with Timer() as t:
                for _ in pool.imap_unordered(_call, jobs, chunksize=2):
                    pass
            best = min(best, t.seconds)
    return best


def mean_abs_diff(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float | None:
    diffs = [
        float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
        for a, b in zip(outputs, reference, strict=True)
        if a.shape == b.shape
    ]
    return float(np.mean(diffs)) if diffs else None


class _patched:
    """Temporarily change a prep.preprocess module constant (its exposed switches)."""

    def __init__(self, **values):
        self.values = values

    def __enter__(self):
        self.saved = {k: getattr(preprocess, k) for k in self.values}
        for k, v in self.values.items():
            setattr(preprocess, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(preprocess, k, v)


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def bench_bucket_class(result: BenchResult, label: str, infos: list, buckets: list, repeat: int,
                       workers: list[int]) -> dict:
    """All variants for one bucket class; returns the figures the goals need."""
    sizes = data.buckets_of(infos, buckets)
    tasks = [(str(info.path), w, h) for info, (w, h) in zip(infos, sizes, strict=True)]
    n = len(tasks)

    def ips(seconds: float) -> float:
        return n / seconds

    p = f"{label}: "
    t_bare, _ = time_loop(bare, tasks, repeat)
    result.add(p + "bare Pillow open+convert+resize (BICUBIC, no crop), 1 proc", ips(t_bare), "img/s")
    t_pipe, ref = time_loop(pipeline, tasks, repeat, keep=True)
    result.add(p + "pipeline load_bucket_image, 1 proc", ips(t_pipe), "img/s", baseline=p + "bare Pillow open+convert+resize (BICUBIC, no crop), 1 proc")
    base = p + "pipeline load_bucket_image, 1 proc"
    with _patched(DRAFT_OVERSAMPLE=math.inf):
        t, out = time_loop(pipeline, tasks, repeat, keep=True)
    result.add(p + "pipeline, draft off (DRAFT_OVERSAMPLE=inf)", ips(t), "img/s", baseline=base,
               note=f"mean |diff| {mean_abs_diff(out, ref):.3f} grey levels")
    with _patched(DRAFT_OVERSAMPLE=1.0):
        t, out = time_loop(pipeline, tasks, repeat, keep=True)
    result.add(p + "pipeline, draft oversample 1.0 (default 2.0)", ips(t), "img/s", baseline=base,
               note=f"mean |diff| {mean_abs_diff(out, ref):.3f} grey levels")
    with _patched(REDUCING_GAP=None):
        t, out = time_loop(pipeline, tasks, repeat, keep=True)
    result.add(p + "pipeline, reducing_gap off (plain LANCZOS)", ips(t), "img/s", baseline=base,
               note=f"mean |diff| {mean_abs_diff(out, ref):.3f} grey levels")
    t_lean, out = time_loop(lean, tasks, repeat, keep=True)
    result.add(p + "local lean: EXIF on the small output, no full-size copy (LANCZOS)", ips(t_lean), "img/s",
               baseline=base, note=f"mean |diff| {mean_abs_diff(out, ref):.3f} grey levels")
    t, out = time_loop(functools.partial(lean, resample=Image.Resampling.BICUBIC), tasks, repeat, keep=True)
    result.add(p + "local lean with BICUBIC (the bare loop's filter)", ips(t), "img/s", baseline=base,
               note=f"mean |diff| {mean_abs_diff(out, ref):.3f} grey levels")
    del ref, out
    t, _ = time_loop(decode_only, tasks, repeat)
    result.add(p + "decode only (open+load, no draft), 1 proc", ips(t), "img/s", baseline=base)

    pool: dict[int, float] = {}
    for processes in workers:
        pool[processes] = time_pool("pipeline", tasks, processes, repeat)
        result.add(p + f"pipeline, Pool({processes})", ips(pool[processes]), "img/s",
                   baseline=p + f"pipeline, Pool({workers[0]})" if processes != workers[0] else base)
    t_bare_pool = time_pool("bare", tasks, workers[-1], repeat)
    result.add(p + f"bare, Pool({workers[-1]})", ips(t_bare_pool), "img/s",
               baseline=p + "bare Pillow open+convert+resize (BICUBIC, no crop), 1 proc")
    return {
        "bare_over_pipeline": t_pipe / t_bare,
        "scaling": pool[workers[0]] / pool[workers[-1]],
        "bare_scaling": t_bare / t_bare_pool,
        "lean_speedup": t_pipe / t_lean,
    }


def bench_dinov3_transform(result: BenchResult, infos: list, processor, repeat: int) -> None:
    tasks = [(str(info.path), 224, 224) for info in infos]
    n = len(tasks)
    t_full, ref = time_loop(lambda p, w, h: dinov3_transform(processor, p), tasks, repeat, keep=True)
    name = "dinov3 transform: open_rgb + processor (pipeline's dinov3_pixels)"
    result.add(name, n / t_full, "img/s")
    t_draft, out = time_loop(lambda p, w, h: dinov3_transform(processor, p, draft=True), tasks, repeat, keep=True)
    diff = float(np.mean([np.abs(a - b).mean() for a, b in zip(out, ref, strict=True)]))
    result.add("dinov3 transform with JPEG draft to >= 448 px", n / t_draft, "img/s", baseline=name,
               note=f"mean |diff| {diff * 0.226 * 255:.3f} grey levels (normalised {diff:.4f})")


def run_preprocess_bench(n_images: int, repeat: int, cache: Path, *, max_mp: float = 4.0, min_mp: float = 0.3,
                         workers: tuple[int, ...] | None = None, dinov3_processor_dir: Path | None = None,
                         ) -> BenchResult:
    result = BenchResult("preprocess")
    cores = os.cpu_count() or 1
    worker_counts = list(workers or sorted({1, min(2, cores)}))
    folder = cache / f"images-n{n_images}-mp{min_mp:g}-{max_mp:g}"
    infos = data.make_image_folder(folder, n_images, min_mp=min_mp, max_mp=max_mp)
    warm_page_cache([i.path for i in infos])
    jpegs = sum(i.path.suffix == ".jpg" for i in infos)
    rotated = sum(bool(i.orientation) for i in infos)
    mp = [i.width * i.height / 1e6 for i in infos]
    result.params = {
        "images": n_images, "jpeg": jpegs, "png": n_images - jpegs, "exif_rotated": rotated,
        "megapixels": f"{min(mp):.2f}-{max(mp):.2f} (mean {np.mean(mp):.2f})", "repeat(best of)": repeat,
        "pools": worker_counts,
    }
    figures = {}
    for label, buckets in (("1024^2 buckets", list(ASPECT_BUCKETS)), ("256^2 buckets", data.SMALL_BUCKETS)):
        figures[label] = bench_bucket_class(result, label, infos, buckets, repeat, worker_counts)
    if dinov3_processor_dir is not None:
        from prep.encoders.dinov3 import load_dinov3_processor

        bench_dinov3_transform(result, infos, load_dinov3_processor(str(dinov3_processor_dir)), repeat)

    for label, fig in figures.items():
        ratio = fig["bare_over_pipeline"]
        result.goal(f"{label}: bare / pipeline time per worker", ratio, "<= 1.2", ratio <= 1.2)
        if len(worker_counts) > 1:
            ideal = worker_counts[-1] / worker_counts[0]
            result.goal(f"{label}: Pool({worker_counts[-1]}) / Pool({worker_counts[0]}) speed-up",
                        fig["scaling"], f">= {0.9 * ideal:.1f} (near-linear; bare loop gets {fig['bare_scaling']:.2f})",
                        fig["scaling"] >= 0.9 * ideal)
    result.extra["figures"] = figures
    return result


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    from prep.testing import make_tiny_models

    sizes = RUN_SIZES[quick]
    models = make_tiny_models(cache / "tiny-models")
    return run_preprocess_bench(sizes["n_images"], sizes["repeat"], cache, dinov3_processor_dir=models["dinov3"])
