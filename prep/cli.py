"""The `prep` command: argument parsing only; every subcommand calls one library function.

Expected failures (bad input, missing paths, full disk) exit non-zero with one line on
stderr and no traceback; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prep import __version__, config
from prep.errors import UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2




# ----------------------------------------------------------------------------- run
def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model flags shared by `run`, `verify` and `report`."""
    g = parser.add_argument_group("models (each a Hub id or a local directory)")
    g.add_argument(
        "--vae-model", default=config.VAE_MODEL, help="Flux VAE repo or dir (default: %(default)s)"
    )
    g.add_argument(
        "--vae-subfolder",
        default=config.VAE_SUBFOLDER,
        help="subfolder of --vae-model holding the VAE; ignored when the dir has none (default: %(default)s)",
    )
    g.add_argument("--t5-model", default=config.T5_MODEL, help="T5 encoder (default: %(default)s)")
    g.add_argument("--dinov3-model", default=config.DINOV3_MODEL, help="DINOv3 ViT (default: %(default)s)")
    g.add_argument(
        "--caption-model", default=config.CAPTION_MODEL, help="Gemma 3 VLM captioner (default: %(default)s)"
    )


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the main job (`prep run` and `prep/run.py`)."""
    io = parser.add_argument_group("input / output")
    io.add_argument(
        "--images",
        type=Path,
        help="folder of images, scanned recursively (optional when the manifest exists)",
    )
    io.add_argument(
        "--manifest",
        type=Path,
        default=config.DEFAULT_MANIFEST,
        help="JSONL manifest, source of truth (default: %(default)s)",
    )
    io.add_argument(
        "--output-base-dir",
        type=Path,
        default=config.DEFAULT_OUTPUT_BASE_DIR,
        help="where dinov3/, vae_latents/, t5_hidden/ go (default: %(default)s)",
    )
    work = parser.add_argument_group("what to do")
    work.add_argument(
        "--pass",
        dest="pass_",
        choices=config.PASS_CHOICES,
        default="all",
        help="all (default) = migrate -> caption -> t5 -> dinov3 -> vae; or one of them; "
        "migrate needs no model (adds ids/sizes/buckets, moves inline DINOv3 vectors to .npy)",
    )
    work.add_argument(
        "--buckets",
        default=None,
        help="comma-separated WxH bucket list, multiples of 16 (default: the 7 Flux buckets 1024x1024,832x1216,...)",
    )
    work.add_argument(
        "--recaption", action="store_true", help="regenerate captions even where a record has one"
    )
    work.add_argument(
        "--keep-stale",
        action="store_true",
        help="do not recompute artifacts whose provenance is stale (image edited, caption edited, "
        "other model or bucket); `prep verify` still reports them",
    )
    work.add_argument(
        "--no-sidecar-captions",
        action="store_true",
        help="ignore <image stem>.txt caption files beside the images",
    )
    work.add_argument("--caption-prompt", default=config.CAPTION_PROMPT, help="prompt given to the captioner")
    work.add_argument(
        "--caption-max-new-tokens",
        type=int,
        default=config.CAPTION_MAX_NEW_TOKENS,
        help="(default: %(default)s)",
    )
    work.add_argument(
        "--verify", action="store_true", help="after the run, verify every side file (like `prep verify`)"
    )
    work.add_argument(
        "--no-resume",
        action="store_true",
        help="start over: delete the three .npy folders and start a new manifest "
        "(the old manifest is kept as a timestamped backup: captions are expensive)",
    )
    work.add_argument(
        "--min-free-gb",
        type=float,
        default=config.DEFAULT_MIN_FREE_GB,
        help="abort when the output dir has less free space (default: %(default)s)",
    )
    add_model_args(parser)
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--batch-size", type=int, default=None, help="images per VAE / DINOv3 batch (default: 8 on a GPU, 1 on a CPU)"
    )
    speed.add_argument(
        "--text-batch-size", type=int, default=64, help="captions per T5 batch (default: %(default)s)"
    )
    speed.add_argument(
        "--caption-batch-size", type=int, default=4, help="images per captioner batch (default: %(default)s)"
    )
    speed.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="data-loader processes decoding images (default: %(default)s)",
    )
    speed.add_argument(
        "--device",
        default="auto",
        help="auto | cpu | cuda | cuda:N (default: auto; accelerate picks the GPU per rank)",
    )
    speed.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype; auto = bf16 on GPU, fp32 on CPU",
    )
    speed.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="rewrite the manifest every N batches (default: %(default)s)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model repos to run their own code (off by default)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the operation done on each image")


def cmd_run(args: argparse.Namespace) -> int:
    from prep.pipeline import RunOptions, run

    return run(RunOptions.from_args(args))


# -------------------------------------------------------------------------- verify
def add_verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest", type=Path, default=config.DEFAULT_MANIFEST, help="JSONL manifest (default: %(default)s)"
    )
    parser.add_argument(
        "--output-base-dir",
        type=Path,
        default=config.DEFAULT_OUTPUT_BASE_DIR,
        help="derived dir (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (lists problems by id)")
    parser.add_argument("--workers", type=int, default=8, help="threads reading side files (default: %(default)s)")
    g = parser.add_argument_group(
        "provenance yardstick (default: the models the last run recorded in prep_metadata.json)"
    )
    g.add_argument("--vae-model", default=None, help="judge VAE latents against this model")
    g.add_argument("--vae-subfolder", default=config.VAE_SUBFOLDER, help="(default: %(default)s)")
    g.add_argument("--t5-model", default=None, help="judge T5 states against this model")
    g.add_argument("--dinov3-model", default=None, help="judge DINOv3 embeddings against this model")
    g.add_argument(
        "--adopt",
        action="store_true",
        help="stamp this configuration onto valid artifacts of unknown provenance (made before provenance "
        "existed) and rewrite the manifest; say so only if you know which models made them",
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from prep.verify import expected_of, judging_config, print_report, verify_manifest

    models = {"vae": args.vae_model, "t5": args.t5_model, "dinov3": args.dinov3_model}
    judged = judging_config(args.output_base_dir, models, args.vae_subfolder)
    report = verify_manifest(
        args.manifest,
        args.output_base_dir,
        workers=args.workers,
        expected=expected_of(judged),
        adopt_with=judged if args.adopt else None,
    )
    print_report(report, as_json=args.json)
    return EXIT_OK if report.ok else EXIT_FAILED


# --------------------------------------------------------------------- tiny-models
def add_tiny_models_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="where to write vae/, t5/, dinov3/, captioner/")
    parser.add_argument("--seed", type=int, default=0)


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from prep.testing import make_tiny_models

    paths = make_tiny_models(args.dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(
        "These models are randomly initialised: their outputs are meaningless (for tests and smoke runs only)."
    )
    return EXIT_OK


# -------------------------------------------------------------------------- export
def add_export_parsers(subparsers) -> None:
    """`prep export webdataset` and `prep push` (owned by the export module's author)."""
    export = subparsers.add_parser("export", help="write training shards from a finished manifest")
    formats = export.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    p = formats.add_parser(
        "webdataset",
        help="WebDataset tar shards per aspect bucket, plus a dataset card (a ready Hub dataset repo)",
        description="Write every ready record (valid v2 record, caption, mask, and the three .npy side files "
        "with the right shape and dtype) as a sample of OUT/bucket_WxH/shard-NNNNNN.tar with the members "
        "{id}.json, {id}.dinov3.npy, {id}.vae.npy, {id}.t5h.npy, {id}.t5m.npy; then OUT/README.md (dataset "
        "card, one config per bucket), OUT/stats.json and, last, OUT/index.json. Same inputs and seed give "
        "byte-identical shards; each shard is written to a temp file and renamed when complete.",
    )
    p.add_argument(
        "--input-jsonl",
        type=Path,
        default=config.DEFAULT_MANIFEST,
        help="the manifest to export (default: %(default)s)",
    )
    p.add_argument(
        "--derived-dir",
        "--output-base-dir",
        dest="derived_dir",
        type=Path,
        default=config.DEFAULT_OUTPUT_BASE_DIR,
        help="folder holding dinov3/, vae_latents/, t5_hidden/ (default: %(default)s)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=config.DEFAULT_SHARDS_DIR,
        help="export folder: bucket_WxH/ shard folders, README.md, index.json, stats.json (default: %(default)s)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="samples per shard (default: %(default)s, about 0.7 GB per shard at 1024x1024)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="export at most N samples, taken after shuffling (default: all)"
    )
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="shuffle the samples with random.Random(--seed) before --limit and sharding "
        "(default: manifest order); samples are then grouped by bucket, so shards never mix buckets",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: %(default)s)")
    p.add_argument(
        "--bucket",
        action="append",
        default=None,
        metavar="WxH[,WxH...]",
        help="export only these buckets; repeatable or a comma list (default: every bucket)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--overwrite", action="store_true", help="delete an existing export in --output-dir and write a new one"
    )
    mode.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted export: keep complete shards whose content matches the plan "
        "(checked by sha256), rewrite the rest, remove temp files and stale shards",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check readiness and plan the shards; write nothing"
    )
    p.add_argument(
        "--allow-stale",
        action="store_true",
        help="export artifacts whose provenance is stale (image/caption edited, bucket or model changed "
        "since they were made); refused by default",
    )
    p.add_argument(
        "--progress-every",
        type=int,
        default=5000,
        metavar="N",
        help="log a progress line every N samples, 0 = never (default: %(default)s); "
        "a tqdm bar is shown too when stderr is a terminal",
    )
    p.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help="processes for the readiness check, which reads .npy headers (default: one)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_export_webdataset)

    p = subparsers.add_parser(
        "push",
        help="upload an export folder to a Hugging Face dataset repo (resumable)",
        description="Create the dataset repo (and the branch for --revision) if needed and upload the export "
        "folder with huggingface_hub's resumable multi-commit upload; rerun to resume an interrupted push. "
        "The token comes from --token-env, else HF_TOKEN or the `hf auth login` cache; it is never printed.",
    )
    p.add_argument("folder", type=Path, help="export folder (with index.json and README.md)")
    p.add_argument("--repo-id", required=True, help="target dataset repo, OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo as private (an existing repo is unchanged)")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created if missing)")
    p.add_argument(
        "--token-env",
        default=None,
        metavar="VAR",
        help="read the Hub token from this environment variable (default: HF_TOKEN / login cache)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check the folder and list what would be uploaded; no network call"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_push)


