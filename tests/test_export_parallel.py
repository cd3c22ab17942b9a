"""The fast shard writer: tar headers built as bytes (identical to tarfile's), shards written in
parallel processes with the same bytes whatever their number, a lazy bounded task queue, and a
worker that dies mid-shard leaving no half shard under a final name."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import tarfile

import pytest
from helpers_export import build_dataset, tar_bytes

from prep.export import tarwriter
from prep.export.webdataset import export_webdataset
from prep.export.workers import WorkerPool


def _tarfile_header(name: str, size: int) -> bytes:
    """What the previous writer produced: tarfile's GNU header for our fixed member attributes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _tarfile_archive(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return build_dataset(tmp_path_factory.mktemp("parallel_data"), per_bucket=7)


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_baseline") / "shards"
    export_webdataset(data["manifest"], data["derived"], out, shard_size=2, progress_every=0, num_workers=1)
    return out


def test_member_headers_are_tarfiles_bytes():
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-"
    for length in (1, 9, 99, 100, 101, 111, 150, 511, 512, 513, 1000):
        name = "".join(rng.choice(alphabet) for _ in range(length - 4)) + ".npy" if length > 4 else "a.js"
        for size in (0, 1, 511, 512, 513, 8**11 - 1, 8**11, 2**40, 256**11 - 1):
            assert tarwriter.member_header(name, size) == _tarfile_header(name, size), (length, size)
    unicode_name = "é" * 60 + ".json"  # 125 bytes in UTF-8: a GNU long name
    assert tarwriter.member_header(unicode_name, 5) == _tarfile_header(unicode_name, 5)
    with pytest.raises(ValueError, match="overflow"):
        tarwriter.member_header("x.npy", 256**11)


@pytest.mark.parametrize("sizes", [[], [0], [1, 512, 513, 10240, 10239], [7] * 40])
def test_whole_archive_is_tarfiles_bytes(sizes):
    rng = random.Random(len(sizes))
    members = [(f"{'k' * rng.randint(1, 110)}.m{i}", rng.randbytes(size)) for i, size in enumerate(sizes)]
    buf = io.BytesIO()
    stream = tarwriter.TarStream(buf)
    for name, payload in members:
        stream.add(name, payload)
    stream.finish()
    assert buf.getvalue() == _tarfile_archive(members)
    assert stream.nbytes == len(buf.getvalue())
    assert stream.sha.hexdigest() == hashlib.sha256(buf.getvalue()).hexdigest()


def test_exported_shards_are_what_tarfile_would_write(baseline):
    index = json.loads((baseline / "index.json").read_text())
    for entry in index["shards"]:
        data = (baseline / entry["path"]).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        assert data == _tarfile_archive(members), entry["path"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]


@pytest.mark.parametrize("workers", [2, 3])
def test_same_bytes_whatever_the_number_of_processes(data, baseline, tmp_path, workers):
    out = tmp_path / "out"
    s = export_webdataset(data["manifest"], data["derived"], out, shard_size=2, progress_every=0,
                          num_workers=workers)
    assert s.written_samples == 21 and s.new_shards == 12
    assert tar_bytes(out) == tar_bytes(baseline)
    for name in ("index.json", "stats.json", "README.md"):
        assert (out / name).read_bytes() == (baseline / name).read_bytes(), name
    # resume in parallel keeps everything and changes nothing
    s = export_webdataset(data["manifest"], data["derived"], out, shard_size=2, progress_every=0,
                          num_workers=workers, resume=True)
    assert (s.kept_shards, s.new_shards) == (12, 0)
    assert tar_bytes(out) == tar_bytes(baseline)


def test_jobs_are_drawn_lazily_and_bounded():
    drawn = []

    def jobs():
        for i in range(20):
            drawn.append(i)
            yield i, (i,)

    with WorkerPool(2) as pool:
        results = {}
        for tag, value in pool.imap(abs, jobs(), in_flight=3):
            assert len(drawn) - len(results) <= 3  # never more than 3 submitted and not yet collected
            results[tag] = value
    assert results == {i: i for i in range(20)}
    with WorkerPool(1) as pool:  # in-process: each job runs when drawn
        assert sorted(pool.imap(abs, ((i, (-i,)) for i in range(3)))) == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="num-workers"):
        WorkerPool(0)


