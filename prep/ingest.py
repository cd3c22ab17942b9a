"""Records from the inputs that are not a plain folder: WebDataset tars and `datasets` datasets.

Each input yields `Sample`s (a locator, the image bytes, a caption, metadata); `ingest` turns
them into records, or updates the record that already has the sample's identity (the same
tar member, the same dataset row): a changed image gets its new fingerprint and size (its
artifacts then go stale), a caption the input gave is replaced when the input's caption
changed. Nothing is ever written here: the preparation rewrites the manifest once at the end.

A rerun reads only what changed: a tar with the size and mtime it had when it was last read
(and at least as many records as that read left) is not opened; a dataset whose version (Hub
commit, or the local data files' sizes and mtimes) and options are those of the last complete
preparation is not streamed. What was read is kept in `<derived dir>/sources.json`, written
after the manifest, so it never claims records the manifest does not hold.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

from prep import journal, sources
from prep.buckets import assign_aspect_bucket
from prep.captions import extra_fields, source_stamp, with_prefix
from prep.errors import UserError
from prep.provenance import text_sha256
from prep.records import has_caption, is_safe_id, new_record
from prep.scan import hashed_id, read_image_header, read_image_header_bytes

logger = logging.getLogger("prep")

WEBDATASET, DATASET = "webdataset", "dataset"
STATE_FILE = "sources.json"


@dataclass
class Sample:
    """One image of an input, as read: where it is, its bytes, and what the input says of it."""

    locator: str
    id_hint: str  # the preferred image_id (a tar key, an id column value, SPLIT-ROW)
    data: bytes | None = None  # None: a local file, read from its path
    mtime_ns: int | None = None  # the container's mtime (tar, data file); None for a Hub commit
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def identity(self) -> str:
        return sources.identity_of(self.locator)


class Ingest:
    """New and updated records from samples; ids assigned with the scan's rules."""

    def __init__(self, prep, source: str):
        self.prep = prep
        self.source = source
        self.opts = prep.opts
        self.rows = identity_rows(prep)
        self.taken = ({i for i in prep.column("image_id") if i} | {r["image_id"] for r in prep.appended})
        self.buckets = prep.opts.bucket_list()

    def add(self, sample: Sample) -> bool:
        """Create or update the sample's record; False when the sample is skipped."""
        if sample.error:
            self.skip(sample.error, sample.locator)
            return False
        header = (read_image_header_bytes(sample.data, sample.locator) if sample.data is not None
                  else read_image_header(sample.locator))
        if header.error:
            self.skip(f"not an image: {header.error}" if "recognised" in header.error else header.error, sample.locator)
            return False
        fp = (sources.bytes_fingerprint(sample.data, sample.mtime_ns) if sample.data is not None
              else sources.image_fingerprint(sample.locator, None))
        if sample.identity not in self.rows:
            self.create(sample, header, fp)
            return True
        return self.update(self.rows[sample.identity], sample, header, fp)

    def skip(self, reason: str, where: str) -> None:
        short = reason.split(":")[0].strip()
        self.prep.tally.skip_input(f"{self.source}: {short}")
        logger.warning("skipped %s: %s", where, reason)

    def new_id(self, hint: str) -> str:
        image_id = hint if is_safe_id(hint) and hint not in self.taken else hashed_id(hint, hint)
        salt = 0
        while image_id in self.taken:
            salt += 1
            image_id = hashed_id(hint, f"{hint}#{salt}")
        self.taken.add(image_id)
        return image_id

    def create(self, sample: Sample, header, fp: dict | None) -> None:
        image_id = self.new_id(sample.id_hint)
        record = new_record(image_id=image_id, image_path=sample.locator, width=header.width, height=header.height,
                            aspect_bucket=assign_aspect_bucket(header.width, header.height, self.buckets))
        if fp is not None:
            record["image_fingerprint"] = fp
        record.update(extra_fields(sample.meta, set()))
        self.set_caption(record, sample)
        self.prep.appended.append(record)
        self.rows[sample.identity] = None
        self.prep.tally.new.add(image_id)

    def update(self, row: int | None, sample: Sample, header, fp: dict | None) -> bool:
        if row is None:  # a second sample with an identity this run already added
            self.skip("duplicate key: seen earlier in this input", sample.locator)
            return False
        record = copy.deepcopy(self.prep.current(row))
        changes: dict = {}
        if record.get("image_path") != sample.locator:
            changes["image_path"] = sample.locator
        if fp is not None and record.get("image_fingerprint") != fp:
            changes["image_fingerprint"] = fp
        if fp is not None and (record.get("width"), record.get("height")) != (header.width, header.height):
            changes.update(width=header.width, height=header.height,
                           aspect_bucket=assign_aspect_bucket(header.width, header.height, self.buckets))
        changes.update({k: v for k, v in extra_fields(sample.meta, set()).items() if record.get(k) != v})
        caption_before = (record.get("caption"), record.get("provenance", {}).get("caption"))
        self.set_caption(record, sample)
        if (record.get("caption"), record.get("provenance", {}).get("caption")) != caption_before:
            changes["caption"] = record["caption"]
            changes["provenance.caption"] = record["provenance"]["caption"]
        if changes:
            journal.apply_update(self.prep.record(row), changes)
            self.prep.tally.enriched.add(record.get("image_id") or sample.locator)
        self.rows[sample.identity] = None
        return True

    def set_caption(self, record: dict, sample: Sample) -> None:
        """The input's caption, unless the record has one from elsewhere (a user's, a sidecar's)."""
        caption = with_prefix(self.opts.caption_prefix, sample.caption)
        if caption is None:
            return
        prov = record.get("provenance") if isinstance(record.get("provenance"), dict) else None
        stamp = ((prov or {}).get("caption") or {}) if isinstance((prov or {}).get("caption"), dict) else {}
        if has_caption(record):
            source = stamp.get("source")
            if source == "model" and stamp.get("text_sha256") != text_sha256(record["caption"]):
                return  # a model's caption edited by hand: the user's now
            if source not in ("model", self.source):
                return  # the user's, a sidecar's, another input's
        record["caption"] = caption
        if prov is not None:
            prov["caption"] = source_stamp(self.source, caption, prefix=self.opts.caption_prefix)


