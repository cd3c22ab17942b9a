"""Options declared once: dataclass fields carry their flag, help, aliases and group.

Every command's options are a dataclass built from these fields; `add_options` turns one into
argparse arguments and `from_namespace` turns parsed arguments back into it, so a flag is
written in exactly one place. Shared concepts share one field (and so one flag name):
`--manifest`, `--derived-dir`, `--num-workers`, `--output-dir`. The seeds' names stay working as
aliases (`--input-jsonl`, `--output-base-dir`). `--config FILE` (YAML or TOML) sets any option;
flags given on the command line override it.

Stages add their own model flags (`--{stage}-model`, `-revision`, `-subfolder`) and their own
option dataclasses from the registry (see `prep.stages`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep import config
from prep.errors import UserError

_NO_DEFAULT = dataclasses.MISSING


def opt(
    default: Any = _NO_DEFAULT,
    help: str = "",  # noqa: A002 - argparse's own word
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple | None = None,
    metavar: str | None = None,
    group: str | None = None,
    flag: str | None = None,
    positional: bool = False,
    default_factory: Any = _NO_DEFAULT,
) -> Any:
    """A dataclass field that is also a command-line option."""
    metadata = {
        "help": help, "aliases": aliases, "choices": choices, "metavar": metavar, "group": group,
        "flag": flag, "positional": positional,
    }  # fmt: skip
    if default_factory is not _NO_DEFAULT:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the scalar type, is a list) of an annotation like `Path | None` or `list[str]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list:
        return (args[0] if args else str), True
    if args and origin is not None:
        return _base_type(args[0])
    return (hint if isinstance(hint, type) else str), False


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.rstrip("_").replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, groups: dict | None = None) -> None:
    """Add one argparse argument per option field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    groups = {} if groups is None else groups
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        meta = f.metadata
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        kind, many = _base_type(hints[f.name])
        default = f.default if f.default is not _NO_DEFAULT else None
        kwargs: dict[str, Any] = {"help": meta["help"], "dest": f.name}
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = kind if kind in (int, float, Path) else str
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if many:
                kwargs["action"] = "append"
            if default is not None and not many and "%(default)" not in kwargs["help"]:
                kwargs["help"] += " (default: %(default)s)"
        if meta.get("positional"):
            kwargs.pop("dest")
            target.add_argument(f.name, **({"nargs": "?"} if f.default is not _NO_DEFAULT else {}), **kwargs)
            continue
        target.add_argument(_flag_name(f), *meta.get("aliases", ()), **kwargs)
        target.set_defaults(**{f.name: _field_default(f)})


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _NO_DEFAULT:
        return f.default
    if f.default_factory is not _NO_DEFAULT:
        return f.default_factory()
    return None


