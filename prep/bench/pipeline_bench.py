"""pipeline: the whole `run` with tiny models, against a naive serial per-image loop.

Every run is a fresh subprocess, so interpreter start, imports and model loads are paid the
same way by all contenders:

- naive: the seed scripts' style. One model at a time (T5, then DINOv3, then the VAE); for
  each image open, preprocess with the same `prep.preprocess` functions, encode that one
  image, `np.save`. Same models, dtype, passes, buckets and captions as the pipeline.
- pipeline, 1 process: `prep run` (CLI parser -> RunOptions -> run_job) in one process.
- pipeline, 2 processes: the same under `accelerate launch --multi_gpu --num_processes 2`.

Captions come from `.txt` sidecars (applied by the pipeline's prepare step, read by the
naive loop), so the caption pass has no work in either and the compared work is
T5 + DINOv3 + VAE. Two regimes: 256^2-class buckets (preprocessing dominates) and the
default 1024^2-class buckets (the tiny VAE dominates). Steady-state figures exclude model
loading (PassStats.load_seconds / the naive loop's load time); end-to-end figures include
everything from process start.

This file is also the child entry point (`--child` / `--naive`), run by path so that
`accelerate launch` can start it.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file by `accelerate launch prep/bench/pipeline_bench.py`
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from prep.bench import data
from prep.bench.common import REPO, BenchResult, child_env, peak_rss_mb
from prep.store import load_npy

THIS = Path(__file__).resolve()
RUN_SIZES = {
    True: {"small": {"n_images": 96}, "default": {"n_images": 8}, "repeat": 2, "big_repeat": 1},
    False: {"small": {"n_images": 512}, "default": {"n_images": 64}, "repeat": 3, "big_repeat": 2},
}
DTYPE = "float32"  # what --dtype auto gives on a CPU
LAST_LOAD = (0.0, 0.0)  # 1-minute load average before/after the last child run


# ------------------------------------------------------------------------------ children
# The naive loop judges nothing: the pipeline encodes every image too (and in one image pass).
NO_CURATION = ("--max-upscale", "off", "--max-aspect", "off", "--near-duplicate", "off")


def child_pipeline(out: Path, run_args: list[str]) -> int:
    """One rank of `prep run`: parse the CLI flags, run_job, dump RunSummary (per rank) as JSON."""
    import psutil

    from prep.cli import build_parser, setup_logging
    from prep.options import run_options_from
    from prep.pipeline import run_job

    imported = time.time()
    args = build_parser().parse_args(["run", *run_args])
    setup_logging(False)
    summary = run_job(run_options_from(args))
    rank = int(os.environ.get("RANK", "0"))
    payload = {
        "rank": rank,
        "counts": summary.counts,
        "seconds": summary.seconds,
        "exit_code": summary.exit_code,
        "passes": [{**asdict(p), "model_share": p.model_share} for p in summary.passes],
        "since_process_start": time.time() - psutil.Process().create_time(),
        "imports_seconds": imported - psutil.Process().create_time(),
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(payload, indent=2))
    return summary.exit_code


def child_naive(out: Path, images: Path, buckets: str, models: dict[str, str], dtype: str, target: Path) -> int:
    """The naive serial loop; writes its timings to `out`."""
    import numpy as np
    import psutil
    from PIL import Image

    from prep.buckets import assign_aspect_bucket, parse_bucket, parse_bucket_list
    from prep.config import IMAGE_EXTENSIONS
    from prep.preprocess import load_bucket_image, open_rgb, to_vae_pixels
    from prep.stages.dinov3 import DINOv3Encoder
    from prep.stages.t5 import T5Encoder
    from prep.stages.vae import VAEEncoder

    imported = time.time()
    bucket_list = parse_bucket_list(buckets)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for kind in ("t5", "dinov3", "vae"):
        (target / kind).mkdir(parents=True, exist_ok=True)
    load, work = {}, {}

    def timed(kind: str, encoder_class, encode_one) -> None:
        started = time.perf_counter()
        encoder = encoder_class.load(models[kind], device="cpu", dtype=dtype)
        load[kind] = time.perf_counter() - started
        started = time.perf_counter()
        for path in files:
            np.save(target / kind / f"{path.stem}.npy", encode_one(encoder, path))
        work[kind] = time.perf_counter() - started
        encoder.unload()

    def vae_latent(vae, path: Path):
        with Image.open(path) as header:
            width, height = header.size
            if int(header.getexif().get(0x0112, 1) or 1) in (5, 6, 7, 8):
                width, height = height, width
        bucket_w, bucket_h = parse_bucket(assign_aspect_bucket(width, height, bucket_list))
        return vae.encode(to_vae_pixels(load_bucket_image(path, bucket_w, bucket_h)[None]))[0][0]

    def t5_hidden(t5, path: Path):
        return t5.encode([path.with_suffix(".txt").read_text(encoding="utf-8").strip()])[0][0]

    timed("t5", T5Encoder, t5_hidden)
    timed("dinov3", DINOv3Encoder, lambda dino, path: dino.encode([open_rgb(path)])[0][0])
    timed("vae", VAEEncoder, vae_latent)
    payload = {
        "records": len(files),
        "load_seconds": load,
        "pass_seconds": work,
        "since_process_start": time.time() - psutil.Process().create_time(),
        "imports_seconds": imported - psutil.Process().create_time(),
        "peak_rss_mb": peak_rss_mb(),
    }
    out.write_text(json.dumps(payload, indent=2))
    return 0


# ------------------------------------------------------------------------------ launching
def model_args(models: dict) -> list[str]:
    from prep.testing import model_flags

    return model_flags(models, caption_max_new_tokens=8)


def _timed(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the whole process tree, result)."""
    global LAST_LOAD
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_LOAD = (load_before, os.getloadavg()[0])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... exited {proc.returncode}:\n"
                           f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return wall, cpu, proc


