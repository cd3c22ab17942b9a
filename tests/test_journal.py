"""Unit tests of `prep.journal` (per-rank update logs, the overlaid view between passes, folding)
and `prep.tally` (counting each record once), without a pipeline run."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from prep import journal
from prep.manifest import cache_file, read_manifest, write_manifest
from prep.tally import Tally


def record(i: int, **extra) -> dict:
    return {"image_id": f"img{i:03d}", "image_path": f"/data/img{i:03d}.jpg", "height": 512, "width": 512,
            "aspect_bucket": "512x512", "format_version": 2, **extra}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [record(i) for i in range(10)])
    return path


def test_updates_merge_per_id_in_file_order_and_a_torn_line_is_ignored(manifest: Path) -> None:
    j0, j1 = journal.Journal(manifest, 0), journal.Journal(manifest, 1)
    j0.append([{"image_id": "img001", "caption": "first"}, {"image_id": "img002", "caption": "x"}])
    j0.append([{"image_id": "img001", "caption": "second"}])
    j1.append([{"image_id": "img003", "provenance.vae": {"model_id": "m"}}])
    j0.close()
    j1.close()
    with open(j1.path, "ab") as f:
        f.write(b'{"image_id": "img004", "capt')  # a process killed mid-line
    updates = journal.read_updates(manifest)
    assert updates == {"img001": {"caption": "second"}, "img002": {"caption": "x"},
                       "img003": {"provenance.vae": {"model_id": "m"}}}


def test_apply_update_sets_one_stamp_or_one_field_of_a_stamp() -> None:
    rec = {"image_id": "a", "provenance": {"dinov3": {"model_id": "d"}}}
    assert journal.apply_update(rec, {"provenance.vae": {"model_id": "v"}})
    assert journal.apply_update(rec, {"provenance.dinov3.file": [1, 2]})
    assert rec["provenance"] == {"dinov3": {"model_id": "d", "file": [1, 2]}, "vae": {"model_id": "v"}}
    assert not journal.apply_update(rec, {"provenance.vae": {"model_id": "v"}})  # idempotent
    assert not journal.apply_update(rec, {"provenance.t5.file": [3]})  # no stamp to refresh


def test_read_current_overlays_the_journals_without_touching_the_file(manifest: Path) -> None:
    before = manifest.read_bytes()
    j = journal.Journal(manifest, 0)
    j.append([{"image_id": "img004", "caption": "a red door"}, {"image_id": "nobody", "caption": "ignored"}])
    j.close()
    current = journal.read_current(manifest)
    assert manifest.read_bytes() == before  # nothing written: the journals are the durable copy
    assert current.record(4)["caption"] == "a red door"
    assert orjson.loads(current.raw(4))["caption"] == "a red door"
    assert current.table.column("caption").to_pylist()[4] == "a red door"  # the projection the passes filter
    assert current.table.column("caption").to_pylist()[3] is None
    changed = current.record(4)
    changed["caption"] = "edited by a caller"
    assert current.record(4)["caption"] == "a red door"  # callers get copies
    assert len(current.to_dataset()) == 10


def test_a_rewrite_of_the_overlaid_view_writes_the_overlay_and_the_new_changes(manifest: Path) -> None:
    from prep.manifest import rewrite

    j = journal.Journal(manifest, 0)
    j.append([{"image_id": "img004", "caption": "from the journal"}])
    j.close()
    current = journal.read_current(manifest)
    flagged = current.record(7) | {"filtered": {"reason": "upscale"}}
    rewrite(current, {7: flagged})
    on_disk = [orjson.loads(line) for line in manifest.read_bytes().splitlines()]
    assert on_disk[4]["caption"] == "from the journal" and on_disk[7]["filtered"] == {"reason": "upscale"}
    assert [r["image_id"] for r in on_disk] == [f"img{i:03d}" for i in range(10)]
    fresh = read_manifest(manifest, use_cache=False)
    assert fresh.table.column("caption").to_pylist() == read_manifest(manifest).table.column("caption").to_pylist()


def test_merge_is_idempotent_and_writes_nothing_when_the_updates_are_in(manifest: Path) -> None:
    j = journal.Journal(manifest, 0)
    j.append([{"image_id": "img001", "caption": "c"}])
    j.close()
    journal.merge_into_manifest(manifest)
    once = manifest.read_bytes()
    stat = manifest.stat()
    journal.merge_into_manifest(manifest)  # a restart folding the same journal again
    assert manifest.read_bytes() == once and manifest.stat().st_ino == stat.st_ino
    journal.clear(manifest)
    assert not journal.journal_dir(manifest).exists()
    assert cache_file(manifest).exists()


def test_a_fold_is_due_only_when_the_journals_are_a_sizeable_share_of_the_manifest(manifest: Path) -> None:
    assert not journal.fold_due(manifest)
    size = manifest.stat().st_size
    j = journal.Journal(manifest, 0)
    j.append([{"image_id": "img001", "caption": "c"}])
    j.close()
    small = journal.journal_bytes(manifest)
    assert small < size * journal.FOLD_SHARE and not journal.fold_due(manifest)
    j = journal.Journal(manifest, 1)
    j.append([{"image_id": "img002", "caption": "x" * int(size * journal.FOLD_SHARE)}])
    j.close()
    assert journal.fold_due(manifest)


def test_tally_counts_each_record_once_with_failures_first() -> None:
    rank0, rank1 = Tally(), Tally()
    rank0.new.update({"a", "b"})
    rank0.failed["b"] = "unreadable"
    rank1.migrated.update({"a", "c"})
    rank1.enriched.add("c")
    rank1.refresh("vae", "d")
    rank1.skip_input("not an image")
    rank0.merge(rank1)
    counts = rank0.counts(total=10)
    assert counts == {"new": 1, "migrated": 1, "enriched": 0, "extracted": 0, "skipped": 7, "failed": 1,
                      "total": 10, "refreshed": 1}
    assert rank0.skipped_inputs == {"not an image": 1}


def test_a_lifted_flag_is_journaled_as_a_removal_and_later_updates_win(manifest: Path) -> None:
    flag = {"reason": "near_duplicate", "detail": "x"}
    j = journal.Journal(manifest, 0)
    j.append([{"image_id": "img001", "filtered": flag}, {"image_id": "img002", "filtered": flag}])
    j.append([{"image_id": "img001", journal.UNSET: ["filtered"]}])
    j.append([{"image_id": "img002", journal.UNSET: ["filtered"]}, {"image_id": "img002", "filtered": flag}])
    j.close()
    journal.merge_into_manifest(manifest)
    on_disk = [orjson.loads(line) for line in manifest.read_bytes().splitlines()]
    assert "filtered" not in on_disk[1] and on_disk[2]["filtered"] == flag
    rec = {"image_id": "a", "filtered": flag, "caption": "c"}
    assert journal.apply_update(rec, {journal.UNSET: ["filtered", "absent"]}) and rec == {"image_id": "a", "caption": "c"}
    assert not journal.apply_update(rec, {journal.UNSET: ["filtered"]})


def test_the_overlaid_view_shares_the_memory_mapped_projection(tmp_path: Path) -> None:
    """Eight ranks reading the overlaid view between passes must not each copy the table."""
    import pyarrow as pa

    path = tmp_path / "big.jsonl"
    write_manifest(path, [record(i, caption=f"a photo number {i} " * 8) for i in range(20_000)])
    read_manifest(path)  # writes the projection cache
    j = journal.Journal(path, 0)
    j.append([{"image_id": "img005", "caption": "changed"}])
    j.close()
    before = pa.total_allocated_bytes()
    current = journal.read_current(path)
    assert current.cache_path is None and current.record(5)["caption"] == "changed"
    assert current.table.column("caption")[5].as_py() == "changed"
    assert current.table.nbytes > 2_000_000
    assert pa.total_allocated_bytes() - before < current.table.nbytes / 10
