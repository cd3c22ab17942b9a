"""`prep demo [DIR]`: the whole flow offline, in about a minute, on generated images and tiny models.

Generated sample images and tiny random models of the real classes (`prep.testing`), then every
pass, `verify`, a WebDataset export, loading it back (`load_manifest`, `load_shards`) and the
HTML report. Nothing is downloaded. The arrays are meaningless (random weights): the demo shows
the files, the formats and the commands, not a dataset to train on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("prep")

DEMO_BUCKETS = "64x64,64x128,128x64,96x96"


@dataclass
class DemoResult:
    folder: Path
    seconds: float = 0.0
    steps: list[tuple[str, float, str]] = field(default_factory=list)  # (step, seconds, what it left)

    def step(self, name: str, started: float, what: str) -> None:
        self.steps.append((name, time.perf_counter() - started, what))


def run_demo(folder: str | Path, *, seed: int = 0) -> DemoResult:
    """Run every part of `prep` in `folder`; returns what each step took and left."""
    from prep.models import quiet_libraries
    from prep.testing import make_test_images, make_tiny_models

    quiet_libraries()
    folder = Path(folder).absolute()
    result = DemoResult(folder)
    begun = started = time.perf_counter()
    models = make_tiny_models(folder / "tiny-models", seed=seed)
    images = make_test_images(folder / "images", seed=seed)
    result.step("inputs", started, f"{len(images)} generated images in images/, tiny models in tiny-models/")
    manifest, derived = folder / "data" / "manifest.jsonl", folder / "data" / "derived"
    _run(result, models, folder / "images", manifest, derived)
    _verify(result, manifest, derived)
    _export(result, manifest, derived, folder / "data" / "shards")
    _load_back(result, manifest, derived, folder / "data" / "shards")
    _report(result, manifest, derived, folder / "report")
    result.seconds = time.perf_counter() - begun
    return result


def _run(result: DemoResult, models: dict, images: Path, manifest: Path, derived: Path) -> None:
    from prep import stages
    from prep.options import ModelChoice, RunOptions
    from prep.pipeline import run_job
    from prep.stages.caption import CaptionOptions

    started = time.perf_counter()
    names = {"vae": "vae", "t5": "t5", "dinov3": "dinov3", "caption": "captioner"}
    opts = RunOptions(
        images=images, manifest=manifest, derived_dir=derived, buckets=DEMO_BUCKETS, min_free_gb=0.0, num_workers=1,
        models={name: ModelChoice(str(models[names[name]])) for name in stages.STAGES if name in names},
        stage_options={"caption": CaptionOptions(caption_max_new_tokens=12)},
    )
    summary = run_job(opts)
    result.step("prep run", started, f"{summary.counts.get('total', 0)} records in {manifest.name}, "
                                     "side files in derived/")


def _verify(result: DemoResult, manifest: Path, derived: Path) -> None:
    from prep.verify import verify_manifest

    started = time.perf_counter()
    report = verify_manifest(manifest, derived)
    result.step("prep verify", started, "OK" if report.ok else "PROBLEMS FOUND")


def _export(result: DemoResult, manifest: Path, derived: Path, out: Path) -> None:
    from prep.export.webdataset import export_webdataset

    started = time.perf_counter()
    summary = export_webdataset(manifest, derived, out, shard_size=4, overwrite=out.exists(), progress_every=0)
    result.step("prep export webdataset", started, f"{summary.written_samples} samples in "
                                                   f"{summary.written_shards} shards under shards/")


def _load_back(result: DemoResult, manifest: Path, derived: Path, shards: Path) -> None:
    import prep

    started = time.perf_counter()
    rows = prep.load_manifest(manifest, derived, ready_only=True)
    batch = next(iter(prep.load_shards(shards, batch_size=2)))
    result.step("load back", started, f"load_manifest: {len(rows)} rows; load_shards: a batch of "
                                      f"{len(batch['key'])} with vae {tuple(batch['vae'].shape)}")


def _report(result: DemoResult, manifest: Path, derived: Path, out: Path) -> None:
    from prep.report import build_report

    started = time.perf_counter()
    build_report(manifest, derived, out, samples=8, progress=False)
    result.step("prep report", started, "report/index.html")


def format_demo(result: DemoResult) -> str:
    lines = [f"demo in {result.folder} ({result.seconds:.0f} s):"]
    lines += [f"  {name:<24} {seconds:5.1f} s  {what}" for name, seconds, what in result.steps]
    lines += [
        "",
        f"Look at: {result.folder / 'report' / 'index.html'} (open it in a browser),",
        f"         {result.folder / 'data' / 'manifest.jsonl'} and {result.folder / 'data' / 'shards'}.",
        "The models were tiny and random: every array here is meaningless. For real data, see README \"Install and run\".",
    ]
    return "\n".join(lines)
