"""Batches of one aspect bucket for map-style datasets, and a collate that makes torch tensors.

`DataLoader(prep.load_manifest(...), batch_size=14)` fails: rows of different buckets have
latents of different shapes ("stack expects each tensor to be equal size"). Use

    sampler = prep.BucketBatchSampler(ds, batch_size=14, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=prep.collate, num_workers=2)

It works for `prep.load_manifest(...)` datasets (their `aspect_bucket` column), for the
Hub / `datasets` route (`load_dataset(export, split="train")`, the default config `all`, or
one config per bucket; the bucket comes from each row's `__url__`, `bucket_WxH/...`, or its
`json.aspect_bucket`), for a `torch.utils.data.ConcatDataset` of those, or for any dataset
given `buckets=` (one label per row). Only that column is read, never the arrays.

Per epoch (`set_epoch`, like DistributedSampler), each bucket's rows are shuffled with the
seed, cut into batches, and the batches of all buckets shuffled together. Across ranks
(`num_replicas`/`rank`, default torch.distributed, else RANK / WORLD_SIZE) rank r takes
batches r, r + R, ...; with `even_batches` (default) the list is first padded by repeating
its first batches so that every rank gets ceil(batches / R) of them: no rank waits at a
collective, and at most R - 1 batches per epoch are seen twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data

from prep.shards import BUCKET_DIR_RE, _bucket_name, resolve_rank_world

# collate: output name -> the names the row formats use (load_manifest, datasets webdataset, load_shards)


def array_fields() -> dict[str, tuple[tuple[str, ...], torch.dtype]]:
    """{output name: (the names a row format may use for it, the torch dtype of the batch)}, from
    the artifact table: the loading column, the export member, and for arrays made from a record
    field (the T5 mask) that field."""
    from prep import stages

    fields = {}
    for artifact in stages.artifacts(stages.ALL).values():
        names = (artifact.column, artifact.member, *((artifact.record_field,) if artifact.record_field else ()))
        fields[artifact.column] = (names, getattr(torch, artifact.collate_dtype or artifact.dtype.name))
    return fields


# -------------------------------------------------------------------- bucket labels
def _arrow_column(dataset, name: str):
    """One column of a `datasets.Dataset` as a pyarrow array (no transform, no arrays decoded)."""
    return dataset.select_columns([name]).with_format("arrow")[:][name].combine_chunks()


def _codes(values, to_bucket) -> tuple[np.ndarray, list[str]]:
    """Dictionary-encode a pyarrow array, mapping each distinct value (not each row) to a bucket."""
    import pyarrow as pa

    encoded = values.dictionary_encode() if not pa.types.is_dictionary(values.type) else values
    names = [to_bucket(v) for v in encoded.dictionary.to_pylist()]
    if encoded.indices.null_count:
        raise ValueError("some rows have no bucket")
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), names


def _bucket_from_url(url: str) -> str:
    for part in reversed(str(url).replace("\\", "/").split("/")[:-1]):
        match = BUCKET_DIR_RE.fullmatch(part)
        if match:
            return match.group(1)
    raise ValueError(f"no bucket_WxH folder in shard path {url!r}")


def _json_bucket(column) -> list[str]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(column.type):
        return pc.struct_field(column, "aspect_bucket").to_pylist()
    storage = column.storage if isinstance(column, pa.ExtensionArray) else column
    return [json.loads(text)["aspect_bucket"] for text in storage.to_pylist()]


def bucket_labels(dataset) -> tuple[np.ndarray, list[str]]:
    """(code per row, bucket name per code) for a dataset; see the module doc for what is accepted."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        all_codes, names = [], []
        for part in dataset.datasets:
            codes, part_names = bucket_labels(part)
            all_codes.append(codes + len(names))
            names += part_names
        return (np.concatenate(all_codes) if all_codes else np.zeros(0, np.int64)), names
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(
            f"cannot read aspect buckets from a {type(dataset).__name__}: pass buckets=[one 'WxH' label per row]"
        )
    import pyarrow as pa

    if "aspect_bucket" in columns:
        return _codes(_arrow_column(dataset, "aspect_bucket"), _bucket_name)
    if "__url__" in columns:
        try:
            return _codes(_arrow_column(dataset, "__url__"), _bucket_from_url)
        except ValueError:
            if "json" not in columns:
                raise
    if "json" in columns:  # the bucket recorded in each sample's JSON member
        return _codes(pa.array(_json_bucket(_arrow_column(dataset, "json")), pa.string()), _bucket_name)
    raise ValueError(
        f"the dataset has no aspect_bucket, __url__ or json column (columns: {', '.join(columns)}): "
        "pass buckets=[one 'WxH' label per row]"
    )


