"""Curation: say no to images that would hurt training, by flagging their records (never deleting).

A flagged record stays in the manifest with `filtered: {reason, detail, by: "prep", ...}`; no
model runs on it, the export and `load_manifest(ready_only=True)` leave it out, and verify and
the report count it apart. The rules (defaults in `DEFAULTS`, see the README's Curation section):

- `too_small`: shorter side under `--min-side` or fewer pixels than `--min-pixels` (off by default);
- `upscale`: the image must be enlarged more than `--max-upscale` times to cover its bucket
  (default 2: a 300x200 thumbnail in a 1216x832 bucket needs 4.2x);
- `aspect`: longer than `--max-aspect` : 1, or with `auto` (the default) so elongated that even
  its nearest bucket crops away more than half of it;
- `duplicate`: the same file content (sha256) as another record;
- `near_duplicate`: DINOv3 cosine similarity >= `--near-duplicate` (default 0.99) with a kept image.

Of a group of duplicates the largest image stays (ties: the smallest id); `--keep-ids FILE`
force-keeps ids. Records that cannot be migrated are flagged by the migrate step
(`unmigratable`, `image_missing`, see `prep.prepare`). Settings are sticky: a value given on the
command line (or in `--config`) is kept in `prep_metadata.json` and used by later runs and
`prep curate` until another is given, so thresholds never flip back behind the user's back.
Changing one and running again lifts or sets exactly the flags it decides; flags someone else
set (`by` is not "prep") are never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from prep import dedup, nearcache, store
from prep.buckets import parse_bucket
from prep.errors import UserError
from prep.parallel import bounded_map
from prep.records import is_safe_id, needs_migration

logger = logging.getLogger("prep")

FLAGGED_BY = "prep"
MIGRATE_REASONS = ("unmigratable", "image_missing")
SIZE_REASONS = ("too_small", "upscale", "aspect")
DUPLICATE_REASONS = ("duplicate", "near_duplicate")
REASONS = (*MIGRATE_REASONS, *SIZE_REASONS, *DUPLICATE_REASONS)  # priority: an earlier reason wins
AFTER_STAGE = "dinov3"  # near duplicates are judged once this stage's embeddings exist
STATE_FILE = ".prep/curate.json"
METADATA_KEY = "curation"
EPSILON = 1e-9


# ------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rules:
    """The curation settings in force (None = that rule is off)."""

    min_side: int = 0
    min_pixels: int = 0
    max_upscale: float | None = 2.0
    max_aspect: float | str | None = "auto"
    near_duplicate: float | None = 0.99
    keep_ids: str | None = None

    def to_json(self) -> dict:
        return {f.name: ("off" if getattr(self, f.name) is None and f.name != "keep_ids" else getattr(self, f.name))
                for f in fields(self)}

    def describe(self) -> str:
        parts = [f"--{f.name.replace('_', '-')} {value:g}" if isinstance(value, float) else
                 f"--{f.name.replace('_', '-')} {value}" for f in fields(self)
                 if (value := self.to_json()[f.name]) is not None]
        return ", ".join(parts)


DEFAULTS = Rules()
RULE_NAMES = tuple(f.name for f in fields(Rules))


def _number(name: str, value, source: str, *, kind=float, low: float = 0.0, high: float | None = None,
            words: tuple[str, ...] = ("off",)):
    """A rule value: a number in range, or one of `words` (returned as None for "off")."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, str) and value.strip().lower() in words:
        return None if value.strip().lower() == "off" else value.strip().lower()
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r} ({source}): expected a number{' or ' + ' / '.join(words) if words else ''}") from None
    if math.isnan(number) or number < low or (high is not None and number > high):
        limit = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise UserError(f"{flag} {value!r} ({source}): must be {limit}")
    return number


def _parse(name: str, value, source: str):
    if name in ("min_side", "min_pixels"):
        return _number(name, value, source, kind=int, words=())
    if name == "max_upscale":
        return _number(name, value, source, low=1.0)
    if name == "max_aspect":
        return _number(name, value, source, low=1.0, words=("off", "auto"))
    if name == "near_duplicate":
        return _number(name, value, source, low=0.0, high=1.0)
    text = str(value).strip()
    if text.lower() in ("", "none", "off"):
        return None
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"--keep-ids {text} ({source}): no such file")
    return str(path.resolve())


def given_rules(opts) -> dict:
    """The rule values given on the command line or in --config (None: not given)."""
    return {name: getattr(opts, name, None) for name in RULE_NAMES}


