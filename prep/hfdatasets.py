"""A Hugging Face dataset as input: streamed once by the preparation, read by row in the passes.

`--dataset NAME_OR_PATH` is a Hub id, a local `save_to_disk` folder, or a local folder that
`datasets.load_dataset` reads (parquet files, an `imagefolder`). The preparation streams it
with `datasets` (`IterableDataset`, image column cast to `Image(decode=False)`: bytes, never
decoded there), so a dataset larger than the disk works; it writes records only.

The passes then read one row's bytes by index, never re-streaming:

- an image stored as a local file (an `imagefolder`, a `save_to_disk` of file paths): the
  record's `image_path` is that file, read like any other;
- a local `save_to_disk` folder: its Arrow files are memory-mapped, a row is a slice (O(1));
- parquet files (a local folder, or a Hub repo through `HfFileSystem` at the pinned commit):
  the file's footer gives its row groups; the row group holding the row is read (image column
  only) and kept while the next rows are read from it (two per process). Cost per image: one
  row group read divided by the rows of it that the worker needs (about 100 images per row
  group as `datasets` writes images; the VAE pass visits a row group once per bucket).

Change detection: a Hub dataset is pinned to the commit its revision resolved to, and the
stream runs again only when that commit changes; a local folder's version is the size and
mtime of its data files (and `save_to_disk`'s own fingerprint), and a row's fingerprint
`mtime_ns` is the mtime of the data file holding it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prep.errors import UserError
from prep.sources import HUB_DATASET, LOCAL_DATASET, DatasetRow, SourceError

logger = logging.getLogger("prep")

ROW_GROUP_CACHE = 2  # row groups kept per process (bounded memory: about 2 x 100 images)


# ------------------------------------------------------------------------------ the input
@dataclass
class DatasetInput:
    """A resolved `--dataset`: where it is, which split and columns, and its version."""

    name: str  # absolute folder, or the Hub id
    scheme: str  # hfds (local) or hf (Hub)
    split: str
    image_column: str
    revision: str | None = None  # the Hub commit
    saved: bool = False  # a save_to_disk folder
    version: str = ""
    columns: dict = field(default_factory=dict)  # feature name -> feature

    @property
    def key(self) -> str:
        """How prep_metadata.json's `sources` names this input."""
        return f"dataset:{self.name}:{self.split}"

    def row(self, index: int) -> DatasetRow:
        dataset = self.name if self.scheme == HUB_DATASET else os.path.abspath(self.name)
        return DatasetRow(self.scheme, dataset, self.revision, self.split, index, self.image_column)


def is_saved_dataset(folder: Path) -> bool:
    """A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def resolve_dataset(name: str, split: str, image_column: str, revision: str | None = None) -> DatasetInput:
    """Find the dataset (local folder first, then the Hub) and its version; UserError if unreachable."""
    folder = Path(name).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"--dataset {name} is a file; give its folder (save_to_disk, parquet files or imagefolder)")
        folder = folder.resolve()
        saved = is_saved_dataset(folder)
        return DatasetInput(str(folder), LOCAL_DATASET, split, image_column, saved=saved,
                            version=local_version(folder, split, saved))
    commit = hub_commit(name, revision)
    return DatasetInput(name, HUB_DATASET, split, image_column, revision=commit, version=commit)


def hub_commit(name: str, revision: str | None) -> str:
    """The commit `revision` (default: main) of a Hub dataset; UserError when it cannot be reached."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(name, revision=revision)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one line for the user
        text = " ".join(str(exc).split())[:200]
        raise UserError(f"--dataset {name}: not a local folder, and the Hub dataset cannot be reached "
                        f"({type(exc).__name__}: {text})") from None
    return info.sha


