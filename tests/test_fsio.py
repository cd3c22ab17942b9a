"""Atomic writes: the old file survives any crash, temp files are recognisable and swept."""

from __future__ import annotations

import os
import stat

import pytest

from prep import fsio
from prep.fsio import TMP_MARK, atomic_open, atomic_write_bytes, atomic_write_text, sweep_temp_files


def _temp_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(TMP_MARK))


def test_atomic_write_bytes_creates_and_replaces(tmp_path):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"\x00\x01first")
    assert target.read_bytes() == b"\x00\x01first"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_atomic_write_text_is_utf8_with_unix_newlines(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "zeile 1\nÜber – 日本語 🐱\n")
    assert target.read_bytes() == "zeile 1\nÜber – 日本語 🐱\n".encode()


def test_atomic_write_text_keeps_surrogate_escaped_bytes(tmp_path):
    raw = b"caf\xe9\n"  # Latin-1, not UTF-8: read with surrogateescape, written back byte for byte
    target = tmp_path / "latin.txt"
    atomic_write_text(target, raw.decode("utf-8", "surrogateescape"))
    assert target.read_bytes() == raw


@pytest.mark.parametrize("writer", [atomic_write_bytes, atomic_write_text])
def test_crash_at_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, writer):
    target = tmp_path / "keep.txt"
    target.write_bytes(b"old content\n")

    def boom(src, dst):
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(os, "replace", boom)
    payload = b"new content" if writer is atomic_write_bytes else "new content"
    with pytest.raises(OSError, match="simulated crash"):
        writer(target, payload)
    assert target.read_bytes() == b"old content\n"
    assert _temp_files(tmp_path) == []


def test_crash_mid_write_keeps_old_file(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_bytes(b"old content\n")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_open(target, "w") as f:
        f.write("half of the new")
        raise RuntimeError("mid-write")
    assert target.read_bytes() == b"old content\n"
    assert _temp_files(tmp_path) == []


def test_crash_at_fsync_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert _temp_files(tmp_path) == []


def test_temp_file_sits_beside_target_with_marker(tmp_path):
    target = tmp_path / "manifest.jsonl"
    with atomic_open(target, "wb") as f:
        temps = _temp_files(tmp_path)
        assert len(temps) == 1
        assert temps[0].startswith(".manifest.jsonl.")
        assert os.path.samefile(os.path.join(tmp_path, temps[0]), f.name)
        assert not target.exists()  # nothing visible under the real name until the rename
        f.write(b"x")
    assert target.read_bytes() == b"x"
    assert _temp_files(tmp_path) == []


def test_new_file_gets_normal_permissions(tmp_path):
    """mkstemp makes 0600 files; the renamed result must be readable like any file open() creates."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write_text(atomic, "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_rewrite_keeps_existing_permissions(tmp_path):
    target = tmp_path / "shared.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_sweep_removes_only_temp_files_in_that_directory(tmp_path):
    (tmp_path / ".manifest.jsonl.abc123.prep-tmp").write_text("torn")
    (tmp_path / "x.npy.prep-tmp").write_bytes(b"torn")
    (tmp_path / "keep.npy").write_bytes(b"keep")
    (tmp_path / "prep-tmp.txt").write_text("keep")  # mark not at the end
    (tmp_path / "dir.prep-tmp").mkdir()  # a directory is never removed
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "deep.prep-tmp").write_text("not recursive")
    assert sweep_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.prep-tmp", "keep.npy", "prep-tmp.txt", "sub"]
    assert (sub / "deep.prep-tmp").exists()
    assert sweep_temp_files(tmp_path) == 0


def test_sweep_missing_directory_is_zero(tmp_path):
    assert sweep_temp_files(tmp_path / "nope") == 0
    (tmp_path / "file").write_text("x")
    assert sweep_temp_files(tmp_path / "file") == 0


def test_sweep_cleans_what_a_killed_write_left(tmp_path, monkeypatch):
    """A kill between the write and the rename leaves a temp file: the next sweep removes it."""
    target = tmp_path / "m.jsonl"
    target.write_text("old\n")
    # Simulate SIGKILL: the cleanup in atomic_open never runs, so disable unlink while it raises.
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(os, "unlink", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert len(_temp_files(tmp_path)) == 1
    assert target.read_text() == "old\n"
    assert fsio.sweep_temp_files(tmp_path) == 1
    assert _temp_files(tmp_path) == []
