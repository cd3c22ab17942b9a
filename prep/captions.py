"""Caption sources for image files: where a caption a user supplied comes from.

`--captions` chooses (the captioner model fills whatever is still missing afterwards):

| value | caption of `photos/cat_on_sofa.jpg` | provenance `source` |
|---|---|---|
| `auto` (default) | metadata file when one names it, else the sidecar | `metadata` / `sidecar` |
| `sidecar` | `photos/cat_on_sofa.txt` (`--caption-extension`) | `sidecar` |
| `metadata` | column `--caption-column` of the `metadata.jsonl/.csv/.parquet` row whose `file_name` is it | `metadata` |
| `filename` | "cat on sofa" (the stem, `_` and `-` as spaces) | `filename` |
| `instance` | `--instance-prompt` | `instance_prompt` |
| `none` | none: the captioner writes every caption | `model` |

`--caption-prefix` is put before every caption these sources give. Metadata files follow the
`datasets` `imagefolder` layout: a `metadata.jsonl`, `metadata.csv` or `metadata.parquet` in
the images folder or any subfolder, `file_name` relative to the metadata file's folder, any
other column kept as an extra record field. An image takes its metadata from the nearest
metadata file at or above its folder.

A caption a source gave is stamped with the source and, for files, the size and mtime of the
file it came from: a later run stats that file (one stat per sidecar, one per metadata file,
never a re-read while it is unchanged) and takes the new caption when it changed.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from prep.config import MAX_CAPTION_FILE_BYTES
from prep.errors import UserError
from prep.records import V2_FIELDS, has_caption

logger = logging.getLogger("prep")

CAPTION_MODES = ("auto", "sidecar", "metadata", "filename", "instance", "none")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
FILE_NAME = "file_name"
MAX_METADATA_BYTES = 4 << 30
# Record fields prep owns: a metadata column or json key of that name is kept as `source_<name>`.
RESERVED_FIELDS = frozenset({*V2_FIELDS, "image_fingerprint", "provenance", "filtered", "dinov3_embedding"})


def source_stamp(source: str, caption: str, st: os.stat_result | None = None, prefix: str = "") -> dict:
    """`provenance.caption` of a caption a source gave (the file it came from, when one did)."""
    from prep.provenance import text_sha256

    stamp: dict = {"source": source, "text_sha256": text_sha256(caption)}
    if st is not None:
        stamp["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if prefix:
        stamp["prefix"] = prefix
    return stamp


def with_prefix(prefix: str, text: str | None) -> str | None:
    text = text.strip() if isinstance(text, str) else None
    return f"{prefix}{text}" if text else None


def extra_fields(values: dict, skip: set[str]) -> dict:
    """Metadata values kept as record fields: JSON-able ones; a name prep owns gets `source_`."""
    fields = {}
    for name, value in values.items():
        if name in skip or not isinstance(name, str) or not _json_able(value):
            continue
        fields[f"source_{name}" if name in RESERVED_FIELDS else name] = value
    return fields


def _json_able(value, depth: int = 0) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return not (isinstance(value, float) and value != value)
    if depth > 8:
        return False
    if isinstance(value, list):
        return all(_json_able(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_able(v, depth + 1) for k, v in value.items())
    return False


def filename_caption(path: str) -> str | None:
    """The file stem as words: `cat_on-a_sofa.v2.jpg` -> "cat on a sofa.v2"."""
    words = re.sub(r"[_\-]+", " ", Path(path).stem).strip()
    return words or None


# ------------------------------------------------------------------------------- sidecars
def sidecar_path(image_path: str, extension: str) -> Path:
    return Path(image_path).with_suffix(extension)


def read_sidecar(image_path: str, extension: str) -> tuple[str, os.stat_result] | None:
    """The caption in `<image stem><extension>` beside the image (and its stat), if any."""
    from prep.fsio import read_capped_text

    path = sidecar_path(image_path, extension)
    try:
        st = os.stat(path)
        text = read_capped_text(path, MAX_CAPTION_FILE_BYTES).strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        logger.warning("caption file %s not used: %s", path, exc)
        return None
    return (text, st) if text else None


def sidecar_unchanged(image_path: str, extension: str, size: int, mtime: int) -> bool:
    try:
        st = os.stat(sidecar_path(image_path, extension))
    except (OSError, ValueError):
        return False
    return st.st_size == size and st.st_mtime_ns == mtime


# ------------------------------------------------------------------------- metadata files
@dataclass
class MetadataFile:
    """One `metadata.*` file: its stat, and its rows by absolute image path (read on demand)."""

    path: Path
    stat: os.stat_result
    rows: dict[str, dict] | None = None
    missing: list[str] = field(default_factory=list)  # file_name values naming no file

    def load(self, caption_column: str | None) -> dict[str, dict]:
        if self.rows is None:
            self.rows = {}
            folder = self.path.parent
            for number, row in enumerate(read_metadata_rows(self.path), start=1):
                name = row.get(FILE_NAME)
                if not isinstance(name, str) or not name:
                    raise UserError(f"{self.path}: row {number} has no {FILE_NAME!r} (the imagefolder layout needs one)")
                target = os.path.normpath(folder / name)
                if not os.path.isfile(target):
                    self.missing.append(name)
                    continue
                self.rows[target] = row
            if self.rows and caption_column is not None and not any(caption_column in r for r in self.rows.values()):
                logger.warning("%s has no %r column: no captions from it (choose one with --caption-column)",
                               self.path, caption_column)
        return self.rows


def read_metadata_rows(path: Path) -> list[dict]:
    """The rows of a metadata.jsonl / .csv / .parquet file, as dicts."""
    from prep.fsio import open_regular

    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise UserError(f"{path} is larger than {MAX_METADATA_BYTES >> 30} GiB")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            with open_regular(path) as f:
                return pq.read_table(f).to_pylist()
        with open_regular(path) as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"metadata file {path} cannot be read: {exc}") from None
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    return _jsonl_rows(path, text)


def _jsonl_rows(path: Path, text: str) -> list[dict]:
    import orjson

    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


class MetadataIndex:
    """The metadata files under the images roots, found by folder (one stat per file, cached)."""

    def __init__(self, roots: list[Path], caption_column: str | None):
        self.roots = [Path(os.path.abspath(r)) for r in roots]
        self.caption_column = caption_column
        self.by_dir: dict[str, MetadataFile | None] = {}

    def file_for(self, image_path: str) -> MetadataFile | None:
        """The nearest metadata file at or above the image's folder, within its images root."""
        folder = os.path.dirname(image_path)
        root = next((str(r) for r in self.roots if folder == str(r) or folder.startswith(str(r) + os.sep)), None)
        return self._nearest(folder, root)

    def _nearest(self, folder: str, root: str | None) -> MetadataFile | None:
        if folder in self.by_dir:
            return self.by_dir[folder]
        found = self._here(folder)
        if found is None and root is not None and folder != root:
            parent = os.path.dirname(folder)
            found = self._nearest(parent, root) if parent != folder else None
        self.by_dir[folder] = found
        return found

    def _here(self, folder: str) -> MetadataFile | None:
        present = [name for name in METADATA_NAMES if os.path.isfile(os.path.join(folder, name))]
        if not present:
            return None
        if len(present) > 1:
            logger.warning("%s has %s: using %s", folder, " and ".join(present), present[0])
        path = Path(folder) / present[0]
        return MetadataFile(path, os.stat(path))

    def lookup(self, image_path: str) -> tuple[MetadataFile, dict] | None:
        meta = self.file_for(image_path)
        if meta is None:
            return None
        row = meta.load(self.caption_column).get(os.path.normpath(image_path))
        return (meta, row) if row is not None else None

    def loaded(self) -> list[MetadataFile]:
        unique = {id(m): m for m in self.by_dir.values() if m is not None}
        return [m for m in unique.values() if m.rows is not None]


