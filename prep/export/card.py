"""The dataset card (`README.md`) of an export folder, which makes the folder a Hub dataset repo.

Built with huggingface_hub's `DatasetCard` / `DatasetCardData` (no hand-written YAML). Its
header declares:

- configs: a default config `all` (every bucket: `bucket_*/*.tar`), so
  `datasets.load_dataset(folder)` works without a name, plus one config per bucket;
- `dataset_info` per config: the members' features, which `datasets`' webdataset builder
  uses instead of inferring them from the first samples (checked in datasets 5.2:
  `load_dataset_builder` passes the card's info for the chosen config to the builder, whose
  `_split_generators` only infers when `info.features` is empty). Per bucket the latent is
  an `Array3D((16, H/8, W/8), float16)`; in `all` it is nested lists of float16, because a
  fixed shape cannot hold several buckets (checked: `all` with mixed shapes loads);
- `license` (default "other"), `size_categories` in the Hub's values, tags.

What the features cannot do: `with_format("numpy")` / `("torch")` return float32 for every
floating column whatever the features say (datasets' formatters default float arrays to
float32 unless one `dtype` is given for all columns). The card says so, with the fix.

The text names models by Hub id, never by local folder: an HF cache path
(`.../models--ORG--NAME/snapshots/COMMIT/...`) shows `ORG/NAME` at that commit, a local
model folder shows its basename and content hash.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from prep import stages

CARD_TAGS = ["webdataset", "flux", "text-to-image", "latents", "prep"]
DEFAULT_CONFIG = "all"
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
)
# The JSON member's fixed fields (prep.export.webdataset.JSON_FIELDS) and their `datasets` types.
JSON_FIELD_TYPES = {
    "image_id": "string",
    "image_path": "string",
    "caption": "string",
    "height": "int64",
    "width": "int64",
    "aspect_bucket": "string",
    "format_version": "int64",
}
# Scalar types as prep.export.webdataset.choose_extra_fields names them -> `datasets` Value dtypes.
SCALAR_TYPES = {"str": "string", "int": "int64", "float": "float64", "bool": "bool"}
# (substring of a lower-cased model id, licence) for the models prep uses by default.
MODEL_LICENCES = (
    ("flux.1-dev", "FLUX.1 [dev] Non-Commercial License"),
    ("flux.1-schnell", "Apache-2.0"),
    ("dinov3", "DINOv3 License"),
    ("gemma", "Gemma Terms of Use"),
    ("t5", "Apache-2.0"),
)
_HF_CACHE_RE = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)(?:/snapshots/([0-9a-fA-F]{7,64}))?")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def size_category(n: int) -> str:
    """The Hub's `size_categories` value for n samples."""
    for limit, label in SIZE_CATEGORIES:
        if n < limit:
            return label
    return "n>1T"


def public_model_id(model_id: Any, revision: Any = None) -> tuple[str, str | None]:
    """(what the card shows for a model, its revision): a Hub id, never a local folder path."""
    text = str(model_id or "unknown").strip()
    posix = text.replace("\\", "/")
    cached = _HF_CACHE_RE.search(posix)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}", cached.group(3) or revision
    local_hash = isinstance(revision, str) and revision.startswith("sha256:")
    looks_local = (
        posix.startswith(("/", "~", "./", "../"))
        or bool(re.match(r"^[A-Za-z]:", text))
        or posix.count("/") > 1
        or not _HUB_ID_RE.fullmatch(posix)
    )
    if local_hash or looks_local:
        name = (PureWindowsPath(text) if "\\" in text else PurePosixPath(posix)).name or "model"
        return f"local model '{name}'", revision
    return text, revision


def _licence_of(model: str) -> str:
    lower = model.lower()
    return next((licence for key, licence in MODEL_LICENCES if key in lower), "see the model's own card")


# ---------------------------------------------------------------------------- header
def _json_feature(index: dict, json_types: dict | None):
    """A typed struct when every field's type is known (index `json_types` or the fixed fields), else Json()."""
    from datasets import Json, Value

    fields = list(index.get("json_fields") or JSON_FIELD_TYPES)
    known = {**JSON_FIELD_TYPES, **{k: SCALAR_TYPES.get(v, v) for k, v in (json_types or {}).items()}}
    if all(f in known for f in fields):
        return {f: Value(known[f]) for f in fields}
    return Json()


