"""The JSONL manifest: tolerant reads with line numbers, atomic rewrites, rejected lines kept, Dataset view."""

from __future__ import annotations

import io
import json
import os
import time

import pytest

from prep.config import T5_MAX_LENGTH
from prep.fsio import TMP_MARK
from prep.manifest import (
    RejectedLine,
    dumps_record,
    projection_names,
    read_manifest,
    rejected_path,
    save_rejected,
    write_manifest,
)

MASK = [1] * 9 + [0] * (T5_MAX_LENGTH - 9)


def v2(i: int, **extra) -> dict:
    return {
        "image_id": f"img_{i}",
        "image_path": f"/data/images/img_{i}.jpg",
        "caption": f"caption {i}",
        "t5_attention_mask": list(MASK),
        "height": 1216,
        "width": 832,
        "aspect_bucket": "832x1216",
        "format_version": 2,
        **extra,
    }


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def side_entries(manifest_path) -> list[dict]:
    side = rejected_path(manifest_path)
    if not side.exists():
        return []
    return [json.loads(line) for line in side.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- reading


def test_missing_manifest_is_empty(tmp_path):
    manifest = read_manifest(tmp_path / "nope.jsonl")
    assert len(manifest) == 0 and list(manifest) == [] and manifest.rejected == []
    dataset = manifest.to_dataset()
    assert len(dataset) == 0
    assert dataset.column_names == projection_names()


def test_directory_raises(tmp_path):
    with pytest.raises(IsADirectoryError):
        read_manifest(tmp_path)


def test_bad_lines_are_rejected_with_line_numbers_and_good_ones_kept_in_order(tmp_path):
    path = tmp_path / "manifest.jsonl"
    lines = [
        json.dumps(v2(1)),  # 1 ok
        '{"image_path": "/x/broken.jpg", "caption": ',  # 2 bad JSON
        "[1, 2, 3]",  # 3 not an object
        '"just a string"',  # 4 not an object
        json.dumps({"caption": "no path"}),  # 5 missing image_path
        json.dumps({"image_path": "", "caption": "empty path"}),  # 6 missing image_path
        json.dumps({"image_path": 42}),  # 7 missing image_path
        json.dumps(v2(2, image_id="../../etc/passwd")),  # 8 unsafe id
        json.dumps(v2(3, image_id="a.b")),  # 9 unsafe id
        json.dumps(v2(4)),  # 10 ok
        "",  # 11 blank: skipped, still counted
        json.dumps(v2(5, image_path="/data/images/img_1.jpg")),  # 12 duplicate path of line 1
        json.dumps(v2(6, image_id="img_4")),  # 13 duplicate id of line 10
        json.dumps({"image_path": "/data/v0.jpg", "caption": "old"}),  # 14 ok (v0, no id)
        json.dumps({"image_path": "a\x00b.jpg"}),  # 15 NUL in path
        "   ",  # 16 blank
        "{oops}",  # 17 bad JSON
        json.dumps(v2(7)),  # 18 ok
    ]
    write_lines(path, lines)
    manifest = read_manifest(path)
    assert [r["image_path"] for r in manifest] == [
        "/data/images/img_1.jpg",
        "/data/images/img_4.jpg",
        "/data/v0.jpg",
        "/data/images/img_7.jpg",
    ]
    assert list(manifest)[0] == v2(1)
    rejected = {item.lineno: item.reason for item in manifest.rejected}
    assert sorted(rejected) == [2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 15, 17]
    assert rejected[2].startswith("bad JSON")
    assert rejected[3] == rejected[4] == "not a JSON object"
    assert rejected[5] == rejected[6] == rejected[7] == "missing image_path"
    assert rejected[8].startswith("unsafe image_id") and "etc/passwd" in rejected[8]
    assert rejected[9].startswith("unsafe image_id")
    assert rejected[12] == "duplicate image_path (first at line 1)"
    assert rejected[13] == "duplicate image_id img_4 (first at line 10)"
    assert rejected[15] == "image_path contains NUL"
    assert rejected[17].startswith("bad JSON")
    # the text is kept verbatim
    assert {item.lineno: item.text for item in manifest.rejected}[2] == lines[1]
    assert [item.lineno for item in manifest.rejected] == sorted(rejected)  # file order
    assert manifest.to_dataset()["row"] == [0, 1, 2, 3]


def test_crlf_bom_and_no_trailing_newline(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(v2(1)).encode() + b"\r\n" + json.dumps(v2(2)).encode()  # no final newline
    )
    manifest = read_manifest(path)
    assert manifest.rejected == []
    assert list(manifest) == [v2(1), v2(2)]


def test_invalid_utf8_line_is_rejected_not_fatal(tmp_path):
    path = tmp_path / "m.jsonl"
    bad_bytes = b'{"image_path": "/x/caf\xe9.jpg", "caption": "latin-1"}'
    lone_surrogate = b'{"image_path": "/x/s.jpg", "caption": "\\ud800"}'
    path.write_bytes(
        json.dumps(v2(1)).encode() + b"\n" + bad_bytes + b"\n" + lone_surrogate + b"\n" + json.dumps(v2(2)).encode() + b"\n"
    )
    manifest = read_manifest(path)
    assert [r["image_id"] for r in manifest] == ["img_1", "img_2"]
    assert [(item.lineno, item.reason) for item in manifest.rejected] == [
        (2, "not valid UTF-8"),
        (3, "not valid UTF-8"),
    ]
    # the rejected text is kept and can be saved, and the original bytes recovered
    write_manifest(path, manifest, manifest.rejected)
    entries = side_entries(path)
    assert entries[0]["text"].encode("utf-8", "surrogateescape") == bad_bytes
    assert entries[1]["text"].encode("utf-8", "surrogateescape") == lone_surrogate
    assert read_manifest(path).rejected == []


def test_records_keep_order_and_rows_around_a_rejected_line(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(v2(i)) for i in range(30)]
    lines.insert(10, "garbage")
    write_lines(path, lines)
    manifest = read_manifest(path)
    assert len(manifest) == 30
    assert manifest.record(29)["image_id"] == "img_29" and manifest.record(10)["image_id"] == "img_10"
    assert [r["image_id"] for r in manifest] == [f"img_{i}" for i in range(30)]
    assert manifest.to_dataset()["row"] == list(range(30))
    assert [(item.lineno, item.text) for item in manifest.rejected] == [(11, "garbage")]
    assert manifest.to_dataset()["image_id"] == [f"img_{i}" for i in range(30)]


# ----------------------------------------------------------------------------- the Dataset view


def test_to_dataset_columns_and_values(tmp_path):
    path = tmp_path / "m.jsonl"
    records = [
        v2(1),
        {"image_path": "/v1/a.png", "caption": "  ", "t5_attention_mask": [1] * 3, "height": 600, "width": 800,
         "dinov3_embedding": [0.0] * 1024},
        {"image_path": "/v0/b.png", "caption": "old caption", "width": "800", "height": 0.5},
        v2(2, caption=None, aspect_bucket=7, t5_attention_mask=[True] * T5_MAX_LENGTH),
    ]  # fmt: skip
    write_manifest(path, records)
    dataset = read_manifest(path).to_dataset()
    for name in ("row", "image_id", "image_path", "caption", "mask_ok", "aspect_bucket", "width", "height",
                 "needs_migration"):  # fmt: skip
        assert name in dataset.column_names
    assert dataset.column_names == projection_names()
    assert len(dataset) == 4
    assert dataset["row"] == [0, 1, 2, 3]
    assert dataset["image_id"] == ["img_1", None, None, "img_2"]
    assert dataset["image_path"] == ["/data/images/img_1.jpg", "/v1/a.png", "/v0/b.png", "/data/images/img_2.jpg"]
    assert dataset["caption"] == ["caption 1", None, "old caption", None]
    assert dataset["mask_ok"] == [True, False, False, False]
    assert dataset["aspect_bucket"] == ["832x1216", None, None, None]
    assert dataset["width"] == [832, 800, None, 832]
    assert dataset["height"] == [1216, 600, None, 1216]
    assert dataset["needs_migration"] == [False, True, True, False]
    # typed columns, so filters work without parsing JSON
    assert dataset.features["width"].dtype == "int64"
    assert dataset.features["mask_ok"].dtype == "bool"
    ready = dataset.filter(lambda row: row["mask_ok"] and not row["needs_migration"])
    assert ready["row"] == [0]


# ----------------------------------------------------------------------------- writing


def test_round_trip_keeps_unknown_fields_and_unicode(tmp_path):
    path = tmp_path / "m.jsonl"
    records = [
        v2(1, source={"site": "example.org", "license": "CC-BY", "ids": [1, 2, {"deep": None}]}, score=0.125),
        v2(2, caption="Ein Bild – 日本語のキャプション 🐱 café ñ \u2028 line-sep \x85 nel \t tab \\ back \"quote\""),
        {"image_path": "/ünï/cødé/写真.jpg", "caption": "v0", "big": 2**62, "neg": -1.5e-300, "flag": False,
         "nothing": None, "empty": {}, "list": []},
    ]  # fmt: skip
    assert write_manifest(path, records) == 3
    first = list(read_manifest(path))
    assert first == records
    write_manifest(path, read_manifest(path))
    assert list(read_manifest(path)) == records
    # one record per line, compact, UTF-8 readable
    raw = path.read_bytes()
    assert raw.count(b"\n") == 3
    assert "日本語".encode() in raw and "\\u65e5" not in raw.decode("utf-8")


def test_dumps_record_is_compact():
    assert dumps_record({"a": 1, "b": "é"}) == '{"a":1,"b":"é"}'


def test_write_manifest_creates_parent_and_counts(tmp_path):
    path = tmp_path / "deep" / "er" / "m.jsonl"
    assert write_manifest(path, (v2(i) for i in range(5))) == 5
    assert len(read_manifest(path)) == 5
    assert write_manifest(path, []) == 0
    assert path.read_bytes() == b""
    assert len(read_manifest(path)) == 0


@pytest.mark.parametrize("crash", ["mid_records", "at_replace"])
def test_write_manifest_crash_keeps_previous_file_byte_for_byte(tmp_path, monkeypatch, crash):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [v2(i) for i in range(10)])
    before = path.read_bytes()

    def records():
        for i in range(100):
            if crash == "mid_records" and i == 50:
                raise RuntimeError("simulated crash mid-write")
            yield v2(i, caption=f"new caption {i}")

    if crash == "at_replace":

        def boom(*args):
            raise RuntimeError("simulated crash mid-write")

        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_manifest(path, records())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(TMP_MARK)] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_rejected_lines_survive_two_rewrites_without_duplicates(tmp_path):
    path = tmp_path / "m.jsonl"
    bad = ["{broken", json.dumps({"no": "path"}), json.dumps(v2(9, image_id="../up"))]
    write_lines(path, [json.dumps(v2(1)), bad[0], json.dumps(v2(2)), bad[1], bad[2]])

    first = read_manifest(path)
    assert [item.lineno for item in first.rejected] == [2, 4, 5]
    write_manifest(path, first, first.rejected)
    entries = side_entries(path)
    assert [(e["line"], e["text"]) for e in entries] == [(2, bad[0]), (4, bad[1]), (5, bad[2])]
    assert all(e["reason"] for e in entries)
    assert [r["image_id"] for r in read_manifest(path)] == ["img_1", "img_2"]

    second = read_manifest(path)
    assert second.rejected == []
    write_manifest(path, second, second.rejected)
    assert side_entries(path) == entries

    # the same bad lines seen again (e.g. a run crashed before its rewrite): not duplicated
    save_rejected(path, first.rejected)
    write_manifest(path, second, first.rejected)
    assert side_entries(path) == entries

    # a new bad line is appended after the old ones
    with open(path, "a", encoding="utf-8") as f:
        f.write("new garbage\n")
    third = read_manifest(path)
    assert [(item.lineno, item.text) for item in third.rejected] == [(3, "new garbage")]
    write_manifest(path, third, third.rejected)
    assert [e["text"] for e in side_entries(path)] == [*bad, "new garbage"]
    assert [r["image_id"] for r in read_manifest(path)] == ["img_1", "img_2"]


