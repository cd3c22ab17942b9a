"""Preparing the manifest before the passes: a list of steps, run by the main rank alone.

Each step looks at the manifest's projection (whole columns, so a million finished records
cost seconds) and touches only the records it must change; all changes go to disk in one
streaming rewrite at the end. The steps, in order:

1. `recover_journals`: fold record updates a killed run left in its journals;
2. `absolutize_paths`: a relative `image_path` from an older manifest is resolved once (against
   the current folder, else the manifest's folder) and stored absolute, so runs from any folder
   find the same files;
3. `refresh_fingerprints`: stat every image that has a fingerprint; hash only those whose size
   or mtime changed (their artifacts then go stale);
4. `scan_images`: new files under `--images` become records; a file already in the manifest
   (by path, or by device and inode: a symlinked folder, a hard link) never gets a second one;
   `scan_webdataset` and `scan_dataset` do the same for `--webdataset` tars and a `--dataset`
   (`prep.ingest`: new samples become records, changed ones are updated); records set aside by
   `prep prune` are not brought back;
5. `apply_captions`: the `--captions` source (metadata file, sidecar, file name, instance
   prompt; `prep.captions`) gives records without a caption theirs (the user's, never
   regenerated); an edited sidecar or metadata file replaces the caption it gave;
6. `migrate_records`: v0/v1 records become v2 (see `prep.migrate`); one that cannot is flagged;
7. `rebucket`: records move to the nearest bucket of the current set;
8. `curate_records`: the size rules and exact duplicates flag (or lift the flags of) records
   (`prep.curate`; near duplicates are judged after the DINOv3 pass);
9. `vouch_for_legacy`: artifacts of records from before provenance (no `provenance` field) are
   adopted as `unknown` - their own manifest vouches for them - and stamps of the previous
   format get their file stamp.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from prep import journal, provenance, sources, store
from prep.buckets import assign_aspect_bucket
from prep.captions import apply_captions
from prep.ingest import scan_dataset, scan_webdataset
from prep.manifest import Manifest, rewrite
from prep.options import RunOptions
from prep.records import has_caption, needs_migration, new_record
from prep.sources import is_uri
from prep.tally import Tally

logger = logging.getLogger("prep")


@dataclass
class Preparation:
    """The manifest being prepared: changed records by row, new records, and what happened."""

    opts: RunOptions
    manifest: Manifest
    tally: Tally
    changed: dict[int, dict] = field(default_factory=dict)
    appended: list[dict] = field(default_factory=list)
    inodes: dict[tuple[int, int], int] = field(default_factory=dict)  # (dev, ino) of record images -> row
    state_updates: dict = field(default_factory=dict)  # what the inputs were (`sources.json`), written after the manifest
    _state: dict | None = None

    def state_of(self, key: str):
        """What the last complete preparation recorded of an input (`prep.ingest.read_state`)."""
        if self._state is None:
            from prep.ingest import read_state

            self._state = read_state(self.opts.derived_dir)
        return self._state.get(key)

    def set_state(self, key: str, value) -> None:
        self.state_updates[key] = value

    def record(self, row: int) -> dict:
        """The record at `row` for reading or changing (a change is kept and written at the end)."""
        row = int(row)
        if row not in self.changed:
            self.changed[row] = self.manifest.record(row)
        return self.changed[row]

    def current(self, row: int) -> dict:
        """The record at `row` as the steps so far left it (not marked changed)."""
        return self.changed.get(int(row)) or self.manifest.record(int(row))

    def column(self, name: str) -> list:
        return self.manifest.table.column(name).to_pylist()

    def all_records(self):
        """(row or None, record) of every record, prepared so far, new ones last (small manifests)."""
        for row in range(len(self.manifest)):
            yield row, self.current(row)
        for record in self.appended:
            yield None, record


Step = Callable[[Preparation], None]


# ------------------------------------------------------------------------------- steps
def recover_journals(prep: Preparation) -> None:
    updates = journal.read_updates(prep.opts.manifest)
    if not updates:
        return
    ids = prep.column("image_id")
    for row, image_id in enumerate(ids):
        update = updates.get(image_id)
        if update is not None:
            record = prep.current(row)
            if journal.apply_update(record, update):
                prep.changed[row] = record
    logger.info("recovered the journals of an interrupted run (%d records)", len(updates))


def absolutize_paths(prep: Preparation) -> None:
    paths = prep.column("image_path")
    relative = [row for row, path in enumerate(paths) if not is_uri(path) and not os.path.isabs(path)]
    if not relative:
        return
    anchors = [Path.cwd(), prep.opts.manifest.resolve().parent]
    moved = 0
    for row in relative:
        record = prep.current(row)
        for anchor in anchors:
            candidate = os.path.normpath(anchor / record["image_path"])
            if os.path.exists(candidate):
                prep.record(row)["image_path"] = candidate
                moved += 1
                break
    if moved:
        logger.info("%d relative image paths resolved and stored as absolute paths (first: %s)",
                    moved, prep.current(relative[0])["image_path"])
    if moved < len(relative):
        logger.warning("%d relative image paths were not found from %s or the manifest's folder; run from the "
                       "folder they are relative to once", len(relative) - moved, Path.cwd())


def refresh_fingerprints(prep: Preparation) -> None:
    """Stat every record's image; re-hash only files whose size or mtime changed."""
    table = prep.manifest.table
    paths = table.column("image_path").to_pylist()
    has_fp = pc.is_valid(table.column("fp_size")).to_numpy(zero_copy_only=False)
    sizes = pc.fill_null(table.column("fp_size"), -1).to_numpy()
    mtimes = pc.fill_null(table.column("fp_mtime"), -1).to_numpy()
    changed = 0
    containers: dict[str, int | None] = {}
    for row, path in enumerate(paths):
        if row in prep.changed:
            path = prep.changed[row]["image_path"]
        if is_uri(path):
            changed += _refresh_located(prep, row, path, int(mtimes[row]) if has_fp[row] else None, containers)
            continue
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            continue
        prep.inodes.setdefault((st.st_dev, st.st_ino), row)
        if not has_fp[row] or (st.st_size == sizes[row] and st.st_mtime_ns == mtimes[row]):
            continue
        record = prep.current(row)
        fresh = provenance.refresh_fingerprint(path, record.get("image_fingerprint"))
        if fresh is not None and fresh != record.get("image_fingerprint"):
            prep.record(row)["image_fingerprint"] = fresh
            changed += 1
    if changed:
        logger.info("%d image files changed on disk since their fingerprint", changed)


