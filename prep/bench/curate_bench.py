"""curate: the near-duplicate search (`prep.dedup.near_duplicates`) on random 1024-d embeddings.

Random unit vectors (DINOv3's width) with planted near-duplicate pairs (cosine about 0.99), at
100k and 1M (quick: 20k and 100k). Each size runs in its own child process, so its peak RSS
(VmHWM) is its own: the float32 matrix plus the low-precision copy the products run on.

- the smaller size is searched in full (every row against every kept row before it) and must
  flag exactly one image of each planted pair (recall 100%, nothing else flagged);
- the larger one is searched for its last query blocks (each against all rows before it: the
  most expensive blocks); the whole search is extrapolated from their time per product
  (about N^2/2 products), and its memory is measured in full (all embeddings, the copy made).

Baseline (same run, same device and dtype): the bare matrix product of one block shape, as
GFLOP/s; the search's effective GFLOP/s (2 * D per product) against it shows what the
thresholding, index extraction and float32 confirmation cost on top of the products.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from prep.bench.common import BenchResult, child_env, peak_rss_mb, run_child

SIZES = {True: (20_000, 100_000), False: (100_000, 1_000_000)}
DIM = 1024
THRESHOLD = 0.98
PLANTED = 100
PARTIAL_BLOCKS = 2


def planted_embeddings(n: int, dim: int = DIM, *, pairs: int = PLANTED, seed: int = 0):
    """(unit float32 rows, {(i, j)}): random vectors and `pairs` copies at cosine ~0.99 of random others."""
    from prep.dedup import normalize_rows

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    chosen = rng.choice(n, size=2 * pairs, replace=False)
    planted = set()
    for a, b in zip(chosen[:pairs].tolist(), chosen[pairs:].tolist(), strict=True):
        noise = rng.standard_normal(dim, dtype=np.float32)
        emb[b] = emb[a] / np.linalg.norm(emb[a]) + 0.1425 * noise / np.linalg.norm(noise)  # cosine ~0.99
        planted.add((min(a, b), max(a, b)))
    return normalize_rows(emb), planted


def bare_matmul_gflops(device: str, dtype_name: str, rows: int = 4096, cols: int = 32768, dim: int = DIM) -> float:
    """GFLOP/s of one bare block product `a @ b.T` (the floor the search builds on)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(rows, dim, device=device).to(dtype)
    b = torch.randn(cols, dim, device=device).to(dtype)
    a @ b.T
    best = float("inf")
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b.T
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * rows * cols * dim / best / 1e9


def measure(n: int, blocks: int | None, device: str) -> dict:
    """One size in this process: the search (all blocks, or the last `blocks`), time, duplicates, peak RSS."""
    from prep.dedup import QUERY_BLOCK, iter_near_duplicates, priority_order, screen_dtype

    started = time.perf_counter()
    emb, planted = planted_embeddings(n)
    order = priority_order([f"{i:09d}" for i in range(n)], np.ones(n, dtype=np.int64))  # equal sizes: by index
    generate_s = time.perf_counter() - started
    first = 0 if blocks is None else max(0, n - blocks * QUERY_BLOCK)
    first -= first % QUERY_BLOCK
    found: dict[int, tuple[int, float]] = {}
    products, search_s = 0, 0.0
    started = time.perf_counter()
    for _, done_products, part in iter_near_duplicates(emb, order, THRESHOLD, device=device, first_row=first):
        products += done_products
        found.update(part)
    search_s = time.perf_counter() - started
    total = sum((min(n, s + QUERY_BLOCK) - s) * min(n, s + QUERY_BLOCK) for s in range(0, n, QUERY_BLOCK))
    expected = {max(pair) for pair in planted if max(pair) >= first}  # the later index of a pair is flagged
    return {
        "n": n, "device": device, "dtype": screen_dtype(device), "rows_searched": n - first,
        "products": products, "total_products": total, "search_s": search_s,
        "extrapolated_s": search_s * total / max(products, 1), "generate_s": generate_s,
        "flagged": len(found), "planted_found": len(set(found) & expected), "planted_expected": len(expected),
        "false_flags": len(set(found) - {max(p) for p in planted}), "peak_rss_mb": peak_rss_mb(),
        "effective_gflops": 2 * DIM * products / max(search_s, 1e-9) / 1e9,  # products computed per second
    }  # fmt: skip