def run_naive(work: Path, images: Path, buckets: str, models: dict) -> dict:
    out = work / "naive.json"
    shutil.rmtree(work / "naive", ignore_errors=True)
    cmd = [sys.executable, str(THIS), "--naive", str(out), "--images", str(images), "--buckets", buckets,
           "--dtype", DTYPE, "--target", str(work / "naive"),
           "--models", json.dumps({k: str(v) for k, v in models.items()})]
    wall, cpu, _ = _timed(cmd, child_env())
    result = json.loads(out.read_text())
    result.update(wall=wall, cpu=cpu, loadavg=LAST_LOAD, load=sum(result["load_seconds"].values()),
                  steady=sum(result["pass_seconds"].values()))
    return result


def run_pipeline(work: Path, images: Path, buckets: str, models: dict, processes: int, workers: int,
                 batch_size: int | None, threads: int | None = None, pass_: str = "all", dtype: str = DTYPE,
                 extra: tuple[str, ...] = ()) -> dict:
    """A fresh `prep run` (1 process, or 2 ranks under accelerate); per-rank PassStats merged.

    `threads` is `--cpu-threads` (the models' threads per process; default 1); `extra` more flags.
    """
    tag = f"p{processes}w{workers}b{batch_size}" + (f"t{threads}" if threads else "") + "".join(
        a.strip("-")[:3] for a in extra)
    run_dir = work / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out = run_dir / "summary"
    run_args = [
        "--images", str(images), "--manifest", str(run_dir / "manifest.jsonl"),
        "--output-base-dir", str(run_dir / "derived"), "--buckets", buckets, "--min-free-gb", "0",
        *(["--batch-size", str(batch_size)] if batch_size else []), "--num-workers", str(workers), "--dtype", dtype,
        "--pass", pass_, *NO_CURATION,
        *(["--cpu-threads", str(threads)] if threads else []), *extra, *model_args(models),
    ]
    script = [str(THIS), "--child", str(out), "--", *run_args]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *script]
    wall, cpu, _ = _timed(cmd, child_env())
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]
    kinds = list(dict.fromkeys(p["kind"] for r in ranks for p in r["passes"]))
    per_pass = {}
    for kind in kinds:
        stats = [p for r in ranks for p in r["passes"] if p["kind"] == kind]
        per_pass[kind] = {
            "records": sum(s["records"] for s in stats),
            "load": max(s["load_seconds"] for s in stats),
            "encode": max(s["encode_seconds"] for s in stats),  # ranks run a pass side by side
            "model": max(s["model_seconds"] for s in stats),
            "model_share": min((s["model_share"] for s in stats if s["encode_seconds"]), default=0.0),
            "reads": sum(s.get("reads", 0) for s in stats),
            "decodes": sum(s.get("decodes", 0) for s in stats),
            "warmup": max(s.get("warmup_seconds", 0.0) for s in stats),
            "cpu": sum(s.get("cpu_seconds", 0.0) for s in stats),
            "stages": {name: max(s.get("stages", {}).get(name, {}).get("model_seconds", 0.0) for s in stats)
                       for name in dict.fromkeys(n for s in stats for n in s.get("stages", {}))},
        }
    return {
        "tag": tag, "processes": processes, "workers": workers, "batch_size": batch_size, "threads": threads,
        "wall": wall, "cpu": cpu, "loadavg": LAST_LOAD,
        "job": max(r["seconds"] for r in ranks),
        "load": sum(p["load"] for p in per_pass.values()),
        "steady": sum(p["encode"] for p in per_pass.values()),
        "model": sum(p["model"] for p in per_pass.values()),
        "passes": per_pass,
        "counts": ranks[0]["counts"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "run_dir": str(run_dir),
    }


def compare_latents(run_dir: Path, naive_dir: Path) -> float | None:
    """Mean |pipeline - naive| over all VAE latents (same work => ~0 up to batching noise)."""
    import numpy as np

    diffs = []
    for line in (run_dir / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        mine = run_dir / "derived" / "vae_latents" / f"{record['image_id']}.npy"
        theirs = naive_dir / "vae" / f"{Path(record['image_path']).stem}.npy"
        if mine.exists() and theirs.exists():
            a, b = load_npy(mine).astype(np.float32), load_npy(theirs).astype(np.float32)
            if a.shape != b.shape:
                return float("inf")
            diffs.append(float(np.abs(a - b).mean()))
    return float(np.mean(diffs)) if diffs else None


def compare_runs(dir_a: Path, dir_b: Path) -> dict:
    """Bit-level comparison of two runs' VAE latents: identical files, and the largest difference."""
    import numpy as np

    folder_a, folder_b = dir_a / "derived" / "vae_latents", dir_b / "derived" / "vae_latents"
    names = sorted(p.name for p in folder_a.glob("*.npy"))
    found = {"files": len(names), "identical": 0, "max_ulp": 0, "rel_l2": 0.0, "elements_differing": 0.0,
             "sign_flips": 0}
    differing, total = 0, 0
    for name in names:
        a, b = load_npy(folder_a / name), load_npy(folder_b / name)
        if a.tobytes() == b.tobytes():
            found["identical"] += 1
        ulps = np.abs(_ordered(a) - _ordered(b))
        found["max_ulp"] = max(found["max_ulp"], int(ulps.max()))
        x, y = a.astype(np.float64), b.astype(np.float64)
        found["rel_l2"] = max(found["rel_l2"], float(np.linalg.norm(x - y) / (np.linalg.norm(x) or 1.0)))
        found["sign_flips"] += int((np.sign(x) * np.sign(y) < 0).sum())
        differing, total = differing + int((ulps > 0).sum()), total + a.size
    found["elements_differing"] = differing / total if total else 0.0
    return found


def _ordered(values):
    """float16 bits as integers in the order of their values (neighbours differ by 1 = one ulp)."""
    import numpy as np

    bits = values.view(np.uint16).astype(np.int32)
    return np.where(bits & 0x8000, 0x8000 - bits, bits)


def _spread(runs: list[dict], n: int) -> str:
    rates = sorted(n / r["steady"] for r in runs)
    return f"{rates[0]:.2f}-{rates[-1]:.2f} img/s over {len(runs)} runs" if len(runs) > 1 else "1 run"


def config_name(config: tuple) -> str:
    processes, workers, batch, threads = (*config, None)[:4]
    return f"{processes} proc x {workers} loader workers, batch {batch}" + (f", --cpu-threads {threads}" if threads else "")


def bench_regime(result: BenchResult, label: str, work: Path, images: Path, n: int, buckets: str, models: dict,
                 configs: list[tuple], repeat: int = 1) -> dict:
    """The naive loop and each (processes, workers, batch[, cpu threads]) config, round-robin `repeat`
    times: the fastest (steady) run of each is kept (load from other processes only slows a run) and
    the spread over runs is reported."""
    naive_runs, tried = [], {config: [] for config in configs}
    for _ in range(max(1, repeat)):
        naive_runs.append(run_naive(work, images, buckets, models))
        for config in configs:
            tried[config].append(run_pipeline(work, images, buckets, models, *config))
    naive = min(naive_runs, key=lambda r: r["steady"])
    p = f"{label}: "
    naive_e2e, naive_steady = p + "naive serial loop, end to end", p + "naive serial loop, steady (no model loads)"
    result.add(naive_e2e, n / naive["wall"], "img/s",
               note=f"wall {naive['wall']:.1f} s, CPU {naive['cpu']:.1f} s ({naive['cpu'] / naive['wall']:.1f} cores busy), "
                    f"imports {naive['imports_seconds']:.1f} s; load avg {naive['loadavg'][0]:.1f}->{naive['loadavg'][1]:.1f}")
    result.add(naive_steady, n / naive["steady"], "img/s",
               note=f"model loads {naive['load']:.1f} s; per pass "
                    + ", ".join(f"{k} {v:.1f} s" for k, v in naive["pass_seconds"].items())
                    + f"; best of {_spread(naive_runs, n)}")
    runs = {}
    for config, attempts in tried.items():
        run = min(attempts, key=lambda r: r["steady"])
        run["attempts"] = [a["steady"] for a in attempts]
        runs[config] = run
        name = config_name(config)
        diff = compare_latents(Path(run["run_dir"]), work / "naive")
        outside = 1 - run["model"] / run["steady"] if run["steady"] else 0.0
        result.add(p + f"pipeline {name}, end to end", n / run["wall"], "img/s", baseline=naive_e2e,
                   note=f"wall {run['wall']:.1f} s, job {run['job']:.1f} s, CPU {run['cpu']:.1f} s "
                        f"({run['cpu'] / run['wall']:.1f} cores busy); "
                        f"load avg {run['loadavg'][0]:.1f}->{run['loadavg'][1]:.1f}")
        result.add(
            p + f"pipeline {name}, steady (no model loads)", n / run["steady"], "img/s", baseline=naive_steady,
            note=f"model loads {run['load']:.1f} s; outside model {100 * outside:.0f}%; per pass "
            + ", ".join(f"{k} {v['encode']:.1f} s ({100 * v['model_share']:.0f}% model"
                        + (f", {v['decodes'] / v['records']:.2f} decodes/img" if v.get("reads") else "") + ")"
                        for k, v in run["passes"].items() if v["records"])
            + (f"; VAE latents vs naive mean |diff| {diff:.1e}" if diff is not None else "")
            + f"; best of {_spread(attempts, n)}",
        )
        if run["counts"].get("failed"):
            result.notes.append(f"{label} {name}: {run['counts']['failed']} records failed")
    return {"naive": naive, "naive_runs": [r["steady"] for r in naive_runs], "runs": runs}


SMALL_CONFIGS = [(1, 2, 8), (2, 1, 8)]
# model-bound: batch 1 too (the CPU VAE is slower per image in batches), and the rank-invariance runs
BIG_CONFIGS = [(2, 1, 8), (1, 2, 1), (2, 1, 1), (1, 2, 1, 2)]


def rank_invariance(result: BenchResult, big: dict) -> None:
    """1 rank vs 2 ranks at batch 1: the same bits with the default --cpu-threads; the bound and the cost
    when the single process runs its models on 2 threads (what the defaults gave before)."""
    one, two, one_t2 = big["runs"][(1, 2, 1)], big["runs"][(2, 1, 1)], big["runs"][(1, 2, 1, 2)]
    same = compare_runs(Path(one["run_dir"]), Path(two["run_dir"]))
    other = compare_runs(Path(one_t2["run_dir"]), Path(two["run_dir"]))
    result.add("c) 1 rank vs 2 ranks, batch 1, --cpu-threads 1 (default): identical VAE latent files",
               same["identical"], f"of {same['files']}", note=f"max {same['max_ulp']} fp16 ulp apart")
    result.add("c) 1 rank on 2 threads vs 2 ranks on 1: identical VAE latent files", other["identical"],
               f"of {other['files']}",
               note=f"max {other['max_ulp']} fp16 ulp, relative error (L2, worst file) {other['rel_l2']:.1e}, "
                    f"{100 * other['elements_differing']:.1f}% of values differ, {other['sign_flips']} sign flips")
    cost = one["steady"] / one_t2["steady"]
    attempts = ", ".join(f"{a:.1f}" for a in one["attempts"]) + " / " + ", ".join(f"{a:.1f}" for a in one_t2["attempts"])
    result.add("c) 1 proc, batch 1: steady time with --cpu-threads 1 (default) / with 2", cost, "x",
               note=f"{one['steady']:.1f} s vs {one_t2['steady']:.1f} s (runs: {attempts} s)")
    result.goal("c) 1 rank and 2 ranks write identical latents (batch 1, default threads)", same["identical"],
                f"= {same['files']}", same["identical"] == same["files"])
    result.extra["rank_invariance"] = {"default": same, "two_threads": other, "cost": cost}


def run_pipeline_bench(cache: Path, work: Path, *, small_n: int, default_n: int | None,
                       configs: list[tuple] | None = None, repeat: int = 2, big_repeat: int = 1) -> BenchResult:
    from prep.testing import make_tiny_models

    result = BenchResult("pipeline")
    models = make_tiny_models(cache / "tiny-models")
    cores = os.cpu_count() or 1
    configs = configs or SMALL_CONFIGS
    result.params = {"dtype": DTYPE, "cores": cores, "repeat (round-robin, best of; a / b)": f"{repeat} / {big_repeat}",
                     "passes": "t5 + dinov3 + vae (captions from .txt sidecars)",
                     "configs (procs, loader workers, batch[, cpu threads])": f"a) {configs}; b) {BIG_CONFIGS}"}
    regimes = [("a) 256^2 buckets", small_n, data.SMALL_BUCKETS, configs, repeat)]
    if default_n:
        from prep.buckets import ASPECT_BUCKETS

        regimes.append(("b) 1024^2 buckets", default_n, list(ASPECT_BUCKETS), BIG_CONFIGS, big_repeat))
    load_before = os.getloadavg()[0]
    figures = {}
    for label, n, buckets, regime_configs, times in regimes:
        infos = data.make_image_folder(cache / f"pipeline-images-n{n}", n)
        bucket_text = ",".join(f"{w}x{h}" for w, h in buckets)
        figures[label] = bench_regime(result, label, work / label.split(")")[0], infos[0].path.parent, n,
                                      bucket_text, models, regime_configs, repeat=times)
        result.params[f"{label} images"] = n
    load_after = os.getloadavg()[0]
    result.params["load_avg_1m"] = f"{load_before:.1f} -> {load_after:.1f}"
    busy = max(load_before, load_after) > cores * 0.75
    caveat = " (machine busy: unreliable)" if busy else ""
    if busy:
        result.notes.append(f"The machine was busy (load average {load_before:.1f} -> {load_after:.1f}): "
                            "wall-clock ratios are disturbed; compare the CPU seconds in the notes.")
    small = figures[regimes[0][0]]
    two_ranks = next((run for config, run in small["runs"].items() if config[0] == 2), None)
    if two_ranks is not None:
        ratio = small["naive"]["steady"] / two_ranks["steady"]
        result.goal(f"a) 2 ranks, steady throughput vs naive loop ({two_ranks['tag']})", ratio, ">= 1.7" + caveat,
                    ratio >= 1.7)
    e2e = small["naive"]["wall"] / min(r["wall"] for r in small["runs"].values())
    result.goal("a) end-to-end vs naive loop (best config, incl. start + model loads)", e2e, "report", None)
    if len(regimes) > 1:
        big = figures[regimes[1][0]]
        best = min(big["runs"].values(), key=lambda r: r["steady"])
        ratio = big["naive"]["steady"] / best["steady"]
        outside = 1 - best["model"] / best["steady"]
        result.goal(f"b) steady throughput vs naive loop (best config: {best['tag']}; outside the model "
                    f"{100 * outside:.0f}%)", ratio, ">= 1.2" + caveat, ratio >= 1.2)
        rank_invariance(result, big)
    result.extra["figures"] = {label: {**found, "runs": {best_tag(c): r for c, r in found["runs"].items()}}
                               for label, found in figures.items()}
    return result


def best_tag(config: tuple) -> str:
    return "p{}w{}b{}".format(*config[:3]) + (f"t{config[3]}" if len(config) > 3 else "")


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    sizes = RUN_SIZES[quick]
    return run_pipeline_bench(cache, work / "pipeline", small_n=sizes["small"]["n_images"],
                              default_n=sizes["default"]["n_images"], repeat=sizes["repeat"],
                              big_repeat=sizes.get("big_repeat", 1))


# ---------------------------------------------------------------------------------- child CLI
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        split = argv.index("--")
        return child_pipeline(Path(argv[1]), argv[split + 1:])
    parser = argparse.ArgumentParser(description="naive loop child of the pipeline benchmark")
    parser.add_argument("--naive", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--buckets", required=True)
    parser.add_argument("--dtype", default=DTYPE)
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--models", required=True)
    args = parser.parse_args(argv)
    return child_naive(args.naive, args.images, args.buckets, json.loads(args.models), args.dtype, args.target)


if __name__ == "__main__":
    sys.exit(main())