def local_version(folder: Path, split: str, saved: bool) -> str:
    """A digest of the data files' names, sizes and mtimes (and save_to_disk's fingerprint)."""
    digest = hashlib.sha256()
    for path in data_files_of(folder, split, saved):
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def data_files_of(folder: Path, split: str, saved: bool) -> list[str]:
    """The split's data files in the order `datasets` reads them."""
    if saved:
        return [str(p) for p in saved_files(folder, split)]
    from datasets import load_dataset_builder

    try:
        files = load_dataset_builder(str(folder)).config.data_files
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--dataset {folder}: datasets cannot read this folder ({type(exc).__name__}: {exc})") from None
    if not files or split not in files:
        raise UserError(f"--dataset {folder}: no split {split!r} (splits: {', '.join(files or {}) or 'none'})")
    return [str(p) for p in files[split]]


def saved_files(folder: Path, split: str) -> list[Path]:
    """The Arrow files of a save_to_disk folder (a DatasetDict's split subfolder), in order."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise UserError(f"--dataset {folder}: no split {split!r} (splits: {', '.join(splits)})")
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    return [folder / entry["filename"] for entry in state.get("_data_files", [])]


# ------------------------------------------------------------------------------ streaming
def open_stream(source: DatasetInput):
    """The dataset as a `datasets.IterableDataset` whose image column yields {bytes, path}."""
    import datasets

    try:
        if source.saved:
            loaded = datasets.load_from_disk(source.name)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[source.split]
            stream = loaded.to_iterable_dataset()
        else:
            stream = datasets.load_dataset(source.name, split=source.split, streaming=True,
                                           revision=source.revision)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--dataset {source.name}: cannot be opened ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    features = stream.features or {}
    source.columns = dict(features)
    check_image_column(source, features)
    return stream.cast_column(source.image_column, datasets.Image(decode=False))


def check_image_column(source: DatasetInput, features) -> None:
    import datasets

    if source.image_column not in features:
        raise UserError(f"--dataset {source.name}: no column {source.image_column!r} "
                        f"(columns: {', '.join(features)}); choose one with --image-column")
    if not isinstance(features[source.image_column], datasets.Image):
        raise UserError(f"--dataset {source.name}: column {source.image_column!r} is not an image column "
                        f"({features[source.image_column]}); choose one with --image-column")


def check_column(source: DatasetInput, column: str | None, flag: str) -> None:
    if column is not None and source.columns and column not in source.columns:
        raise UserError(f"--dataset {source.name}: no column {column!r} for {flag} "
                        f"(columns: {', '.join(source.columns)})")


def iter_rows(stream) -> Iterator[tuple[int, dict]]:
    """(row index, example) in stream order: the index the passes read the row back by."""
    yield from enumerate(stream)


# ---------------------------------------------------------------------------- reading rows
class RowReader:
    """Reads rows of one dataset split by index from its data files (Arrow or parquet)."""

    def __init__(self, files: list[str], local: bool):
        self.files = files
        self.local = local
        self.starts: list[int] = []
        self.tables: dict[int, object] = {}
        self.groups: OrderedDict = OrderedDict()
        counts = self.row_counts()
        total = 0
        for count in counts:
            self.starts.append(total)
            total += count
        self.total = total

    def row_counts(self) -> list[int]:
        """Rows per file from the footers (parquet) or the memory-mapped tables (Arrow); threads
        hide the round trips of remote files (one small range request per footer)."""
        if self.local or len(self.files) < 2:
            return [self.rows_in(i) for i in range(len(self.files))]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(self.rows_in, range(len(self.files))))

    def rows_in(self, index: int) -> int:
        return self.open(index).metadata.num_rows if self.is_parquet(index) else self.arrow(index).num_rows

    def is_parquet(self, index: int) -> bool:
        return self.files[index].endswith(".parquet")

    def open(self, index: int):
        """The parquet file (footer read once; kept open)."""
        import pyarrow.parquet as pq

        if index not in self.tables:
            if self.local:
                from prep.fsio import open_regular

                handle = open_regular(self.files[index])
            else:
                import fsspec

                handle = fsspec.open(self.files[index], "rb").open()
            self.tables[index] = pq.ParquetFile(handle)
        return self.tables[index]

    def arrow(self, index: int):
        """An Arrow file of save_to_disk, memory-mapped."""
        if index not in self.tables:
            from datasets.table import MemoryMappedTable

            if not self.files[index].endswith(".arrow"):
                raise SourceError(f"{self.files[index]}: prep reads dataset rows from parquet or Arrow files only")
            self.tables[index] = MemoryMappedTable.from_file(self.files[index])
        return self.tables[index]

    def locate(self, row: int) -> tuple[int, int]:
        import bisect

        if not 0 <= row < self.total:
            raise SourceError(f"row {row} is out of range (the split has {self.total} rows)")
        index = bisect.bisect_right(self.starts, row) - 1
        return index, row - self.starts[index]

    def value(self, row: int, column: str):
        index, offset = self.locate(row)
        if not self.is_parquet(index):
            return self.arrow(index).fast_slice(offset, 1).column(column)[0].as_py()
        parquet = self.open(index)
        group, start = 0, 0
        while start + parquet.metadata.row_group(group).num_rows <= offset:
            start += parquet.metadata.row_group(group).num_rows
            group += 1
        key = (index, group, column)
        if key not in self.groups:
            self.groups[key] = parquet.read_row_group(group, columns=[column]).column(column)
            while len(self.groups) > ROW_GROUP_CACHE:
                self.groups.popitem(last=False)
        self.groups.move_to_end(key)
        return self.groups[key][offset - start].as_py()

    def file_of(self, row: int) -> str:
        return self.files[self.locate(row)[0]]


_READERS: dict[tuple, RowReader] = {}


def forget_readers() -> None:
    """Drop this process's open readers (a new run must see files replaced since)."""
    _READERS.clear()