def find_metadata_files(root: Path) -> list[Path]:
    """Every metadata file under `root` (hidden folders skipped), for `auto` and for checks."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in METADATA_NAMES if n in filenames]
    return found


# ------------------------------------------------------------------------- the prepare step
FILE_SOURCES = ("sidecar", "metadata")


@dataclass
class Found:
    """A caption a source gives one record: its text (prefixed), stamp and extra fields."""

    caption: str
    stamp: dict
    fields: dict = field(default_factory=dict)


class CaptionSources:
    """The `--captions` choice applied to records: which source gives which record its caption."""

    def __init__(self, opts, roots: list[Path]):
        self.opts = opts
        self.mode = opts.captions
        self.prefix = opts.caption_prefix or ""
        self.metadata = MetadataIndex(roots, opts.caption_column)

    def order(self) -> tuple[str, ...]:
        if self.mode == "auto":
            return ("metadata",) if self.opts.no_sidecar_captions else ("metadata", "sidecar")
        return (self.mode,)

    def find(self, image_path: str) -> Found | None:
        """The caption of the first source in order that has one for this image."""
        from prep.sources import identity_of, is_uri

        for source in self.order():
            if source == "instance":
                text = with_prefix(self.prefix, self.opts.instance_prompt)
                if text:
                    return Found(text, source_stamp("instance_prompt", text, prefix=self.prefix))
            elif source == "filename":
                name = identity_of(image_path).rsplit("#", 1)[-1] if is_uri(image_path) else image_path
                text = with_prefix(self.prefix, filename_caption(name))
                if text and not image_path.startswith(("hf://", "hfds://")):
                    return Found(text, source_stamp("filename", text, prefix=self.prefix))
            elif is_uri(image_path):
                continue
            elif source == "sidecar":
                found = read_sidecar(image_path, self.opts.caption_extension)
                text = with_prefix(self.prefix, found[0]) if found else None
                if text:
                    return Found(text, source_stamp("sidecar", text, found[1], self.prefix))
            elif source == "metadata":
                found = self.from_metadata(image_path)
                if found:
                    return found
        return None

    def from_metadata(self, image_path: str) -> Found | None:
        hit = self.metadata.lookup(image_path)
        if hit is None:
            return None
        meta, row = hit
        column = self.opts.caption_column
        if self.mode == "metadata" and meta.rows and not any(column in r for r in meta.rows.values()):
            raise UserError(f"{meta.path}: no {column!r} column for the captions (choose one with --caption-column)")
        fields = extra_fields(row, {FILE_NAME, column})
        text = with_prefix(self.prefix, row.get(column) if isinstance(row.get(column), str) else None)
        if text is None:
            return Found("", {}, fields) if fields else None
        return Found(text, source_stamp("metadata", text, meta.stat, self.prefix), fields)

    def unchanged(self, source: str, image_path: str, size: int, mtime: int) -> bool:
        """A file-sourced caption whose file has the size and mtime it had (a stat, no read)."""
        if source == "sidecar":
            return sidecar_unchanged(image_path, self.opts.caption_extension, size, mtime)
        meta = self.metadata.file_for(image_path)
        return meta is not None and meta.stat.st_size == size and meta.stat.st_mtime_ns == mtime

    def report_missing(self, tally) -> None:
        for meta in self.metadata.loaded():
            for _ in meta.missing:
                tally.skip_input("metadata: names a missing file")
            if meta.missing:
                logger.warning("%s names %d files that do not exist (first: %s)", meta.path, len(meta.missing),
                               ", ".join(meta.missing[:3]))


def apply_captions(prep) -> None:
    """Captions from the `--captions` source for records without one, and where that source changed."""
    import numpy as np
    import pyarrow.compute as pc

    from prep import store
    from prep.manifest import config_hash

    opts = prep.opts
    if opts.captions == "none" or "caption" not in opts.selected_passes() or opts.recaption:
        return
    roots = [opts.images] if opts.images is not None else []
    roots += [Path(r) for r in store.read_metadata(opts.derived_dir).get("images_roots") or []]
    chooser = CaptionSources(opts, roots)
    table = prep.manifest.table
    missing = ~pc.is_valid(table.column("caption")).to_numpy(zero_copy_only=False)
    sources_ = pc.fill_null(table.column("caption__source"), "").to_pylist()
    configs = table.column("caption__config").to_pylist()
    sizes = pc.fill_null(table.column("caption__file_size"), -1).to_numpy()
    mtimes = pc.fill_null(table.column("caption__file_mtime"), -1).to_numpy()
    paths = table.column("image_path").to_pylist()
    ours = {"sidecar": "sidecar", "metadata": "metadata", "instance": "instance_prompt", "filename": "filename"}
    mine = {ours[s] for s in chooser.order()}
    config = config_hash({"prefix": chooser.prefix} if chooser.prefix else None)
    candidates = missing | np.array([s in mine for s in sources_], dtype=bool)
    for row in np.flatnonzero(candidates).tolist():
        path = prep.changed[row]["image_path"] if row in prep.changed else paths[row]
        source = sources_[row]
        if not missing[row] and configs[row] == config and (
            (source in FILE_SOURCES and chooser.unchanged(source, path, int(sizes[row]), int(mtimes[row])))
            or source in ("instance_prompt", "filename") and not _instance_changed(chooser, prep.current(row))
        ):
            continue
        take_caption(prep, chooser, prep.current(row), row)
    for record in prep.appended:
        if not has_caption(record):
            take_caption(prep, chooser, record, None)
    chooser.report_missing(prep.tally)


def _instance_changed(chooser: CaptionSources, record: dict) -> bool:
    found = chooser.find(record["image_path"])
    return found is None or found.caption != record.get("caption")


def take_caption(prep, chooser: CaptionSources, record: dict, row: int | None) -> None:
    from prep import journal

    found = chooser.find(record["image_path"])
    if found is None:
        return
    update = {k: v for k, v in found.fields.items() if record.get(k) != v}
    prov = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    if found.caption and (found.caption != record.get("caption") or prov.get("caption") != found.stamp):
        update.update({"caption": found.caption, "provenance.caption": found.stamp})
    if not update:
        return
    target = record if row is None else prep.record(row)
    journal.apply_update(target, update)
    prep.tally.enriched.add(target.get("image_id") or target["image_path"])

