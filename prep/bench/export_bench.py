"""Export throughput: `prep export webdataset` beside `tar -cf` of the same member files, and peak RSS.

    python -m prep.bench.export_bench.py --samples 2000 --workdir /tmp/export-bench

Builds `n_samples` records of the 128x128 bucket with random side files (DINOv3 (1024,) f32,
VAE (16,16,16) f16, T5 (77,1024) f16: ~166 KB a sample), then, from the page cache:
  * runs the export in a child process (fresh interpreter: its peak RSS is the export's),
    timing the readiness pass and the whole export (which fsyncs every shard);
  * runs `tar -cf` over the same .npy files (no fsync) as the I/O ceiling.
The core is `run_export_bench(n_samples, workdir) -> dict`.
"""

from __future__ import annotations

import argparse
import json
import os
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
rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
readiness(read_manifest(manifest), derived)
readiness_s = time.perf_counter() - t
t = time.perf_counter()
s = export_webdataset(manifest, derived, out, shard_size=shard_size, progress_every=0, progress_bar=False)
export_s = time.perf_counter() - t
print(json.dumps({
    "readiness_s": readiness_s, "export_s": export_s, "samples": s.written_samples, "shards": s.written_shards,
    "tar_bytes": s.bytes_written, "rss_after_imports": rss_after_imports,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
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


def run_export_bench(n_samples: int, workdir: Path, *, shard_size: int = 1000) -> dict:
    """Time the export and `tar -cf` of the same files; returns the numbers (bytes, seconds, MB/s, RSS)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    manifest, derived = build_inputs(n_samples, workdir)
    build_s = time.perf_counter() - t
    out = workdir / "shards"
    shutil.rmtree(out, ignore_errors=True)
    repo_root = Path(__file__).resolve().parent.parent
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(manifest), str(derived), str(out), str(shard_size)],
        capture_output=True, text=True, check=True, cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    export = json.loads(child.stdout.strip().splitlines()[-1])

    # tar -cf of the same member files (the .npy side files; JSON and masks are tiny), no fsync.
    names = [f"{kind}/{p.name}" for kind in ("dinov3", "vae_latents", "t5_hidden") for p in sorted((derived / kind).glob("*.npy"))]
    listing = workdir / "files.txt"
    listing.write_text("\n".join(names) + "\n")
    tar_path = workdir / "plain.tar"
    t = time.perf_counter()
    subprocess.run(["tar", "-cf", str(tar_path), "-C", str(derived), "-T", str(listing)], check=True)
    tar_s = time.perf_counter() - t
    fd = os.open(tar_path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the export fsyncs every shard; this gives tar the same durability
    finally:
        os.close(fd)
    tar_fsync_s = time.perf_counter() - t
    tar_bytes = tar_path.stat().st_size
    tar_path.unlink()
    shutil.rmtree(out, ignore_errors=True)

    mb = 1e6
    return {
        "n_samples": export["samples"],
        "shards": export["shards"],
        "bucket": BUCKET,
        "build_inputs_s": round(build_s, 2),
        "export_bytes": export["tar_bytes"],
        "readiness_s": round(export["readiness_s"], 3),
        "export_s": round(export["export_s"], 3),
        "export_MB_per_s": round(export["tar_bytes"] / mb / export["export_s"], 1),
        "export_samples_per_s": round(export["samples"] / export["export_s"], 1),
        # export_s includes its own readiness pass; this is the shard-writing part alone (approx.)
        "export_write_MB_per_s": round(export["tar_bytes"] / mb / max(export["export_s"] - export["readiness_s"], 1e-9), 1),
        "tar_cf_bytes": tar_bytes,
        "tar_cf_s": round(tar_s, 3),
        "tar_cf_MB_per_s": round(tar_bytes / mb / tar_s, 1),
        "tar_cf_samples_per_s": round(n_samples / tar_s, 1),
        "tar_cf_fsync_s": round(tar_fsync_s, 3),
        "tar_cf_fsync_MB_per_s": round(tar_bytes / mb / tar_fsync_s, 1),
        "rss_after_imports_MB": round(export["rss_after_imports"] / mb, 1),
        "peak_rss_MB": round(export["peak_rss"] / mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prep-export-bench"))
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(run_export_bench(args.samples, args.workdir, shard_size=args.shard_size), indent=2))


if __name__ == "__main__":
    main()
