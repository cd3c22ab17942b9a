"""Loading the dataset in Python: the manifest with lazy arrays, and the exported shards.

`load_manifest` gives a `datasets.Dataset` of the valid v2 records whose rows also carry
the three side-file arrays, read from disk only when a row (or a batch of rows) is accessed.
`load_shards` streams an export (a local folder or a Hub dataset repo) through a WebDataset
pipeline and yields decoded samples, or batches that never mix buckets.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from prep import config, store
from prep.buckets import format_bucket, parse_bucket
from prep.records import INLINE_DINOV3_FIELD, V2_FIELDS, validate_record

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------- load_manifest
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("t5_attention_mask", pa.list_(pa.int8())),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("aspect_bucket", pa.string()),
        ("format_version", pa.int64()),
        ("extra", pa.string()),  # every non-v2 field, as one JSON object (heterogeneous extras)
    ]
)
ARRAY_COLUMNS = {"dinov3": "dinov3", "vae": "vae", "t5_hidden": "t5"}  # column -> store kind
_CHUNK = 50_000


class ArrayLoader:
    """The `with_transform` function: adds `dinov3`, `vae`, `t5_hidden` arrays to accessed rows.

    Arrays keep their on-disk dtypes (float32, float16, float16); a missing or unreadable
    file gives None. A batch that holds one column only (a column query in datasets < 4, or
    a dataset narrowed with `select_columns` to columns without `image_id`) loads no arrays.
    """

    def __init__(self, derived_dir: str | Path):
        self.derived_dir = str(derived_dir)

    def __call__(self, batch: dict) -> dict:
        if len(batch) <= 1 or "image_id" not in batch:
            return batch
        out = dict(batch)
        for column, kind in ARRAY_COLUMNS.items():
            out[column] = [store.load_npy(store.artifact_path(self.derived_dir, kind, i)) for i in batch["image_id"]]
        return out


def _row(record: dict) -> dict:
    row = {key: record[key] for key in V2_FIELDS}
    extra = {k: v for k, v in record.items() if k not in V2_FIELDS and k != INLINE_DINOV3_FIELD}
    row["extra"] = json.dumps(extra, ensure_ascii=False, sort_keys=True)
    return row


def load_manifest(
    manifest: str | Path = config.DEFAULT_MANIFEST,
    derived_dir: str | Path = config.DEFAULT_OUTPUT_BASE_DIR,
    *,
    ready_only: bool = False,
):
    """A `datasets.Dataset` of the manifest's valid v2 records, with lazily loaded arrays.

    Columns: the v2 fields plus `extra` (the record's other fields as a JSON object string,
    `json.loads(row["extra"])`). Accessing a row or a slice also yields `dinov3` (1024,)
    float32, `vae` (16, H/8, W/8) float16 and `t5_hidden` (77, 1024) float16 numpy arrays
    (None when the file is missing), read at access time via `with_transform`.
    Records that are not valid v2 records are left out (logged); with `ready_only`, so are
    records whose side files are missing or have the wrong shape/dtype (headers only).

    Note: in datasets >= 4 a column query (`ds["caption"]`) on a dataset with a transform
    formats every row, so it would read every array; for metadata columns use
    `ds.with_format(None)["caption"]` (or `ds.select_columns(["caption"])`).
    """
    from datasets import Dataset

    from prep.manifest import read_manifest

    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} not found")
    batches, rows, skipped = [], [], 0
    for record in read_manifest(manifest):
        problems = validate_record(record)
        if not problems and ready_only:
            problems = store.readiness_reasons(record, derived_dir)
        if problems:
            skipped += 1
            continue
        rows.append(_row(record))
        if len(rows) >= _CHUNK:
            batches.append(pa.RecordBatch.from_pylist(rows, schema=MANIFEST_SCHEMA))
            rows = []
    if rows:
        batches.append(pa.RecordBatch.from_pylist(rows, schema=MANIFEST_SCHEMA))
    if skipped:
        logger.info("load_manifest: %d record(s) left out (not %s)", skipped, "ready" if ready_only else "valid v2")
    table = pa.Table.from_batches(batches, schema=MANIFEST_SCHEMA) if batches else MANIFEST_SCHEMA.empty_table()
    return Dataset(table).with_transform(ArrayLoader(derived_dir))


# ---------------------------------------------------------------------- load_shards
BUCKET_DIR_RE = re.compile(r"bucket_([1-9][0-9]*x[1-9][0-9]*)")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SAMPLE_MEMBERS = {"dinov3.npy": "dinov3", "vae.npy": "vae", "t5h.npy": "t5_hidden", "t5m.npy": "t5_mask"}


def check_member_name(name: str) -> bool:
    """Tar member names must be relative and stay inside the archive; raises ValueError otherwise."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "\x00" in name:
        raise ValueError(f"unsafe tar member name {name!r}: absolute paths and '..' are refused")
    return True


