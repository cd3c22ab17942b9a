"""Smoke test of the benchmark suite: tiny sizes through the Python entry points; structure, not speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prep.bench import data
from prep.bench.__main__ import main as bench_main
from prep.bench.__main__ import run_export
from prep.bench.common import BenchResult, run_guarded, write_results
from prep.bench.gpu_bench import run_gpu_bench
from prep.bench.preprocess_bench import lean, pipeline, run_preprocess_bench
from prep.bench.scale_bench import run_scale_bench

REQUIRED_KEYS = {"name", "status", "seconds", "params", "rows", "goals", "notes", "extra"}


def check_result(result: BenchResult) -> None:
    assert result.status == "ok", result.notes
    assert result.rows
    for row in result.rows:
        assert row.value is None or row.value == row.value  # not NaN
        if row.baseline is not None:
            assert row.baseline in {r.name for r in result.rows}
    for goal in result.goals:
        assert goal.met in (True, False, None)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[BenchResult], Path]:
    cache = tmp_path_factory.mktemp("bench-cache")
    work = tmp_path_factory.mktemp("bench-work")
    found = [
        run_guarded("preprocess", lambda: run_preprocess_bench(4, 1, cache, min_mp=0.05, max_mp=0.2, workers=(1, 2))),
        run_guarded("scale", lambda: run_scale_bench(cache, work / "scale", records=300, growth=(100, 200, 400),
                                                          added=4)),
        run_guarded("gpu", lambda: run_gpu_bench(device="cpu", tiny=True, iters=1,
                                                 passes=[("vae", 32, 1), ("dinov3", 224, 1), ("t5", 77, 1)])),
        run_guarded("export", lambda: run_export(True, cache, work, sizes=(8, 16))),
    ]
    return found, cache


def test_benchmarks_produce_rows_ratios_and_goals(results) -> None:
    found, _ = results
    for result in found[:3]:
        check_result(result)
    preprocess = found[0]
    assert any(r.ratio is not None for r in preprocess.rows)
    assert {g.goal.split(":")[0] for g in preprocess.goals} == {"1024^2 buckets", "256^2 buckets"}
    assert found[2].extra["measured"] is True
    assert found[3].status in ("ok", "absent")


def test_results_json_and_markdown(results, tmp_path) -> None:
    found, _ = results
    json_path, md_path = write_results(tmp_path, found, quick=True, total_seconds=1.0)
    payload = json.loads(json_path.read_text())
    assert set(payload) >= {"machine", "quick", "benchmarks", "total_seconds"}
    assert payload["machine"]["cores"] >= 1
    assert list(payload["benchmarks"]) == ["preprocess", "scale", "gpu", "export"]
    for bench in payload["benchmarks"].values():
        assert set(bench) >= REQUIRED_KEYS
    text = md_path.read_text()
    assert text.startswith("# prep benchmarks")
    assert "Machine:" in text
    for name in ("preprocess", "scale", "gpu", "export"):
        assert f"## {name} (" in text
    assert "| metric | value | unit | ratio | vs | note |" in text
    assert "| goal | measured | target | met |" in text


def test_lean_variant_matches_pipeline_on_rotated_images(results) -> None:
    _, cache = results
    infos = data.make_image_folder(cache / "rotated", 6, min_mp=0.05, max_mp=0.1, exif_fraction=1.0, png_fraction=0.0)
    assert {i.orientation for i in infos} - {None}
    for info, (w, h) in zip(infos, data.buckets_of(infos, data.SMALL_BUCKETS), strict=True):
        a, b = pipeline(str(info.path), w, h), lean(str(info.path), w, h)
        assert a.shape == b.shape == (h, w, 3)
        assert abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_cli_writes_results(tmp_path, monkeypatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("the gpu benchmark measures real-size models on a GPU machine")
    assert bench_main(["gpu", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 0
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["benchmarks"]["gpu"]["extra"]["measured"] is False
    assert "expected on H100" in (tmp_path / "out" / "results.md").read_text()


def test_sources_bench_compares_tars_with_files(tmp_path) -> None:
    from prep.bench.sources_bench import run_sources_bench

    result = run_guarded("sources", lambda: run_sources_bench(12, 1, tmp_path / "cache", tmp_path / "work"))
    check_result(result)
    assert result.row("tars: fingerprint + read").baseline == "files: fingerprint + read"
    assert result.row("tars: fingerprint + read").ratio is not None
    assert {g.goal.split(",")[0] for g in result.goals} == {"tars vs files"}


def test_gpu_pipeline_figures_run_on_any_device(tmp_path) -> None:
    """`prep bench gpu`'s pipeline part, on the CPU with tiny models: every figure it reports is there."""
    from prep.bench.gpu_bench import run_pipeline_on_device
    from prep.testing import make_tiny_models

    models = make_tiny_models(tmp_path / "cache" / "tiny-models")
    result = BenchResult("gpu")
    figures = run_pipeline_on_device(result, tmp_path / "cache", tmp_path / "work", "cpu", images=3, sizes=(64,),
                                     models=models, workers=1, dtype="float32")
    check_result(result)
    assert set(figures) == {"dinov3@64", "vae@64", "all@64"}
    for found in figures.values():
        assert found["images_per_s"] > 0 and 0 < found["busy_share"] <= 1 and found["cpu_cores"] > 0
    assert figures["vae@64"]["decodes_per_image"] == figures["dinov3@64"]["decodes_per_image"] == 1.0
    assert 1.0 <= figures["all@64"]["decodes_per_image"] <= 2.0  # DINOv3 and the VAE may draft at other scales
    assert figures["vae@64"]["vae_tflops"] > 0 and figures["dinov3@64"]["vae_tflops"] is None
    assert figures["all@64"]["vae_tflops"] > 0  # the VAE's share of the shared pass
    names = {row.name for row in result.rows}
    assert {"pipeline vae@64: VAE achieved TFLOP/s", "pipeline all@64: CPU cores used per GPU",
            "pipeline all@64: share of GPU time busy"} <= names


def test_the_vae_benchmark_picks_bf16_only_where_the_cpu_has_it(monkeypatch) -> None:
    from prep.bench import vae_bench

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("prep.models.cpu_features", lambda: {"native_bf16": False, "capability": "AVX2",
                                                              "flags": ["avx2"], "threads": 2})
    assert vae_bench.bench_dtype()[0] == "float32"
    monkeypatch.setattr("prep.models.cpu_features", lambda: {"native_bf16": True, "capability": "AVX512",
                                                              "flags": ["avx512_bf16"], "threads": 2})
    assert vae_bench.bench_dtype()[0] == "bfloat16"


def test_every_result_names_the_cpu_flags_that_matter(tmp_path) -> None:
    from prep.bench.common import machine_info

    info = machine_info()
    assert {"cpu_capability", "cpu_flags", "native_bf16"} <= set(info)
    _, md_path = write_results(tmp_path, [BenchResult("x")], quick=True, info=info)
    assert "CPU kernels " in md_path.read_text()


def test_ulp_distance_counts_float16_steps_across_zero() -> None:
    import numpy as np

    from prep.bench.pipeline_bench import _ordered

    values = np.array([0.0, -0.0, 1.0, np.nextafter(np.float16(1.0), np.float16(2.0)), -np.float16(6e-8), 6e-8],
                      dtype=np.float16)
    ordered = _ordered(values)
    assert ordered[0] == ordered[1]  # +0 and -0
    assert ordered[3] - ordered[2] == 1  # neighbours
    assert ordered[5] - ordered[4] == 2  # the smallest subnormals on both sides of zero
