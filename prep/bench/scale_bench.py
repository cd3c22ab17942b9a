"""scale: manifest handling at a million records, and verify throughput on real side files.

Manifest (a child process per contender, so peak RSS is its own, from getrusage):

- prep: `read_manifest(...).to_dataset()`, a readiness filter that reads no arrays
  (`Dataset.filter` on the projected columns, and `validate_record` on every full record),
  `.npy` header checks on the subset that has side files (`store.readiness_reasons`), then
  `write_manifest` of every record;
- bare: the floor in plain Python: stream the file, `json.loads` + `json.dumps` each line,
  write it back (no validation, no Dataset).

Verify: `prep.verify.verify_manifest` over records with valid side files (3 per record,
real shapes of the default buckets), against a bare single-threaded `np.load` + isfinite loop.
Files were just written, so both read from the page cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

from prep.bench import data
from prep.bench.common import BenchResult, child_env, peak_rss_mb, run_child

RUN_SIZES = {True: {"records": 100_000, "verify_records": 2_000}, False: {"records": 1_000_000, "verify_records": 10_000}}
TARGET_RECORDS, TARGET_SECONDS, TARGET_RSS_MB = 1_000_000, 60.0, 1024.0


def child_prep(out: Path, manifest: Path, base: Path, side_n: int) -> None:
    import datasets

    from prep.manifest import read_manifest, write_manifest
    from prep.records import validate_record
    from prep.store import readiness_reasons

    datasets.disable_progress_bars()
    rss_start = peak_rss_mb()
    times = {}
    started = time.perf_counter()
    m = read_manifest(manifest)
    ds = m.to_dataset()
    times["read_manifest + to_dataset"] = time.perf_counter() - started
    rss_loaded = peak_rss_mb()

    started = time.perf_counter()
    ready = ds.filter(
        lambda b: [c is not None and ok and not mig for c, ok, mig in zip(b["caption"], b["mask_ok"], b["needs_migration"], strict=True)],
        batched=True, batch_size=10_000, keep_in_memory=True, load_from_cache_file=False,
    )
    times["Dataset.filter on projected columns"] = time.perf_counter() - started

    started = time.perf_counter()
    valid = sum(1 for record in m if not validate_record(record))
    times["validate_record on every record"] = time.perf_counter() - started

    started = time.perf_counter()
    headers_ok = 0
    for index, record in enumerate(m):
        if index >= side_n:
            break
        headers_ok += not readiness_reasons(record, base)
    times["readiness_reasons (.npy headers) on the side-file subset"] = time.perf_counter() - started

    started = time.perf_counter()
    written = write_manifest(manifest.with_name("rewritten.jsonl"), m, m.rejected)
    times["write_manifest"] = time.perf_counter() - started
    manifest.with_name("rewritten.jsonl").unlink()
    out.write_text(json.dumps({
        "records": len(m), "ready_rows": len(ready), "valid": valid, "headers_ok": headers_ok, "written": written,
        "times": times, "rss_start_mb": rss_start, "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
    }))


def child_bare(out: Path, manifest: Path) -> None:
    rss_start = peak_rss_mb()
    started = time.perf_counter()
    target = manifest.with_name("bare.jsonl")
    count = 0
    with open(manifest, encoding="utf-8") as src, open(target, "w", encoding="utf-8") as dst:
        for line in src:
            record = json.loads(line)
            dst.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
        dst.flush()
        os.fsync(dst.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    out.write_text(json.dumps({"records": count, "seconds": seconds, "rss_start_mb": rss_start, "peak_rss_mb": peak_rss_mb()}))


def bare_verify(base: Path, n: int) -> float:
    import numpy as np

    from prep.store import artifact_dir

    started = time.perf_counter()
    for kind in ("dinov3", "vae", "t5"):
        folder = artifact_dir(base, kind)
        for index in range(n):
            with open(folder / f"img{index:08d}.npy", "rb") as f:  # the bare library read, no checks
                array = np.lib.format.read_array(f, allow_pickle=False)
            assert np.isfinite(array).all()
    return time.perf_counter() - started


def run_scale_bench(cache: Path, work: Path, *, records: int, verify_records: int) -> BenchResult:
    from prep.verify import verify_manifest

    result = BenchResult("scale")
    work.mkdir(parents=True, exist_ok=True)
    result.params = {"records": records, "verify records": verify_records, "side files": 3 * verify_records}
    manifest = data.write_synthetic_manifest(cache / f"scale-manifest-{records}.jsonl", records)
    side_base = cache / f"side-files-{verify_records}"
    data.write_side_files(side_base, verify_records)
    size_mb = manifest.stat().st_size / 1e6
    result.params["manifest MB"] = round(size_mb)

    # bare floor
    out = work / "bare.json"
    run_child([sys.executable, "-m", "prep.bench.scale_bench", "--bare", str(out), str(manifest)], env=child_env())
    bare = json.loads(out.read_text())
    base_name = "bare: stream json.loads + json.dumps + write"
    result.add(base_name, bare["seconds"], "s", note=f"peak RSS {bare['peak_rss_mb']:.0f} MB")

    # prep
    out = work / "prep.json"
    run_child([sys.executable, "-m", "prep.bench.scale_bench", "--prep", str(out), str(manifest), str(side_base),
               str(verify_records)], env=child_env(), timeout=1800)
    prep = json.loads(out.read_text())
    total = 0.0
    for name, seconds in prep["times"].items():
        total += seconds
        unit_note = f"{records / seconds:,.0f} rec/s" if "subset" not in name else f"{verify_records / seconds:,.0f} rec/s"
        result.add(f"prep: {name}", seconds, "s", note=unit_note)
    manifest_total = total - prep["times"]["readiness_reasons (.npy headers) on the side-file subset"]
    result.add("prep: load + filter + validate + write (no header checks)", manifest_total, "s",
               baseline=base_name, invert=True, note="ratio > 1: faster than the bare floor")
    peak = prep["peak_rss_mb"]
    result.add("prep: peak RSS", peak, "MB", note=f"after imports {prep['rss_start_mb']:.0f} MB, after load "
               f"{prep['rss_loaded_mb']:.0f} MB; ready rows {prep['ready_rows']}, valid {prep['valid']}")

    # verify
    from prep.manifest import write_manifest

    verify_manifest_path = work / "verify-manifest.jsonl"
    masks = data._mask_texts()  # noqa: SLF001
    lines = [json.loads(data.synthetic_record_line(i, masks, data.ASPECT_BUCKETS)) for i in range(verify_records)]
    write_manifest(verify_manifest_path, lines)
    t_bare = bare_verify(side_base, verify_records)
    files = 3 * verify_records
    verify_base = "bare np.load + isfinite, 1 thread"
    result.add(verify_base, files / t_bare, "files/s")
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        report = verify_manifest(verify_manifest_path, side_base)
    t_verify = time.perf_counter() - started
    result.add("prep.verify.verify_manifest (8 threads)", files / t_verify, "files/s", baseline=verify_base,
               note="ok" if report.ok else f"NOT ok: {report.to_dict()['artifacts']}")

    # goals (extrapolated linearly when fewer than a million records were measured)
    factor = TARGET_RECORDS / records
    projected = manifest_total * factor
    scaled = f" (projected x{factor:g})" if factor != 1 else ""
    result.goal(f"manifest load + filter + write at 1M records{scaled}",
                projected, f"< {TARGET_SECONDS:.0f} s", projected < TARGET_SECONDS)
    rss_growth = peak - prep["rss_start_mb"]
    projected_rss = prep["rss_start_mb"] + rss_growth * factor
    result.goal(f"peak RSS at 1M records{scaled}",
                projected_rss, f"< {TARGET_RSS_MB:.0f} MB", projected_rss < TARGET_RSS_MB)
    result.extra = {"prep": prep, "bare": bare, "verify_seconds": t_verify, "bare_verify_seconds": t_bare}
    return result


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    sizes = RUN_SIZES[quick]
    return run_scale_bench(cache, work / "scale", records=sizes["records"], verify_records=sizes["verify_records"])


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "--prep":
        child_prep(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
    elif mode == "--bare":
        child_bare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python -m prep.bench.scale_bench --prep OUT MANIFEST SIDE_BASE SIDE_N | --bare OUT MANIFEST")