def from_namespace(cls: type, namespace: argparse.Namespace, **overrides) -> Any:
    """Build dataclass `cls` from parsed arguments (fields the namespace lacks keep their default)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
    return cls(**values)


# ---------------------------------------------------------------------------- config file
def read_config_file(path: Path) -> dict:
    """Options from a YAML or TOML file: {option name: value}; names may use '-' or '_'."""
    text = _read_text(path)
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file, said in one line
        raise UserError(f"--config {path}: cannot parse ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _read_text(path: Path) -> str:
    from prep.fsio import read_capped_text

    try:
        return read_capped_text(path, 1 << 20)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: {exc}") from None


def apply_config_defaults(parser: argparse.ArgumentParser, values: dict, source: Path) -> None:
    """Make the file's values the parser's defaults, so flags on the command line still win.

    A key is any of an option's flag names without the dashes (`pass`, `input_jsonl`,
    `derived-dir`), or its destination name.
    """
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", "config", argparse.SUPPRESS):
            continue
        actions[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                actions[flag[2:].replace("-", "_")] = action
    unknown = sorted(set(values) - set(actions) - {"config"})
    if unknown:
        raise UserError(f"--config {source}: unknown option(s) for this command: {', '.join(unknown)}")
    converted = {}
    for name, value in values.items():
        if name == "config":
            continue
        action = actions[name]
        converted[action.dest] = _convert(action, value, source)
    parser.set_defaults(**converted)


def _convert(action: argparse.Action, value: Any, source: Path) -> Any:
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [action.type(v) if action.type and isinstance(v, str) else v for v in items]
    if isinstance(value, list) and action.type in (str, None):
        value = ",".join(str(v) for v in value)
    if isinstance(value, str) and action.type not in (None, str):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise UserError(f"--config {source}: {action.dest}: bad value {value!r}") from None
    if action.choices and value not in action.choices:
        raise UserError(f"--config {source}: {action.dest}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


# --------------------------------------------------------------------------- shared options
@dataclass
class Logging:
    """Flags every command has."""

    verbose: bool = opt(False, "debug logging (every operation on every image)", aliases=("-v",))
    debug: bool = opt(False, "show tracebacks for expected errors")


@dataclass
class DatasetPaths:
    """Where a dataset lives: the manifest and the derived dir of side files."""

    manifest: Path = opt(
        config.DEFAULT_MANIFEST, "JSONL manifest, the source of truth", aliases=("--input-jsonl",), group="dataset"
    )
    derived_dir: Path = opt(
        config.DEFAULT_DERIVED_DIR,
        "folder of the side files (dinov3/, vae_latents/, t5_hidden/) and prep_metadata.json",
        aliases=("--output-base-dir",),
        group="dataset",
    )


@dataclass
class Parallel:
    num_workers: int | None = opt(
        None,
        "parallel workers: run: image-decoding processes per rank (default 2); export: shard-writing processes "
        "(default: the CPUs, at most 8; small exports stay in one process); verify: reader threads (default 8)",
        aliases=("--workers", "--num-proc"), metavar="N", group="speed",
    )


@dataclass
class CurationRules:
    """Which images the run says no to (flags, never deletes; see prep.curate and the README).

    Every value is sticky: unset here means the value kept in prep_metadata.json by the last run
    or `prep curate`, else the default.
    """

    min_side: int | None = opt(
        None, "flag images whose shorter side is under PX pixels (default: the value last used, else 0 = off)", metavar="PX", group="curation"
    )
    min_pixels: int | None = opt(
        None, "flag images with fewer than N pixels, width x height (default: the value last used, else 0 = off)", metavar="N", group="curation"
    )
    max_upscale: str | None = opt(
        None, "flag images that must be enlarged more than X times to cover their bucket (default: the value last used, "
        "else 2; 'off' allows any)",
        metavar="X", group="curation",
    )
    max_aspect: str | None = opt(
        None, "flag images longer than R:1 (default: the value last used, else auto = when even the nearest "
        "bucket crops away more than half of the image; 'off' allows any)", metavar="R", group="curation",
    )
    near_duplicate: str | None = opt(
        None, "flag images whose DINOv3 cosine similarity with a kept, larger image is at least T (default: "
        "the value last used, else 0.99; 'off' keeps them); exact copies (same sha256) are always flagged", metavar="T", group="curation",
    )
    keep_ids: str | None = opt(
        None, "never flag the image ids listed in FILE (one per line); 'none' forgets a file given before",
        metavar="FILE", group="curation",
    )


@dataclass
class ModelChoice:
    """One stage's model: a Hub id or a folder, an optional pinned revision and subfolder."""

    source: str
    revision: str | None = None
    subfolder: str | None = None


