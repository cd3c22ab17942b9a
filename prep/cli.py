"""The `prep` command: argument parsing only; every subcommand calls one library function.

Options are declared once, as dataclasses in `prep.options` (and each stage's own); this module
turns them into subcommands. Expected failures (bad input, missing paths, full disk, a gated
model) exit non-zero with one line on stderr and no traceback; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from prep import __version__
from prep.errors import UserError
from prep.options import (
    CurateOptions,
    DemoOptions,
    ExportOptions,
    PruneOptions,
    PushOptions,
    ReportOptions,
    RunOptions,
    TinyModelsOptions,
    VerifyOptions,
    add_model_options,
    add_options,
    add_stage_options,
    apply_config_defaults,
    from_namespace,
    pass_choices,
    read_config_file,
    run_options_from,
)

EXIT_OK, EXIT_FAILED = 0, 1

DESCRIPTION = (
    "Turn a folder of images into a training-ready dataset for a text- and DINOv3-conditioned Flux-VAE "
    "diffusion model: a JSONL manifest plus Flux VAE latents, T5-Large hidden states and DINOv3 embeddings "
    "as .npy side files, captions from Gemma 3 where missing; export as bucketed WebDataset shards or to "
    "the Hugging Face Hub."
)


# ------------------------------------------------------------------------------ commands
def cmd_run(args: argparse.Namespace) -> int:
    from prep.pipeline import run

    return run(run_options_from(args))


def cmd_verify(args: argparse.Namespace) -> int:
    from prep.options import model_choices
    from prep.verify import expected_of, judging_config, print_report, verify_manifest

    opts = from_namespace(VerifyOptions, args)
    judged = judging_config(opts.derived_dir, model_choices(args))
    report = verify_manifest(
        opts.manifest, opts.derived_dir, workers=opts.num_workers or 8, expected=expected_of(judged),
        adopt_with=judged if opts.adopt else None,
    )
    print_report(report, as_json=opts.json)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_export_webdataset(args: argparse.Namespace) -> int:
    from prep.export.webdataset import export_webdataset, format_summary

    opts = from_namespace(ExportOptions, args)
    summary = export_webdataset(
        opts.manifest, opts.derived_dir, opts.output_dir, shard_size=opts.shard_size, limit=opts.limit,
        shuffle=opts.shuffle, seed=opts.seed, buckets=opts.bucket, overwrite=opts.overwrite, resume=opts.resume,
        dry_run=opts.dry_run, progress_every=opts.progress_every, num_workers=opts.num_workers,
        allow_stale=opts.allow_stale, image_path=opts.image_path, license=opts.license,
    )
    print(json.dumps(summary.to_dict(), indent=2) if opts.json else format_summary(summary))
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from prep.export.hub import format_push, push_export

    opts = from_namespace(PushOptions, args)
    if not opts.repo_id:
        raise UserError("--repo-id is required (OWNER/NAME)")
    result = push_export(
        opts.folder, opts.repo_id, private=opts.private, revision=opts.revision, token_env=opts.token_env,
        dry_run=opts.dry_run,
    )
    print(format_push(result))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from prep.report import build_report, summary_line

    opts = from_namespace(ReportOptions, args)
    if opts.samples < 0:
        raise UserError("--samples must be >= 0")
    result = build_report(
        opts.manifest, opts.derived_dir, opts.output_dir, samples=opts.samples, seed=opts.seed,
        decode=not opts.no_decode, vae_model=opts.vae_model, vae_subfolder=opts.vae_subfolder,
        t5_model=opts.t5_model, device=opts.device, dtype=opts.dtype, workers=opts.num_workers or 8,
    )
    print(summary_line(result))
    return EXIT_OK


def cmd_curate(args: argparse.Namespace) -> int:
    from prep.curate import curate_dataset, format_judgement, judgement_dict

    opts = from_namespace(CurateOptions, args)
    judgement, ids = curate_dataset(opts)
    if opts.json:
        print(json.dumps(judgement_dict(judgement, ids, dry_run=opts.dry_run), indent=2))
    else:
        print(format_judgement(judgement, ids, dry_run=opts.dry_run))
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from prep.prune import format_prune, prune

    opts = from_namespace(PruneOptions, args)
    print(format_prune(prune(opts.manifest, opts.reason, dry_run=opts.dry_run)))
    return EXIT_OK


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from prep.testing import make_tiny_models

    opts = from_namespace(TinyModelsOptions, args)
    for name, path in make_tiny_models(opts.dir, seed=opts.seed).items():
        print(f"{name}: {path}")
    print("These models are randomly initialised: their outputs are meaningless (for tests and smoke runs only).")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from prep.demo import format_demo, run_demo

    opts = from_namespace(DemoOptions, args)
    print(format_demo(run_demo(opts.dir, seed=opts.seed)))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from prep.bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


# ------------------------------------------------------------------------------- parser
def _command(sub, name: str, func: Callable, options: type | None, help_text: str, description: str = ""):
    parser = sub.add_parser(name, help=help_text, description=description or help_text)
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="YAML or TOML file of options (names as the flags, e.g. shard_size: 500); "
                        "flags given here override it")
    if options is not None:
        add_options(parser, options)
    parser.set_defaults(func=func, _parser=parser)
    return parser


def add_run_parser(sub) -> argparse.ArgumentParser:
    parser = _command(
        sub, "run", cmd_run, RunOptions,
        "scan, migrate, caption and encode (same as `accelerate launch prep/run.py`)",
        "The main job: scan the inputs (--images, --dataset, --webdataset) for new images, take the captions "
        "you have (--captions), migrate old records, flag images that would hurt training (too small for their "
        "bucket, too elongated, duplicates: never deleted, no model pass; see the curation options and `prep "
        "curate`), then the caption (where missing), DINOv3, VAE and T5 passes; resumable (kill it and run it "
        "again), on every GPU under `accelerate launch`.",
    )
    for action in parser._actions:
        if action.dest == "pass_":
            action.choices = pass_choices()
    groups = {g.title: g for g in parser._action_groups}
    add_stage_options(parser, groups)
    add_model_options(parser, groups=groups)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prep", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"prep {__version__}")
    parser.add_argument("--debug", dest="top_debug", action="store_true", help="show tracebacks for expected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_run_parser(sub)
    verify = _command(
        sub, "verify", cmd_verify, VerifyOptions,
        "read and check every side file of a manifest (exit 1 if anything is missing, invalid or stale)",
    )
    add_model_options(verify, judging=True)
    export = sub.add_parser("export", help="write training shards from a finished manifest")
    formats = export.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    _command(
        formats, "webdataset", cmd_export_webdataset, ExportOptions,
        "WebDataset tar shards per aspect bucket, plus a dataset card (a ready Hub dataset repo)",
        "Write every ready record (valid v2 record, caption, mask, and its side files, stamped for it) as a "
        "sample of OUT/bucket_WxH/shard-NNNNNN.tar; then OUT/README.md (dataset card), OUT/stats.json and, "
        "last, OUT/index.json. Same inputs and seed give byte-identical shards; each shard is written to a "
        "temp file and renamed when complete.",
    )
    _command(
        sub, "push", cmd_push, PushOptions, "upload an export folder to a Hugging Face dataset repo (resumable)",
        "Create the dataset repo (and the branch for --revision) if needed and upload the export folder with "
        "huggingface_hub's resumable multi-commit upload; rerun to resume an interrupted push. The token comes "
        "from --token-env, else HF_TOKEN or the `hf auth login` cache; it is never printed.",
    )
    _command(
        sub, "curate", cmd_curate, CurateOptions,
        "flag images that would hurt training (too small, too elongated, duplicates); --dry-run shows a table",
        "Apply the curation rules to an existing dataset: flag (never delete) records whose image is too "
        "small, must be enlarged too much or cropped too much for its bucket, or duplicates a kept image "
        "(same sha256, or DINOv3 cosine similarity above --near-duplicate). Flagged records get no model "
        "pass and are not exported; changing a threshold and running again lifts or sets exactly the flags "
        "it decides. Settings given here are kept in prep_metadata.json for later runs.",
    )
    _command(
        sub, "prune", cmd_prune, PruneOptions,
        "move flagged records to <manifest>.pruned.jsonl (never deletes; e.g. Stage-1 records that cannot migrate)",
        "Move the records flagged `filtered` (all, or those of --reason) out of the manifest into "
        "<manifest>.pruned.jsonl, line for line. The side manifest is written (fsynced) before the manifest "
        "is rewritten, so an interrupted prune loses nothing and a rerun duplicates nothing; later scans of "
        "--images do not bring the pruned images back.",
    )
    _command(sub, "report", cmd_report, ReportOptions,
             "write an HTML report: counts, charts and a contact sheet of sampled records")
    _command(sub, "tiny-models", cmd_tiny_models, TinyModelsOptions,
             "write tiny random models of the real classes (tests, offline smoke runs)")
    _command(sub, "demo", cmd_demo, DemoOptions,
             "run the whole flow offline on generated images and tiny models (about a minute)",
             "Generate sample images and tiny random models, run every pass, verify, export WebDataset "
             "shards, load them back and write the report, all under DIR. Nothing is downloaded; the "
             "arrays are meaningless (random weights).")
    bench = sub.add_parser("bench", help="measure this machine: `prep bench all --quick --out DIR` "
                                         "(see `prep bench --help`)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench, _parser=bench, debug=False, verbose=False)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, then again with the --config file's values as defaults (command-line flags win)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        apply_config_defaults(args._parser, read_config_file(args.config), args.config)
        args = parser.parse_args(argv)
    args.debug = bool(getattr(args, "debug", False) or args.top_debug)
    return args


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "datasets", "huggingface_hub", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command, turning expected failures into one stderr line and an exit code."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("prep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except UserError as exc:
        if args.debug:
            raise
        print(f"prep: error: {exc}", file=sys.stderr)
        return exc.code
    except (OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"prep: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the bench parser takes the rest as is (REMAINDER drops a leading --help)
        from prep.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    try:
        args = parse(argv)
    except UserError as exc:
        print(f"prep: error: {exc}", file=sys.stderr)
        return exc.code
    setup_logging(getattr(args, "verbose", False))
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
