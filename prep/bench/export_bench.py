"""Export throughput: `prep export webdataset` beside `tar -cf` of the same member files, and peak RSS.

    python -m prep.bench.export_bench --samples 10000 --workers 2 --repeat 3 --workdir /tmp/export-bench

Builds `n_samples` records of the 128x128 bucket with random side files (DINOv3 (1024,) f32,
VAE (16,16,16) f16, T5 (77,1024) f16: ~166 KB a sample), then, from the page cache, `repeat`
times in turn (so both see the same machine load):
  * runs the export in a child process (fresh interpreter: its peak RSS is the export's;
    the workers' is the largest peak among its children), timing the readiness pass and the
    whole export (which fsyncs every shard);
  * runs `tar -cf` over the same .npy files, then fsyncs the tar (the same durability): the
    baseline. `tar` is single-threaded; the export uses `--workers` processes.
Each run also records the CPU seconds spent (export: itself and its workers; tar) and the
1-minute load average: on a shared machine the wall-clock ratio moves with other load.
Figures are medians over the repeats, with each run's in `runs` (the spread) and the ratio
export / (tar -cf + fsync) of each run, measured back to back.
The core is `run_export_bench(n_samples, workdir, ...) -> dict`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUCKET = "128x128"

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import datasets
datasets.disable_progress_bars()
from prep.export.webdataset import export_webdataset, readiness
from prep.manifest import read_manifest
manifest, derived, out, shard_size = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
workers = int(sys.argv[5]) if sys.argv[5] != "None" else None

def peak_rss():
    # VmHWM starts afresh at exec; ru_maxrss carries the size of the process that forked us
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

rss_after_imports = peak_rss()
t = time.perf_counter()
readiness(read_manifest(manifest), derived)  # in this process: the serial cost of the readiness pass
readiness_s = time.perf_counter() - t
def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
cpu_before = cpu()
t = time.perf_counter()
s = export_webdataset(manifest, derived, out, shard_size=shard_size, progress_every=0, progress_bar=False,
                      **({} if workers is None else {"num_workers": workers}))
export_s = time.perf_counter() - t
export_cpu_s = cpu() - cpu_before
print(json.dumps({
    "readiness_s": readiness_s, "export_s": export_s, "export_cpu_s": export_cpu_s,
    "samples": s.written_samples, "shards": s.written_shards,
    "tar_bytes": s.bytes_written, "rss_after_imports": rss_after_imports,
    "peak_rss": peak_rss(),
    # forked workers: ru_maxrss counts the pages they share with this process (an upper bound)
    "peak_rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
}))
"""