def reader_for(row: DatasetRow) -> RowReader:
    key = (os.getpid(), row.scheme, row.dataset, row.revision, row.split)
    reader = _READERS.get(key)
    if reader is None:
        if row.scheme == LOCAL_DATASET:
            folder = Path(row.dataset)
            files, local = data_files_of(folder, row.split, is_saved_dataset(folder)), True
        else:
            files, local = hub_data_files(row.dataset, row.revision, row.split), False
        try:
            reader = RowReader(files, local)
        except UserError as exc:
            raise SourceError(str(exc)) from None
        _READERS[key] = reader
    return reader


def hub_data_files(name: str, revision: str | None, split: str) -> list[str]:
    from datasets import load_dataset_builder

    try:
        files = load_dataset_builder(name, revision=revision).config.data_files
        return [str(p) for p in files[split]]
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"hf://datasets/{name}@{revision}: data files of split {split} unavailable "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None


def check_hub_files(source: DatasetInput) -> None:
    """A Hub dataset's rows are read back from its parquet files: refuse other layouts early."""
    files = hub_data_files(source.name, source.revision, source.split)
    others = sorted({os.path.splitext(f)[1] or f for f in files if not f.endswith(".parquet")})
    if others:
        raise UserError(f"--dataset {source.name}: its {source.split} split is stored as {', '.join(others)} files, "
                        "which prep cannot read by row; use the Hub's parquet conversion "
                        "(--dataset-revision refs/convert/parquet), or download it and use --images / --webdataset")


def read_row_bytes(row: DatasetRow) -> bytes:
    """The image bytes of one row (the passes' reader; see the module docstring for the cost)."""
    try:
        value = reader_for(row).value(row.row, row.column)
    except SourceError:
        raise
    except (KeyError, ValueError, OSError) as exc:
        raise SourceError(f"{row.locator}: {type(exc).__name__}: {exc}") from None
    if isinstance(value, dict) and value.get("bytes"):
        from prep.sources import MAX_IMAGE_BYTES

        if len(value["bytes"]) > MAX_IMAGE_BYTES:
            raise SourceError(f"{row.locator}: image of {len(value['bytes'])} bytes, over {MAX_IMAGE_BYTES}")
        return value["bytes"]
    if isinstance(value, dict) and value.get("path") and os.path.isabs(value["path"]):
        from prep.fsio import open_regular

        with open_regular(value["path"]) as f:
            return f.read()
    raise SourceError(f"{row.locator}: the row holds no image bytes")


def local_version_mtime(row: DatasetRow) -> int:
    """The mtime of the data file holding a local row (the fingerprint's `mtime_ns`)."""
    return os.stat(reader_for(row).file_of(row.row)).st_mtime_ns