@dataclass
class RunOptions(CurationRules, Logging, Parallel, DatasetPaths):
    """Everything the main job (`prep run`, `prep/run.py`) needs; also buildable from Python."""

    images: Path | None = opt(
        None, "folder of images, scanned recursively (optional when the manifest exists)", group="inputs"
    )
    dataset: str | None = opt(
        None, "a Hugging Face dataset: Hub id, or a local folder (save_to_disk, parquet files, imagefolder); "
        "streamed, images read by row, never copied", metavar="NAME_OR_PATH", group="inputs",
    )
    split: str = opt("train", "--dataset split", group="inputs")
    dataset_revision: str | None = opt(None, "--dataset Hub branch, tag or commit (default: main)", metavar="REV",
                                       group="inputs")
    image_column: str = opt("image", "--dataset column holding the images (an Image feature)", group="inputs")
    id_column: str | None = opt(
        None, "--dataset column whose values become image_id (made safe; default: SPLIT-ROW)", group="inputs"
    )
    webdataset: str | None = opt(
        None, "WebDataset tars (img2dataset output): a brace pattern 'data/{00000..00099}.tar', a glob or a folder; "
        "members are read in place by offset", metavar="PATTERN", group="inputs",
    )
    pass_: str = opt(
        "all",
        "all = migrate, then every stage in order (caption, dinov3, vae, t5); or one of them. "
        "migrate needs no model (ids, sizes, buckets; inline DINOv3 vectors to .npy)",
        flag="--pass",
        group="what to do",
    )
    buckets: str | None = opt(
        None,
        "comma-separated WxH bucket list, multiples of 16 (default: the 7 Flux buckets 1024x1024,832x1216,...)",
        group="what to do",
    )
    recaption: bool = opt(False, "regenerate captions a model wrote (a user's caption is never replaced)",
                          group="what to do")
    keep_stale: bool = opt(
        False,
        "do not recompute artifacts whose provenance is stale (image, caption, bucket or model changed); "
        "`prep verify` still reports them",
        group="what to do",
    )
    captions: str = opt(
        "auto",
        "where the captions users supplied come from (the captioner fills the rest): auto = metadata file, "
        "else sidecar (files), .txt member (tars), --caption-column (datasets); sidecar = <stem>.txt beside the image "
        "or in the tar sample; metadata = --caption-column of metadata.jsonl/.csv/.parquet (imagefolder layout), "
        "of the tar sample's .json or of the dataset; filename = the file stem as words; instance = --instance-prompt; "
        "none = the captioner writes every caption",
        choices=("auto", "sidecar", "metadata", "filename", "instance", "none"), group="captions",
    )
    caption_extension: str = opt(".txt", "extension of sidecar caption files and tar caption members", group="captions")
    caption_column: str = opt(
        "text", "metadata column (or json key, or dataset column) holding the caption (diffusers' default)",
        group="captions",
    )
    instance_prompt: str | None = opt(None, "the caption of every image with --captions instance", group="captions")
    caption_prefix: str = opt("", "put before every caption a source gives (e.g. a trigger word and a space)",
                              group="captions")
    no_sidecar_captions: bool = opt(False, "ignore <image stem>.txt caption files beside the images", group="captions")
    verify: bool = opt(False, "after the run, read and check every side file (like `prep verify`)", group="what to do")
    no_resume: bool = opt(
        False,
        "start over: delete the side-file folders and start a new manifest (the old one is kept as a "
        "timestamped backup: captions are expensive)",
        group="what to do",
    )
    rebind: bool = opt(
        False,
        "use a derived dir that belongs to another manifest path (after moving or renaming the manifest); "
        "its artifacts are checked against this manifest's records",
        group="dataset",
    )
    min_free_gb: float = opt(
        config.DEFAULT_MIN_FREE_GB, "refuse to start with less free space under the derived dir", group="dataset"
    )
    batch_size: int | None = opt(
        None, "images per DINOv3 / VAE batch, whatever the bucket (overrides --batch-pixels; default: by pixels on "
        "a GPU, 1 on a CPU)", group="speed"
    )
    batch_pixels: int | None = opt(
        None, "input pixels per DINOv3 / VAE batch: a batch of WxH inputs holds max(1, N // (W*H)) images, so a "
        "1024x1024 batch holds a quarter of a 512x512 one (default on a GPU: 8388608, 8 images of 1024x1024; "
        "on a CPU batches of 1, faster there)", group="speed",
    )
    memory_budget_gb: float | None = opt(
        None, "memory the models of one image pass may take together (default: the device's free memory); the "
        "captioner, DINOv3 and the VAE run on each decoded batch together when their weights fit with room for "
        "a batch, else in groups that fit, each group decoding the images again", group="speed",
    )
    compile: bool = opt(
        False, "torch.compile the DINOv3, VAE and T5 models, not the captioner's generate (the first batch of "
        "each shape pays the compilation, reported as warm-up; outputs may differ from uncompiled ones in the "
        "last bits)", group="speed",
    )
    cpu_threads: int | None = opt(
        None, "intra-op threads of the models in each process on a CPU (default: 1 per process, whatever the "
        "number of ranks, so that results do not depend on it; see README Performance)", group="speed",
    )
    text_batch_size: int = opt(64, "captions per T5 batch", group="speed")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (auto: accelerate's GPU per rank, else CPU)", group="speed")
    dtype: str = opt(
        "auto", "compute dtype; auto = bf16 on GPU, fp32 on CPU (fp16 is refused: the models overflow)",
        choices=("auto", "float32", "bfloat16"), group="speed",
    )
    checkpoint_minutes: float = opt(
        10.0, "fold the journals into the manifest at least this often during a pass", group="speed"
    )
    trust_remote_code: bool = opt(False, "allow model repos to run their own code (off by default)", group="models")
    models: dict[str, ModelChoice] = field(default_factory=dict)
    stage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from prep import stages

        if self.num_workers is None:
            self.num_workers = 2
        self.manifest = Path(self.manifest)
        self.derived_dir = Path(self.derived_dir)
        if self.images is not None:
            self.images = Path(self.images)
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension
        for name, stage in stages.STAGES.items():
            if stage.model is not None and name not in self.models:
                self.models[name] = ModelChoice(stage.model.default, None, stage.model.subfolder)

    @property
    def output_base_dir(self) -> Path:  # the seeds' name of the derived dir
        return self.derived_dir

    def bucket_list(self):
        from prep.buckets import ASPECT_BUCKETS, parse_bucket_list

        return parse_bucket_list(self.buckets) if self.buckets else list(ASPECT_BUCKETS)

    def selected_passes(self) -> tuple[str, ...]:
        from prep import stages

        names = ("migrate", *stages.STAGES)
        return names if self.pass_ == "all" else (self.pass_,)

    def selected_stages(self) -> list:
        """The stages this run runs: `--pass` names one (even an optional one), `all` the enabled ones."""
        from prep import stages

        chosen = [stages.STAGES[name] for name in self.selected_passes() if name in stages.STAGES]
        return chosen if self.pass_ != "all" else [stage for stage in chosen if stage.enabled(self)]


def pass_choices() -> tuple[str, ...]:
    from prep import stages

    return ("all", "migrate", *stages.STAGES)


def add_model_options(parser: argparse.ArgumentParser, *, judging: bool = False, groups: dict | None = None) -> None:
    """`--{stage}-model`, `--{stage}-revision` (and `-subfolder`) for every stage with a model."""
    from prep import stages

    title = "provenance yardstick (default: the models the last run recorded in prep_metadata.json)" if judging else "models"
    group = (groups or {}).get(title) or parser.add_argument_group(
        title, None if judging else "each a Hub id or a local folder; gated Hub models need `hf auth login`"
    )
    for name, stage in stages.STAGES.items():
        spec = stage.model
        if spec is None:
            continue
        default = None if judging else spec.default
        help_text = f"{spec.help}" + ("" if judging else " (default: %(default)s)")
        group.add_argument(f"--{name}-model", dest=f"{name}_model", default=default, help=help_text)
        group.add_argument(
            f"--{name}-revision", dest=f"{name}_revision", default=None, metavar="REV",
            help=f"pin --{name}-model to this Hub branch, tag or commit (default: main)",
        )
        if spec.subfolder is not None:
            group.add_argument(
                f"--{name}-subfolder", dest=f"{name}_subfolder", default=spec.subfolder,
                help=f"subfolder of --{name}-model holding it; ignored for a folder without it (default: %(default)s)",
            )


def add_stage_options(parser: argparse.ArgumentParser, groups: dict | None = None) -> None:
    """Each stage's own option dataclass (e.g. the captioner's prompt)."""
    from prep import stages

    for stage in stages.STAGES.values():
        if stage.options is not None:
            add_options(parser, stage.options, groups)


def model_choices(namespace: argparse.Namespace) -> dict[str, ModelChoice]:
    """{stage: ModelChoice} from parsed `--{stage}-model` flags (stages whose flag is unset are left out)."""
    from prep import stages

    chosen = {}
    for name, stage in stages.STAGES.items():
        source = getattr(namespace, f"{name}_model", None)
        if stage.model is None or not source:
            continue
        subfolder = getattr(namespace, f"{name}_subfolder", stage.model.subfolder)
        chosen[name] = ModelChoice(source, getattr(namespace, f"{name}_revision", None), subfolder or None)
    return chosen


def run_options_from(namespace: argparse.Namespace) -> RunOptions:
    from prep import stages

    stage_options = {
        name: from_namespace(stage.options, namespace)
        for name, stage in stages.STAGES.items()
        if stage.options is not None
    }
    return from_namespace(RunOptions, namespace, models=model_choices(namespace), stage_options=stage_options)


# ------------------------------------------------------------------------ other commands
@dataclass
class VerifyOptions(Logging, Parallel, DatasetPaths):
    """`prep verify`: read every side file of a manifest and judge it."""

    json: bool = opt(False, "print the report as JSON (lists problems by id)")
    adopt: bool = opt(
        False,
        "stamp the models named below (or the last run's) onto valid artifacts of unknown provenance (made "
        "before provenance existed) and rewrite the manifest; say so only if you know which models made them",
    )


@dataclass
class ExportOptions(Logging, Parallel, DatasetPaths):
    """`prep export webdataset`: ready records -> bucketed, reproducible WebDataset shards."""

    output_dir: Path = opt(
        config.DEFAULT_SHARDS_DIR,
        "export folder: bucket_WxH/ shard folders, README.md (dataset card), index.json, stats.json",
        group="export",
    )
    shard_size: int = opt(1000, "samples per shard (about 0.7 GB per shard at 1024x1024)", group="export")
    limit: int | None = opt(None, "export at most N samples, taken after shuffling (default: all)", group="export")
    shuffle: bool = opt(
        False,
        "shuffle the samples with random.Random(--seed) before --limit and sharding (default: manifest order); "
        "samples are then grouped by bucket, so shards never mix buckets",
        group="export",
    )
    seed: int = opt(0, "shuffle seed", group="export")
    bucket: list[str] = opt(
        None, "export only these buckets; repeatable or a comma list (default: every bucket)", metavar="WxH[,WxH...]",
        group="export",
    )
    overwrite: bool = opt(False, "delete an existing export in --output-dir and write a new one", group="export")
    resume: bool = opt(
        False,
        "finish an interrupted export: keep complete shards whose content matches the plan (checked by sha256), "
        "rewrite the rest, remove temp files and stale shards",
        group="export",
    )
    dry_run: bool = opt(False, "check readiness and plan the shards; write nothing", group="export")
    allow_stale: bool = opt(
        False,
        "export artifacts whose provenance is stale (image or caption edited, bucket or model changed since "
        "they were made); refused by default",
        group="export",
    )
    progress_every: int = opt(5000, "log a progress line every N samples, 0 = never", metavar="N", group="export")
    image_path: str = opt(
        "relative",
        "what the samples' image_path holds: the path relative to the images root the run recorded (else to the "
        "common parent folder of the exported images; URIs are kept), the absolute path as in the record, or none "
        "(no image_path key). Absolute paths show user and folder names",
        choices=("relative", "absolute", "none"), group="export",
    )
    license: str = opt(
        "other",
        "licence id for the dataset card (a Hub licence id, e.g. cc-by-4.0). The arrays also fall under the licences "
        "of the models that made them, listed in the card",
        group="export",
    )
    json: bool = opt(False, "print the summary as JSON")


@dataclass(kw_only=True)
class PushOptions(Logging):
    """`prep push`: upload an export folder to a Hugging Face dataset repo."""

    folder: Path = opt(help="export folder (with index.json and README.md)", positional=True)
    repo_id: str = opt(None, "target dataset repo, OWNER/NAME")
    private: bool = opt(False, "create the repo as private (an existing repo is unchanged)")
    revision: str | None = opt(None, "push to this branch (created if missing)", metavar="BRANCH")
    token_env: str | None = opt(
        None, "read the Hub token from this environment variable (default: HF_TOKEN or the login cache)", metavar="VAR"
    )
    dry_run: bool = opt(False, "check the folder and list what would be uploaded; no network call")


@dataclass
class ReportOptions(Logging, Parallel, DatasetPaths):
    """`prep report`: an HTML page with counts, charts and a contact sheet."""

    output_dir: Path = opt(Path("report"), "folder for index.html and its PNGs", aliases=("--out",))
    samples: int = opt(16, "records on the contact sheet")
    seed: int = opt(0, "seed of the sample")
    no_decode: bool = opt(
        False, "do not load the VAE: the sheet shows originals and crops; latents are still checked for NaN/Inf"
    )
    vae_model: str | None = opt(None, "VAE to decode with (default: the one in prep_metadata.json)")
    vae_subfolder: str | None = opt(None, f"subfolder of --vae-model (default: the recorded one, else {config.VAE_SUBFOLDER})")
    t5_model: str | None = opt(None, "T5 tokenizer for token counts (default: the one in prep_metadata.json)")
    device: str = opt("auto", "device for the VAE decode (auto = GPU if any)")
    dtype: str = opt("auto", "decode dtype", choices=("auto", "float32", "bfloat16"))


@dataclass(kw_only=True)
class TinyModelsOptions(Logging):
    """`prep tiny-models`: tiny random models of the real classes (tests, offline smoke runs)."""

    dir: Path = opt(help="where to write vae/, t5/, dinov3/, captioner/", positional=True)
    seed: int = opt(0, "weight seed")


@dataclass(kw_only=True)
class DemoOptions(Logging):
    """`prep demo`: the whole flow offline on generated images and tiny models."""

    dir: Path = opt(Path("prep-demo"), "folder for the demo's images, models, dataset, shards and report",
                    positional=True)
    seed: int = opt(0, "seed of the generated images and models")


@dataclass
class CurateOptions(CurationRules, Logging, Parallel, DatasetPaths):
    """`prep curate`: apply the curation rules to an existing dataset (flags, never deletes)."""

    dry_run: bool = opt(False, "print the table of what would be flagged or lifted; write nothing")
    device: str = opt("auto", "device for the near-duplicate products (auto: a GPU when there is one)")
    json: bool = opt(False, "print the result as JSON (every flagged record with its reason)")


@dataclass
class PruneOptions(Logging, DatasetPaths):
    """`prep prune`: move flagged records to a side manifest (never deletes)."""

    reason: list[str] = opt(
        None, "move only records flagged for these reasons; repeatable or a comma list (default: every flagged "
        "record)", metavar="REASON[,REASON...]",
    )
    dry_run: bool = opt(False, "count what would move; write nothing")
