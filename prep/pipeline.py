"""The main job: prepare the manifest, then every stage's pass, resumably, under Accelerate.

Shape of a run (every rank runs this; `accelerate launch` starts the ranks):

1. Every rank checks its inputs and model flags (cheap, read-only), so a bad flag or a gated
   model fails everywhere at once, before any pass and before anything is created.
2. The main rank takes the locks (the manifest's, at its resolved path, and the derived
   dir's, which is bound to one manifest) and prepares the manifest alone (`prep.prepare`).
3. For each pass (the image stages share one, `stage_groups`), every rank reads the
   manifest's projection (memory-mapped, shared), takes its stride of the records (row %
   ranks == rank: balanced, and no two ranks touch one record), decides each stage's work
   with a `Dataset.filter` (`prep.needs`), loads the models that fit together
   (`prep.residency`) and encodes and writes (`prep.passes`). Record updates go to per-rank
   journals (durable after every batch). The next pass reads the manifest with the journals
   overlaid in memory (`journal.read_current`); the main rank folds them into the file with a
   streaming rewrite once at the end of the run, and sooner when they grow large
   (`journal.fold_due`) or every `--checkpoint-minutes` during a pass. A rewrite costs the
   whole file, so a run that adds 200 images to a million records pays for it once.
4. Right after the DINOv3 pass the main rank judges near duplicates (`prep.curate`), so the
   VAE and T5 passes skip the records it flags; the other ranks wait at a barrier.

Resume comes from files on disk (stamped side files, journals), never from the `datasets`
cache. No collective runs during long work, only between passes.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prep import journal, provenance, stages, store
from prep.curate import AFTER_STAGE
from prep.errors import UserError
from prep.fsio import LockedError, acquire_lock, release_lock, sweep_temp_files
from prep.manifest import cache_file, lock_manifest, read_manifest, resolve_manifest_path
from prep.models import ResolvedModel, resolve_model
from prep.needs import Yardstick, plan_stage, read_redo
from prep.options import RunOptions
from prep.tally import Tally, progress_line, refreshed_line

logger = logging.getLogger("prep")

__all__ = ["RunOptions", "RunSummary", "run", "run_job"]


CPU_THREADS = 1  # --cpu-threads default (see set_cpu_threads)


class RunError(UserError):
    """An expected condition that stops the run (bad input, no space); reported as one line."""


# ------------------------------------------------------------------------------- checks
def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def has_any_image(folder: Path) -> bool:
    from prep.scan import iter_image_files

    return next(iter(iter_image_files(folder)), None) is not None


def check_inputs(opts: RunOptions) -> None:
    """Read-only checks every rank runs first, so bad input fails cleanly everywhere, creating nothing."""
    manifest = opts.manifest
    if opts.images is not None:
        if not opts.images.exists():
            raise RunError(f"images folder {opts.images} does not exist")
        if not opts.images.is_dir():
            raise RunError(f"--images {opts.images} is not a folder")
    if manifest.exists() and not resolve_manifest_path(manifest).is_file():
        raise RunError(f"manifest {manifest} is not a file")
    has_records = manifest.exists() and os.path.getsize(resolve_manifest_path(manifest)) > 0
    if opts.images is None and not opts.dataset and not opts.webdataset and not manifest.exists():
        raise RunError(f"manifest {manifest} does not exist and no input was given (--images, --dataset or --webdataset)")
    check_source_options(opts)
    if opts.images is not None and not has_records and not opts.no_resume and not has_any_image(opts.images):
        from prep.config import IMAGE_EXTENSIONS

        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise RunError(f"no image found under {opts.images} (looked for {kinds}, hidden folders skipped)")
    if opts.derived_dir.exists() and not opts.derived_dir.is_dir():
        raise RunError(f"derived dir {opts.derived_dir} is not a folder")
    for target in (opts.derived_dir, manifest.parent):
        parent = nearest_existing(target)
        if not parent.is_dir():
            raise RunError(f"cannot create {target}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunError(f"{target} is not writable")
    free_gb = shutil.disk_usage(nearest_existing(opts.derived_dir)).free / 1e9
    if free_gb < opts.min_free_gb:
        raise RunError(
            f"only {free_gb:.1f} GB free under {opts.derived_dir}, need {opts.min_free_gb:g} "
            "(about 675 KiB per 1024x1024 image; lower with --min-free-gb)"
        )
    try:
        opts.bucket_list()
    except ValueError as exc:
        raise RunError(f"--buckets: {exc}") from None
    if (opts.batch_size is not None and opts.batch_size < 1) or opts.text_batch_size < 1:
        raise RunError("batch sizes must be >= 1")
    if (opts.batch_pixels is not None and opts.batch_pixels < 1) or (opts.cpu_threads is not None and opts.cpu_threads < 1):
        raise RunError("--batch-pixels and --cpu-threads must be >= 1")
    if opts.memory_budget_gb is not None and opts.memory_budget_gb < 0:
        raise RunError("--memory-budget-gb must be >= 0")
    if opts.pass_ not in ("all", "migrate", *stages.STAGES):
        raise RunError(f"--pass {opts.pass_}: choose all, migrate or one of {', '.join(stages.STAGES)}")
    from prep.curate import check_given

    check_given(opts)


def check_source_options(opts: RunOptions) -> None:
    """The input and caption flags (`prep.sources`, `prep.captions`): cheap checks, no streaming."""
    if opts.webdataset:
        from prep.tars import check_tars

        check_tars(opts.webdataset)
    if opts.captions == "instance" and not (opts.instance_prompt or "").strip():
        raise RunError("--captions instance needs --instance-prompt TEXT")
    if opts.instance_prompt and opts.captions != "instance":
        raise RunError(f"--instance-prompt is used only with --captions instance (not {opts.captions})")
    if opts.captions == "metadata" and opts.images is not None and opts.images.is_dir():
        from prep.captions import find_metadata_files

        if not find_metadata_files(opts.images):
            raise RunError(f"--captions metadata: no metadata.jsonl, metadata.csv or metadata.parquet under {opts.images}")


def resolve_models(opts: RunOptions) -> dict[str, ResolvedModel]:
    """Check the model flag of every selected stage and pin its revision (before any pass runs)."""
    resolved = {}
    for stage in opts.selected_stages():
        owner = stage.model_from or stage.name
        if stages.model_spec(stage) is None:
            continue
        choice = opts.models[owner]
        resolved[stage.name] = resolve_model(
            f"--{owner}-model", choice.source, revision=choice.revision, subfolder=choice.subfolder
        )
    return resolved


# ------------------------------------------------------------------------------ locks
@dataclass
class Locks:
    manifest: object
    derived: object

    def release(self) -> None:
        release_lock(self.derived)
        release_lock(self.manifest)


def take_locks(opts: RunOptions) -> Locks:
    """The manifest's lock (at its resolved path) and the derived dir's; one job per dataset."""
    target = resolve_manifest_path(opts.manifest)
    target.parent.mkdir(parents=True, exist_ok=True)
    opts.derived_dir.mkdir(parents=True, exist_ok=True)
    manifest_lock = lock_manifest(opts.manifest, error=RunError)
    try:
        derived_lock = acquire_lock(opts.derived_dir / store.LOCK_FILE, f"the derived dir {opts.derived_dir}")
    except LockedError as exc:
        release_lock(manifest_lock)
        raise RunError(str(exc)) from None
    return Locks(manifest_lock, derived_lock)


def bind_derived_dir(opts: RunOptions) -> None:
    """A derived dir belongs to one manifest: refuse another (its artifacts are that manifest's)."""
    derived = Path(os.path.realpath(opts.derived_dir))
    manifest = resolve_manifest_path(opts.manifest)
    bound = store.read_metadata(derived).get("manifest")
    relative = os.path.relpath(manifest, derived)
    if isinstance(bound, str) and os.path.normpath(derived / bound) != str(manifest) and not opts.rebind:
        raise RunError(
            f"{opts.derived_dir} belongs to the manifest {os.path.normpath(derived / bound)} (prep_metadata.json); "
            "use another --derived-dir, or pass --rebind if you moved or renamed that manifest"
        )
    if bound != relative:
        store.update_metadata(derived, {"manifest": relative})


# ------------------------------------------------------------------------------ prepare
def start_over(opts: RunOptions) -> None:
    """--no-resume: keep the old manifest as a timestamped backup, delete the side files."""
    target = resolve_manifest_path(opts.manifest)
    if target.exists():
        backup = target.with_name(f"{target.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(target, backup)
        logger.info("--no-resume: previous manifest kept as %s", backup)
    cache_file(target).unlink(missing_ok=True)
    journal.clear(opts.manifest)
    for kind in stages.file_artifacts(stages.ALL):
        shutil.rmtree(store.artifact_dir(opts.derived_dir, kind), ignore_errors=True)


def prepare(opts: RunOptions, tally: Tally) -> None:
    """Main rank only: sweep, bind, then the manifest steps (`prep.prepare`)."""
    from prep.prepare import prepare_manifest

    if opts.no_resume:
        start_over(opts)
    store.ensure_dirs(opts.derived_dir)
    target = resolve_manifest_path(opts.manifest)
    swept = store.sweep_stray_temp_files(opts.derived_dir)
    # A manifest checkpoint (or rejected-lines / metadata rewrite) killed before its rename
    # leaves `.manifest.jsonl.<random>.prep-tmp` beside the manifest: sweep those too.
    swept += sweep_temp_files(target.parent, prefix=f".{target.name}.")
    swept += sweep_temp_files(opts.derived_dir, prefix=f".{store.METADATA_FILE}.")
    if swept:
        logger.info("removed %d temp files left by an interrupted run", swept)
    legacy_idx = opts.manifest.with_suffix(".idx")
    if legacy_idx.exists():
        logger.info("ignoring legacy %s: resume now comes from the manifest and side files", legacy_idx)
    prepare_manifest(opts, read_manifest(opts.manifest), tally)
    updates: dict = {"buckets": [f"{w}x{h}" for w, h in opts.bucket_list()]}
    if opts.images is not None:
        roots = store.read_metadata(opts.derived_dir).get("images_roots") or []
        root = os.path.abspath(opts.images)
        if root not in roots:
            updates["images_roots"] = [*roots, root]
    if any(store.read_metadata(opts.derived_dir).get(k) != v for k, v in updates.items()):
        store.update_metadata(opts.derived_dir, updates)


# ------------------------------------------------------------------------------- passes
@dataclass
class PassStats:
    """Timing of one pass on one rank: the figures the benchmarks read."""

    kind: str  # the stage, or "caption+dinov3+vae" for image stages that shared one pass
    records: int = 0
    load_seconds: float = 0.0
    encode_seconds: float = 0.0  # wall time of the pass, model loading excluded
    model_seconds: float = 0.0  # time inside the models' forward / generate
    reads: int = 0  # image files read (one per record in an image pass)
    decodes: int = 0  # image decodes (one per record when its stages agree on the JPEG draft scale)
    warmup_seconds: float = 0.0  # --compile: first batch of each input shape, compilation included
    cpu_seconds: float = 0.0  # CPU time of this rank and its decoding workers during the pass
    stages: dict = field(default_factory=dict)  # per stage: records, model_seconds

    @property
    def model_share(self) -> float:
        return self.model_seconds / self.encode_seconds if self.encode_seconds else 0.0


def stage_config(stage, opts: RunOptions, model: ResolvedModel | None, dtype: str | None) -> dict:
    """The configuration a stage's stamps record (and a run judges staleness against)."""
    fields: dict = {}
    if model is not None:
        fields = {"model_id": model.source, "revision": model.revision, "dtype": dtype}
        if stages.model_spec(stage).subfolder is not None:
            fields["subfolder"] = model.subfolder
    fields.update(stage.settings(opts))
    return fields


def expected_config(stage, opts: RunOptions, model: ResolvedModel | None, device: str) -> dict:
    """What this run expects of existing stamps; the dtype is judged only when --dtype was given
    ("auto" differs between a GPU and a CPU box, and resuming elsewhere should not redo a dataset)."""
    from prep.models import resolve_dtype

    dtype = None if opts.dtype == "auto" else str(resolve_dtype(opts.dtype, device))
    fields = stage_config(stage, opts, model, dtype)
    if fields.get("revision") == "unknown":
        fields["revision"] = None
    return fields


def stage_groups(selected: list, first: str | None = None) -> list[list]:
    """The passes, in run order: consecutive image stages share one pass (each image is read and
    decoded once for all of them); a stage reading captions runs alone, after the captioner's
    pass is folded in. `first`: an image stage that runs alone before the other image stages,
    because a step between (near-duplicate judging after DINOv3) spares them the records it flags."""
    if first is not None and any(stage.name == first for stage in selected):
        ahead = [stage for stage in selected if stage.name == first]
        return [ahead, *stage_groups([stage for stage in selected if stage.name != first])]
    groups: list[list] = []
    for stage in selected:
        if groups and stage.reads == stages.IMAGE and groups[-1][-1].reads == stages.IMAGE:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def near_duplicates_first(opts: RunOptions) -> str | None:
    """The stage to run before the other image stages: DINOv3 while near duplicates are judged
    (the captioner and the VAE then skip them), else none (one image pass for all)."""
    from prep.curate import rules_for

    return AFTER_STAGE if rules_for(opts, opts.derived_dir).near_duplicate is not None else None


@dataclass
class StagePlan:
    """One stage's work on this rank, decided before any model loads."""

    stage: object
    model: ResolvedModel | None
    todo: object  # the filtered projection Dataset
    stale: dict
    expected: dict  # the stamp fields this run expects of the stage's outputs


def plan_on_rank(stage, dataset, opts: RunOptions, models: dict, device: str, journal_) -> StagePlan:
    """The `needs` filter of one stage over this rank's records; refreshed file stamps journaled."""
    model = models.get(stage.name)
    yard = Yardstick(
        derived_dir=opts.derived_dir,
        expected=provenance.Expected({stage.name: expected_config(stage, opts, model, device)}),
        keep_stale=opts.keep_stale,
        recaption=opts.recaption,
        redo=read_redo(opts.derived_dir),
    )
    todo, work = plan_stage(dataset, stage, yard)
    if work.refreshed:
        journal_.append(
            {"image_id": row_id, f"provenance.{stage.name}.file": stamp}
            for row_id, stamp in _ids_of(todo_source=dataset, refreshed=work.refreshed)
        )
    return StagePlan(stage, model, todo, work.stale, yard.expected.get(stage.name))


def run_stages(group: list, opts: RunOptions, state, models: dict[str, ResolvedModel], tally: Tally) -> list[PassStats]:
    """A group of stages on every rank: filter each one's stride -> load the models that fit
    together -> one pass per resident group -> unload -> fold the journals when they have grown
    large (main rank; else they stay overlaid until the run's final fold, `fold_journals`)."""
    device = device_for(opts, state)
    manifest = journal.read_current(opts.manifest)
    dataset = manifest.to_dataset()
    if state.num_processes > 1:
        dataset = dataset.shard(state.num_processes, state.process_index, contiguous=False)
    journal_ = journal.Journal(opts.manifest, state.process_index)
    plans = [plan_on_rank(stage, dataset, opts, models, device, journal_) for stage in group]
    del manifest
    totals = _gather(state, [len(plan.todo) for plan in plans])
    if state.is_main_process:
        for index, plan in enumerate(plans):
            announce(plan.stage, opts, plan.model, device, sum(counts[index] for counts in totals), plan.stale)
    state.wait_for_everyone()  # the models are recorded before any rank writes an artifact
    stats = [encode_together(together, opts, state, device, journal_, tally)
             for together in resident(plans, opts, device)]
    journal_.close()
    state.wait_for_everyone()
    if state.is_main_process:
        for plan in plans:
            finished = plan.stage.finish(opts=opts, model=plan.model, device=device, config=plan.expected)
            if finished:
                store.update_metadata(opts.derived_dir, finished)
        if journal.fold_due(opts.manifest):
            fold_journals(opts)
    state.wait_for_everyone()
    return stats or [PassStats("+".join(stage.name for stage in group))]


def fold_journals(opts: RunOptions) -> None:
    """Main rank, every rank done writing: the journals into the manifest (one streaming
    rewrite, when anything changed), then cleared."""
    journal.merge_into_manifest(opts.manifest)
    journal.clear(opts.manifest)


def resident(plans: list[StagePlan], opts: RunOptions, device: str) -> list[list[StagePlan]]:
    """The stages with work on this rank, in groups whose models fit in memory together (`prep.residency`)."""
    from prep import residency
    from prep.models import resolve_dtype
    from prep.stages.base import DEFAULT_BATCH_PIXELS

    busy = [plan for plan in plans if len(plan.todo)]
    if len(busy) <= 1:
        return [busy] if busy else []
    itemsize = resolve_dtype(opts.dtype, device).itemsize
    footprints = [
        residency.footprint(plan.stage.name, residency.checkpoint_folder(plan.model), itemsize,
                            has_model=plan.model is not None)
        for plan in busy
    ]
    largest = max(w * h for w, h in opts.bucket_list())
    budget_pixels = opts.batch_pixels or (DEFAULT_BATCH_PIXELS if str(device).startswith("cuda") else 0)
    batch_pixels = opts.batch_size * largest if opts.batch_size else max(budget_pixels, largest)
    budget = residency.memory_budget(device, opts.memory_budget_gb)
    reserve = residency.working_reserve(footprints, batch_pixels, itemsize)
    groups = residency.resident_groups(footprints, budget, reserve)
    sizes = ", ".join(f"{f.name} {f.weights / 1e9:.2f} GB" if f.weights is not None else f"{f.name} unknown"
                      for f in footprints)
    how = "together" if len(groups) == 1 else "as " + " | ".join("+".join(g) for g in groups)
    logger.info("image pass: models %s (weights %s; budget %.1f GB, reserve %.1f GB)",
                how, sizes, budget / 1e9, reserve / 1e9)
    by_name = {plan.stage.name: plan for plan in busy}
    return [[by_name[name] for name in group] for group in groups]


def encode_together(plans: list[StagePlan], opts: RunOptions, state, device: str, journal_, tally: Tally) -> PassStats:
    """Load the plans' models, run one pass over their records, unload; this rank's PassStats."""
    from prep.passes import AsyncWriter, run_pass
    from prep.progress import progress

    kind = "+".join(plan.stage.name for plan in plans)
    records = len(set().union(*(plan.todo["row"] for plan in plans)))
    stats = PassStats(kind, records=records)
    writer = AsyncWriter()
    ctxs: list = []
    started = time.perf_counter()
    bar = None
    try:
        for plan in plans:
            ctxs.append(start_context(plan, opts, state, device, journal_, tally, writer))
        stats.load_seconds = time.perf_counter() - started
        text = all(plan.stage.reads == stages.CAPTION for plan in plans)
        bar = ctxs[0].bar = progress(total=records, desc=kind, unit="caption" if text else "img")
        encode_started, cpu_started = time.perf_counter(), process_cpu_seconds()
        counts = run_pass(ctxs, {plan.stage.name: plan.todo for plan in plans}, device=device)
        writer.drain()
        stats.encode_seconds = time.perf_counter() - encode_started
        stats.cpu_seconds = process_cpu_seconds() - cpu_started
        stats.reads, stats.decodes = counts.reads, counts.decodes
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        for ctx in ctxs:
            ctx.encoder.unload()
        free_memory()
    stats.model_seconds = sum(ctx.model_seconds for ctx in ctxs)
    stats.warmup_seconds = sum(ctx.warmup_seconds for ctx in ctxs)
    stats.stages = {ctx.kind: {"records": len(plan.todo), "model_seconds": ctx.model_seconds}
                    for ctx, plan in zip(ctxs, plans, strict=True)}
    log_pass(stats, state, time.perf_counter() - started)
    return stats


def announce(stage, opts: RunOptions, model: ResolvedModel | None, device: str, total: int, stale: dict) -> None:
    """Main rank, before a pass: say how much work it has, and record the model that will do it."""
    from prep.models import resolve_dtype

    if not total and not stale:
        return
    count = sum(1 for why in stale.values() if why.startswith("stale"))
    kept = " (kept: --keep-stale)" if opts.keep_stale and count else ""
    logger.info("%s: %d records need work%s%s", stage.name, total, f", {count} stale" if count else "", kept)
    if not total:
        return
    updates: dict = {}
    if model is not None:
        dtype = str(resolve_dtype(opts.dtype, device))
        models = dict(store.read_metadata(opts.derived_dir).get("models") or {})
        models[stage.name] = {"model_id": model.source, "revision": model.revision, "dtype": dtype}
        updates = {"models": models, **stage.metadata(model, compute_dtype=dtype)}
    if stage.optional:
        updates["optional_stages"] = sorted(store.active_stages(opts.derived_dir) | {stage.name})
    metadata = store.read_metadata(opts.derived_dir)
    if any(metadata.get(key) != value for key, value in updates.items()):
        store.update_metadata(opts.derived_dir, updates)


def process_cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pass's decoding workers, once joined)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def start_context(plan: StagePlan, opts: RunOptions, state, device: str, journal_, tally: Tally, writer):
    """Load one stage's model (compiled with --compile) and make its PassContext."""
    from prep.passes import PassContext

    encoder = plan.stage.load(plan.model, device=device, dtype=opts.dtype, opts=opts)
    compiled = bool(opts.compile and encoder.compile())
    config = stage_config(plan.stage, opts, plan.model, str(encoder.dtype))
    return PassContext(
        stage=plan.stage, opts=opts, encoder=encoder, journal=journal_, writer=writer, tally=tally,
        is_main=state.is_main_process, config=config, stale=plan.stale, compiled=compiled,
    )


def log_pass(stats: PassStats, state, elapsed: float) -> None:
    decodes = f"; {stats.decodes / stats.records:.2f} decodes per image" if stats.reads else ""
    warmup = f"; compile warm-up {stats.warmup_seconds:.1f} s" if stats.warmup_seconds else ""
    logger.info(
        "%s: rank %d encoded %d records in %.1f s (%.2f/s; model load %.1f s; %.0f%% of encode time in the model%s%s)",
        stats.kind, state.process_index, stats.records, elapsed, stats.records / max(elapsed, 1e-9),
        stats.load_seconds, 100 * stats.model_share, decodes, warmup,
    )


def judge_near_duplicates(opts: RunOptions, state) -> None:
    """Main rank, right after the DINOv3 pass and before the VAE's: flag near duplicates (`prep.curate`),
    so the expensive passes skip them. The other ranks wait at the barrier."""
    if state.is_main_process:
        from prep.curate import curate_after_stage

        curate_after_stage(opts, device_for(opts, state))
    state.wait_for_everyone()


def _ids_of(*, todo_source, refreshed: dict[int, dict]):
    """(image_id, new file stamp) for refreshed rows (same bytes, new mtime)."""
    rows = set(refreshed)
    for row, image_id in zip(todo_source["row"], todo_source["image_id"], strict=True):
        if row in rows:
            yield image_id, refreshed[row]


def _gather(state, value) -> list:
    """Every rank's `value` (a collective: only between passes)."""
    if state.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_for(opts: RunOptions, state) -> str:
    """--device auto follows Accelerate (one GPU per rank); an explicit device wins."""
    return str(state.device) if opts.device == "auto" else opts.device


def set_cpu_threads(opts: RunOptions, device: str) -> None:
    """On a CPU, every process runs its models on the same number of threads (--cpu-threads, default
    1): CPU kernels split their work by thread count, and the last bits of a result follow the split,
    so results would otherwise depend on how many ranks share the machine."""
    import torch

    if torch.device(device).type == "cpu":
        torch.set_num_threads(opts.cpu_threads or CPU_THREADS)


def make_state(opts: RunOptions):
    """Accelerate's PartialState; on a machine without CUDA it runs ranks on the CPU (gloo)."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or opts.device == "cpu"
    return PartialState(cpu=cpu)


def exit_with_launcher() -> None:
    """A rank started by a launcher exits when the launcher dies (kill -9 of `accelerate launch`):
    an orphaned rank would hold the dataset's locks and wait forever at the next barrier."""
    if "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                logger.error("the launcher (pid %d) is gone: exiting", parent)
                os._exit(1)

    threading.Thread(target=watch, name="prep-parent-watch", daemon=True).start()


def gather_tallies(state, tally: Tally) -> Tally:
    """Merge every rank's tally on the main rank (one collective, at the very end)."""
    if state.num_processes == 1:
        return tally
    merged = Tally()
    for item in _gather(state, tally):
        merged.merge(item)
    return merged


@dataclass
class RunSummary:
    """What a run did: counts (main rank), this rank's pass timings, wall time, exit code."""

    counts: dict[str, int]
    passes: list[PassStats]
    seconds: float
    exit_code: int


def run_job(opts: RunOptions) -> RunSummary:
    """The main job; every rank calls it. Counts are complete on the main rank only."""
    from prep.models import quiet_libraries

    quiet_libraries()
    check_inputs(opts)
    state = make_state(opts)
    exit_with_launcher()
    set_cpu_threads(opts, device_for(opts, state))
    started = time.perf_counter()
    with state.main_process_first():
        models = resolve_models(opts)
    tally = Tally()
    locks = None
    if state.is_main_process:
        locks = take_locks(opts)
    try:
        if state.is_main_process:
            bind_derived_dir(opts)
            prepare(opts, tally)
        state.wait_for_everyone()
        passes = []
        for group in stage_groups(opts.selected_stages(), near_duplicates_first(opts)):
            passes.extend(run_stages(group, opts, state, models, tally))
            if any(stage.name == AFTER_STAGE for stage in group):
                judge_near_duplicates(opts, state)
        if state.is_main_process:
            fold_journals(opts)
        merged = gather_tallies(state, tally)
        code, counts = 0, {}
        if state.is_main_process:
            counts = merged.counts(len(read_manifest(opts.manifest)))
            report(opts, merged, counts, time.perf_counter() - started)
            if opts.verify:
                code = verify_after_run(opts)
        state.wait_for_everyone()  # every rank's side files are in place
        if state.is_main_process:
            store.mark_left_clean(opts.derived_dir)
    finally:
        if locks is not None:
            locks.release()
    return RunSummary(counts, passes, time.perf_counter() - started, code)


def report(opts: RunOptions, tally: Tally, counts: dict, elapsed: float) -> None:
    from prep.curate import filtered_line

    print(progress_line(counts, (counts["total"] - counts["skipped"]) / max(elapsed, 1e-9)), flush=True)
    if line := filtered_line(read_manifest(opts.manifest)):
        print(line, flush=True)
    if line := refreshed_line(tally):
        print(line, flush=True)
    if tally.unreadable:
        print(f"scan: {tally.unreadable} unreadable files skipped (see warnings above)", flush=True)
    if tally.skipped_inputs:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(tally.skipped_inputs.items()))
        print(f"inputs: {sum(tally.skipped_inputs.values())} samples skipped ({reasons}; see warnings above)", flush=True)


def verify_after_run(opts: RunOptions) -> int:
    from prep.verify import print_report, verify_manifest

    result = verify_manifest(opts.manifest, opts.derived_dir)
    print_report(result)
    return 0 if result.ok else 1


def run(opts: RunOptions) -> int:
    """The main job. Returns the process exit code."""
    return run_job(opts).exit_code
