"""`python -m prep.bench all --quick --out DIR` or `python -m prep.bench <name> [...] --out DIR`.

Benchmarks: preprocess, pipeline, vae, export, scale, gpu, sources, curate. Each writes absolute numbers and
ratios against a baseline measured in the same run to DIR/results.json and DIR/results.md.
Generated inputs (images, tiny and real-size random models, manifests, side files) are kept in
--cache (default /tmp/prep-bench-cache, or $PREP_BENCH_CACHE) and reused by later runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prep.bench.common import (
    BenchResult,
    cache_dir,
    child_env,
    machine_info,
    quiet_progress,
    run_guarded,
    write_results,
)

NAMES = ("preprocess", "pipeline", "vae", "export", "scale", "gpu", "sources", "curate")
EXPORT_SIZES = {True: (1_000, 10_000), False: (1_000, 10_000, 100_000)}
EXPORT_RATIO_GOAL = 0.8
EXPORT_RSS_FLAT_MB = 50.0


def run_export(quick: bool, cache: Path, work: Path, sizes: tuple[int, ...] | None = None) -> BenchResult:
    """The `export` benchmark: prep/bench/export_bench.py's run_export_bench at each size (lazy import)."""
    result = BenchResult("export")
    try:
        module = importlib.import_module("prep.bench.export_bench")
        run_export_bench = module.run_export_bench
    except (ImportError, AttributeError) as exc:
        result.status = "absent"
        result.notes.append(f"prep/bench/export_bench.py (run_export_bench) is not available: {exc}")
        return result
    sizes = sizes or EXPORT_SIZES[quick]
    result.params["sizes"] = list(sizes)
    runs = {}
    for n in sizes:
        figures = run_export_bench(n, cache / f"export-{n}")
        runs[n] = figures
        tar_name = f"{n} samples: tar -cf + fsync"
        result.add(f"{n} samples: tar -cf", figures["tar_cf_MB_per_s"], "MB/s")
        result.add(tar_name, figures["tar_cf_fsync_MB_per_s"], "MB/s")
        result.add(f"{n} samples: export webdataset", figures["export_MB_per_s"], "MB/s", baseline=tar_name,
                   note=f"{figures['export_samples_per_s']:.0f} samples/s, {figures['shards']} shards, "
                        f"readiness {figures['readiness_s']:.2f} s of {figures['export_s']:.2f} s; "
                        f"vs plain tar -cf {figures['export_MB_per_s'] / figures['tar_cf_MB_per_s']:.2f}x")
        result.add(f"{n} samples: export peak RSS", figures["peak_rss_MB"], "MB",
                   note=f"after imports {figures['rss_after_imports_MB']:.0f} MB")
    largest, smallest = max(sizes), min(sizes)
    ratio = runs[largest]["export_MB_per_s"] / runs[largest]["tar_cf_fsync_MB_per_s"]
    result.goal(f"export / (tar -cf + fsync) at {largest} samples", ratio, f">= {EXPORT_RATIO_GOAL}",
                ratio >= EXPORT_RATIO_GOAL)
    plain = runs[largest]["export_MB_per_s"] / runs[largest]["tar_cf_MB_per_s"]
    result.goal(f"export / plain tar -cf (page cache, no fsync) at {largest} samples", plain,
                f">= {EXPORT_RATIO_GOAL}", plain >= EXPORT_RATIO_GOAL)
    growth = runs[largest]["peak_rss_MB"] - runs[smallest]["peak_rss_MB"]
    result.goal(f"peak RSS growth {smallest} -> {largest} samples (flat)", growth,
                f"< {EXPORT_RSS_FLAT_MB:.0f} MB", growth < EXPORT_RSS_FLAT_MB)
    result.extra["runs"] = {str(k): v for k, v in runs.items()}
    return result