def test_rejected_saved_before_the_manifest_drops_them(tmp_path, monkeypatch):
    """If the rewrite dies, the bad lines are in the side file and still in the old manifest."""
    path = tmp_path / "m.jsonl"
    write_lines(path, [json.dumps(v2(1)), "{bad"])
    before = path.read_bytes()
    manifest = read_manifest(path)

    def records():
        yield from manifest
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_manifest(path, records(), manifest.rejected)
    assert path.read_bytes() == before
    assert [e["text"] for e in side_entries(path)] == ["{bad"]


def test_save_rejected_keeps_unparseable_side_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    rejected_path(path).write_text("hand-written note\n", encoding="utf-8")
    save_rejected(path, [RejectedLine(3, "x", "bad JSON")])
    lines = rejected_path(path).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "hand-written note"
    assert json.loads(lines[1]) == {"line": 3, "reason": "bad JSON", "text": "x"}
    save_rejected(path, [])
    assert rejected_path(path).read_text(encoding="utf-8").splitlines() == lines
    assert rejected_path(path).name == "m.jsonl.rejected.jsonl"


# ----------------------------------------------------------------------------- scale


def test_large_v1_manifest_reads_fully_and_quickly(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    embeddings = [json.dumps(rng.standard_normal(1024).astype(np.float32).tolist()) for _ in range(8)]
    path = tmp_path / "v1.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1500):
            width, height = 640 + i % 7 * 64, 480 + i % 5 * 64
            mask = json.dumps([1] * (5 + i % 40) + [0] * (T5_MAX_LENGTH - 5 - i % 40))
            f.write(
                f'{{"image_path": "/data/images/{i:05d}.jpg", "caption": "caption number {i}", '
                f'"dinov3_embedding": {embeddings[i % 8]}, "t5_attention_mask": {mask}, '
                f'"height": {height}, "width": {width}}}\n'
            )
    assert path.stat().st_size > 10_000_000

    start = time.perf_counter()
    manifest = read_manifest(path)
    dataset = manifest.to_dataset()
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed

    assert len(manifest) == 1500 and manifest.rejected == []
    assert dataset["image_path"][1499] == "/data/images/01499.jpg"
    assert all(dataset["needs_migration"]) and all(dataset["mask_ok"])
    assert dataset["image_id"] == [None] * 1500
    assert dataset["width"][:3] == [640, 704, 768]
    records = list(manifest)
    assert records[7]["dinov3_embedding"] == json.loads(embeddings[7])
    assert sum(records[13]["t5_attention_mask"]) == 18


# ----------------------------------------------------------------------------- spliced projection
def stamped(i: int, bucket: str = "832x1216") -> dict:
    stamp = {"model_id": "m", "revision": "r", "dtype": "torch.float32", "image_sha256": f"{i:064x}", "format": 2,
             "bucket": bucket, "file": {"size": 10 + i, "mtime_ns": i, "sha256": f"{i + 1:064x}"}}
    return v2(i, aspect_bucket=bucket, image_fingerprint={"size": i, "mtime_ns": i, "sha256": f"{i:064x}"},
              provenance={"vae": stamp, "dinov3": {**stamp, "input_size": [224, 224]}})


@pytest.mark.parametrize("slices", [4096, 1], ids=["slices", "one-take"])
@pytest.mark.parametrize("new_column", [False, True], ids=["same-columns", "new-column"])
def test_a_rewrite_projects_exactly_what_a_fresh_read_projects(tmp_path, monkeypatch, slices, new_column):
    """The projection a rewrite splices (old rows kept, changed rows projected again, dropped rows out,
    appended rows added) equals the projection of the new file read from scratch."""
    import prep.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_SLICES", slices)
    path = tmp_path / "manifest.jsonl"
    lines = [json.dumps(stamped(i, "832x1216" if i % 3 else "1024x1024")) for i in range(40)]
    lines.insert(7, "{not json")  # a gap in the old file between rows
    write_lines(path, lines)
    manifest = read_manifest(path)
    changed = {}
    for row in (0, 5, 6, 7, 20, 39):
        record = manifest.record(row)
        record["caption"] = f"edited {row}"
        record["aspect_bucket"] = "1216x832"
        if new_column and row == 20:
            record["provenance"]["vae_flip"] = dict(record["provenance"]["vae"], flip="horizontal")
        changed[row] = record
    appended = [stamped(100, "768x1280"), v2(101)]
    result = manifest_module.rewrite(manifest, changed, appended, drop=[3, 6])
    fresh = read_manifest(path, use_cache=False)
    assert result.table.column_names == fresh.table.column_names
    assert result.table.to_pylist() == fresh.table.to_pylist()
    assert [result.record(row) for row in range(len(result))] == [fresh.record(row) for row in range(len(fresh))]
    assert len(fresh) == 40 - 2 + 2 and fresh.record(4)["caption"] == "edited 5"


def test_the_dataset_view_takes_the_memory_mapped_projection_without_a_copy(tmp_path):
    """`datasets` decodes dictionary columns into each process's memory (570 MB per million
    records, per rank): the projection's columns must be types it keeps as they are."""
    import pyarrow as pa

    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [stamped(i, "832x1216" if i % 3 else "1024x1024") for i in range(20_000)])
    read_manifest(path)  # writes the projection cache
    manifest = read_manifest(path)
    assert manifest.cache_path is not None
    assert not any(pa.types.is_dictionary(t) for t in manifest.table.schema.types)
    before = pa.total_allocated_bytes()
    dataset = manifest.to_dataset()
    assert manifest.table.nbytes > 2_000_000
    assert pa.total_allocated_bytes() - before < manifest.table.nbytes / 10
    assert dataset[7]["vae__bucket"] == "832x1216" and dataset[6]["aspect_bucket"] == "1024x1024"