def _bucket_name(bucket: str) -> str:
    text = str(bucket).removeprefix("bucket_")
    return format_bucket(*parse_bucket(text))


def _local_shards(root: Path) -> dict[str, list[str]]:
    if root.is_file():
        match = BUCKET_DIR_RE.fullmatch(root.parent.name)
        return {match.group(1) if match else root.parent.name: [str(root)]}
    match = BUCKET_DIR_RE.fullmatch(root.name)
    if match:  # a bucket folder itself
        return {match.group(1): [str(p) for p in sorted(root.glob("*.tar"))]}
    index_path = root / "index.json"
    shards: dict[str, list[str]] = {}
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        for shard in index.get("shards", []):
            check_member_name(shard["path"])
            shards.setdefault(shard["bucket"], []).append(str(root / shard["path"]))
        return {b: shards[b] for b in sorted(shards)}
    for directory in sorted(root.iterdir()):
        match = BUCKET_DIR_RE.fullmatch(directory.name)
        if match and directory.is_dir():
            tars = sorted(str(p) for p in directory.glob("*.tar"))
            if tars:
                shards[match.group(1)] = tars
    return shards


def _hub_shards(source: str, revision: str | None, fs) -> dict[str, list[str]]:
    repo_id = source.removeprefix("hf://").removeprefix("datasets/")
    if "@" in repo_id and revision is None:
        repo_id, revision = repo_id.split("@", 1)
    if not _HUB_ID_RE.fullmatch(repo_id):
        raise FileNotFoundError(f"{source!r} is neither an existing local path nor a Hub dataset id (OWNER/NAME)")
    root = f"datasets/{repo_id}" + (f"@{quote(revision, safe='')}" if revision else "")
    if fs is None:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
    shards: dict[str, list[str]] = {}
    for path in sorted(fs.glob(f"{root}/bucket_*/*.tar")):
        # Paths come back as "datasets/OWNER/NAME[@rev]/bucket_WxH/shard-000000.tar".
        path = path.removeprefix("hf://")
        for prefix in (root + "/", f"datasets/{repo_id}/"):
            if path.startswith(prefix):
                relative = path[len(prefix) :]
                break
        else:
            start = path.find("/bucket_", len(f"datasets/{repo_id}"))
            if start < 0:
                continue
            relative = path[start + 1 :]
        check_member_name(relative)
        parent = relative.split("/")[0]
        match = BUCKET_DIR_RE.fullmatch(parent)
        if match and relative.count("/") == 1:
            shards.setdefault(match.group(1), []).append(f"hf://{root}/{relative}")
    return {b: shards[b] for b in sorted(shards)}


def resolve_shards(
    source: str | Path, bucket: str | None = None, *, revision: str | None = None, fs=None
) -> dict[str, list[str]]:
    """{bucket "WxH": [shard url, ...]} for a local export folder / bucket folder / tar, or a Hub id.

    A Hub dataset id (OWNER/NAME, optionally `hf://datasets/` prefixed or `@revision`
    suffixed) that is not an existing local path is listed with `HfFileSystem.glob`
    (`fs` lets tests inject a fake) into `hf://datasets/OWNER/NAME[@rev]/bucket_*/*.tar` URLs.
    """
    local = Path(source).expanduser()
    shards = _local_shards(local) if local.exists() else _hub_shards(str(source), revision, fs)
    if bucket is not None:
        name = _bucket_name(bucket)
        if name not in shards:
            raise ValueError(f"no shards for bucket {name} in {source}; found: {', '.join(shards) or 'none'}")
        shards = {name: shards[name]}
    if not shards:
        raise FileNotFoundError(f"no shards (bucket_WxH/*.tar) found in {source}")
    return shards


