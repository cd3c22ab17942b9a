"""scale: a million records as a real run writes them, then how time and memory grow toward ten million.

The fixture (`data.build_real_dataset`): the real pipeline runs once with tiny models on a few
images; its records (fingerprint, four provenance stamps with file stamps, the 77-int mask, a
caption: about 2 KB each) are replicated with new ids and paths, and every image and side file
of a replica is a hard link, so a million records cost a 2 GB manifest and almost no other disk.

Goals (issue "Scale"), each command in its own process (wall time and peak RSS are its own):

1. `prep run` on the finished dataset, nothing to do (every record complete): < 60 s and < 2 GB,
   reporting every record skipped; cold (no projection cache: the first run after the manifest
   was edited by hand) and warm.
2. 200 new images added to it: the time beyond the no-op run, against the same 200 images run
   into an empty manifest (goal: within 1.5x).
3. `prep export webdataset --dry-run` (< 120 s, < 2 GB) and `prep verify` (its time beyond a bare
   threaded `np.load` of the same files under 60 s, < 2 GB).
4. Growth: load + every stage's `needs` filter + one checkpoint (a journal of 1,000 updates
   folded in) at n, 2n and 4n records, on the warm projection cache a run meets (every rewrite
   by prep leaves it current; the best of WARM_RUNS runs, since the first after a fixture build
   meets cold kernel caches); a linear fit projects 10M (< 10 min, < 4 GB). The cold parse
   (the first read after the manifest was edited outside prep) is measured and projected beside it.

Baselines measured in the same run: `wc -l`, a streaming `json.loads` of every line, `stat` of
every side file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prep.bench import data
from prep.bench.common import BenchResult, PrivatePeak, child_env, peak_rss_mb, run_child

SIZES = {True: {"records": 100_000, "growth": (100_000, 200_000, 400_000)},
         False: {"records": 1_000_000, "growth": (1_000_000, 2_000_000, 4_000_000)}}
NEW_IMAGES = 200
WARM_RUNS = 2  # goal 4: the best of this many warm runs per size
GOALS = {"noop_s": 60.0, "rss_mb": 2048.0, "added_ratio": 1.5, "export_s": 120.0, "verify_beyond_s": 60.0,
         "ten_million_s": 600.0, "ten_million_mb": 4096.0}


# ------------------------------------------------------------------------- child processes
def child_cli(out: Path, argv: list[str]) -> None:
    """Run one `prep` command in this process; record its wall time, peak RSS and output."""
    import contextlib
    import io

    from prep.cli import main

    stdout = io.StringIO()
    private = PrivatePeak()
    started = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    seconds = time.perf_counter() - started
    out.write_text(json.dumps({"code": code, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                               "private_mb": private.stop(), "stdout": stdout.getvalue()[-4000:]}))


def child_growth(out: Path, manifest: Path, derived: Path, phase: str) -> None:
    """One growth measurement in its own process (its own peak RSS). `cold`: parse the manifest and
    write the projection cache (the first read after the manifest was edited outside prep).
    `warm`: what a run meets (every rewrite by prep leaves the cache current): load + the needs
    filter of every stage a run plans + one checkpoint."""
    from prep.manifest import cache_file, read_manifest
    from prep.models import quiet_libraries

    quiet_libraries()
    private = PrivatePeak()
    if phase == "cold":
        cache_file(manifest).unlink(missing_ok=True)
        started = time.perf_counter()
        m = read_manifest(manifest)
        times = {"load, cold (parse + write the cache)": time.perf_counter() - started}
        out.write_text(json.dumps({"records": len(m), "times": times, "peak_rss_mb": peak_rss_mb(),
                                   "private_mb": private.stop()}))
        return
    started = time.perf_counter()
    m = read_manifest(manifest)
    dataset = m.to_dataset()
    times = {"load, warm (memory-mapped cache)": time.perf_counter() - started}
    started = time.perf_counter()
    todo = _plan_every_stage(dataset, derived)
    times["needs filters of the stages a run plans"] = time.perf_counter() - started
    started = time.perf_counter()
    m = _one_checkpoint(manifest, m)
    times["one checkpoint (fold 1,000 updates: streaming rewrite)"] = time.perf_counter() - started
    out.write_text(json.dumps({"records": len(m), "todo": todo, "times": times, "peak_rss_mb": peak_rss_mb(),
                               "private_mb": private.stop()}))


def _plan_every_stage(dataset, derived: Path) -> int:
    """The needs filter of every stage a run on this dataset plans; the records they would do."""
    from prep import provenance, stages
    from prep.needs import Yardstick, plan_stage
    from prep.store import active_stages, read_metadata

    expected = provenance.expected_from_metadata(read_metadata(derived))
    active = active_stages(derived)
    todo = 0
    for stage in (stage for stage in stages.STAGES.values() if not stage.optional or stage.name in active):
        yard = Yardstick(derived_dir=derived, expected=provenance.Expected({stage.name: expected.get(stage.name)}))
        needed, _ = plan_stage(dataset, stage, yard)
        todo += len(needed)
    return todo


def _one_checkpoint(manifest: Path, m):
    """A journal of 1,000 updates folded in: the first 1,000 records get a field whose value is new
    each time (the same value again would change nothing, and a fold of no change writes nothing)."""
    from prep import journal

    ids = m.table.column("image_id").slice(0, 1000).to_pylist()
    note = f"checkpoint {time.time_ns()}"
    writer = journal.Journal(manifest, 0)
    writer.append({"image_id": i, "bench_note": note} for i in ids)
    writer.close()
    m = journal.merge_into_manifest(manifest, m)
    journal.clear(manifest)
    return m


def child_baselines(out: Path, manifest: Path, derived: Path) -> None:
    """The floors: a streaming json.loads of every line, and a stat of every side file."""
    from prep.store import file_artifacts

    times = {}
    started = time.perf_counter()
    count = 0
    with open(manifest, "rb") as f:
        for line in f:
            json.loads(line)
            count += 1
    times["stream json.loads of every line"] = time.perf_counter() - started
    started = time.perf_counter()
    stats = 0
    for artifact in file_artifacts().values():
        with os.scandir(derived / artifact.folder) as it:
            for entry in it:
                os.stat(entry.path)
                stats += 1
    times[f"stat of every side file ({stats:,})"] = time.perf_counter() - started
    out.write_text(json.dumps({"records": count, "times": times, "peak_rss_mb": peak_rss_mb()}))


def child_bare_verify(out: Path, derived: Path, threads: int = 8) -> None:
    """The floor of verify: every side file read with np.load (threads), and np.isfinite."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from prep.parallel import bounded_map
    from prep.store import file_artifacts

    def read(path: str) -> bool:
        with open(path, "rb") as f:  # the bare library read, no checks
            return bool(np.isfinite(np.lib.format.read_array(f, allow_pickle=False)).all())

    paths = [entry.path for a in file_artifacts().values() for entry in os.scandir(derived / a.folder)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        finite = sum(bounded_map(pool, read, paths))  # Executor.map would hold 3M futures at once
    out.write_text(json.dumps({"files": len(paths), "finite": finite, "seconds": time.perf_counter() - started,
                               "peak_rss_mb": peak_rss_mb()}))


def _child(work: Path, name: str, args: list[str], timeout: float = 3600) -> dict:
    out = work / f"{name}.json"
    run_child([sys.executable, "-m", "prep.bench.scale_bench", *args[:1], str(out), *args[1:]], env=child_env(),
              timeout=timeout)
    return json.loads(out.read_text())


def _cli(work: Path, name: str, argv: list[str], timeout: float = 3600) -> dict:
    return _child(work, name, ["--cli", "--", *argv], timeout)


# ------------------------------------------------------------------------------ the runs
def run_args(paths: dict, models: dict, images: Path | None = None) -> list[str]:
    from prep.testing import model_flags

    return ["run", "--images", str(images or paths["images"]), "--manifest", str(paths["manifest"]),
            "--derived-dir", str(paths["derived"]), "--buckets", data.REAL_BUCKETS, "--min-free-gb", "0",
            "--num-workers", "1", *model_flags(models, caption_max_new_tokens=40)]


def new_images(folder: Path, n: int) -> Path:
    from prep.testing import make_test_images

    if not folder.is_dir() or len(list(folder.iterdir())) != n:
        shutil.rmtree(folder, ignore_errors=True)
        made = []
        seed = 1000
        while len(made) < n:
            made += make_test_images(folder / f"s{seed}", seed=seed)
            seed += 1
        for i, path in enumerate(made):
            if i < n:
                path.rename(folder / f"new{i:04d}{path.suffix}")
            else:
                path.unlink()
        for sub in folder.glob("s*"):
            shutil.rmtree(sub)
    return folder


def _snapshot(paths: dict, into: Path) -> None:
    """Keep the manifest and its metadata aside (the side files of new records are told apart by name)."""
    from prep.manifest import cache_file

    into.mkdir(parents=True, exist_ok=True)
    for path in (paths["manifest"], cache_file(paths["manifest"]), paths["derived"] / "prep_metadata.json"):
        if path.exists():  # the projection cache too: restored, the next command reads warm as a user's would
            shutil.copy2(path, into / path.name)
    shutil.rmtree(into / ".prep", ignore_errors=True)  # curation state and near-duplicate cache: files are
    shutil.copytree(paths["derived"] / ".prep", into / ".prep", copy_function=os.link)  # replaced, never changed


def _restore(paths: dict, into: Path) -> None:
    from prep.manifest import cache_file
    from prep.store import file_artifacts

    shutil.copy2(into / paths["manifest"].name, paths["manifest"])
    cache = cache_file(paths["manifest"])
    cache.unlink(missing_ok=True)
    if (into / cache.name).exists():
        shutil.copy2(into / cache.name, cache)
    shutil.copy2(into / "prep_metadata.json", paths["derived"] / "prep_metadata.json")
    shutil.rmtree(paths["derived"] / ".prep", ignore_errors=True)
    shutil.copytree(into / ".prep", paths["derived"] / ".prep", copy_function=os.link)
    for artifact in file_artifacts().values():
        for path in (paths["derived"] / artifact.folder).glob("new*.npy"):
            path.unlink()
    shutil.rmtree(paths["images"] / "new", ignore_errors=True)


def goal_noop_and_added(result: BenchResult, cache: Path, work: Path, paths: dict, models: dict, n: int,
                        added: int = NEW_IMAGES) -> None:
    from prep.manifest import cache_file

    cache_file(paths["manifest"]).unlink(missing_ok=True)
    cold = _cli(work, "noop-cold", run_args(paths, models))
    warm = _cli(work, "noop-warm", run_args(paths, models))
    skipped = f"{n} skipped"
    for label, ran in (("cold: no projection cache", cold), ("warm", warm)):
        ok = ran["code"] == 0 and skipped in ran["stdout"]
        result.add(f"1. prep run, nothing to do, {n:,} records ({label})", ran["seconds"], "s",
                   note=f"peak RSS {ran['peak_rss_mb']:.0f} MB (private {ran['private_mb']:.0f} MB); "
                        f"{'reports ' + skipped if ok else 'WRONG: ' + ran['stdout'][-200:]}")
    scale = 1_000_000 / n
    result.goal(f"no-op run at 1M records (warm){'' if scale == 1 else f', projected x{scale:g}'}",
                warm["seconds"] * scale, f"< {GOALS['noop_s']:.0f} s", warm["seconds"] * scale < GOALS["noop_s"])
    result.goal("no-op run peak RSS", warm["peak_rss_mb"], f"< {GOALS['rss_mb']:.0f} MB",
                warm["peak_rss_mb"] < GOALS["rss_mb"])
    fresh = new_images(cache / f"new-images-{added}", added)
    empty = {"manifest": work / "empty" / "manifest.jsonl", "derived": work / "empty" / "derived", "images": fresh}
    shutil.rmtree(work / "empty", ignore_errors=True)
    alone = _cli(work, "alone", run_args(empty, models))
    snapshot = work / "snapshot"
    _snapshot(paths, snapshot)
    shutil.copytree(fresh, paths["images"] / "new")
    try:
        grown = _cli(work, "added", run_args(paths, models))
    finally:
        _restore(paths, snapshot)
    beyond = grown["seconds"] - warm["seconds"]
    result.add(f"2. {added} images into an empty manifest", alone["seconds"], "s",
               note=f"peak RSS {alone['peak_rss_mb']:.0f} MB")
    result.add(f"2. {added} images added to the {n:,}-record dataset: time beyond the no-op run", beyond, "s",
               baseline=f"2. {added} images into an empty manifest",
               note=f"whole run {grown['seconds']:.1f} s, peak RSS {grown['peak_rss_mb']:.0f} MB")
    ratio = beyond / alone["seconds"]
    result.goal(f"adding {added} images: time beyond the no-op run vs the same {added} alone", ratio,
                f"<= {GOALS['added_ratio']}x", ratio <= GOALS["added_ratio"])


def goal_export_and_verify(result: BenchResult, work: Path, paths: dict, n: int) -> None:
    export = _cli(work, "export-dry", ["export", "webdataset", "--manifest", str(paths["manifest"]), "--derived-dir",
                                       str(paths["derived"]), "--output-dir", str(work / "shards"), "--dry-run"])
    result.add(f"3. prep export webdataset --dry-run, {n:,} records", export["seconds"], "s",
               note=f"peak RSS {export['peak_rss_mb']:.0f} MB")
    scale = 1_000_000 / n
    result.goal("export --dry-run at 1M records" + ("" if scale == 1 else f" (projected x{scale:g})"),
                export["seconds"] * scale, f"< {GOALS['export_s']:.0f} s", export["seconds"] * scale < GOALS["export_s"])
    bare = _child(work, "bare-verify", ["--bare-verify", str(paths["derived"])])
    verify = _cli(work, "verify", ["verify", "--manifest", str(paths["manifest"]), "--derived-dir", str(paths["derived"])])
    result.add(f"3. bare np.load + isfinite of the {bare['files']:,} side files (8 threads)", bare["seconds"], "s")
    result.add(f"3. prep verify, {n:,} records", verify["seconds"], "s", baseline=f"3. bare np.load + isfinite of the {bare['files']:,} side files (8 threads)",
               note=f"peak RSS {verify['peak_rss_mb']:.0f} MB, exit {verify['code']}")
    beyond = (verify["seconds"] - bare["seconds"]) * scale
    result.goal("verify: time beyond the bare read at 1M records" + ("" if scale == 1 else f" (projected x{scale:g})"),
                beyond, f"< {GOALS['verify_beyond_s']:.0f} s", beyond < GOALS["verify_beyond_s"])
    result.goal("verify / export peak RSS", max(verify["peak_rss_mb"], export["peak_rss_mb"]),
                f"< {GOALS['rss_mb']:.0f} MB", max(verify["peak_rss_mb"], export["peak_rss_mb"]) < GOALS["rss_mb"])


def goal_growth(result: BenchResult, cache: Path, work: Path, models: dict, sizes: tuple[int, ...]) -> None:
    """Goal 4 on what a run meets (the warm projection cache); the cold parse reported beside it."""
    import numpy as np

    warm, cold = [], []
    for n in sizes:
        paths = data.build_real_dataset(cache / f"real-{n}", n, models, progress=False)
        args = [str(paths["manifest"]), str(paths["derived"])]
        cold.append(_child(work, f"growth-cold-{n}", ["--growth", *args, "cold"]))
        runs = [_child(work, f"growth-warm-{n}-{i}", ["--growth", *args, "warm"]) for i in range(WARM_RUNS)]
        warm.append(min(runs, key=lambda f: sum(f["times"].values())))  # the best run, as the suite keeps
        spread = ", ".join(f"{sum(f['times'].values()):.1f}" for f in runs)
        for figures in (cold[-1], warm[-1]):
            for step, seconds in figures["times"].items():
                result.add(f"4. {n:,} records: {step}", seconds, "s")
        result.add(f"4. {n:,} records: peak RSS, warm (load + needs + checkpoint)", warm[-1]["peak_rss_mb"], "MB",
                   note=f"of which private (per process) {warm[-1]['private_mb']:.0f} MB; the rest is the "
                        f"memory-mapped cache, one copy per node; warm runs took {spread} s (the best is kept: the "
                        "first after a fixture build or a big write meets cold kernel caches)")
        result.add(f"4. {n:,} records: peak RSS, cold parse", cold[-1]["peak_rss_mb"], "MB",
                   note=f"of which private {cold[-1]['private_mb']:.0f} MB")
    xs = np.asarray(sizes, dtype=float)

    def projected(figures: list[dict], metric: str) -> tuple[float, float]:
        ys = np.asarray([sum(f["times"].values()) if metric == "seconds" else f[metric] for f in figures])
        slope, intercept = np.polyfit(xs, ys, 1)
        return float(slope * 10_000_000 + intercept), float(np.corrcoef(xs, ys)[0, 1]) if len(xs) > 2 else 1.0

    value, fit = projected(warm, "private_mb")
    result.add(f"4. 10M records projected, private memory per process (fit r={fit:.3f})", value, "MB",
               note="what each of 8 ranks adds beside the one shared memory-mapped cache")
    for metric, unit, goal in (("seconds", "s", GOALS["ten_million_s"]), ("peak_rss_mb", "MB", GOALS["ten_million_mb"])):
        value, fit = projected(warm, metric)
        result.goal(f"10M records projected ({metric}: load + needs + checkpoint; fit r={fit:.3f})",
                    value, f"< {goal:.0f} {unit}", value < goal)
        value, fit = projected(cold, metric)
        result.add(f"4. 10M records projected, cold parse alone ({metric}; fit r={fit:.3f})", value, unit,
                   note="the first read after the manifest was edited outside prep")


def run_scale_bench(cache: Path, work: Path, *, records: int, growth: tuple[int, ...],
                    added: int = NEW_IMAGES) -> BenchResult:
    from prep.testing import make_tiny_models

    result = BenchResult("scale")
    work.mkdir(parents=True, exist_ok=True)
    models = make_tiny_models(cache / "tiny-models")
    paths = data.build_real_dataset(cache / f"real-{records}", records, models, progress=False)
    result.params = {"records": records, "manifest MB": round(paths["manifest"].stat().st_size / 1e6),
                     "growth": list(growth)}
    started = time.perf_counter()
    subprocess.run(["wc", "-l", str(paths["manifest"])], check=True, capture_output=True)
    result.add("baseline: wc -l", time.perf_counter() - started, "s")
    base = _child(work, "baselines", ["--baselines", str(paths["manifest"]), str(paths["derived"])])
    for step, seconds in base["times"].items():
        result.add(f"baseline: {step}", seconds, "s")
    goal_noop_and_added(result, cache, work, paths, models, records, added)
    goal_export_and_verify(result, work, paths, records)
    goal_growth(result, cache, work, models, growth)
    return result


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    sizes = SIZES[quick]
    return run_scale_bench(cache, work / "scale", records=sizes["records"], growth=sizes["growth"])


if __name__ == "__main__":
    mode, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if mode == "--cli":
        child_cli(Path(rest[0]), rest[2:] if rest[1:2] == ["--"] else rest[1:])
    elif mode == "--growth":
        child_growth(Path(rest[0]), Path(rest[1]), Path(rest[2]), rest[3])
    elif mode == "--baselines":
        child_baselines(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    elif mode == "--bare-verify":
        child_bare_verify(Path(rest[0]), Path(rest[1]))
    else:
        sys.exit("usage: python -m prep.bench.scale_bench --cli OUT -- ARGV | --growth OUT MANIFEST DERIVED cold|warm | "
                 "--baselines OUT MANIFEST DERIVED | --bare-verify OUT DERIVED")