# ------------------------------------------------------------------------- sampler
class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices that never mix buckets; seeded per epoch; rank-aware with even epochs.

    Pass it as `DataLoader(ds, batch_sampler=sampler, collate_fn=prep.collate)` and call
    `sampler.set_epoch(epoch)` at the start of each epoch. `len(sampler)` is the number of
    batches this rank gets per epoch (the same on every rank with `even_batches`).
    """

    def __init__(
        self,
        dataset=None,
        batch_size: int = 1,
        *,
        buckets: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        even_batches: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if buckets is not None:
            names = sorted({_bucket_name(b) for b in buckets})
            lookup = {name: i for i, name in enumerate(names)}
            codes = np.fromiter((lookup[_bucket_name(b)] for b in buckets), np.int64, len(buckets))
        elif dataset is not None:
            codes, names = bucket_labels(dataset)
        else:
            raise ValueError("pass a dataset or buckets=[one 'WxH' label per row]")
        # rows of each bucket, keyed by the normalised bucket name (two codes may name one bucket)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        groups: dict[str, list[np.ndarray]] = {}
        for chunk in np.split(order, bounds) if len(order) else []:
            groups.setdefault(names[codes[chunk[0]]], []).append(chunk)
        self.groups = {name: np.sort(np.concatenate(parts)) for name, parts in sorted(groups.items())}
        self.buckets = list(self.groups)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.num_replicas = resolve_rank_world(rank, num_replicas)
        self.even_batches = even_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _per_bucket(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def total_batches(self) -> int:
        """Batches per epoch over all ranks, before padding."""
        return sum(self._per_bucket(len(rows)) for rows in self.groups.values())

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of an epoch in order, over all ranks (before padding and the rank split)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        batches: list[list[int]] = []
        for rows in self.groups.values():
            if self.shuffle:
                rows = rng.permutation(rows)
            stop = len(rows) - len(rows) % self.batch_size if self.drop_last else len(rows)
            batches += [rows[i : i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        if self.num_replicas > 1:
            if self.even_batches and batches:
                total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
                batches += [batches[i % len(batches)] for i in range(total - len(batches))]
            batches = batches[self.rank :: self.num_replicas]
        return iter(batches)

    def __len__(self) -> int:
        n = self.total_batches()
        if self.num_replicas == 1:
            return n
        if self.even_batches:
            return math.ceil(n / self.num_replicas)
        return len(range(self.rank, n, self.num_replicas))


# ------------------------------------------------------------------------- collate
def _field(row: dict, names: tuple[str, ...], out: str, where: str):
    for name in names:
        if name in row:
            value = row[name]
            if value is None:
                raise ValueError(
                    f"{where} has no {out} array (a missing side file?): load the manifest with ready_only=True"
                )
            return value
    raise KeyError(f"{where} has none of the fields {', '.join(names)}")


def _row_id(row: dict) -> Any:
    for name in ("image_id", "__key__", "key"):
        if name in row:
            return row[name]
    meta = row.get("json")
    return meta.get("image_id") if isinstance(meta, dict) else None


def _meta(row: dict, name: str) -> Any:
    if name in row:
        return row[name]
    meta = row.get("json")
    return meta.get(name) if isinstance(meta, dict) else None


def collate(rows: list[dict]) -> dict:
    """A list of rows of one bucket -> dict of torch tensors plus metadata lists.

    Accepts rows of `prep.load_manifest`, of `datasets` over the export (any format; with
    `with_format("numpy")` datasets returns float32 for the float16 columns: they are cast back
    to float16 here, which is exact), or samples of `prep.load_shards`. Returns `vae`
    (B, 16, H/8, W/8) float16, `t5_hidden` (B, 77, 1024) float16, `t5_mask` (B, 77) bool
    (True = real token), `dinov3` (B, 1024) float32, and lists `image_id`, `caption`, plus
    `aspect_bucket` (one string). A batch mixing buckets raises ValueError.
    """
    if not rows:
        raise ValueError("collate got an empty batch")
    batch: dict[str, Any] = {}
    from prep import stages

    optional = {a.column for a in stages.artifacts(stages.ALL).values()} - {a.column for a in stages.artifacts().values()}
    for out, (names, dtype) in array_fields().items():
        if out in optional and not all(any(row.get(n) is not None for n in names) for row in rows):
            continue  # an optional artifact (a mirrored crop's latent) the rows do not carry
        arrays = []
        for row in rows:
            value = _field(row, names, out, f"row {_row_id(row)!r}")
            arrays.append(value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            buckets = sorted({str(_meta(r, "aspect_bucket")) for r in rows})
            raise ValueError(
                f"batch mixes {out} shapes {sorted(shapes)} (buckets {', '.join(buckets)}): batch with "
                "prep.BucketBatchSampler (DataLoader(ds, batch_sampler=...)) so a batch holds one bucket"
            )
        stacked = np.stack(arrays)
        batch[out] = torch.from_numpy(stacked != 0 if dtype is torch.bool else stacked).to(dtype)
    batch["image_id"] = [_row_id(r) for r in rows]
    batch["caption"] = [_meta(r, "caption") for r in rows]
    buckets = {_meta(r, "aspect_bucket") for r in rows}
    batch["aspect_bucket"] = buckets.pop() if len(buckets) == 1 else sorted(map(str, buckets))
    return batch