def measure_incremental(n: int, new: int = 200) -> dict:
    """A run adding `new` images: their best match among `n` cached kept embeddings (`prep.nearcache`)."""
    from prep.nearcache import best_matches

    rng = np.random.default_rng(1)
    kept = rng.standard_normal((n, DIM), dtype=np.float32)
    kept /= np.linalg.norm(kept, axis=1, keepdims=True)
    kept = kept.astype(np.float16)
    queries = kept[:new].astype(np.float32)
    started = time.perf_counter()
    best, score = best_matches(queries, kept, threshold=0.99)  # as a run calls it: screened in bf16
    seconds = time.perf_counter() - started
    return {"n": n, "new": new, "seconds": seconds, "all_found": bool((best == np.arange(new)).all()),
            "peak_rss_mb": peak_rss_mb()}


def child_main(argv: list[str]) -> None:
    if argv[0] == "incremental":
        print(json.dumps(measure_incremental(int(argv[1]))))
        return
    n, blocks, device = int(argv[0]), (None if argv[1] == "all" else int(argv[1])), argv[2]
    print(json.dumps(measure(n, blocks, device)))


def run_size(n: int, blocks: int | None, device: str) -> dict:
    cmd = [sys.executable, "-c", "import sys; from prep.bench.curate_bench import child_main; child_main(sys.argv[1:])",
           str(n), "all" if blocks is None else str(blocks), device]
    proc = run_child(cmd, timeout=7200, env=child_env())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_curate_bench(sizes: tuple[int, int], device: str = "auto") -> BenchResult:
    from prep.curate import resolve_device
    from prep.dedup import screen_dtype

    device = resolve_device(device)
    result = BenchResult("curate", params={"sizes": list(sizes), "dim": DIM, "threshold": THRESHOLD,
                                           "planted_pairs": PLANTED, "device": device,
                                           "screen_dtype": screen_dtype(device)})
    baseline = f"bare block product 4096x32768x{DIM} ({screen_dtype(device)}, {device})"
    result.add(baseline, bare_matmul_gflops(device, screen_dtype(device)), "GFLOP/s")
    small, large = sizes
    full = run_size(small, None, device)
    _add_size(result, full, baseline)
    recall = full["planted_found"] / max(full["planted_expected"], 1)
    result.goal(f"{small:,}: planted near duplicates flagged", recall, "100%, nothing else flagged",
                recall == 1.0 and full["false_flags"] == 0)
    partial = run_size(large, PARTIAL_BLOCKS, device)
    _add_size(result, partial, baseline)
    runs = {}
    for n in sizes:
        cmd = [sys.executable, "-c", "import sys; from prep.bench.curate_bench import child_main; "
               "child_main(sys.argv[1:])", "incremental", str(n)]
        runs[n] = json.loads(run_child(cmd, timeout=3600, env=child_env()).stdout.strip().splitlines()[-1])
        result.add(f"a run adding 200 images: judged against {n:,} cached kept embeddings", runs[n]["seconds"], "s",
                   note=f"peak RSS {runs[n]['peak_rss_mb']:.0f} MB; every planted copy found: {runs[n]['all_found']}")
    result.extra["runs"] = {str(small): full, str(large): partial, "incremental": runs}
    return result


def _add_size(result: BenchResult, run: dict, baseline: str) -> None:
    n = run["n"]
    whole = run["rows_searched"] >= n
    how = "measured" if whole else (f"extrapolated from the last {run['rows_searched']:,} of {n:,} query rows "
                                    f"({run['search_s']:.0f} s measured, each against all rows before it)")
    result.add(f"{n:,} embeddings: near-duplicate search", run["extrapolated_s"], "s", note=how)
    result.add(f"{n:,} embeddings: effective GFLOP/s", run["effective_gflops"], "GFLOP/s", baseline=baseline,
               note="2*D FLOP per product; ratio = share of the bare product speed")
    result.add(f"{n:,} embeddings: peak RSS", run["peak_rss_mb"], "MB",
               note=f"float32 matrix {n * DIM * 4 / 2**20:.0f} MB + {run['dtype']} copy, measured in full")


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    return run_curate_bench(SIZES[quick])