def array_feature(artifact, bucket: str | None = None, *, lists: bool = False):
    """The `datasets` feature of one artifact's member: a fixed-shape ArrayND (or a list for 1-D),
    or nested lists when its shape follows the bucket and no single bucket is given (or `lists`:
    what the webdataset builder infers by itself)."""
    from datasets import Array2D, Array3D, Array4D, Array5D, List, Value

    dtype = artifact.dtype.name
    shape = artifact.shape_for({"aspect_bucket": bucket}) if bucket or not artifact.by_bucket else None
    if shape is None or lists:
        feature = Value(dtype)
        for _ in artifact.shape_for({"aspect_bucket": "1024x1024"}):
            feature = List(feature)
        return feature
    if len(shape) == 1:
        return List(Value(dtype))
    return {2: Array2D, 3: Array3D, 4: Array4D, 5: Array5D}[len(shape)](shape=tuple(shape), dtype=dtype)


def exported_artifacts(index: dict) -> list:
    """The artifacts whose members an export holds (index.json "members"; the table's non-optional
    ones when it does not say)."""
    names = index.get("members")
    table = stages.artifacts(stages.ALL) if isinstance(names, list) else stages.artifacts()
    return [a for a in table.values() if not isinstance(names, list) or a.member in names]


def _features(index: dict, bucket: str | None, json_types: dict | None):
    """Every member's feature: the json struct, then one per artifact of the table."""
    from datasets import Features, Value


    arrays = {a.member: array_feature(a, bucket) for a in exported_artifacts(index)}
    return Features({"json": _json_feature(index, json_types), **arrays, "__key__": Value("string"),
                     "__url__": Value("string")})


def _buckets(index: dict) -> list[str]:
    return sorted(b for b, e in (index.get("buckets") or {}).items() if e.get("samples"))


def card_data(index: dict, *, license: str = "other", title: str | None = None, json_types: dict | None = None):
    """The card's YAML header as a `huggingface_hub.DatasetCardData`."""
    from datasets import DatasetInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    buckets = _buckets(index)
    json_types = json_types if json_types is not None else (index.get("json_field_types") or index.get("json_types"))
    configs, infos = [], {}
    if buckets:
        configs.append(
            {
                "config_name": DEFAULT_CONFIG,
                "default": True,
                "data_files": [{"split": "train", "path": "bucket_*/*.tar"}],
            }
        )
        infos[DEFAULT_CONFIG] = DatasetInfo(features=_features(index, None, json_types))
    for bucket in buckets:
        configs.append(
            {"config_name": f"bucket_{bucket}", "data_files": [{"split": "train", "path": f"bucket_{bucket}/*.tar"}]}
        )
        infos[f"bucket_{bucket}"] = DatasetInfo(features=_features(index, bucket, json_types))
    data = DatasetCardData(
        license=license,
        pretty_name=title,
        task_categories=["text-to-image"],
        tags=list(CARD_TAGS),
        size_categories=[size_category(int(index.get("samples", 0)))],
        configs=configs or None,
    )
    if infos:
        DatasetInfosDict(infos).to_dataset_card_data(data)
    return data


def card_header(index: dict, **options) -> dict:
    """The card's YAML header as a dict."""
    return card_data(index, **options).to_dict()


# ------------------------------------------------------------------------------ text
def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _latent_section(metadata: dict) -> list[str]:
    vae = metadata.get("vae") if isinstance(metadata.get("vae"), dict) else None
    if not vae:
        return [
            "The derived dir recorded no latent convention (no `vae` entry in prep_metadata.json).",
            "`prep` stores the posterior **mean** of the Flux VAE, normalised as "
            "`(z - shift_factor) * scaling_factor` (Flux: shift 0.1159, scaling 0.3611); check how these "
            "latents were made before training, or the transform may be applied twice.",
        ]
    latent = vae.get("latent", "unknown")
    lines = [
        f"- stored latent: **{_cell(latent)}**"
        + (" (the mean of the VAE posterior, no sampling noise)" if latent == "posterior_mean" else ""),
        f"- already normalised as: `{_cell(vae.get('transform', 'unknown'))}`",
        f"- shift_factor: `{_cell(vae.get('shift_factor', 'unknown'))}`, "
        f"scaling_factor: `{_cell(vae.get('scaling_factor', 'unknown'))}`",
    ]
    if vae.get("model_id"):
        model, _ = public_model_id(vae["model_id"])
        lines.append(f"- VAE: `{_cell(model)}`" + (f" (subfolder `{_cell(vae['subfolder'])}`)" if vae.get("subfolder") else ""))
    if vae.get("dtype"):
        lines.append(f"- on disk: {_cell(vae['dtype'])}")
    lines.append(
        "- to decode: `z = latent / scaling_factor + shift_factor`, then `vae.decode(z)`. "
        "Do not apply the transform again when training."
    )
    return lines