def resolve_rules(given: dict, stored: dict | None) -> Rules:
    """Given values win, then the ones kept in prep_metadata.json, then the defaults; UserError on bad ones."""
    values = {}
    stored = stored if isinstance(stored, dict) else {}
    for name in RULE_NAMES:
        if given.get(name) is not None:
            values[name] = _parse(name, given[name], "given")
        elif name in stored:
            values[name] = _parse(name, "off" if stored[name] is None and name != "keep_ids" else stored[name],
                                  "kept in prep_metadata.json; give the flag to change it")
        else:
            values[name] = getattr(DEFAULTS, name)
    return Rules(**values)


def rules_for(opts, derived_dir: Path) -> Rules:
    return resolve_rules(given_rules(opts), store.read_metadata(derived_dir).get(METADATA_KEY))


def check_given(opts) -> None:
    """Bad rule values fail at once, with one line (before anything is created)."""
    resolve_rules(given_rules(opts), {})


def remember_rules(derived_dir: Path, rules: Rules) -> None:
    """Keep the settings in force, so later runs and `prep curate` use them until changed."""
    if store.read_metadata(derived_dir).get(METADATA_KEY) != rules.to_json():
        store.update_metadata(derived_dir, {METADATA_KEY: rules.to_json()})


def read_keep_ids(path: str | None) -> set[str]:
    """Ids to keep whatever the rules say: one per line; blank lines and `#` comments are skipped."""
    if path is None:
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            return {line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")}
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--keep-ids {path}: {exc}") from None


# ------------------------------------------------------------------------------ flags
def make_flag(reason: str, detail: str, **extra) -> dict:
    return {"reason": reason, "detail": detail, "by": FLAGGED_BY, **extra}


def is_prep_flag(flag) -> bool:
    return isinstance(flag, dict) and flag.get("by") == FLAGGED_BY and flag.get("reason") in REASONS


def reason_of(flag) -> str | None:
    return flag.get("reason") if isinstance(flag, dict) and isinstance(flag.get("reason"), str) else None


def _outranks(current, new: dict) -> bool:
    """A prep flag of an earlier (higher-priority) reason stays when a later rule decides too."""
    return is_prep_flag(current) and REASONS.index(current["reason"]) < REASONS.index(new["reason"])


def settle(current, decided: dict | None, owned: tuple[str, ...]):
    """The record's `filtered` value after a rule judged it: flags not set by prep always stay."""
    if current is not None and not is_prep_flag(current):
        return current
    if decided is not None:  # another rule's flag of a higher priority stays; this rule's own is replaced
        return current if current is not None and current["reason"] not in owned and _outranks(current, decided) \
            else decided
    return None if is_prep_flag(current) and current["reason"] in owned else current


# ------------------------------------------------------------------------------ columns
@dataclass
class Columns:
    """What curation judges, one entry per record (manifest rows first, then records new this run)."""

    ids: list
    widths: np.ndarray
    heights: np.ndarray
    buckets: list
    shas: list
    flags: list  # the current `filtered` value of each record (None: not flagged)
    judged: np.ndarray  # v2 records with an id (a record waiting for migration is not judged by the rules)
    embedding_ok: np.ndarray  # a DINOv3 file is stamped for this very image
    embedding_stamp: np.ndarray  # the stamped file's hash (to tell when the embeddings changed)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def pixels(self) -> np.ndarray:
        return self.widths * self.heights


def _valid(table, name: str) -> np.ndarray:
    return pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False)