def identity_rows(prep) -> dict[str, int | None]:
    """identity -> row of every record (tar members without their offset, Hub rows without the commit)."""
    rows: dict[str, int | None] = {}
    for row, path in enumerate(prep.column("image_path")):
        if row in prep.changed:
            path = prep.changed[row]["image_path"]
        rows.setdefault(sources.identity_of(path) if sources.is_uri(path) else os.path.normpath(path), row)
    for record in prep.appended:
        rows[sources.identity_of(record["image_path"])] = None
    return rows


def read_state(derived_dir) -> dict:
    """What the last complete preparations read of each input ({} when unknown: read everything)."""
    from pathlib import Path

    try:
        state = json.loads((Path(derived_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(derived_dir, updates: dict) -> None:
    from pathlib import Path

    from prep.fsio import atomic_write_text

    state = {**read_state(derived_dir), **updates}
    atomic_write_text(Path(derived_dir) / STATE_FILE, json.dumps(state, sort_keys=True) + "\n")


def options_digest(opts, *names: str) -> str:
    values = {name: getattr(opts, name) for name in names}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- webdataset
WDS_OPTIONS = ("captions", "caption_extension", "caption_column", "caption_prefix")


def scan_webdataset(prep) -> None:
    """Records for the samples of `--webdataset` tars that are new or changed since they were read."""
    from prep.progress import progress
    from prep.tars import check_tars, iter_tar_samples

    opts = prep.opts
    if not opts.webdataset:
        return
    tars = check_tars(opts.webdataset)
    digest = options_digest(opts, *WDS_OPTIONS)
    counts = tar_record_counts(prep)
    todo = [t for t in tars if not tar_unchanged(prep.state_of(f"tar:{t}"), t, digest, counts.get(t, 0))]
    if len(todo) < len(tars):
        logger.info("webdataset: %d of %d tars unchanged since they were read: not opened", len(tars) - len(todo), len(tars))
    ingest = Ingest(prep, WEBDATASET)
    caption_ext, caption_key = tar_caption_rules(opts)
    keys: set[str] = set()
    for tar in progress(todo, desc="webdataset", unit="tar"):
        st = os.stat(tar)
        kept = 0
        for found in iter_tar_samples(tar, caption_ext, caption_key):
            sample = tar_sample(found, st.st_mtime_ns)
            if found.key and found.key in keys and not sample.error:
                sample.error = f"duplicate key: {found.key!r} seen earlier in this input"
            keys.add(found.key)
            kept += ingest.add(sample)
        prep.set_state(f"tar:{tar}", {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "options": digest,
                                      "records": kept})


def tar_unchanged(state, tar: str, digest: str, records: int) -> bool:
    """Read before at this size and mtime, with these options, and its records are still there."""
    if not isinstance(state, dict):
        return False
    st = os.stat(tar)
    return (state.get("size"), state.get("mtime_ns"), state.get("options")) == (st.st_size, st.st_mtime_ns, digest) \
        and records >= (state.get("records") or 0)


def tar_caption_rules(opts) -> tuple[str | None, str | None]:
    """(caption member extension, json key) the `--captions` mode reads from a tar sample."""
    mode = opts.captions
    return {
        "auto": (opts.caption_extension, opts.caption_column),
        "sidecar": (opts.caption_extension, None),
        "metadata": (None, opts.caption_column),
    }.get(mode, (None, None))


def tar_sample(found, mtime: int) -> Sample:
    if found.error or found.image is None:
        where = f"{found.tar}#{found.key}" if found.key else found.tar
        return Sample(locator=where, id_hint=found.key, error=found.error or "no image member")
    return Sample(locator=found.image.locator, id_hint=os.path.basename(found.key), data=found.data,
                  mtime_ns=mtime, caption=found.caption, meta=found.meta)


def tar_record_counts(prep) -> dict[str, int]:
    """tar path -> how many records the manifest holds of its members."""
    counts: dict[str, int] = {}
    for row, path in enumerate(prep.column("image_path")):
        if row in prep.changed:
            path = prep.changed[row]["image_path"]
        if path.startswith("tar://"):
            tar = sources.parse_tar(path).tar
            counts[tar] = counts.get(tar, 0) + 1
    return counts


# ------------------------------------------------------------------------------ datasets
DATASET_OPTIONS = ("split", "image_column", "id_column", "captions", "caption_column", "caption_prefix",
                   "instance_prompt")


def scan_dataset(prep) -> None:
    """Records for the rows of `--dataset`, streamed once; skipped when its version is unchanged."""
    from prep import hfdatasets
    from prep.progress import progress

    opts = prep.opts
    if not opts.dataset:
        return
    hfdatasets.forget_readers()
    source = hfdatasets.resolve_dataset(opts.dataset, opts.split, opts.image_column, opts.dataset_revision)
    state = {"version": source.version, "options": options_digest(opts, *DATASET_OPTIONS)}
    previous = prep.state_of(source.key) or {}
    rows = identity_rows(prep)
    prefix = sources.identity_of(source.row(0).locator).rsplit("/", 1)[0] + "/"  # hfds://PATH/SPLIT/, hf://...
    held = sum(1 for identity in rows if identity.startswith(prefix))
    if ({k: previous.get(k) for k in state} == state and previous.get("first") in rows
            and held >= (previous.get("records") or 0)):
        logger.info("dataset %s (%s) unchanged since it was read: not streamed", source.name, source.split)
        return
    if source.scheme == sources.HUB_DATASET:
        try:
            hfdatasets.check_hub_files(source)
        except sources.SourceError as exc:
            raise UserError(str(exc)) from None
    stream = hfdatasets.open_stream(source)
    caption_column = dataset_caption_column(opts, source)
    hfdatasets.check_column(source, opts.id_column, "--id-column")
    ingest = Ingest(prep, DATASET)
    first, kept = None, 0
    for index, example in progress(hfdatasets.iter_rows(stream), desc="dataset", unit="row"):
        sample = dataset_sample(source, index, example, caption_column, opts)
        first = first or sample.identity
        if ingest.add(sample) and sample.identity.startswith(prefix):
            kept += 1  # rows read back by index (rows that are files are checked through `first`)
    prep.set_state(source.key, {**state, "first": first, "records": kept})


def dataset_caption_column(opts, source) -> str | None:
    from prep import hfdatasets

    if opts.captions == "metadata":
        hfdatasets.check_column(source, opts.caption_column, "--caption-column")
        return opts.caption_column
    if opts.captions == "auto" and opts.caption_column in source.columns:
        return opts.caption_column
    if opts.captions in ("sidecar", "filename"):
        raise UserError(f"--captions {opts.captions} does not apply to --dataset; use metadata (a column), "
                        "instance or none")
    return None


def dataset_sample(source, index: int, example: dict, caption_column: str | None, opts) -> Sample:
    """A streamed row: a local file when the image is one, else the row itself (its bytes)."""
    image = example.get(source.image_column) or {}
    hint = f"{source.split}-{index}"
    if opts.id_column is not None:
        hint = str(example.get(opts.id_column))
    meta = {k: v for k, v in example.items() if k not in (source.image_column, caption_column, opts.id_column)}
    caption = example.get(caption_column) if caption_column else None
    if opts.captions == "instance":
        caption = opts.instance_prompt
    caption = caption if isinstance(caption, str) else None
    path = image.get("path") if isinstance(image, dict) else None
    if isinstance(image, dict) and not image.get("bytes") and isinstance(path, str) and os.path.isabs(path):
        return Sample(locator=os.path.normpath(path), id_hint=hint, caption=caption, meta=meta)
    if isinstance(path, str) and "://" in path and not (isinstance(image, dict) and image.get("bytes")):
        raise UserError(f"--dataset {source.name}: row {index} names a remote image file ({path}) instead of holding "
                        "its bytes; use the Hub's parquet conversion (--dataset-revision refs/convert/parquet)")
    if not isinstance(image, dict) or not image.get("bytes"):
        return Sample(locator=source.row(index).locator, id_hint=hint, error="no image in the row")
    return Sample(locator=source.row(index).locator, id_hint=hint, data=image["bytes"],
                  mtime_ns=row_mtime(source, index), caption=caption, meta=meta)


def row_mtime(source, index: int) -> int | None:
    return sources.container_mtime(source.row(index).locator) if source.scheme == sources.LOCAL_DATASET else None
