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
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from prep import preprocess
from prep.bench import data
from prep.bench.common import BenchResult, Timer
from prep.buckets import ASPECT_BUCKETS

RUN_SIZES = {True: {"n_images": 32, "repeat": 2}, False: {"n_images": 200, "repeat": 3}}

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
    out = {"bare": bare, "pipeline": pipeline, "lean": lean}[name](path, width, height)
    return getattr(out, "shape", None)


def _noop(_: int) -> int:
    return 0


class Measure:
    """Best wall and CPU seconds of one variant over interleaved rounds (+ first-round outputs)."""

    def __init__(self, fn: Callable, keep: bool):
        self.fn, self.keep = fn, keep
        self.wall = self.cpu = math.inf
        self.outputs: list | None = None

    def round(self, tasks: list[tuple[str, int, int]]) -> None:
        results = []
        wall, cpu = time.perf_counter(), time.process_time()
        for path, width, height in tasks:
            out = self.fn(path, width, height)
            if self.keep:
                results.append(out)
        self.wall = min(self.wall, time.perf_counter() - wall)
        self.cpu = min(self.cpu, time.process_time() - cpu)
        if self.keep and self.outputs is None:
            self.outputs = results


def measure_all(variants: dict[str, tuple[Callable, bool]], tasks: list, repeat: int) -> dict[str, Measure]:
    """Run every variant `repeat` times, round-robin (load from other processes hits all alike).

    An untimed warm-up round over a few files comes first (lazy imports, allocator, caches).
    """
    measures = {name: Measure(fn, keep) for name, (fn, keep) in variants.items()}
    for fn, _ in variants.values():
        for path, width, height in tasks[:4]:
            fn(path, width, height)
    for _ in range(repeat):
        for measure in measures.values():
            measure.round(tasks)
    return measures


def time_pool(name: str, tasks: list[tuple[str, int, int]], processes: int, repeat: int) -> tuple[float, float]:
    """Best-of-`repeat` (wall seconds, worker CPU seconds) over all tasks in a forked, warmed-up Pool."""
    import psutil

    ctx = multiprocessing.get_context("fork")
    best, best_cpu = math.inf, math.inf
    with ctx.Pool(processes) as pool:
        pool.map(_noop, range(processes * 2))
        workers = [psutil.Process(p.pid) for p in pool._pool]  # noqa: SLF001 - CPU time of the workers

        def cpu() -> float:
            return sum(sum(w.cpu_times()[:2]) for w in workers)

        jobs = [(name, *task) for task in tasks]
        for _ in range(repeat):
            used = cpu()
            with Timer() as t:
                for _ in pool.imap_unordered(_call, jobs, chunksize=2):
                    pass
            best, best_cpu = min(best, t.seconds), min(best_cpu, cpu() - used)
    return best, best_cpu