def _load_npy_bytes(data: bytes, what: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{what}: not a plain .npy array ({exc})") from exc


def decode_sample(sample: dict) -> dict:
    """A raw WebDataset sample (bytes per member) -> key, json dict and numpy arrays (no pickle)."""
    key = sample.get("__key__")
    where = f"sample {key!r} in {sample.get('__url__')}"
    missing = [m for m in ("json", *SAMPLE_MEMBERS) if m not in sample]
    if missing:
        raise ValueError(f"{where} lacks member(s) {', '.join(missing)}")
    out: dict[str, Any] = {"key": key, "json": json.loads(sample["json"])}
    for member, name in SAMPLE_MEMBERS.items():
        out[name] = _load_npy_bytes(sample[member], f"{where} member {member}")
    return out


def collate(samples: list[dict]) -> dict:
    """Stack a list of decoded samples of one bucket: arrays get a leading batch axis."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "json": [s["json"] for s in samples]}
    for name in SAMPLE_MEMBERS.values():
        batch[name] = np.stack([s[name] for s in samples])
    return batch


class _ShardList:
    """First pipeline stage: shard URLs as dict(url=...), reshuffled each epoch when asked."""

    def __init__(self, urls: list[str], shuffle: bool, seed: int):
        self.urls, self.shuffle, self.seed, self.epoch = list(urls), shuffle, seed, 0

    def __call__(self) -> Iterator[dict]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        self.epoch += 1
        for url in urls:
            yield {"url": url}


class _OpenShards:
    """Open each shard (local file, or hf:// through HfFileSystem so no token is put on a command line)."""

    def __init__(self, fs=None):
        self.fs = fs

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for item in src:
            url = item["url"]
            if url.startswith("hf://"):
                if self.fs is None:
                    from huggingface_hub import HfFileSystem

                    self.fs = HfFileSystem()
                stream = self.fs.open(url, "rb")
            else:
                stream = open(url, "rb")  # noqa: SIM115 - closed below, after the tar is read
            try:
                yield {**item, "stream": stream}
            finally:
                stream.close()


class _Batcher:
    def __init__(self, batch_size: int, drop_last: bool):
        self.batch_size, self.drop_last = batch_size, drop_last

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        pending: list[dict] = []
        for sample in src:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield collate(pending)
                pending = []
        if pending and not self.drop_last:
            yield collate(pending)


class _BucketMix:
    """Source stage over several bucket pipelines: one after another, or interleaved at random."""

    def __init__(self, pipelines: dict[str, Any], interleave: bool, seed: int):
        self.pipelines, self.interleave, self.seed, self.epoch = pipelines, interleave, seed, 0

    def __call__(self) -> Iterator[dict]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch + 7)
        self.epoch += 1
        if not self.interleave:
            for pipeline in self.pipelines.values():
                yield from pipeline
            return
        active = [iter(p) for p in self.pipelines.values()]
        while active:
            i = rng.randrange(len(active))
            try:
                yield next(active[i])
            except StopIteration:
                active.pop(i)


def _bucket_pipeline(urls, *, shuffle, seed, shuffle_buffer, batch_size, drop_last, fs, nodesplitter, workersplitter):
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stages: list[Any] = [_ShardList(urls, shuffle, seed)]
    if nodesplitter is not None:
        stages.append(nodesplitter)
    if workersplitter is not None:
        stages.append(workersplitter)
    stages.append(_OpenShards(fs))
    stages.append(wds.pipelinefilter(tar_file_expander)(select_files=check_member_name))
    stages.append(wds.pipelinefilter(group_by_keys)())
    if shuffle and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(100, shuffle_buffer), rng=random.Random(seed)))
    stages.append(wds.map(decode_sample))
    if batch_size:
        stages.append(_Batcher(batch_size, drop_last))
    return wds.DataPipeline(*stages)


def load_shards(
    path_or_hub_id: str | Path,
    bucket: str | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    batch_size: int | None = None,
    drop_last: bool = False,
    interleave: bool = False,
    revision: str | None = None,
    fs=None,
    nodesplitter=None,
    workersplitter="default",
):
    """An iterable (a webdataset `DataPipeline`, usable with a torch DataLoader) over an export.

    Samples are dicts: `key`, `json` (dict), `dinov3`, `vae`, `t5_hidden`, `t5_mask` (numpy,
    on-disk dtypes). With `batch_size`, each item is a batch of one bucket: `key`/`json`
    lists and stacked arrays (the last short batch is kept unless `drop_last`).
    `bucket=None` reads every bucket: one after another, or with `interleave=True` in a
    seeded random order at batch (or sample) granularity; a batch never mixes buckets.
    `shuffle` shuffles shard order (per epoch) and samples in a `shuffle_buffer`-sized buffer.
    `.npy` members are decoded with `allow_pickle=False`; tar member names with an absolute
    path or `..` raise ValueError. Split across DataLoader workers by shard
    (`workersplitter`, default webdataset's split_by_worker); pass
    `nodesplitter=webdataset.split_by_node` under DDP. The result's `.urls` maps bucket -> shards.
    """
    import webdataset as wds

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workersplitter == "default":
        workersplitter = wds.split_by_worker
    urls = resolve_shards(path_or_hub_id, bucket, revision=revision, fs=fs)
    options = dict(
        shuffle=shuffle,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        batch_size=batch_size,
        drop_last=drop_last,
        fs=fs,
        nodesplitter=nodesplitter,
        workersplitter=workersplitter,
    )
    pipelines = {b: _bucket_pipeline(u, **options) for b, u in urls.items()}
    if len(pipelines) == 1:
        result = next(iter(pipelines.values()))
    else:
        result = wds.DataPipeline(_BucketMix(pipelines, interleave, seed))
    result.urls = urls
    result.buckets = list(urls)
    return result