def build_inputs(n_samples: int, workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Manifest + side files for `n_samples` ready records (reused when already built)."""
    from prep import store
    from prep.buckets import latent_shape
    from prep.config import DINOV3_DIM, T5_HIDDEN_DIM, T5_MAX_LENGTH

    manifest, derived = workdir / "manifest.jsonl", workdir / "derived"
    marker = workdir / f".built-{n_samples}"
    if marker.exists():
        return manifest, derived
    shutil.rmtree(derived, ignore_errors=True)
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in BUCKET.split("x"))
    lines = []
    for i in range(n_samples):
        image_id = f"bench_{i:07d}"
        store.save_artifact(derived, "dinov3", image_id, rng.standard_normal(DINOV3_DIM, dtype=np.float32))
        store.save_artifact(derived, "vae", image_id, rng.standard_normal(latent_shape(BUCKET), dtype=np.float32))
        store.save_artifact(derived, "t5", image_id, rng.standard_normal((T5_MAX_LENGTH, T5_HIDDEN_DIM), dtype=np.float32))
        n_tokens = 5 + i % 60
        lines.append(json.dumps({
            "image_id": image_id, "image_path": f"images/{image_id}.jpg", "caption": f"benchmark caption {i}",
            "t5_attention_mask": [1] * n_tokens + [0] * (T5_MAX_LENGTH - n_tokens), "height": height,
            "width": width, "aspect_bucket": BUCKET, "format_version": 2, "source": "bench",
        }))
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    marker.write_text("ok")
    return manifest, derived


def _export_once(manifest: Path, derived: Path, out: Path, shard_size: int, num_workers: int | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    repo_root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(manifest), str(derived), str(out), str(shard_size), str(num_workers)],
        capture_output=True, text=True, check=True, cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def _tar_once(workdir: Path, derived: Path) -> dict:
    """`tar -cf` of the same member files (the .npy side files; JSON and masks are tiny), then fsync."""
    names = [f"{kind}/{p.name}" for kind in ("dinov3", "vae_latents", "t5_hidden")
             for p in sorted((derived / kind).glob("*.npy"))]
    listing = workdir / "files.txt"
    listing.write_text("\n".join(names) + "\n")
    tar_path = workdir / "plain.tar"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["tar", "-cf", str(tar_path), "-C", str(derived), "-T", str(listing)], check=True)
    tar_s = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tar_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    fd = os.open(tar_path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the export fsyncs every shard; this gives tar the same durability
    finally:
        os.close(fd)
    tar_fsync_s = time.perf_counter() - t
    size = tar_path.stat().st_size
    tar_path.unlink()
    return {"tar_s": tar_s, "tar_fsync_s": tar_fsync_s, "tar_bytes": size, "tar_cpu_s": tar_cpu_s}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_export_bench(
    n_samples: int, workdir: Path, *, shard_size: int = 1000, num_workers: int | None = None, repeat: int = 1
) -> dict:
    """Time the export and `tar -cf` + fsync of the same files, `repeat` times in turn; medians and each run."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    manifest, derived = build_inputs(n_samples, workdir)
    build_s = time.perf_counter() - t
    mb = 1e6
    runs = []
    for _ in range(max(1, repeat)):
        export = _export_once(manifest, derived, workdir / "shards", shard_size, num_workers)
        tar = _tar_once(workdir, derived)
        runs.append({
            "export_s": round(export["export_s"], 3),
            "export_MB_per_s": round(export["tar_bytes"] / mb / export["export_s"], 1),
            "tar_cf_MB_per_s": round(tar["tar_bytes"] / mb / tar["tar_s"], 1),
            "tar_cf_fsync_MB_per_s": round(tar["tar_bytes"] / mb / tar["tar_fsync_s"], 1),
            "ratio_vs_tar_fsync": round(tar["tar_fsync_s"] / export["export_s"] * export["tar_bytes"]
                                        / tar["tar_bytes"], 3),
            "readiness_s": round(export["readiness_s"], 3),
            "export_cpu_s": round(export["export_cpu_s"], 2),
            "tar_cpu_s": round(tar["tar_cpu_s"], 2),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "peak_rss_MB": round(export["peak_rss"] / mb, 1),
            "peak_rss_workers_MB": round(export["peak_rss_workers"] / mb, 1),
            "_export": export, "_tar": tar,
        })
    return _summarise(runs, n_samples, num_workers, build_s)


def _summarise(runs: list[dict], n_samples: int, num_workers: int | None, build_s: float) -> dict:
    def med(key: str) -> float:
        return _median([r[key] for r in runs])

    export, tar = runs[0]["_export"], runs[0]["_tar"]
    export_s, tar_s = _median([r["_export"]["export_s"] for r in runs]), _median([r["_tar"]["tar_s"] for r in runs])
    return {
        "n_samples": export["samples"],
        "shards": export["shards"],
        "bucket": BUCKET,
        "num_workers": num_workers,
        "repeat": len(runs),
        "build_inputs_s": round(build_s, 2),
        "export_bytes": export["tar_bytes"],
        "readiness_s": med("readiness_s"),
        "export_s": round(export_s, 3),
        "export_MB_per_s": med("export_MB_per_s"),
        "export_samples_per_s": round(export["samples"] / export_s, 1),
        "tar_cf_bytes": tar["tar_bytes"],
        "tar_cf_s": round(tar_s, 3),
        "tar_cf_MB_per_s": med("tar_cf_MB_per_s"),
        "tar_cf_samples_per_s": round(n_samples / tar_s, 1),
        "tar_cf_fsync_s": round(_median([r["_tar"]["tar_fsync_s"] for r in runs]), 3),
        "tar_cf_fsync_MB_per_s": med("tar_cf_fsync_MB_per_s"),
        "ratio_vs_tar_fsync": med("ratio_vs_tar_fsync"),
        "ratio_vs_tar_fsync_range": [min(r["ratio_vs_tar_fsync"] for r in runs),
                                     max(r["ratio_vs_tar_fsync"] for r in runs)],
        "rss_after_imports_MB": round(export["rss_after_imports"] / 1e6, 1),
        "peak_rss_MB": med("peak_rss_MB"),
        "peak_rss_workers_MB": med("peak_rss_workers_MB"),
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prep-export-bench"))
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="export worker processes (default: the CPUs)")
    parser.add_argument("--repeat", type=int, default=1, help="export + tar runs, in turn (default: 1)")
    args = parser.parse_args()
    print(json.dumps(run_export_bench(args.samples, args.workdir, shard_size=args.shard_size,
                                      num_workers=args.workers, repeat=args.repeat), indent=2))


if __name__ == "__main__":
    main()