def test_a_stamp_configuration_comes_back_from_the_cache_in_a_new_process(tmp_path, monkeypatch):
    """The projection keeps a configuration as a hash; a process that reads only the cache (every
    rank of a warm run) must still know the configuration behind it."""
    import prep.manifest as manifest_module

    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [stamped(i) for i in range(5)])
    read_manifest(path)
    monkeypatch.setattr(manifest_module, "CONFIGS", {})  # as in a fresh process
    manifest = read_manifest(path)
    assert manifest.cache_path is not None
    key = manifest.table.column("vae__config")[0].as_py()
    assert manifest_module.stamp_config(key) == {"model_id": "m", "revision": "r", "dtype": "torch.float32"}
    monkeypatch.setattr(manifest_module, "CONFIGS", {})
    with pytest.raises(RuntimeError, match="never seen"):
        manifest_module.stamp_config(key)


def test_a_rewrite_hands_back_the_memory_mapped_cache_not_a_second_table(tmp_path):
    import pyarrow as pa

    import prep.manifest as manifest_module

    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [stamped(i) for i in range(20_000)])
    manifest = read_manifest(path)
    record = manifest.record(3)
    record["caption"] = "edited"
    before = pa.total_allocated_bytes()
    result = manifest_module.rewrite(manifest, {3: record})
    assert result.cache_path is not None and result.table.column("caption")[3].as_py() == "edited"
    assert pa.total_allocated_bytes() - before < result.table.nbytes / 10
    assert result.table.to_pylist() == read_manifest(path, use_cache=False).table.to_pylist()