def mean_abs_diff(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float | None:
    diffs = [
        float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
        for a, b in zip(outputs, reference, strict=True)
        if a.shape == b.shape
    ]
    return float(np.mean(diffs)) if diffs else None


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


class _Patched:
    """A variant that calls the pipeline with prep.preprocess module constants changed."""

    def __init__(self, **values):
        self.values = values

    def __call__(self, path: str, width: int, height: int) -> np.ndarray:
        saved = {k: getattr(preprocess, k) for k in self.values}
        try:
            for k, v in self.values.items():
                setattr(preprocess, k, v)
            return preprocess.load_bucket_image(path, width, height)
        finally:
            for k, v in saved.items():
                setattr(preprocess, k, v)


BARE = "bare Pillow open+convert+resize (BICUBIC, no crop)"
PIPE = "pipeline load_bucket_image"


def bench_bucket_class(result: BenchResult, label: str, infos: list, buckets: list, repeat: int,
                       workers: list[int], small: bool) -> dict:
    """All variants for one bucket class; returns the figures the goals need.

    Single-process variants are reported as images per CPU-second (insensitive to other load
    on the machine) and per wall-second; Pools by wall time (plus their workers' CPU time).
    """
    sizes = data.buckets_of(infos, buckets)
    tasks = [(str(info.path), w, h) for info, (w, h) in zip(infos, sizes, strict=True)]
    n = len(tasks)
    variants = {
        BARE: (bare, False),
        PIPE: (pipeline, True),
        "local lean: EXIF on the small output, no full-size copy": (lean, True),
        "local lean with BICUBIC (the bare loop's filter)": (functools.partial(lean, resample=Image.Resampling.BICUBIC), True),
        "decode only (open+load, no draft)": (decode_only, False),
    }
    if small:  # draft and reducing_gap only act on big downscales (never for <= 4 MP to 1024^2 buckets)
        variants.update({
            "pipeline, draft off (DRAFT_OVERSAMPLE=inf)": (_Patched(DRAFT_OVERSAMPLE=math.inf), True),
            "pipeline, draft oversample 1.0 (default 2.0)": (_Patched(DRAFT_OVERSAMPLE=1.0), True),
            "pipeline, reducing_gap off (plain LANCZOS)": (_Patched(REDUCING_GAP=None), True),
        })
    measures = measure_all(variants, tasks, repeat)
    ref = measures[PIPE].outputs
    p = f"{label}: "
    for name, m in measures.items():
        baseline = None if name == BARE else (p + BARE + " [CPU]" if name == PIPE else p + PIPE + " [CPU]")
        note = ""
        if m.outputs is not None and name != PIPE:
            diff = mean_abs_diff(m.outputs, ref)
            note = f"mean |diff| vs pipeline {diff:.3f} grey levels" if diff is not None else ""
        result.add(p + name + " [CPU]", n / m.cpu, "img/CPU-s", baseline=baseline, note=note)
        if name in (BARE, PIPE):
            result.add(p + name + " [wall]", n / m.wall, "img/s", note="1 process")
    pool: dict[int, tuple[float, float]] = {}
    for processes in workers:
        pool[processes] = time_pool("pipeline", tasks, processes, repeat)
        wall, cpu = pool[processes]
        first = p + f"pipeline, Pool({workers[0]})"
        result.add(p + f"pipeline, Pool({processes})", n / wall, "img/s",
                   baseline=first if processes != workers[0] else None,
                   note=f"workers' CPU {1000 * cpu / n:.0f} ms/img")
    bare_pool = {k: time_pool("bare", tasks, k, repeat) for k in (workers[0], workers[-1])}
    result.add(p + f"bare, Pool({workers[-1]})", n / bare_pool[workers[-1]][0], "img/s",
               baseline=p + BARE + " [wall]", note=f"workers' CPU {1000 * bare_pool[workers[-1]][1] / n:.0f} ms/img")
    return {
        "bare_over_pipeline_cpu": measures[PIPE].cpu / measures[BARE].cpu,
        "bare_over_pipeline_wall": measures[PIPE].wall / measures[BARE].wall,
        "scaling": pool[workers[0]][0] / pool[workers[-1]][0],
        # None when the workers' CPU time was below the clock's resolution (tiny smoke runs)
        "cpu_per_image_growth": pool[workers[-1]][1] / pool[workers[0]][1] if pool[workers[0]][1] > 0 else None,
        "bare_scaling": bare_pool[workers[0]][0] / bare_pool[workers[-1]][0],
        "lean_speedup_cpu": measures[PIPE].cpu / measures["local lean: EXIF on the small output, no full-size copy"].cpu,
        "pipeline_cpu_ms": 1000 * measures[PIPE].cpu / n,
    }


def bench_dinov3_transform(result: BenchResult, infos: list, processor, repeat: int) -> float:
    tasks = [(str(info.path), 224, 224) for info in infos]
    n = len(tasks)
    full = "dinov3 transform: open_rgb + processor (pipeline's dinov3_pixels)"
    drafted = "dinov3 transform with JPEG draft to >= 448 px"
    measures = measure_all(
        {
            full: (lambda p, w, h: dinov3_transform(processor, p), True),
            drafted: (lambda p, w, h: dinov3_transform(processor, p, draft=True), True),
        },
        tasks,
        repeat,
    )
    diff = float(np.mean([np.abs(a - b).mean() for a, b in zip(measures[drafted].outputs, measures[full].outputs, strict=True)]))
    result.add(full + " [CPU]", n / measures[full].cpu, "img/CPU-s")
    result.add(drafted + " [CPU]", n / measures[drafted].cpu, "img/CPU-s", baseline=full + " [CPU]",
               note=f"mean |diff| {diff * 0.226 * 255:.3f} grey levels (normalised {diff:.4f})")
    return measures[full].cpu / measures[drafted].cpu


def image_pass_cpu(infos: list, buckets: list, processor, stage_sets: list[tuple[str, ...]], repeat: int
                   ) -> tuple[float, float]:
    """(CPU seconds, decodes) of the image pass's worker work for every image, one pass per stage set."""
    import functools

    from prep.loader import ImageRecords, ImageWork
    from prep.stages.base import ImageInput
    from prep.stages.dinov3 import dinov3_input
    from prep.stages.vae import vae_crop

    best, decodes = float("inf"), 0
    for _ in range(max(1, repeat)):
        started, decodes = time.process_time(), 0
        for stage_set in stage_sets:
            pairs = data.buckets_of(infos, buckets)
            work = ImageWork([f"i{k}" for k in range(len(infos))], [str(i.path) for i in infos],
                             [f"{w}x{h}" for w, h in pairs], [stage_set] * len(infos), [None] * len(infos))
            table = {}
            for w, h in set(pairs):
                table[("vae", f"{w}x{h}")] = ImageInput(functools.partial(vae_crop, width=w, height=h), (w, h), w * h)
                table[("dinov3", f"{w}x{h}")] = ImageInput(functools.partial(dinov3_input, processor), (224, 224))
            records = ImageRecords(work, table)
            for index in range(len(records)):
                decodes += records[index][3]
        best = min(best, time.process_time() - started)
    return best, decodes


def bench_image_pass(result: BenchResult, infos: list, processor, repeat: int) -> dict:
    """The image pass's worker CPU per image (VAE crop + DINOv3 input) from one read, vs one pass per stage."""
    n, figures = len(infos), {}
    for label, buckets in (("1024^2 buckets", list(ASPECT_BUCKETS)), ("256^2 buckets", data.SMALL_BUCKETS)):
        apart, apart_decodes = image_pass_cpu(infos, buckets, processor, [("dinov3",), ("vae",)], repeat)
        together, together_decodes = image_pass_cpu(infos, buckets, processor, [("dinov3", "vae")], repeat)
        base = f"{label}: worker inputs for DINOv3 + VAE, one pass per stage [CPU]"
        result.add(base, n / apart, "img/CPU-s", note=f"{apart_decodes / n:.2f} decodes and 2 reads per image")
        result.add(f"{label}: worker inputs for DINOv3 + VAE, one image pass [CPU]", n / together, "img/CPU-s",
                   baseline=base, note=f"{together_decodes / n:.2f} decodes and 1 read per image "
                                       "(a second decode where DINOv3's JPEG draft scale differs from the VAE's)")
        figures[label] = {"ms_per_image": 1000 * together / n, "ms_per_image_apart": 1000 * apart / n,
                          "decodes_per_image": together_decodes / n}
    return figures


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
    load_before = os.getloadavg()[0]
    for label, buckets, small in (("1024^2 buckets", list(ASPECT_BUCKETS), False),
                                  ("256^2 buckets", data.SMALL_BUCKETS, True)):
        figures[label] = bench_bucket_class(result, label, infos, buckets, repeat, worker_counts, small)
    if dinov3_processor_dir is not None:
        from prep.stages.dinov3 import load_dinov3_processor

        processor = load_dinov3_processor(str(dinov3_processor_dir))
        figures["dinov3_draft_speedup"] = bench_dinov3_transform(result, infos, processor, repeat)
        result.extra["image_pass"] = bench_image_pass(result, infos, processor, repeat)
    load_after = os.getloadavg()[0]
    result.params["load_avg_1m"] = f"{load_before:.1f} -> {load_after:.1f}"
    if max(load_before, load_after) > cores * 0.75:
        result.notes.append(
            f"The machine was busy (load average {load_before:.1f} -> {load_after:.1f} on {cores} cores): "
            "wall-clock figures and Pool scaling are disturbed; the [CPU] rows are not."
        )

    for label, fig in figures.items():
        if not isinstance(fig, dict):
            continue
        ratio = fig["bare_over_pipeline_cpu"]
        result.goal(f"{label}: pipeline / bare time per worker (CPU time)", ratio, "<= 1.2", ratio <= 1.2)
        if len(worker_counts) > 1:
            ideal = worker_counts[-1] / worker_counts[0]
            result.goal(f"{label}: Pool({worker_counts[-1]}) / Pool({worker_counts[0]}) speed-up",
                        fig["scaling"], f">= {0.9 * ideal:.1f} (near-linear; bare loop gets {fig['bare_scaling']:.2f})",
                        fig["scaling"] >= 0.9 * ideal)
            growth = fig["cpu_per_image_growth"]
            result.goal(f"{label}: CPU per image, Pool({worker_counts[-1]}) / Pool({worker_counts[0]}) "
                        "(scaling proxy immune to other load)", growth, "<= 1.1", None if growth is None else growth <= 1.1)
    result.extra["figures"] = figures
    return result


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    from prep.testing import make_tiny_models

    sizes = RUN_SIZES[quick]
    models = make_tiny_models(cache / "tiny-models")
    return run_preprocess_bench(sizes["n_images"], sizes["repeat"], cache, dinov3_processor_dir=models["dinov3"])