def test_a_worker_killed_mid_shard_leaves_no_half_shard_and_resume_completes(data, baseline, tmp_path,
                                                                             monkeypatch):
    parent = os.getpid()
    real = tarwriter.sample_members
    calls = {"n": 0}

    def dies_in_a_worker(*args, **kwargs):
        calls["n"] += 1  # counted per process: workers are forked with n = 0
        if os.getpid() != parent and calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-shard: the second shard of this worker
        return real(*args, **kwargs)

    monkeypatch.setattr(tarwriter, "sample_members", dies_in_a_worker)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="worker process died.*--resume"):
        export_webdataset(data["manifest"], data["derived"], out, shard_size=2, progress_every=0, num_workers=2)
    monkeypatch.setattr(tarwriter, "sample_members", real)
    assert not (out / "index.json").exists()
    assert not list(out.rglob("*.prep-tmp"))  # temp files of killed workers are swept
    done = tar_bytes(out)
    assert len(done) < 12
    reference = tar_bytes(baseline)
    for rel, content in done.items():  # any shard with a final name is complete
        assert content == reference[rel], rel
    s = export_webdataset(data["manifest"], data["derived"], out, shard_size=2, progress_every=0,
                          num_workers=2, resume=True)
    assert s.new_shards == 12 - s.kept_shards and s.kept_shards <= len(done)
    assert tar_bytes(out) == reference
    assert (out / "index.json").read_bytes() == (baseline / "index.json").read_bytes()


def test_an_error_in_a_worker_is_raised_as_is_and_leaves_no_temp_file(data, tmp_path, monkeypatch):
    import errno

    parent = os.getpid()
    real = tarwriter.sample_members

    def disk_full_in_a_worker(*args, **kwargs):
        if os.getpid() != parent:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(tarwriter, "sample_members", disk_full_in_a_worker)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left on device"):
        export_webdataset(data["manifest"], data["derived"], out, shard_size=2, progress_every=0, num_workers=2)
    assert not list(out.rglob("*.prep-tmp")) and not list(out.rglob("*.tar"))
    assert not (out / "index.json").exists()


def test_card_options_reach_render_card(data, tmp_path, monkeypatch):
    import prep.export.card as card

    seen = {}
    real = card.render_card

    def render(index, metadata, **options):
        seen.update(options)
        return real(index, metadata)

    monkeypatch.setattr(card, "render_card", render)
    export_webdataset(data["manifest"], data["derived"], tmp_path / "out", progress_every=0, license="cc-by-4.0",
                      pretty_name="Test")
    assert seen == {"license": "cc-by-4.0", "pretty_name": "Test"}


def test_a_misspelt_option_fails_before_any_work(data, tmp_path):
    with pytest.raises(TypeError, match="shard_sise"):
        export_webdataset(data["manifest"], data["derived"], tmp_path / "out", shard_sise=2)
    assert not (tmp_path / "out").exists()


def test_two_exports_at_once_in_one_process_never_mix_their_manifests(data, baseline, tmp_path):
    import threading

    other = build_dataset(tmp_path / "other", per_bucket=3, seed=5)
    alone = tmp_path / "other-alone"
    export_webdataset(other["manifest"], other["derived"], alone, shard_size=2, progress_every=0, num_workers=1)
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    errors = []

    def run(name, source):
        try:
            export_webdataset(source["manifest"], source["derived"], outs[name], shard_size=2, progress_every=0,
                              num_workers=1)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("a", data)), threading.Thread(target=run, args=("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert tar_bytes(outs["a"]) == tar_bytes(baseline) and tar_bytes(outs["b"]) == tar_bytes(alone)


def test_readiness_in_workers_equals_readiness_in_process(monkeypatch, tmp_path):
    from prep.export import readiness as readiness_module
    from prep.manifest import read_manifest

    data = build_dataset(tmp_path / "d", per_bucket=6)
    manifest = read_manifest(data["manifest"])
    alone = readiness_module.readiness(manifest, data["derived"], field_roots=())
    monkeypatch.setattr(readiness_module, "CHUNK", 4)  # 24 records: six chunks, in two workers
    for send in (False, True):
        with WorkerPool(2, shared=None if send else manifest) as pool:
            assert pool.shares_memory is not send
            ready = readiness_module.readiness(manifest, data["derived"], pool=pool, field_roots=())
        assert ready.rows.tolist() == alone.rows.tolist() and ready.codes.tolist() == alone.codes.tolist()
        assert (ready.bucket_names, ready.reasons, ready.not_ready) == (alone.bucket_names, alone.reasons, 5)
        assert ready.fields == alone.fields and ready.fields.records == 18