def test_a_cold_parse_spools_the_projection_instead_of_holding_it(tmp_path, monkeypatch):
    """The first read of ten million records must not hold their projection in memory: each chunk
    goes to a nameless temp file as it is made, and nothing is left in the folder."""
    import pyarrow as pa

    import prep.manifest as manifest_module

    monkeypatch.setattr(manifest_module._Projector, "CHUNK", 1_000)
    monkeypatch.setattr(manifest_module, "CACHE_BATCH", 1_000)
    held = []
    flush = manifest_module._Projector._flush

    def flush_and_count(self):
        flush(self)
        held.append(sum(batch.nbytes for batch in self.batches))

    monkeypatch.setattr(manifest_module._Projector, "_flush", flush_and_count)
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [stamped(i) for i in range(10_000)])
    before = pa.total_allocated_bytes()
    manifest = read_manifest(path)
    assert manifest.cache_path is not None and len(manifest) == 10_000 and len(held) >= 10
    assert max(held) == 0 and pa.total_allocated_bytes() - before < manifest.table.nbytes / 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "manifest.jsonl.cache.arrow"]
    assert manifest.table.to_pylist() == read_manifest(path, use_cache=False).table.to_pylist()


def test_a_pickled_manifest_brings_its_stamp_configurations(tmp_path, monkeypatch):
    import pickle

    import prep.manifest as manifest_module

    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [stamped(i) for i in range(3)])
    data = pickle.dumps(read_manifest(path))
    monkeypatch.setattr(manifest_module, "CONFIGS", {})  # a spawned worker
    manifest = pickle.loads(data)
    key = manifest.table.column("vae__config")[1].as_py()
    assert manifest_module.stamp_config(key)["model_id"] == "m" and manifest.record(1)["image_id"] == "img_1"