def cmd_export_webdataset(args: argparse.Namespace) -> int:
    import json

    from prep.export.webdataset import export_webdataset, format_summary

    summary = export_webdataset(
        args.input_jsonl,
        args.derived_dir,
        args.output_dir,
        shard_size=args.shard_size,
        limit=args.limit,
        shuffle=args.shuffle,
        seed=args.seed,
        buckets=args.bucket,
        overwrite=args.overwrite,
        resume=args.resume,
        dry_run=args.dry_run,
        progress_every=args.progress_every,
        num_proc=args.num_proc,
        allow_stale=args.allow_stale,
    )
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary))
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from prep.export.hub import format_push, push_export

    result = push_export(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token_env=args.token_env,
        dry_run=args.dry_run,
    )
    print(format_push(result))
    return EXIT_OK


# -------------------------------------------------------------------------- report
def add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest", type=Path, default=config.DEFAULT_MANIFEST, help="JSONL manifest (default: %(default)s)"
    )
    parser.add_argument(
        "--derived-dir",
        "--output-base-dir",
        dest="derived_dir",
        type=Path,
        default=config.DEFAULT_OUTPUT_BASE_DIR,
        help="dir holding dinov3/, vae_latents/, t5_hidden/ and prep_metadata.json (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report"), help="folder for index.html and its PNGs (default: %(default)s)"
    )
    parser.add_argument(
        "--samples", type=int, default=16, help="records on the contact sheet (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default: %(default)s)")
    parser.add_argument(
        "--no-decode",
        action="store_true",
        help="do not load the VAE: the sheet shows originals and crops; latents are still checked for NaN/Inf",
    )
    parser.add_argument(
        "--vae-model", default=None, help="VAE to decode with (default: the one in prep_metadata.json)"
    )
    parser.add_argument(
        "--vae-subfolder",
        default=None,
        help=f"subfolder of --vae-model (default: the recorded one, else {config.VAE_SUBFOLDER})",
    )
    parser.add_argument(
        "--t5-model", default=None, help="T5 tokenizer for token counts (default: the one in prep_metadata.json)"
    )
    parser.add_argument("--device", default="auto", help="device for the VAE decode (default: auto = GPU if any)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="decode dtype (default: auto)"
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="threads reading side files (default: %(default)s)"
    )


