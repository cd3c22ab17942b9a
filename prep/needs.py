"""Which records a stage must (re)do: a vectorised `Dataset.filter` over the manifest projection.

A record needs a stage when it is eligible (migrated, has an id, not filtered out; the VAE also
needs a bucket, T5 a caption) and its artifact is not vouched for:

- no stamp, or a stamp of an older format (a file may exist: it was not made for this record);
- unless `--keep-stale`: the stamp's configuration differs from this run's (another model,
  revision, dtype or setting), its input changed (image edited, caption edited) or the VAE
  bucket moved;
- the side file is not the one stamped: missing, or another size, or another mtime and other
  bytes (same bytes with a new mtime is fine: the stamp is refreshed, nothing recomputed);
- `prep verify` listed it as invalid (`<derived>/.prep/redo.json`: NaN values, bad data that a
  size check cannot see).

Everything but the per-file `stat` works on whole Arrow columns, so a run over a million
finished records decides in seconds and reads no JSON and no image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prep import provenance
from prep.manifest import release_mapped_pages

REDO_FILE = ".prep/redo.json"


@dataclass
class Yardstick:
    """What a run expects: its configuration per stage, and what the user asked to keep or redo."""

    derived_dir: Path
    expected: provenance.Expected
    keep_stale: bool = False
    recaption: bool = False
    redo: dict[str, set[str]] = field(default_factory=dict)  # stage -> ids verify found invalid


@dataclass
class StageWork:
    """One stage's decision on a set of rows."""

    rows: list[int] = field(default_factory=list)
    stale: dict[str, str] = field(default_factory=dict)  # image_id -> why its artifact is redone (or kept)
    refreshed: dict[int, dict] = field(default_factory=dict)  # row -> new file stamp (same bytes, new mtime)


