"""The dataset card (`README.md`) of an export folder, which makes the folder a Hub dataset repo.

Its YAML header declares one config per bucket (`config_name: bucket_WxH`, `data_files:
[{split: train, path: bucket_WxH/*.tar}]`) because samples of different buckets have
latents of different shapes and cannot share one Arrow schema. The text says what each
member holds, the latent convention and the models (from the derived dir's
prep_metadata.json when present) and the counts per bucket.
"""

from __future__ import annotations

from typing import Any

import yaml

from prep import config

CARD_TAGS = ["webdataset", "flux", "text-to-image", "latents", "prep"]


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def card_header(index: dict) -> dict:
    buckets = sorted(b for b, e in index.get("buckets", {}).items() if e.get("samples"))
    header: dict[str, Any] = {
        "tags": CARD_TAGS,
        "task_categories": ["text-to-image"],
        "size_categories": [_size_category(int(index.get("samples", 0)))],
    }
    if buckets:
        header["configs"] = [
            {"config_name": f"bucket_{b}", "data_files": [{"split": "train", "path": f"bucket_{b}/*.tar"}]}
            for b in buckets
        ]
    return header


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
        lines.append(f"- VAE: `{_cell(vae['model_id'])}`" + (f" (subfolder `{_cell(vae['subfolder'])}`)" if vae.get("subfolder") else ""))
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
    lines = ["| artifact | model | revision |", "|---|---|---|"]
    for kind, entry in sorted(models.items()):
        entry = entry if isinstance(entry, dict) else {"model_id": entry}
        lines.append(f"| {_cell(kind)} | `{_cell(entry.get('model_id', 'unknown'))}` | {_cell(entry.get('revision') or 'unknown')} |")
    return lines


def render_card(index: dict, metadata: dict | None = None, *, title: str = "prep training shards") -> str:
    """The README.md text for an export described by `index` (its index.json content)."""
    metadata = metadata or {}
    header = yaml.safe_dump(card_header(index), sort_keys=False, default_flow_style=False)
    buckets = index.get("buckets", {})
    first = next(iter(sorted(buckets)), "1024x1024")
    members = [
        "| member | content |",
        "|---|---|",
        "| `{id}.json` | " + ", ".join(f"`{f}`" for f in index.get("json_fields", [])) + " |",
        f"| `{{id}}.dinov3.npy` | DINOv3 image embedding, float32 ({config.DINOV3_DIM},) |",
        f"| `{{id}}.vae.npy` | Flux VAE latent, float16 ({config.VAE_LATENT_CHANNELS}, H/8, W/8) for bucket WxH |",
        f"| `{{id}}.t5h.npy` | T5 encoder last hidden state, float16 ({config.T5_MAX_LENGTH}, {config.T5_HIDDEN_DIM}) |",
        f"| `{{id}}.t5m.npy` | T5 attention mask, uint8 ({config.T5_MAX_LENGTH},) (1 = real token) |",
    ]
    table = ["| config | latent shape | samples | shards | bytes |", "|---|---|---|---|---|"]
    for bucket, entry in sorted(buckets.items()):
        shape = tuple(entry.get("vae_shape", ()))
        table.append(
            f"| `bucket_{bucket}` | {shape} | {entry.get('samples', 0)} | {entry.get('shards', 0)} | {entry.get('bytes', 0)} |"
        )
    dropped = index.get("dropped_fields") or {}
    options = index.get("options") or {}
    parts = [
        "---",
        header.rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        f"{index.get('samples', 0)} training samples for a text- and DINOv3-conditioned Flux-VAE diffusion model, "
        "as WebDataset tar shards, one folder (and one `datasets` config) per aspect bucket. "
        "All samples of a bucket share one latent shape, so a batch drawn from one config needs no padding.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("<this repo or folder>", name="bucket_{first}", split="train")',
        "",
        "import prep  # or plain webdataset over bucket_*/shard-*.tar",
        f'for batch in prep.load_shards("<this repo or folder>", bucket="{first}", batch_size=32): ...',
        "```",
        "",
        "A config name is required: buckets have different latent shapes.",
        "",
        "## Members of each sample",
        "",
        "The key is the `image_id` (`[A-Za-z0-9_-]`, no dots).",
        "",
        *members,
        "",
    ]
    if dropped:
        parts += [
            "Extra manifest fields not present as one scalar type in every sample were left out of the JSON member: "
            + ", ".join(f"`{_cell(k)}` ({_cell(v)})" for k, v in dropped.items())
            + ".",
            "",
        ]
    parts += [
        "## Latent convention",
        "",
        *_latent_section(metadata),
        "",
        "## Models",
        "",
        *_models_section(metadata),
        "",
        "## Buckets",
        "",
        *table,
        "",
        "## Export",
        "",
        f"Written by `prep export webdataset` (prep {index.get('prep_version', '?')}): "
        f"shard size {options.get('shard_size')}, shuffle {options.get('shuffle')}, seed {options.get('seed')}, "
        f"limit {options.get('limit')}. `index.json` lists every shard with its sample count, size and sha256; "
        "`stats.json` holds the export summary (records skipped, by reason). The tars are reproducible: the same "
        "inputs and seed give byte-identical shards.",
        "",
    ]
    return "\n".join(parts)