def _ints(table, name: str) -> np.ndarray:
    return pc.fill_null(table.column(name), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def columns_of_manifest(manifest) -> Columns:
    """The columns from a manifest's projection; only records that carry a flag are parsed."""
    table = manifest.table
    flagged = np.flatnonzero(pc.is_valid(table.column("filtered")).to_numpy(zero_copy_only=False))
    flags: list = [None] * len(manifest)
    for row in flagged.tolist():
        flags[row] = manifest.record(row).get("filtered")
    ids = table.column("image_id").to_pylist()
    judged = ~pc.fill_null(table.column("needs_migration"), False).to_numpy(zero_copy_only=False)
    judged &= np.asarray([is_safe_id(i) for i in ids], dtype=bool)
    stamp = _ints(table, "dinov3__file_sha")
    present = _valid(table, "dinov3__file_sha") & _valid(table, "dinov3__input") & _valid(table, "fp_sha")
    fresh = present & (_ints(table, "dinov3__input") == _ints(table, "fp_sha"))
    return Columns(
        ids=ids, widths=_ints(table, "width"), heights=_ints(table, "height"),
        buckets=table.column("aspect_bucket").to_pylist(), shas=table.column("fp_sha256").to_pylist(),
        flags=flags, judged=judged, embedding_ok=fresh, embedding_stamp=stamp,
    )  # fmt: skip


def _record_values(record: dict) -> tuple:
    fp = record.get("image_fingerprint") if isinstance(record.get("image_fingerprint"), dict) else {}
    width, height = record.get("width"), record.get("height")
    return (
        record.get("image_id"),
        width if type(width) is int and width > 0 else 0,
        height if type(height) is int and height > 0 else 0,
        record.get("aspect_bucket") if isinstance(record.get("aspect_bucket"), str) else None,
        fp.get("sha256") if isinstance(fp.get("sha256"), str) else None,
        record.get("filtered"),
        not needs_migration(record) and is_safe_id(record.get("image_id")),
    )


def columns_of_preparation(prep) -> Columns:
    """The columns as the preparation steps left the records (changed rows and new records included)."""
    columns = columns_of_manifest(prep.manifest)
    for row, record in prep.changed.items():
        values = _record_values(record)
        (columns.ids[row], columns.widths[row], columns.heights[row], columns.buckets[row], columns.shas[row],
         columns.flags[row], columns.judged[row]) = values
    if prep.appended:
        new = list(zip(*(_record_values(r) for r in prep.appended), strict=True))
        columns.ids += list(new[0])
        columns.widths = np.concatenate([columns.widths, np.asarray(new[1], np.int64)])
        columns.heights = np.concatenate([columns.heights, np.asarray(new[2], np.int64)])
        columns.buckets += list(new[3])
        columns.shas += list(new[4])
        columns.flags += list(new[5])
        columns.judged = np.concatenate([columns.judged, np.asarray(new[6], bool)])
        extra = np.zeros(len(prep.appended), dtype=bool)
        columns.embedding_ok = np.concatenate([columns.embedding_ok, extra])
        columns.embedding_stamp = np.concatenate([columns.embedding_stamp, extra.astype(np.int64)])
    return columns


# ------------------------------------------------------------------------------ size rules
@dataclass
class Geometry:
    """Per record: how its image meets its bucket (arrays; zeros where the record has no size or bucket)."""

    known: np.ndarray
    upscale: np.ndarray  # scale factor of the resize-to-cover (> 1: enlarged)
    crop: np.ndarray  # share of the image the centre crop cuts away
    aspect: np.ndarray  # longer side / shorter side
    bucket_w: np.ndarray
    bucket_h: np.ndarray


def geometry(columns: Columns) -> Geometry:
    """Scale factor, crop share and aspect of every record against its bucket (vectorised)."""
    sizes: dict[str | None, tuple[int, int]] = {}
    for bucket in set(columns.buckets):
        try:
            sizes[bucket] = parse_bucket(bucket)
        except (ValueError, TypeError, AttributeError):
            sizes[bucket] = (0, 0)
    bw = np.asarray([sizes[b][0] for b in columns.buckets], dtype=np.int64)
    bh = np.asarray([sizes[b][1] for b in columns.buckets], dtype=np.int64)
    w, h = columns.widths, columns.heights
    known = (w > 0) & (h > 0) & (bw > 0)
    safe_w, safe_h = np.where(known, w, 1), np.where(known, h, 1)
    upscale = np.maximum(bw / safe_w, bh / safe_h)
    a, b = safe_w * np.where(known, bh, 1), safe_h * np.where(known, bw, 1)  # exact integers
    crop = 1.0 - np.minimum(a, b) / np.maximum(a, b)
    aspect = np.maximum(safe_w, safe_h) / np.minimum(safe_w, safe_h)
    return Geometry(known, np.where(known, upscale, 0.0), np.where(known, crop, 0.0), np.where(known, aspect, 0.0),
                    bw, bh)


def _size_detail(i: int, columns: Columns, geo: Geometry, rules: Rules) -> dict | None:
    w, h = int(columns.widths[i]), int(columns.heights[i])
    bucket = f"{geo.bucket_w[i]}x{geo.bucket_h[i]}"
    if min(w, h) < rules.min_side:
        return make_flag("too_small", f"{w}x{h}: shorter side under --min-side {rules.min_side}")
    if w * h < rules.min_pixels:
        return make_flag("too_small", f"{w}x{h} = {w * h} pixels, under --min-pixels {rules.min_pixels}")
    scale = float(geo.upscale[i])
    if rules.max_upscale is not None and scale > rules.max_upscale + EPSILON:
        return make_flag("upscale", f"{w}x{h} would be enlarged {scale:.2f}x to cover its bucket {bucket} "
                         f"(--max-upscale {rules.max_upscale:g})", upscale=round(scale, 3))
    crop, aspect = float(geo.crop[i]), float(geo.aspect[i])
    if rules.max_aspect == "auto" and crop > 0.5 + EPSILON:
        return make_flag("aspect", f"aspect {aspect:.2f}:1: its nearest bucket {bucket} crops away {crop:.0%} of "
                         "the image (--max-aspect auto: at most half)", crop=round(crop, 3))
    if isinstance(rules.max_aspect, float) and aspect > rules.max_aspect + EPSILON:
        return make_flag("aspect", f"aspect {aspect:.2f}:1 exceeds --max-aspect {rules.max_aspect:g} "
                         f"(bucket {bucket} crops away {crop:.0%})", crop=round(crop, 3))
    return None


def size_flags(columns: Columns, rules: Rules, keep: set[str]) -> tuple[dict[int, dict], np.ndarray]:
    """({index: flag} of records the size rules say no to, the records judged)."""
    geo = geometry(columns)
    scope = columns.judged & geo.known
    suspect = (np.minimum(columns.widths, columns.heights) < rules.min_side) | (columns.pixels < rules.min_pixels)
    if rules.max_upscale is not None:
        suspect |= geo.upscale > rules.max_upscale + EPSILON
    if rules.max_aspect == "auto":
        suspect |= geo.crop > 0.5 + EPSILON
    elif rules.max_aspect is not None:
        suspect |= geo.aspect > rules.max_aspect + EPSILON
    flags = {}
    for i in np.flatnonzero(scope & suspect).tolist():
        if columns.ids[i] in keep:
            continue
        flag = _size_detail(i, columns, geo, rules)
        if flag is not None:
            flags[i] = flag
    return flags, scope


# ------------------------------------------------------------------------------ duplicates
def _open_to(effective: list, index: int, reasons: tuple[str, ...]) -> bool:
    """A record a duplicate rule may judge: not flagged, or flagged by prep for one of `reasons`."""
    flag = effective[index]
    return flag is None or (is_prep_flag(flag) and flag["reason"] in reasons)


def exact_flags(columns: Columns, effective: list, keep: set[str], rank: np.ndarray) -> tuple[dict, np.ndarray]:
    """Records whose file has the same sha256 as a kept one (the largest, then the smallest id)."""
    scope = columns.judged.copy()
    for i in np.flatnonzero(scope).tolist():
        if effective[i] is not None and not _open_to(effective, i, DUPLICATE_REASONS):
            scope[i] = False
    shas = [sha if scope[i] else None for i, sha in enumerate(columns.shas)]
    flags = {}
    for group in dedup.exact_duplicate_groups(shas, rank):
        first = group[0]
        for member in group[1:]:
            if columns.ids[member] not in keep:
                flags[member] = make_flag("duplicate", f"same file content (sha256 {shas[first][:12]}) as "
                                          f"{columns.ids[first]}", duplicate_of=columns.ids[first])
    return flags, scope


def near_pool(columns: Columns, effective: list) -> np.ndarray:
    """Records whose DINOv3 embedding (stamped for this image) takes part in the near-duplicate judgement."""
    pool = columns.judged & columns.embedding_ok
    for i in np.flatnonzero(pool).tolist():
        if not _open_to(effective, i, ("near_duplicate",)):
            pool[i] = False
    return pool


def load_embeddings(derived_dir: Path, ids: list[str], *, workers: int = 8):
    """(k, D) unit float32 rows of the DINOv3 side files and a bool per id: the file was a valid array."""
    from concurrent.futures import ThreadPoolExecutor

    from prep.progress import progress as bar

    shape = store.expected_shape("dinov3", {})
    dtype = store.artifact_spec("dinov3").dtype
    matrix = np.zeros((len(ids), *shape), dtype=np.float32)
    ok = np.zeros(len(ids), dtype=bool)

    def load(i: int) -> None:
        array = store.load_npy(store.artifact_path(derived_dir, "dinov3", ids[i]), shape, dtype)
        if array is not None and np.isfinite(array).all() and np.any(array):
            matrix[i] = array
            ok[i] = True

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in bar(bounded_map(pool, load, range(len(ids))), total=len(ids), desc="near-duplicates: read", unit="emb"):
            pass
    return dedup.normalize_rows(matrix), ok


def near_digest(columns: Columns, pool: np.ndarray, effective: list, threshold: float, keep: set[str]) -> str:
    """What the near-duplicate judgement depends on: unchanged digest, unchanged answer."""
    index = np.flatnonzero(pool)
    digest = hashlib.sha256(json.dumps([threshold, sorted(keep)]).encode())
    digest.update(np.ascontiguousarray(columns.embedding_stamp[index]).tobytes())
    digest.update(np.ascontiguousarray(columns.pixels[index]).tobytes())
    digest.update("\n".join(columns.ids[i] for i in index.tolist()).encode())
    marks = [f"{i}:{effective[i].get('duplicate_of')}" for i in index.tolist() if effective[i] is not None]
    digest.update("\n".join(marks).encode())
    return digest.hexdigest()


@dataclass
class NearInfo:
    """How the near-duplicate judgement went (for the printed summary and the benchmark)."""

    judged: int = 0
    not_judged: int = 0  # no DINOv3 embedding yet (or an unreadable one): judged on a later run
    pairs: int = 0  # duplicates found (each with the kept image it is most similar to)
    seconds: float = 0.0
    skipped: bool = False  # nothing it depends on changed since the last judgement
    digest: str | None = None


def resolve_device(device: str) -> str:
    if device in ("auto", None):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def near_flags(columns: Columns, effective: list, rules: Rules, keep: set[str], derived_dir: Path, *,
               device: str = "auto", workers: int = 8, previous: str | None = None,
               incremental: bool = False) -> tuple[dict, np.ndarray, NearInfo]:
    """Records similar (DINOv3 cosine >= threshold) to a kept, larger image; skipped when nothing changed.

    `incremental` (a run): only images not judged before are compared with the cached embeddings of
    the kept ones (`prep.nearcache`), unless the cache is missing or most images are new.
    """
    info = NearInfo()
    if rules.near_duplicate is None:
        return {}, columns.judged.copy(), info
    pool = near_pool(columns, effective)
    waiting = columns.judged & ~columns.embedding_ok
    info.not_judged = sum(1 for i in np.flatnonzero(waiting).tolist() if _open_to(effective, i, ("near_duplicate",)))
    info.digest = near_digest(columns, pool, effective, rules.near_duplicate, keep)
    if info.digest == previous:
        info.skipped, info.judged = True, int(pool.sum())
        return {}, np.zeros(len(columns), dtype=bool), info
    if incremental:
        result = near_flags_incremental(columns, pool, effective, rules, keep, derived_dir, workers, info)
        if result is not None:
            return result
    started = time.perf_counter()
    index = np.flatnonzero(pool)
    ids = [columns.ids[i] for i in index.tolist()]
    matrix, ok = load_embeddings(derived_dir, ids, workers=workers)
    if not ok.all():
        info.digest = None  # some could not be read: judge again next time
        pool[index[~ok]] = False
        index, matrix, ids = index[ok], matrix[ok], [i for i, good in zip(ids, ok, strict=True) if good]
    info.judged, info.not_judged = len(index), info.not_judged + int((~ok).sum())
    order = dedup.priority_order(ids, columns.pixels[index])
    keep_mask = np.asarray([i in keep for i in ids], dtype=bool)
    found = dedup.near_duplicates(matrix, order, rules.near_duplicate, keep=keep_mask, device=resolve_device(device))
    info.pairs = len(found)
    flags = {int(index[local]): near_flag(ids[other], similarity, rules) for local, (other, similarity) in found.items()}
    kept = np.asarray([local not in found for local in range(len(ids))], dtype=bool)
    nearcache.save(derived_dir, nearcache.settings_key(rules.near_duplicate, keep),
                   [i for i, k in zip(ids, kept, strict=True) if k], columns.embedding_stamp[index][kept],
                   [matrix[kept].astype(np.float16)], matrix.shape[1])
    info.seconds = time.perf_counter() - started
    return flags, pool, info


def near_flag(kept_id: str, similarity: float, rules: Rules) -> dict:
    return make_flag(
        "near_duplicate", f"DINOv3 cosine similarity {similarity:.3f} with {kept_id}, which is kept "
        f"(--near-duplicate {rules.near_duplicate:g})", duplicate_of=kept_id, similarity=round(float(similarity), 4),
    )


def near_flags_incremental(columns: Columns, pool: np.ndarray, effective: list, rules: Rules, keep: set[str],
                           derived_dir: Path, workers: int, info: NearInfo) -> tuple[dict, np.ndarray, NearInfo] | None:
    """The images not judged before, against the cached kept embeddings; None when a full judgement is due."""
    started = time.perf_counter()
    cache = nearcache.load(derived_dir)
    if cache is None or cache.key != nearcache.settings_key(rules.near_duplicate, keep):
        return None
    index = np.flatnonzero(pool)
    current = {columns.ids[i]: int(columns.embedding_stamp[i]) for i in index.tolist()}
    alive = nearcache.still_kept(cache, current)
    known = {i for i, a in zip(cache.ids, alive.tolist(), strict=True) if a}
    new = [i for i in index.tolist() if columns.ids[i] not in known and reason_of(effective[i]) != "near_duplicate"]
    if len(new) > max(1000, len(index) // 4):
        return None  # mostly new: the full judgement costs about the same and decides best
    ids = [columns.ids[i] for i in new]
    matrix, ok = load_embeddings(derived_dir, ids, workers=workers)
    corpus_ids = [i for i, a in zip(cache.ids, alive.tolist(), strict=True) if a]
    best, score = nearcache.best_matches(matrix, cache.chunks(alive), threshold=rules.near_duplicate)  # a chunk at a time
    flags, accepted = {}, []
    for local in dedup.priority_order(ids, columns.pixels[new]).tolist():
        if not ok[local]:
            continue
        if ids[local] not in keep and score[local] >= rules.near_duplicate:
            flags[new[local]] = near_flag(corpus_ids[best[local]], score[local], rules)
            continue
        if accepted and ids[local] not in keep:
            sims = matrix[accepted] @ matrix[local]
            if sims.max() >= rules.near_duplicate:
                flags[new[local]] = near_flag(ids[accepted[int(sims.argmax())]], float(sims.max()), rules)
                continue
        accepted.append(local)
    nearcache.append(derived_dir, cache, alive, [ids[k] for k in accepted],
                     columns.embedding_stamp[np.asarray(new, dtype=np.int64)[accepted]],
                     matrix[accepted].astype(np.float16).reshape(len(accepted), cache.dim))
    scope = np.zeros(len(columns), dtype=bool)
    scope[np.asarray(new, dtype=np.int64)] = True
    info.judged, info.pairs, info.seconds = len(new), len(flags), time.perf_counter() - started
    return flags, scope, info


# ------------------------------------------------------------------------------ judging
@dataclass
class Judgement:
    """What the rules decided: the new `filtered` value of each record that changes, and counts."""

    rules: Rules
    changes: dict[int, dict | None]
    before: Counter
    after: Counter
    near: NearInfo | None = None
    flags: list = field(default_factory=list)  # every record's `filtered` value after the judgement
    previous: list = field(default_factory=list)  # ... and before it

    @property
    def flagged(self) -> list[int]:
        """Records newly flagged, or flagged for another reason than before."""
        return sorted(i for i, flag in self.changes.items()
                      if flag is not None and reason_of(self.previous[i]) != flag["reason"])

    @property
    def updated(self) -> list[int]:
        """Records flagged for the same reason, with a new detail (another threshold, another kept image)."""
        return sorted(i for i, flag in self.changes.items()
                      if flag is not None and reason_of(self.previous[i]) == flag["reason"])

    @property
    def lifted(self) -> list[int]:
        return sorted(i for i, flag in self.changes.items() if flag is None)


def _settle_all(effective: list, touched: set[int], decided: dict[int, dict], scope: np.ndarray,
                owned: tuple[str, ...]) -> None:
    """Apply one rule's decisions to the working flags (only records in its scope change)."""
    candidates = set(decided) | {i for i, flag in enumerate(effective) if flag is not None and scope[i]}
    for i in candidates:
        new = settle(effective[i], decided.get(i), owned)
        if new != effective[i]:
            effective[i] = new
            touched.add(i)


def judge(columns: Columns, rules: Rules, *, derived_dir: Path | None = None, near: bool = False,
          device: str = "auto", workers: int = 8, previous_digest: str | None = None,
          incremental: bool = False) -> Judgement:
    """Every rule in priority order (size, exact duplicates, then near duplicates when `near`)."""
    keep = read_keep_ids(rules.keep_ids)
    effective = list(columns.flags)
    touched: set[int] = set()
    decided, scope = size_flags(columns, rules, keep)
    _settle_all(effective, touched, decided, scope, SIZE_REASONS)
    rank = np.empty(len(columns), dtype=np.int64)
    rank[dedup.priority_order(columns.ids, columns.pixels)] = np.arange(len(columns))
    decided, scope = exact_flags(columns, effective, keep, rank)
    _settle_all(effective, touched, decided, scope, ("duplicate",))
    info = None
    if near and derived_dir is not None:
        decided, scope, info = near_flags(columns, effective, rules, keep, derived_dir, device=device,
                                          workers=workers, previous=previous_digest, incremental=incremental)
        _settle_all(effective, touched, decided, scope, ("near_duplicate",))
        if info.digest is not None and not info.skipped:
            info.digest = near_digest(columns, near_pool(columns, effective), effective, rules.near_duplicate, keep)
    changes = {i: effective[i] for i in touched if effective[i] != columns.flags[i]}
    return Judgement(rules, changes, _count(columns.flags), _count(effective), info, effective, list(columns.flags))


def _count(flags: list) -> Counter:
    return Counter(reason_of(flag) for flag in flags if reason_of(flag) is not None)


# ------------------------------------------------------------------------------ applying
def may_flag(record: dict) -> bool:
    """A `filtered` value prep did not set (the user's, another tool's) is never touched."""
    current = record.get("filtered")
    if current is not None and not is_prep_flag(current):
        logger.debug("%s: its own `filtered` value %r is kept", record.get("image_id"), current)
        return False
    return True


def set_flag(record: dict, flag: dict | None) -> bool:
    """Write a judgement into a record (unless `may_flag` says no); True when written."""
    if not may_flag(record):
        return False
    if flag is None:
        record.pop("filtered", None)
    else:
        record["filtered"] = flag
    return True


def apply_to_preparation(prep, judgement: Judgement) -> None:
    """Changes into the manifest being prepared (rows) and the records new this run."""
    rows = len(prep.manifest)
    for index, flag in judgement.changes.items():
        if index < rows:
            if may_flag(prep.current(index)):
                set_flag(prep.record(index), flag)
        else:
            set_flag(prep.appended[index - rows], flag)


def apply_to_manifest(manifest, judgement: Judgement):
    """One streaming rewrite with the changed records; returns the new manifest."""
    from prep.manifest import rewrite

    changed = {}
    for row, flag in judgement.changes.items():
        record = manifest.record(row)
        if set_flag(record, flag):
            changed[row] = record
    return rewrite(manifest, changed) if changed else manifest


def read_state(derived_dir: Path) -> dict:
    try:
        state = json.loads((Path(derived_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(derived_dir: Path, digest: str | None) -> None:
    from prep.fsio import atomic_write_text

    path = Path(derived_dir) / STATE_FILE
    if digest is None:
        path.unlink(missing_ok=True)
        return
    if read_state(derived_dir).get("near_duplicate_digest") == digest:
        return  # a run with nothing to do writes nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"near_duplicate_digest": digest}) + "\n")


# ------------------------------------------------------------------------------ entry points
def curate_records(prep) -> None:
    """The preparation step (before any pass): size rules and exact duplicates.

    Runs when a model pass is selected (not with `--pass migrate`). Near duplicates need the
    DINOv3 embeddings and are judged after that pass (`curate_after_stage`).
    """
    opts = prep.opts
    if not opts.selected_stages():
        return
    rules = rules_for(opts, opts.derived_dir)
    judgement = judge(columns_of_preparation(prep), rules)
    apply_to_preparation(prep, judgement)
    remember_rules(opts.derived_dir, rules)
    log_changes(judgement, "before the passes")


def journal_flags(manifest, judgement: Judgement, manifest_path) -> int:
    """The judgement's changes as journal updates (main rank, between passes): the next pass reads
    them overlaid and the run's final fold writes them, with no rewrite of its own. Returns how
    many records changed."""
    from prep import journal

    updates = []
    for row, flag in judgement.changes.items():
        record = manifest.record(row)
        if set_flag(record, flag):
            image_id = record["image_id"]
            updates.append({"image_id": image_id, "filtered": flag} if flag is not None
                           else {"image_id": image_id, journal.UNSET: ["filtered"]})
    writer = journal.Journal(manifest_path, 0)
    writer.append(updates)
    writer.close()
    return len(updates)


def curate_after_stage(opts, device: str) -> Judgement:
    """Main rank, after the DINOv3 pass: every rule again, near duplicates included, on the manifest
    as the run has it (journals overlaid); changed flags are journaled (`journal_flags`)."""
    from prep.journal import read_current

    rules = rules_for(opts, opts.derived_dir)
    manifest = read_current(opts.manifest)
    judgement = judge(columns_of_manifest(manifest), rules, derived_dir=opts.derived_dir, near=True, device=device,
                      workers=max(8, getattr(opts, "num_workers", 0) or 0),  # reader threads: the files are small
                      previous_digest=read_state(opts.derived_dir).get("near_duplicate_digest"), incremental=True)
    journal_flags(manifest, judgement, opts.manifest)
    write_state(opts.derived_dir, judgement.near.digest if judgement.near else None)
    remember_rules(opts.derived_dir, rules)
    log_changes(judgement, "after the dinov3 pass")
    return judgement


def log_changes(judgement: Judgement, when: str) -> None:
    flagged, lifted = judgement.flagged, judgement.lifted
    if not flagged and not lifted:
        return
    reasons = Counter(judgement.changes[i]["reason"] for i in flagged)
    parts = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
    logger.info("curate (%s): %d records flagged%s, %d flags lifted; `prep curate --dry-run` lists them",
                when, len(flagged), f" ({parts})" if parts else "", len(lifted))
    for i in flagged[:5]:
        logger.info("  flagged: %s", judgement.changes[i]["detail"])


def filtered_line(manifest) -> str | None:
    """`filtered: 5 records not used (upscale 3, near_duplicate 2)`, or None when none is."""
    counts = pc.value_counts(manifest.table.column("filtered").drop_null()) if len(manifest) else []
    pairs = sorted((item["values"].as_py(), item["counts"].as_py()) for item in counts)
    if not pairs:
        return None
    total = sum(n for _, n in pairs)
    listed = ", ".join(f"{reason} {n}" for reason, n in pairs)
    return (f"filtered: {total} record{'s' if total != 1 else ''} flagged, not encoded or exported ({listed}); "
            "`prep curate --dry-run` explains, `prep prune` moves them aside")


# ------------------------------------------------------------------------------ prep curate
def curate_dataset(opts) -> tuple[Judgement, list]:
    """`prep curate`: judge every record with the rules in force; write unless `opts.dry_run`.

    Returns the judgement and the record ids (by index). Takes the manifest's lock when writing.
    """
    from prep.manifest import lock_manifest, read_manifest, resolve_manifest_path

    rules = rules_for(opts, opts.derived_dir)
    if not Path(opts.manifest).exists() or not resolve_manifest_path(opts.manifest).is_file():
        raise UserError(f"manifest {opts.manifest} does not exist or is not a file (pass --manifest)")
    lock = None if opts.dry_run else lock_manifest(
        opts.manifest, "curation rewrites the manifest; wait for the other job (or use --dry-run)")
    try:
        manifest = read_manifest(opts.manifest)
        columns = columns_of_manifest(manifest)
        judgement = judge(columns, rules, derived_dir=Path(opts.derived_dir), near=True, device=opts.device,
                          workers=opts.num_workers or 8, previous_digest=read_state(opts.derived_dir).get("near_duplicate_digest"))
        if not opts.dry_run:
            apply_to_manifest(manifest, judgement)
            if Path(opts.derived_dir).is_dir():
                write_state(opts.derived_dir, judgement.near.digest if judgement.near else None)
                remember_rules(opts.derived_dir, rules)
    finally:
        if lock is not None:
            from prep.fsio import release_lock

            release_lock(lock)
    return judgement, columns.ids


LISTED = 20


def judgement_dict(judgement: Judgement, ids: list, *, dry_run: bool) -> dict:
    near = judgement.near
    return {
        "dry_run": dry_run,
        "rules": judgement.rules.to_json(),
        "records": len(ids),
        "filtered_before": dict(sorted(judgement.before.items())),
        "filtered_after": dict(sorted(judgement.after.items())),
        "flagged": [{"image_id": ids[i], **judgement.changes[i]} for i in judgement.flagged],
        "lifted": [ids[i] for i in judgement.lifted],
        "updated": [{"image_id": ids[i], **judgement.changes[i]} for i in judgement.updated],
        "near_duplicates": None if near is None else {
            "judged": near.judged, "not_judged": near.not_judged, "duplicates": near.pairs,
            "seconds": round(near.seconds, 3), "unchanged_since_last_time": near.skipped},
    }  # fmt: skip


def format_judgement(judgement: Judgement, ids: list, *, dry_run: bool) -> str:
    """The table `prep curate` prints: counts per reason before and after, then what changes and why."""
    lines = [f"curate: {len(ids)} records; rules: {judgement.rules.describe()}"]
    reasons = sorted(set(judgement.before) | set(judgement.after), key=lambda r: (r not in REASONS, REASONS.index(r) if r in REASONS else 0, r))
    if reasons:
        lines.append(f"  {'reason':<16}{'now':>8}{'after':>8}")
        for reason in reasons:
            before, after = judgement.before[reason], judgement.after[reason]
            delta = f"  ({after - before:+d})" if after != before else ""
            lines.append(f"  {reason:<16}{before:>8}{after:>8}{delta}")
    else:
        lines.append("  no record is flagged")
    near = judgement.near
    if near is not None and judgement.rules.near_duplicate is not None:
        how = "unchanged since the last judgement" if near.skipped else f"{near.pairs} duplicates, {near.seconds:.1f} s"
        lines.append(f"  near duplicates: {near.judged} judged ({how}); {near.not_judged} without a DINOv3 embedding "
                     "yet (judged after their dinov3 pass)")
    verb = ("would flag", "would lift") if dry_run else ("flagged", "lifted")
    flagged, lifted = judgement.flagged, judgement.lifted
    if flagged:
        lines.append(f"{verb[0]} {len(flagged)} record(s):")
        lines += [f"  {ids[i]} [{judgement.changes[i]['reason']}] {judgement.changes[i]['detail']}" for i in flagged[:LISTED]]
        lines += [f"  ... {len(flagged) - LISTED} more (--json lists all)"] if len(flagged) > LISTED else []
    if lifted:
        lines.append(f"{verb[1]} {len(lifted)} flag(s): " + ", ".join(str(ids[i]) for i in lifted[:LISTED])
                     + (" ..." if len(lifted) > LISTED else ""))
    if judgement.updated:
        lines.append(f"  ({len(judgement.updated)} flag(s) keep their reason with a new detail)")
    if not judgement.changes:
        lines.append("nothing to change")
    elif dry_run:
        lines.append("dry run: nothing written (run without --dry-run to apply)")
    return "\n".join(lines)