def test_a_cold_parse_that_cannot_spool_reads_in_memory(tmp_path, monkeypatch):
    """A full disk may stop the spool or the cache; the manifest is still read."""
    import tempfile

    import prep.manifest as manifest_module

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [stamped(i) for i in range(3)])
    monkeypatch.setattr(manifest_module._Projector, "CHUNK", 2)  # the spool is written during the parse
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: FullDisk())
    assert [r["image_id"] for r in read_manifest(path)] == ["img_0", "img_1", "img_2"]


def _mapped_rss_kb(name: str) -> int:
    """This process's resident kB of the mappings of files named `name` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and os.path.basename(fields[5]) == name
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_a_pass_over_the_projection_leaves_one_batch_of_it_resident(tmp_path):
    """A pass over the mapped projection (a needs filter, a cache write) gives back each batch's
    pages as it goes: the process's RSS does not grow to the whole file (6 GB at ten million
    records, counted once per rank by SLURM and `ps`), and the data is still all there."""
    from prep import provenance, stages
    from prep.manifest import rewrite
    from prep.needs import Yardstick, plan_stage

    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [stamped(i) for i in range(60_000)])
    read_manifest(path)  # writes the cache
    manifest = read_manifest(path)
    cache = manifest.cache_path.name
    expected = manifest.table.to_pylist()[:3]
    whole = _mapped_rss_kb(cache)
    assert whole > 10_000  # reading every column brought the whole file in: the measure can see it
    import prep.manifest as manifest_module

    manifest_module.release_mapped_pages()
    assert _mapped_rss_kb(cache) < whole / 10
    yard = Yardstick(derived_dir=tmp_path, expected=provenance.Expected({}))
    todo, _ = plan_stage(manifest.to_dataset(), stages.get("vae"), yard)
    assert len(todo) == 60_000
    assert _mapped_rss_kb(cache) < whole / 4  # at most one 20k-row batch of the columns it read
    record = manifest.record(5)
    record["caption"] = "edited"
    result = rewrite(manifest, {5: record})  # the cache written again from the mapped one
    assert _mapped_rss_kb(cache) < whole / 4
    assert result.table.to_pylist()[:3] == expected and result.table.column("caption")[5].as_py() == "edited"