def run_isolated(name: str, args: argparse.Namespace, cache: Path, work: Path, parts: Path) -> BenchResult:
    """One benchmark in its own `python -m prep.bench NAME` process.

    Keeps the parent small, so children's memory figures are their own, and one benchmark's
    imports, threads and heap cannot slow the next.
    """
    out = parts / name
    cmd = [sys.executable, "-m", "prep.bench", name, "--out", str(out), "--cache", str(cache), "--work", str(work),
           "--context", str(parts)]
    if args.quick:
        cmd.append("--quick")
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, env=child_env(), check=False)
    try:
        payload = json.loads((out / "results.json").read_text())
        return BenchResult.from_dict(payload["benchmarks"][name])
    except (OSError, ValueError, KeyError) as exc:
        result = BenchResult(name, status="error", seconds=time.perf_counter() - started)
        result.notes.append(f"`python -m prep.bench {name}` exited {proc.returncode} without results: {exc}")
        return result


def load_context(context: Path | None, name: str) -> BenchResult | None:
    """A result written earlier in the same `all` run (the gpu benchmark reads preprocess's)."""
    if context is None:
        return None
    try:
        payload = json.loads((context / name / "results.json").read_text())
        return BenchResult.from_dict(payload["benchmarks"][name])
    except (OSError, ValueError, KeyError):
        return None


def run_one(name: str, quick: bool, cache: Path, work: Path, done: dict[str, BenchResult],
            context: Path | None = None) -> BenchResult:
    if name == "export":
        return run_guarded(name, lambda: run_export(quick, cache, work))
    module = importlib.import_module(f"prep.bench.{name}_bench")
    if name == "gpu":
        pre = done.get("preprocess") or load_context(context, "preprocess")
        figures = {}
        if pre is not None and pre.status == "ok":
            with contextlib.suppress(KeyError):
                figures["pipeline_img_per_cpu_s_1024"] = pre.value("1024^2 buckets: pipeline load_bucket_image [CPU]")
            with contextlib.suppress(KeyError):
                figures["image_pass_img_per_cpu_s_1024"] = pre.value(
                    "1024^2 buckets: worker inputs for DINOv3 + VAE, one image pass [CPU]")
        return run_guarded(name, lambda: module.run(quick, cache, work, preprocess_figures=figures))
    return run_guarded(name, lambda: module.run(quick, cache, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prep.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=("all", *NAMES), metavar="NAME",
                        help=f"all, or one or more of: {', '.join(NAMES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (all: under 10 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, required=True, help="where results.json and results.md go")
    parser.add_argument("--cache", type=Path, default=None, help="generated inputs (default /tmp/prep-bench-cache)")
    parser.add_argument("--work", type=Path, default=None, help="scratch space (default OUT/work)")
    parser.add_argument("--in-process", action="store_true",
                        help="run several benchmarks in this process (default: one child process each)")
    parser.add_argument("--context", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = list(NAMES) if "all" in args.names else list(dict.fromkeys(args.names))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = cache_dir(str(args.cache) if args.cache else None)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    child = args.context is not None  # a part of `all`: the parent reports progress and the machine
    info = machine_info(probe_torch=not child)
    started = time.perf_counter()
    done: dict[str, BenchResult] = {}
    isolate = len(names) > 1 and not args.in_process
    with quiet_progress():
        for name in names:
            if not child:
                print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            if isolate:
                result = run_isolated(name, args, cache, work, args.out / "parts")
            else:
                result = run_one(name, args.quick, cache, work, done, args.context)
            done[name] = result
            if not child:
                print(f"[bench] {name}: {result.status} in {result.seconds:.1f} s", file=sys.stderr, flush=True)
            write_results(args.out, list(done.values()), quick=args.quick,
                          total_seconds=time.perf_counter() - started, info=info)
    total = time.perf_counter() - started
    json_path, md_path = write_results(args.out, list(done.values()), quick=args.quick, total_seconds=total, info=info)
    if not child:
        print(md_path.read_text())
        print(f"[bench] wrote {json_path} and {md_path} in {total:.0f} s", file=sys.stderr)
    return 1 if any(r.status == "error" for r in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