def cmd_report(args: argparse.Namespace) -> int:
    from prep.report import build_report, summary_line

    if args.samples < 0:
        raise UserError("--samples must be >= 0")
    result = build_report(
        args.manifest,
        args.derived_dir,
        args.out,
        samples=args.samples,
        seed=args.seed,
        decode=not args.no_decode,
        vae_model=args.vae_model,
        vae_subfolder=args.vae_subfolder,
        t5_model=args.t5_model,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
    )
    print(summary_line(result))
    return EXIT_OK


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prep",
        description="Turn a folder of images into a training-ready dataset: a JSONL manifest plus "
        "Flux VAE latents, T5-Large hidden states and DINOv3 embeddings as .npy side files.",
    )
    parser.add_argument("--version", action="version", version=f"prep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="scan, migrate, caption and encode (same as `python prep/run.py`)")
    add_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "verify", help="check every side file of a manifest (exit 1 if any is missing or invalid)"
    )
    add_verify_args(p)
    p.set_defaults(func=cmd_verify)

    add_export_parsers(sub)

    p = sub.add_parser(
        "report", help="write an HTML report: counts, charts and a contact sheet of sampled records"
    )
    add_report_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "tiny-models", help="write tiny random models of the real classes (tests, offline smoke runs)"
    )
    add_tiny_models_args(p)
    p.set_defaults(func=cmd_tiny_models)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "datasets", "huggingface_hub"):
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
    except (
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        FileExistsError,
        ValueError,
        OSError,
    ) as exc:
        if args.debug:
            raise
        print(f"prep: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