def _models_section(metadata: dict) -> list[str]:
    models = metadata.get("models") if isinstance(metadata.get("models"), dict) else {}
    if not models:
        return ["No model provenance was recorded (prep_metadata.json has no `models` entry)."]
    lines = ["| artifact | model | revision | licence of the model |", "|---|---|---|---|"]
    for kind, entry in sorted(models.items()):
        entry = entry if isinstance(entry, dict) else {"model_id": entry}
        model, revision = public_model_id(entry.get("model_id", "unknown"), entry.get("revision"))
        lines.append(
            f"| {_cell(kind)} | `{_cell(model)}` | {_cell(revision or 'unknown')} | {_cell(_licence_of(model))} |"
        )
    return lines


def _uncond_section(index: dict) -> list[str]:
    entry = index.get("uncond")
    if not isinstance(entry, dict) or not entry.get("path"):
        return []
    return [
        "## Caption dropout (classifier-free guidance)",
        "",
        f"`{_cell(entry['path'])}` holds the T5 state of the empty caption (`t5_hidden` (77, 1024) float16 and "
        "`t5_mask` (77,) uint8, from the same T5 as the samples): replace a sample's `t5h.npy` / `t5m.npy` with "
        "it for the fraction of the batch you drop the caption of (often 10%). "
        '`prep.load_uncond("<this repo or folder>")` reads it.',
        "",
    ]


def _licence_section(license: str) -> list[str]:
    return [
        f"The card's licence (`{_cell(license)}`) covers this packaging. The arrays and captions are outputs "
        "of the models listed above, whose terms may restrict their use; with prep's default models:",
        "",
        "- VAE latents: the FLUX.1-dev VAE (`black-forest-labs/FLUX.1-dev`), FLUX.1 [dev] Non-Commercial License",
        "- image embeddings: DINOv3 (`facebook/dinov3-vitl16-pretrain-lvd1689m`), DINOv3 License",
        "- text states: T5 (`google-t5/t5-large`), Apache-2.0",
        "- captions: Gemma 3 (`google/gemma-3-4b-it`), Gemma Terms of Use",
        "",
        "The images themselves are not included; their own licences still apply to what was derived from them.",
    ]


def render_card(
    index: dict,
    metadata: dict | None = None,
    *,
    title: str = "prep training shards",
    license: str = "other",
    json_types: dict | None = None,
) -> str:
    """The README.md text for an export described by `index` (its index.json content).

    `metadata`: the derived dir's prep_metadata.json (latent convention, models). `license`:
    the Hub licence id of the card (default "other"). `json_types`: {extra JSON field: "str" |
    "int" | "float" | "bool"} (default: index["json_field_types"]); without the type of every
    field, the `json` member is declared as `Json()`.
    """
    from huggingface_hub import DatasetCard

    metadata = metadata or {}
    data = card_data(index, license=license, title=title, json_types=json_types)
    json_is_typed = not _json_declared_as_json(getattr(data, "dataset_info", None) or [])
    parts = [
        f"# {title}",
        "",
        f"{index.get('samples', 0)} training samples for a text- and DINOv3-conditioned Flux-VAE diffusion model, "
        "as WebDataset tar shards, one folder per aspect bucket. All samples of a bucket share one latent shape, "
        "so a batch drawn from one bucket needs no padding.",
        "",
        *_loading_section(index, json_is_typed),
        *_members_section(index),
        *_uncond_section(index),
        "## Latent convention", "", *_latent_section(metadata), "",
        "## Models", "", *_models_section(metadata), "",
        "## Licence", "", *_licence_section(license), "",
        "## Buckets", "", *_buckets_table(index), "",
        *_export_section(index),
    ]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts)))