def read_redo(derived_dir: str | Path) -> dict[str, set[str]]:
    """{stage: ids} that `prep verify` found invalid and the next run must redo."""
    try:
        data = json.loads((Path(derived_dir) / REDO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {kind: {i for i in ids if isinstance(i, str)} for kind, ids in data.items() if isinstance(ids, list)}


def write_redo(derived_dir: str | Path, redo: dict[str, list[str]]) -> None:
    from prep.fsio import atomic_write_text

    path = Path(derived_dir) / REDO_FILE
    if not any(redo.values()):
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({k: sorted(v) for k, v in redo.items() if v}, indent=1) + "\n")


# ------------------------------------------------------------------------ column helpers
def str_column(batch: pa.Table, name: str) -> np.ndarray:
    return np.asarray(batch.column(name).to_pylist(), dtype=object)


def valid_mask(batch: pa.Table, name: str) -> np.ndarray:
    return pc.is_valid(batch.column(name)).to_numpy(zero_copy_only=False)


def int_column(batch: pa.Table, name: str) -> np.ndarray:
    """An int64 column with nulls as a sentinel (no float conversion, so 64-bit hashes stay exact)."""
    return pc.fill_null(batch.column(name), np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)


def bool_column(batch: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(batch.column(name), False).to_numpy(zero_copy_only=False)


NULL = np.iinfo(np.int64).min


def eligible(batch: pa.Table, stage) -> np.ndarray:
    """Records a stage may touch: migrated, with an id, not filtered out (and what the stage reads)."""
    ok = valid_mask(batch, "image_id") & ~bool_column(batch, "needs_migration") & ~valid_mask(batch, "filtered")
    if stage.by_bucket:
        ok &= valid_mask(batch, "aspect_bucket")
    if stage.reads == "caption":
        ok &= valid_mask(batch, "caption")
    return ok


class ConfigJudge:
    """Stale reasons per distinct stamp configuration (a handful per dataset), computed once each."""

    def __init__(self, expected: dict):
        self.expected = expected
        self.cache: dict[int | None, str | None] = {None: None}

    def reasons(self, column) -> list[str | None]:
        """A `<stage>__config` column (configuration hashes) -> the stale reason of each row."""
        from prep.manifest import stamp_config

        values = column.to_pylist()
        for value in set(values) - self.cache.keys():
            self.cache[value] = provenance.config_stale_reason(stamp_config(value), self.expected)
        return [self.cache[value] for value in values]


def plan_batch(batch: pa.Table, stage, yard: Yardstick, judge: ConfigJudge, work: StageWork) -> np.ndarray:
    """The `needs` decision for one Arrow batch of the projection (a bool per row)."""
    if stage.artifact is None:
        return _plan_caption_batch(batch, stage, yard, judge, work)
    name = stage.name
    ok = eligible(batch, stage)
    ids = str_column(batch, "image_id")
    has_stamp = valid_mask(batch, f"{name}__config") | valid_mask(batch, f"{name}__origin")
    current = int_column(batch, f"{name}__format") == provenance.PROVENANCE_FORMAT
    reasons = np.full(len(ids), None, dtype=object)
    # inputs changed: the image (or the caption, for a stage reading captions) is not the stamped one
    stamped_input = int_column(batch, f"{name}__input")
    now_input = int_column(batch, "caption_hash" if stage.reads == "caption" else "fp_sha")
    changed = (stamped_input != NULL) & (now_input != NULL) & (stamped_input != now_input)
    reasons[changed] = "caption changed" if stage.reads == "caption" else "image changed"
    if stage.by_bucket:
        stamped_bucket = str_column(batch, f"{name}__bucket")
        bucket = str_column(batch, "aspect_bucket")
        moved = has_stamp & (stamped_bucket != bucket)
        for i in np.flatnonzero(moved & (reasons == None)):  # noqa: E711 - numpy elementwise
            reasons[i] = f"bucket changed ({stamped_bucket[i]} -> {bucket[i]})"
    legacy = valid_mask(batch, f"{name}__origin")
    config_reasons = np.asarray(judge.reasons(batch.column(f"{name}__config")), dtype=object)
    config_stale = ~legacy & (config_reasons != None)  # noqa: E711
    reasons[config_stale & (reasons == None)] = config_reasons[config_stale & (reasons == None)]  # noqa: E711
    # the record fields the stage writes (T5: the attention mask) must be there too
    fields_ok = bool_column(batch, stage.fields_column) if stage.fields_column else np.ones(len(ids), dtype=bool)
    stale = reasons != None  # noqa: E711
    need = ok & (~has_stamp | ~current | ~fields_ok | (stale & (not yard.keep_stale)))
    redo = yard.redo.get(name, set())
    for i in np.flatnonzero(ok & ~need):
        if ids[i] in redo:
            need[i] = True
            work.stale[ids[i]] = "invalid when verified"
    for i in np.flatnonzero(ok & stale):
        work.stale[ids[i]] = f"stale: {reasons[i]}" + ("" if need[i] else " (kept: --keep-stale)")
    # the side file itself: one stat per remaining record
    candidates = np.flatnonzero(ok & ~need)
    if len(candidates):
        _check_files(batch, stage, yard, candidates, ids, need, work)
    for i in np.flatnonzero(ok & ~has_stamp):
        path = Path(yard.derived_dir) / stage.artifact.folder / f"{ids[i]}.npy"
        if os.path.lexists(path):
            work.stale[ids[i]] = "stale: not made for this record (no stamp)"
    rows = batch.column("row").to_numpy()
    work.rows.extend(int(r) for r in rows[need])
    release_mapped_pages()
    return need


def _check_files(batch, stage, yard: Yardstick, candidates, ids, need, work: StageWork) -> None:
    """Stat each remaining side file against its stamp; hash it only when its mtime moved."""
    from prep.fsio import sha256_file
    from prep.manifest import hash64

    name = stage.name
    folder = os.path.join(yard.derived_dir, stage.artifact.folder, "")
    sizes = int_column(batch, f"{name}__file_size")
    mtimes = int_column(batch, f"{name}__file_mtime")
    shas = int_column(batch, f"{name}__file_sha")
    rows = batch.column("row").to_numpy()
    stat = os.stat
    for i in candidates.tolist():
        path = folder + ids[i] + ".npy"
        try:
            st = stat(path)
        except (OSError, ValueError):
            need[i] = True
            continue
        if st.st_size == sizes[i] and st.st_mtime_ns == mtimes[i]:
            continue
        digest = None
        if st.st_size == sizes[i]:
            try:
                digest = sha256_file(path)
            except OSError:
                digest = None
        if digest is not None and hash64(digest) == shas[i]:  # same bytes, new mtime (a copy)
            work.refreshed[int(rows[i])] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        else:
            need[i] = True
            work.stale[ids[i]] = "stale: file is not the one its record stamped"


def _plan_caption_batch(batch, stage, yard: Yardstick, judge: ConfigJudge, work: StageWork) -> np.ndarray:
    """Captions: missing ones are made; a model's caption is redone when stale (or with --recaption)."""
    name = stage.name
    ok = eligible(batch, stage)
    ids = str_column(batch, "image_id")
    missing = ~valid_mask(batch, "caption")
    source = str_column(batch, f"{name}__source")
    by_model = source == "model"
    untouched = int_column(batch, f"{name}__text") == int_column(batch, "caption_hash")
    stamped_input = int_column(batch, f"{name}__input")
    image_changed = (stamped_input != NULL) & (int_column(batch, "fp_sha") != NULL) & (stamped_input != int_column(batch, "fp_sha"))
    reasons = np.asarray(judge.reasons(batch.column(f"{name}__config")), dtype=object)
    config_stale = reasons != None  # noqa: E711
    model_made = ok & ~missing & by_model & untouched
    stale = model_made & (image_changed | config_stale)
    need = ok & (missing | (model_made & yard.recaption) | (stale & (not yard.keep_stale)))
    for i in np.flatnonzero(stale):
        why = "image changed" if image_changed[i] else reasons[i]
        work.stale[ids[i]] = f"stale: {why}" + ("" if need[i] else " (kept: --keep-stale)")
    work.rows.extend(int(r) for r in batch.column("row").to_numpy()[need])
    release_mapped_pages()
    return need


def plan_stage(dataset, stage, yard: Yardstick, *, desc: str | None = None):
    """Filter a projection `Dataset` (with its `row` column) to the records `stage` must do.

    Returns (the filtered dataset, the StageWork with stale reasons and refreshed file stamps).
    """
    from prep.passes import fresh_fingerprint

    work = StageWork()
    judge = ConfigJudge(yard.expected.get(stage.name))
    todo = dataset.with_format("arrow").filter(
        lambda batch: plan_batch(batch, stage, yard, judge, work),
        batched=True,
        batch_size=20_000,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=fresh_fingerprint(f"needs-{stage.name}"),
        desc=desc,
    )
    return todo.with_format(None), work