def _refresh_located(prep: Preparation, row: int, locator: str, mtime: int | None, containers: dict) -> int:
    """A tar member's or dataset row's fingerprint, re-hashed only when its container's mtime changed."""
    if mtime is None or locator.startswith("hf://"):
        return 0  # no fingerprint yet (the pass takes it), or a Hub commit (immutable)
    key = sources.local_path_of(locator) if locator.startswith("tar://") else locator
    if key not in containers:
        try:
            containers[key] = sources.container_mtime(locator)
        except (OSError, ValueError):
            containers[key] = None
    if containers[key] is None or containers[key] == mtime:
        return 0
    record = prep.current(row)
    fresh = sources.image_fingerprint(locator, record.get("image_fingerprint"))
    if fresh is None and locator.startswith("tar://"):
        locator = _member_moved(prep, row, locator, containers)
        fresh = sources.image_fingerprint(locator, None) if locator else None
    if fresh is None or fresh == record.get("image_fingerprint"):
        return 0
    prep.record(row)["image_fingerprint"] = fresh
    return 1


def _member_moved(prep: Preparation, row: int, locator: str, containers: dict) -> str | None:
    """A tar rewritten since it was read: find the member again by name (headers only), move the record."""
    from prep.tars import index_tar

    member = sources.parse_tar(locator)
    key = ("index", member.tar)
    if key not in containers:
        try:
            containers[key] = index_tar(member.tar)
        except OSError:
            containers[key] = {}
    found = containers[key].get(member.member)
    if found is None:
        logger.warning("%s: member %s is gone; record %s keeps its old fingerprint", member.tar, member.member,
                       prep.current(row).get("image_id"))
        return None
    moved = sources.TarMember(member.tar, member.member, *found).locator
    prep.record(row)["image_path"] = moved
    return moved


def scan_images(prep: Preparation) -> None:
    """Records for images under `--images` that the manifest does not know yet."""
    from prep.progress import progress
    from prep.prune import pruned_keys
    from prep.scan import assign_image_ids, iter_image_paths, read_headers, relative_key

    opts = prep.opts
    if opts.images is None:
        return
    root = Path(os.path.abspath(opts.images))
    known = {os.path.normpath(p) for p in prep.column("image_path")}
    known.update(os.path.normpath(p) for p in (r["image_path"] for r in prep.changed.values()))
    pruned_paths, pruned_ids = pruned_keys(opts.manifest)  # set aside by `prep prune`: not brought back
    known |= pruned_paths
    candidates = []
    for path in progress(iter_image_paths(root), desc="scan", unit="file"):
        if path in known or os.path.normpath(path) in known:
            continue
        same = _same_file_row(prep, path)
        if same is not None:
            logger.debug("%s is the image of record %s (same file): no second record", path, same)
            continue
        candidates.append(Path(path))
    headers = list(progress(read_headers(candidates), total=len(candidates), desc="headers", unit="img"))
    readable = []
    for header in headers:
        if header.error:
            prep.tally.unreadable += 1
            logger.warning("skipped %s: %s", header.path, header.error)
        else:
            readable.append(header)
    taken = (set(prep.column("image_id")) | pruned_ids) - {None}
    ids = assign_image_ids([relative_key(h.path, root) for h in readable], taken)
    buckets = opts.bucket_list()
    for header, image_id in zip(readable, ids, strict=True):
        bucket = assign_aspect_bucket(header.width, header.height, buckets)
        prep.appended.append(
            new_record(image_id=image_id, image_path=os.path.normpath(str(header.path)), width=header.width,
                       height=header.height, aspect_bucket=bucket)
        )
        prep.tally.new.add(image_id)
        logger.debug("new %s: %s %dx%d -> %s", image_id, header.path, header.width, header.height, bucket)