def _loading_section(index: dict, json_is_typed: bool) -> list[str]:
    first = next(iter(_buckets(index)), "1024x1024")
    lines = [
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("<this repo or folder>", split="train")  # config "{DEFAULT_CONFIG}": every bucket',
        f'ds = load_dataset("<this repo or folder>", name="bucket_{first}", split="train")  # one bucket',
        "",
        "import prep  # batches of one bucket, split across ranks and DataLoader workers",
        'for batch in prep.load_shards("<this repo or folder>", batch_size=32, shuffle=True): ...',
        "```",
        "",
        f"The default config `{DEFAULT_CONFIG}` holds every bucket; its `vae.npy` is declared as nested lists "
        "of float16 because the latent shape differs between buckets, so batch it per bucket (e.g. with "
        "`prep.BucketBatchSampler`, which reads each row's bucket from `__url__`). The per-bucket configs declare "
        "`vae.npy` as a fixed-shape `Array3D`, which is faster to read.",
        "",
        "**dtypes**: `dataset_info` declares the arrays' shapes and dtypes (float16 latents and T5 states) and "
        "they are stored float16, but `datasets`' numpy and torch formats return every floating array as float32. "
        "The values are exact float16 values; restore the dtype exactly with `.half()` / `.astype(np.float16)`, "
        'or in one line: `ds.with_format("torch", columns=["vae.npy", "t5h.npy"], dtype=torch.float16, '
        "output_all_columns=True)`.",
        "",
    ]
    if not json_is_typed:
        lines += [
            "The `json` member is declared as `Json()` (some extra fields have no recorded type), which needs a "
            "`datasets` with the `Json` feature type (5.2 has it); with an older one, load with "
            '`load_dataset("webdataset", data_files={"train": "<repo or folder>/bucket_*/*.tar"})`, which infers '
            "the types.",
            "",
        ]
    return lines


def _members_section(index: dict) -> list[str]:
    lines = [
        "## Members of each sample",
        "",
        "The key is the `image_id` (`[A-Za-z0-9_-]`, no dots).",
        "",
        "| member | content |",
        "|---|---|",
        "| `{id}.json` | " + ", ".join(f"`{f}`" for f in index.get("json_fields", [])) + " |",
        *(f"| `{{id}}.{a.member}` | {_cell(a.description)}, {a.dtype.name} |" for a in exported_artifacts(index)),
        "",
    ]
    dropped = index.get("dropped_fields") or {}
    if dropped:
        lines += [
            "Extra manifest fields not present as one scalar type in every sample were left out of the JSON member: "
            + ", ".join(f"`{_cell(k)}` ({_cell(v)})" for k, v in dropped.items())
            + ".",
            "",
        ]
    return lines


def _buckets_table(index: dict) -> list[str]:
    table = ["| config | latent shape | samples | shards | bytes |", "|---|---|---|---|---|"]
    for bucket, entry in sorted((index.get("buckets") or {}).items()):
        shape = tuple(entry.get("vae_shape", ()))
        table.append(
            f"| `bucket_{bucket}` | {shape} | {entry.get('samples', 0)} | {entry.get('shards', 0)} | {entry.get('bytes', 0)} |"
        )
    return table


def _export_section(index: dict) -> list[str]:
    options = index.get("options") or {}
    return [
        "## Export",
        "",
        f"Written by `prep export webdataset` (prep {index.get('prep_version', '?')}): "
        f"shard size {options.get('shard_size')}, shuffle {options.get('shuffle')}, seed {options.get('seed')}, "
        f"limit {options.get('limit')}. `index.json` lists every shard with its sample count, size and sha256; "
        "`stats.json` holds the export summary (records skipped, by reason). The tars are reproducible: the same "
        "inputs and seed give byte-identical shards.",
        "",
    ]


def _json_declared_as_json(dataset_info) -> bool:
    infos = dataset_info if isinstance(dataset_info, list) else [dataset_info]
    for info in infos:
        for feature in info.get("features", []):
            if feature.get("name") == "json" and feature.get("dtype") == "json":
                return True
    return False
