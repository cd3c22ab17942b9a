"""`prep.inplace`: a rewrite whose changes are all in the manifest's last lines writes only that tail,
in place, with an undo file; a kill anywhere leaves the old or the new manifest, never a mix."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from prep import fsio, inplace
from prep.errors import UserError
from prep.fsio import acquire_lock, release_lock
from prep.manifest import lock_manifest, read_manifest, rewrite, write_manifest

N = 200  # the tail of a few records is well under TAIL_SHARE of the file


def record(i: int, **extra) -> dict:
    return {"image_id": f"img{i:04d}", "image_path": f"/data/img{i:04d}.jpg", "height": 512, "width": 512,
            "aspect_bucket": "512x512", "format_version": 2, **extra}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [record(i) for i in range(N)])
    return path


def expected_bytes(records: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def assert_projection_is_fresh(result, path: Path) -> None:
    fresh = read_manifest(path, use_cache=False)
    assert result.table.equals(fresh.table)
    assert read_manifest(path).table.equals(fresh.table)  # the cache was written for the new file
    assert [result.record(row) for row in range(len(result))] == list(fresh)


def test_appended_records_go_in_place_and_equal_a_whole_rewrite(manifest: Path) -> None:
    inode = manifest.stat().st_ino
    result = rewrite(read_manifest(manifest), {}, [record(N), record(N + 1)])
    assert manifest.stat().st_ino == inode  # written in place, not copied to a new file
    assert manifest.read_bytes() == expected_bytes([record(i) for i in range(N + 2)])
    assert not inplace.undo_path(manifest).exists()
    assert_projection_is_fresh(result, manifest)


def test_a_manifest_with_another_name_is_rewritten_whole_and_the_other_name_keeps_its_bytes(manifest: Path) -> None:
    """A hard-linked snapshot (`cp -al`, rsnapshot) shares the manifest's inode: a write in place
    would change the snapshot too. The rewrite goes to a new file; the snapshot is untouched."""
    snapshot = manifest.with_name("snapshot.jsonl")
    os.link(manifest, snapshot)
    before = snapshot.read_bytes()
    result = rewrite(read_manifest(manifest), {}, [record(N)])
    assert snapshot.read_bytes() == before
    assert manifest.read_bytes() == expected_bytes([record(i) for i in range(N + 1)])
    assert not os.path.samefile(manifest, snapshot)
    assert_projection_is_fresh(result, manifest)


def test_changed_last_rows_are_rewritten_in_place(manifest: Path) -> None:
    inode = manifest.stat().st_ino
    m = read_manifest(manifest)
    changed = {N - 3: record(N - 3, caption="a longer caption than before"), N - 1: record(N - 1, caption="x")}
    result = rewrite(m, changed, [record(N)])
    assert manifest.stat().st_ino == inode
    want = [record(i) for i in range(N + 1)]
    want[N - 3], want[N - 1] = changed[N - 3], changed[N - 1]
    assert manifest.read_bytes() == expected_bytes(want)
    assert_projection_is_fresh(result, manifest)


def test_a_change_early_in_the_file_or_a_rejected_line_means_a_whole_rewrite(manifest: Path) -> None:
    inode = manifest.stat().st_ino
    rewrite(read_manifest(manifest), {0: record(0, caption="first")})
    assert manifest.stat().st_ino != inode  # temp + rename
    with open(manifest, "ab") as f:
        f.write(b"not json\n")
    inode = manifest.stat().st_ino
    result = rewrite(read_manifest(manifest), {}, [record(N)])
    assert manifest.stat().st_ino != inode  # the bad line moves to the side file: the whole file is written
    assert b"not json" not in manifest.read_bytes()
    assert_projection_is_fresh(result, manifest)


def torn_change(manifest: Path, monkeypatch) -> bytes:
    """An in-place change killed halfway through its tail write; returns the bytes before it."""
    before = manifest.read_bytes()
    original = inplace._write_at

    def half_then_die(path, start, data):
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt  # stands in for the kill; the undo file is on disk

    monkeypatch.setattr(inplace, "_write_at", half_then_die)
    monkeypatch.setattr(inplace, "roll_back", lambda path: False)  # a killed writer rolls nothing back
    with pytest.raises(KeyboardInterrupt):
        rewrite(read_manifest(manifest), {N - 1: record(N - 1, caption="new")}, [record(N)])
    monkeypatch.setattr(inplace, "_write_at", original)
    monkeypatch.undo()
    assert inplace.undo_path(manifest).exists() and manifest.read_bytes() != before
    return before


def test_a_torn_tail_is_put_back_by_the_next_reader(manifest: Path, monkeypatch) -> None:
    before = torn_change(manifest, monkeypatch)
    assert list(read_manifest(manifest)) == [record(i) for i in range(N)]
    assert manifest.read_bytes() == before and not inplace.undo_path(manifest).exists()


def test_a_torn_tail_is_put_back_by_the_next_writer(manifest: Path, monkeypatch) -> None:
    before = torn_change(manifest, monkeypatch)
    lock = lock_manifest(manifest)
    try:
        assert manifest.read_bytes() == before and not inplace.undo_path(manifest).exists()
    finally:
        release_lock(lock)


def test_a_failed_tail_write_is_rolled_back_at_once(manifest: Path, monkeypatch) -> None:
    before = manifest.read_bytes()
    original = inplace._write_at
    calls = []

    def fail_first(path, start, data):
        calls.append(start)
        if len(calls) == 1:
            with open(path, "r+b") as f:
                f.seek(start)
                f.write(data[:10])
            raise OSError(28, "No space left on device")
        original(path, start, data)

    monkeypatch.setattr(inplace, "_write_at", fail_first)
    with pytest.raises(OSError):
        rewrite(read_manifest(manifest), {}, [record(N)])
    assert manifest.read_bytes() == before and not inplace.undo_path(manifest).exists()


def test_a_damaged_undo_file_is_left_alone(manifest: Path) -> None:
    undo = inplace.undo_path(manifest)
    undo.write_bytes(b'{"offset": 0, "length": 99}\nshort')
    before = manifest.read_bytes()
    with pytest.raises(UserError, match="damaged"):
        read_manifest(manifest)
    assert undo.exists() and manifest.read_bytes() == before  # nothing guessed: the user's bytes stay


def test_a_reader_waits_for_a_live_writer(manifest: Path, monkeypatch) -> None:
    held = acquire_lock(manifest.with_name(manifest.name + ".lock"), "test")
    undo = inplace.undo_path(manifest)
    try:
        undo.write_bytes(orjson.dumps({"offset": manifest.stat().st_size, "length": 0}) + b"\n")
        monkeypatch.setattr(inplace, "WAIT_S", 0.2)
        monkeypatch.setattr(fsio, "held_lock_paths", lambda: [])  # as if another process held the lock
        with pytest.raises(UserError, match="being changed in place"):
            read_manifest(manifest)
    finally:
        release_lock(held)
    assert len(read_manifest(manifest)) == N  # the writer gone: its undo file is applied (nothing to put back here)
    assert not undo.exists()


def test_a_reader_of_the_old_file_never_gets_another_record(manifest: Path) -> None:
    stale = read_manifest(manifest)  # opened before the change, as a concurrent export would
    rewrite(read_manifest(manifest), {N - 2: record(N - 2, caption="a caption that moves the next line")})
    assert stale.record(0) == record(0)  # the untouched prefix is still served
    for row in (N - 2, N - 1):  # their old spans now hold part of a longer line, or of two lines
        with pytest.raises(UserError, match="changed while this command read it"):
            stale.record(row)


def test_the_file_is_not_the_one_read_means_a_whole_rewrite(manifest: Path) -> None:
    m = read_manifest(manifest)
    os.replace(manifest, manifest.with_suffix(".old"))
    write_manifest(manifest, [record(i) for i in range(N)])
    inode = manifest.stat().st_ino
    rewrite(m, {}, [record(N)])
    assert manifest.stat().st_ino != inode
    assert list(read_manifest(manifest)) == [record(i) for i in range(N + 1)]


def test_an_undo_file_of_a_replaced_manifest_is_not_applied(manifest: Path, monkeypatch) -> None:
    torn_change(manifest, monkeypatch)
    write_manifest(manifest, [record(i) for i in range(3)])  # a writer that did not read first replaced the file
    assert list(read_manifest(manifest)) == [record(i) for i in range(3)]  # not cut and patched with another file's end
    undo = inplace.undo_path(manifest)
    assert not undo.exists() and undo.with_name(undo.name + ".stale").exists()  # kept for the user, out of the way


def test_a_read_torn_by_an_in_place_change_is_read_again(manifest: Path, monkeypatch) -> None:
    from prep import manifest as manifest_module

    parse, calls = manifest_module._parse, []

    def parse_while_another_job_appends(path, data, spool=None):
        calls.append(path)
        result = parse(path, data, spool)
        if len(calls) == 1:
            size = manifest.stat().st_size
            inplace.rewrite_tail(manifest, size, b"", orjson.dumps(record(N)) + b"\n")
        return result

    monkeypatch.setattr(manifest_module, "_parse", parse_while_another_job_appends)
    manifest_module.cache_file(manifest).unlink(missing_ok=True)
    assert list(read_manifest(manifest)) == [record(i) for i in range(N + 1)]
    assert len(calls) == 2  # the first version was dropped, not cached
    monkeypatch.undo()
    assert read_manifest(manifest).table.equals(read_manifest(manifest, use_cache=False).table)


def test_a_last_line_without_a_newline_means_a_whole_rewrite(manifest: Path) -> None:
    manifest.write_bytes(manifest.read_bytes().rstrip(b"\n"))  # as a hand edit may leave it
    inode = manifest.stat().st_ino
    rewrite(read_manifest(manifest), {}, [record(N)])
    assert manifest.stat().st_ino != inode  # appending in place would glue the new line onto the last one
    assert manifest.read_bytes() == expected_bytes([record(i) for i in range(N + 1)])