def _same_file_row(prep: Preparation, path: str) -> int | None:
    """The row whose image is this very file (same device and inode), if any."""
    if not prep.inodes:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return prep.inodes.get((st.st_dev, st.st_ino))


def migrate_records(prep: Preparation) -> None:
    """v0/v1 records -> v2 (only with `--pass all` or `--pass migrate`)."""
    from prep.migrate import EXTRACTED, FAILED, MIGRATED, ids_for_records, migrate_record

    opts = prep.opts
    if "migrate" not in opts.selected_passes():
        return
    rows = np.flatnonzero(pc.fill_null(prep.manifest.table.column("needs_migration"), False).to_numpy(
        zero_copy_only=False)).tolist()
    rows = [row for row in rows if needs_migration(prep.current(row))]
    if not rows:
        return
    taken = (set(prep.column("image_id")) | {r["image_id"] for r in prep.appended}) - {None}
    records = [prep.current(row) for row in rows]
    new_ids = ids_for_records(records, taken)
    buckets = opts.bucket_list()
    for row, record in zip(rows, records, strict=True):
        result = migrate_record(record, opts.derived_dir, new_ids.get(record["image_path"]), buckets)
        label = result.record.get("image_id") or record["image_path"]
        if result.status == FAILED:
            flag_unmigratable(prep, row, record, result.reason)
        elif result.status in (MIGRATED, EXTRACTED):
            prep.changed[row] = lift_migrate_flag(result.record)
            (prep.tally.migrated if result.status == MIGRATED else prep.tally.extracted).add(label)
            logger.debug("%s %s -> v2", result.status, label)


def flag_unmigratable(prep: Preparation, row: int, record: dict, reason: str) -> None:
    """A record that cannot become v2 is flagged (`unmigratable`, or `image_missing` when its image is
    gone), so runs and verify count it apart; it is tried again on every run, and `prep prune` moves it aside."""
    from prep.curate import make_flag, may_flag

    path = record["image_path"]
    kind = "image_missing" if not is_uri(path) and not os.path.exists(path) else "unmigratable"
    flag = make_flag(kind, reason)
    if not may_flag(record):  # the record carries a `filtered` value of its own: counted as failed, as before
        prep.tally.failed[record.get("image_id") or path] = f"migrate: {reason}"
        logger.warning("not migrated %s: %s", path, reason)
        return
    if record.get("filtered") == flag:
        logger.debug("still not migrated %s: %s", path, reason)
        return
    prep.record(row)["filtered"] = flag
    logger.warning("not migrated %s: %s (flagged filtered: %s; `prep prune` moves it aside)", path, reason, kind)


def lift_migrate_flag(record: dict) -> dict:
    """A record that migrates at last loses the flag its earlier failures set."""
    from prep.curate import MIGRATE_REASONS, is_prep_flag

    flag = record.get("filtered")
    if is_prep_flag(flag) and flag["reason"] in MIGRATE_REASONS:
        record.pop("filtered")
    return record


def rebucket(prep: Preparation) -> None:
    """Move v2 records to the nearest bucket of the current set (their VAE latent then goes stale)."""
    table = prep.manifest.table
    widths = table.column("width").to_pylist()
    heights = table.column("height").to_pylist()
    buckets = table.column("aspect_bucket").to_pylist()
    wanted = prep.opts.bucket_list()
    nearest_of: dict[tuple[int, int], str] = {}
    moved = 0
    for row, (width, height, bucket) in enumerate(zip(widths, heights, buckets, strict=True)):
        if row in prep.changed:
            record = prep.changed[row]
            width, height, bucket = record.get("width"), record.get("height"), record.get("aspect_bucket")
            if needs_migration(record):
                continue
        if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0 or bucket is None:
            continue
        key = (width, height)
        if key not in nearest_of:
            nearest_of[key] = assign_aspect_bucket(width, height, wanted)
        if nearest_of[key] != bucket and not needs_migration(prep.current(row)):
            prep.record(row)["aspect_bucket"] = nearest_of[key]
            moved += 1
    if moved:
        logger.info("%d records moved to a new aspect bucket (the bucket set changed)", moved)


def vouch_for_legacy(prep: Preparation) -> None:
    """Records from before provenance adopt their valid side files as `unknown`; old stamps get file stamps."""
    from prep import stages

    table = prep.manifest.table
    legacy = ~pc.fill_null(table.column("has_provenance"), False).to_numpy(zero_copy_only=False)
    old_format = np.zeros(len(legacy), dtype=bool)
    for stage in stages.artifact_stages():
        formats = pc.fill_null(table.column(f"{stage.name}__format"), 0).to_numpy()
        old_format |= (formats != 0) & (formats < provenance.PROVENANCE_FORMAT)
    rows = np.flatnonzero(legacy | old_format).tolist()
    adopted = 0
    for row in rows:
        record = prep.current(row)
        if needs_migration(record):
            continue
        adopted += adopt_record_artifacts(record, prep.opts.derived_dir, legacy=bool(legacy[row]))
        prep.changed[row] = record
    if adopted:
        logger.info("%d artifacts of records from an older manifest adopted (provenance unknown; "
                    "`prep verify --adopt` stamps them with the models you name)", adopted)


def adopt_record_artifacts(record: dict, derived_dir: Path, *, legacy: bool) -> int:
    """Stamp the valid side files an older record vouches for (in place); returns how many."""
    from prep import stages

    prov = record.setdefault("provenance", {}) if isinstance(record.get("provenance"), dict) or legacy else None
    if prov is None:
        return 0
    if legacy and has_caption(record) and "caption" not in prov:
        prov["caption"] = {"source": "user", "text_sha256": provenance.text_sha256(record["caption"])}
    count = 0
    for stage in stages.artifact_stages():
        stamp = prov.get(stage.name)
        if not legacy and not (isinstance(stamp, dict) and stamp.get("format", 0) < provenance.PROVENANCE_FORMAT):
            continue
        if legacy and stamp is not None:
            continue
        path = store.artifact_path(derived_dir, stage.name, record["image_id"])
        if store.check_artifact(derived_dir, stage.name, record, read_data=True) != store.VALID:
            if not legacy:
                prov.pop(stage.name, None)  # an old stamp for a file that is not there: redo
            continue
        data = path.read_bytes()
        new = dict(stamp) if isinstance(stamp, dict) else {"origin": "legacy"}
        new["format"] = provenance.PROVENANCE_FORMAT
        new["file"] = provenance.file_stamp(data, os.stat(path))
        if legacy:
            _stamp_legacy_inputs(new, record, stage)
        prov[stage.name] = new
        count += 1
    return count


def _stamp_legacy_inputs(stamp: dict, record: dict, stage) -> None:
    """The inputs an adopted artifact was made from, as the record says now (to notice later edits)."""
    if stage.reads == "caption":
        stamp["caption_sha256"] = provenance.text_sha256(record.get("caption"))
        return
    fp = provenance.refresh_fingerprint(record["image_path"], record.get("image_fingerprint"))
    if fp is not None:
        record["image_fingerprint"] = fp
        stamp["image_sha256"] = fp["sha256"]
    if stage.by_bucket:
        stamp["bucket"] = record.get("aspect_bucket")


def curate_records(prep: Preparation) -> None:
    """Flag (or lift the flags of) records the size rules and exact duplicates say no to (`prep.curate`)."""
    from prep.curate import curate_records as judge_records

    judge_records(prep)


STEPS: list[Step] = [
    recover_journals,
    absolutize_paths,
    refresh_fingerprints,
    scan_images,
    scan_webdataset,
    scan_dataset,
    apply_captions,
    migrate_records,
    rebucket,
    curate_records,
    vouch_for_legacy,
]


def prepare_manifest(opts: RunOptions, manifest: Manifest, tally: Tally, steps: list[Step] = STEPS) -> Manifest:
    """Run the steps; one streaming rewrite if anything changed. Returns the manifest as it now is."""
    from prep.hfdatasets import forget_readers

    forget_readers()  # dataset files replaced since this process last read them must be opened anew
    prep = Preparation(opts, manifest, tally)
    for step in steps:
        step(prep)
    if prep.changed or prep.appended or manifest.rejected:
        manifest = rewrite(manifest, prep.changed, prep.appended)
    journal.clear(opts.manifest)
    if prep.state_updates:  # only now: a state never claims records the manifest does not hold
        from prep.ingest import write_state

        write_state(opts.derived_dir, prep.state_updates)
    return manifest
