"""prep.load_shards: decoding, batching per bucket, safe tar reading, Hub URLs, rank/worker splitting."""

from __future__ import annotations

import collections
import gzip
import io
import json
import logging
import shutil
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_export import SMALL_BUCKETS, build_dataset, side_arrays

import prep
from prep import shards
from prep.export.webdataset import export_webdataset
from prep.shards import ShardError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("shards")
    data = build_dataset(tmp, per_bucket=5)
    data["out"] = tmp / "shards"
    # 5 samples per bucket in shards of 2 -> 2 + 2 + 1 per bucket, 9 shards, 15 samples
    export_webdataset(data["manifest"], data["derived"], data["out"], shard_size=2, progress_every=0)
    return data


# ------------------------------------------------------------------------ decoding
def test_load_shards_samples(data):
    samples = list(prep.load_shards(data["out"], bucket="64x128"))
    assert [s["key"] for s in samples] == [f"img_{i:04d}" for i in range(5, 10)]
    by_id = {r["image_id"]: r for r in data["records"]}
    for s in samples:
        expected = side_arrays(data["derived"], s["key"])
        for name in ("dinov3", "vae", "t5_hidden"):
            assert s[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(s[name], expected[name])
        assert s["vae"].flags.writeable  # torch.from_numpy takes it without a warning
        assert s["t5_mask"].dtype == np.uint8
        assert s["t5_mask"].tolist() == by_id[s["key"]]["t5_attention_mask"]
        assert s["json"]["aspect_bucket"] == "64x128"


@pytest.mark.parametrize("interleave", [False, True])
def test_load_shards_batches_never_mix_buckets(data, interleave):
    loader = prep.load_shards(data["out"], batch_size=2, shuffle=True, seed=3, shuffle_buffer=4, interleave=interleave)
    assert loader.buckets == sorted(SMALL_BUCKETS)
    keys, seen_buckets = [], []
    for batch in loader:
        buckets = {j["aspect_bucket"] for j in batch["json"]}
        assert len(buckets) == 1
        bucket = buckets.pop()
        seen_buckets.append(bucket)
        width, height = (int(v) for v in bucket.split("x"))
        assert batch["vae"].shape[1:] == (16, height // 8, width // 8) and batch["vae"].dtype == np.float16
        assert batch["t5_hidden"].shape[1:] == (77, 1024) and batch["dinov3"].shape[1:] == (1024,)
        assert len(batch["key"]) <= 2
        keys += batch["key"]
    assert sorted(keys) == sorted(data["ready"])
    runs = [b for i, b in enumerate(seen_buckets) if i == 0 or seen_buckets[i - 1] != b]
    if not interleave:
        assert len(runs) == 3  # one bucket after another
    # seeded: a fresh loader with the same seed gives the same order
    again = [k for b in prep.load_shards(data["out"], batch_size=2, shuffle=True, seed=3, shuffle_buffer=4,
                                         interleave=interleave) for k in b["key"]]
    assert again == keys
    dropped = list(prep.load_shards(data["out"], bucket="64x64", batch_size=2, drop_last=True))
    assert [len(b["key"]) for b in dropped] == [2, 2]


# ----------------------------------------------------------------- tar building helpers
def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _sample_members(key: str = "k", bucket: str = "64x64") -> dict[str, bytes]:
    width, height = (int(v) for v in bucket.split("x"))
    return {
        f"{key}.json": json.dumps({"image_id": key, "aspect_bucket": bucket}).encode(),
        f"{key}.dinov3.npy": _npy(np.zeros(1024, np.float32)),
        f"{key}.vae.npy": _npy(np.ones((16, height // 8, width // 8), np.float16)),
        f"{key}.t5h.npy": _npy(np.zeros((77, 1024), np.float16)),
        f"{key}.t5m.npy": _npy(np.ones(77, np.uint8)),
    }


def _write_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = (), mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for info in extra:
            tar.addfile(info)
    return path


def _one_shard(tmp_path: Path, members: dict[str, bytes], **kw) -> Path:
    _write_tar(tmp_path / "bucket_64x64" / "shard-000000.tar", members, **kw)
    return tmp_path


# ---------------------------------------------------------------- safe tar reading
@pytest.mark.parametrize("name", ["../evil.json", "/etc/evil.json", "a/../../evil.json"])
def test_member_name_check(tmp_path, name):
    with pytest.raises(ValueError, match="unsafe tar member name"):
        shards.check_member_name(name)
    _one_shard(tmp_path, {"ok.json": b"{}", name: b"{}"})
    with pytest.raises(ValueError, match="unsafe tar member name"):
        list(prep.load_shards(tmp_path))


def test_pickled_npy_member_refused(tmp_path):
    members = _sample_members()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members["k.dinov3.npy"] = buf.getvalue()
    with pytest.raises(ValueError, match="not a plain .npy.*pickle is never used"):
        list(prep.load_shards(_one_shard(tmp_path, members)))


def test_old_loading_names_still_import():
    from prep import loading

    assert loading.load_shards is shards.load_shards and loading.check_member_name is shards.check_member_name
    from prep.shards import load_shards  # noqa: F401 - the new home

    assert prep.load_shards is shards.load_shards


def _gzip_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst


def test_case7_compressed_shard_refused_unless_allowed(data, tmp_path):
    src = data["out"] / "bucket_64x64" / "shard-000000.tar"
    _gzip_copy(src, tmp_path / "bucket_64x64" / "shard-000000.tar")
    with pytest.raises(ShardError, match=r"shard-000000.tar is gz-compressed.*allow_compressed=True"):
        list(prep.load_shards(tmp_path))
    keys = [s["key"] for s in prep.load_shards(tmp_path, allow_compressed=True)]
    assert keys == [s["key"] for s in prep.load_shards(src)]


def _huge_zero_member_tar(path: Path, member_size: int, compress: bool) -> Path:
    """A shard whose vae member is `member_size` zero bytes after a valid .npy header (gzip: a bomb)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": (0,)})
    members = _sample_members()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            if name.endswith(".vae.npy"):
                info.size = member_size
                tar.addfile(info, io.BytesIO(header.getvalue() + bytes(member_size - len(header.getvalue()))))
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_case7_member_size_capped_from_header_before_reading(tmp_path, monkeypatch):
    # a gzip bomb: 8 MiB of zeros in a few KB; with the compression allowed, the cap still applies
    shard = _huge_zero_member_tar(tmp_path / "bucket_64x64" / "shard-000000.tar", 8 << 20, compress=True)
    assert shard.stat().st_size < 64 << 10
    reads = []
    real = shards._read_exact
    monkeypatch.setattr(shards, "_read_exact", lambda f, size, where: reads.append(size) or real(f, size, where))
    with pytest.raises(ShardError, match=r"shard-000000.tar member 'k.vae.npy' is 8388608 bytes, over "
                                         r"max_member_bytes=1048576"):
        list(prep.load_shards(tmp_path, allow_compressed=True, max_member_bytes=1 << 20))
    assert max(reads) < 1 << 20  # the big member itself was never read


def test_member_size_cap_uses_the_header(tmp_path):
    """A header claiming 1 GiB with no payload behind it: refused by size, not by reading to the end."""
    path = tmp_path / "bucket_64x64" / "shard-000000.tar"
    members = _sample_members()
    del members["k.vae.npy"]
    _write_tar(path, members)
    info = tarfile.TarInfo("k.vae.npy")
    info.size = 1 << 30
    data = path.read_bytes().rstrip(b"\0")  # drop the end-of-archive blocks
    data += bytes(-len(data) % 512) + info.tobuf(format=tarfile.GNU_FORMAT)
    path.write_bytes(data)
    with pytest.raises(ShardError, match=r"member 'k.vae.npy' is 1073741824 bytes, over max_member_bytes=67108864"):
        list(prep.load_shards(tmp_path))


def test_npy_header_must_match_payload_size(tmp_path):
    members = _sample_members()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f2", "fortran_order": False, "shape": (16, 100_000, 100_000)}
    )
    members["k.vae.npy"] = header.getvalue() + bytes(4096)  # a 4 KB member claiming 320 GB
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(ShardError, match=r"claims shape \(16, 100000, 100000\) of float16 \(320000000000 bytes\)"
                                             r" but the member holds 4096 bytes"):
            list(prep.load_shards(_one_shard(tmp_path, members)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and time.perf_counter() - started < 5


@pytest.mark.parametrize("payload, match", [
    (b"\x93NUMPY\x01\x00", "not a plain .npy"),  # truncated header
    (b"not an npy at all", "not a plain .npy"),
    (_npy(np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])), "not a plain number type"),
    (_npy(np.array(["abc"])), "not a plain number type"),
])
def test_malformed_npy_members(tmp_path, payload, match):
    members = _sample_members()
    members["k.t5h.npy"] = payload
    with pytest.raises(ShardError, match=match):
        list(prep.load_shards(_one_shard(tmp_path, members)))


def test_decode_npy_orders_and_writable():
    a = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    out = shards.decode_npy(bytearray(_npy(a)), "x")
    np.testing.assert_array_equal(out, a)
    assert out.flags.writeable
    big_endian = np.arange(5, dtype=">f2")
    np.testing.assert_array_equal(shards.decode_npy(_npy(big_endian), "x"), big_endian)


def _special(name: str, kind: bytes, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize("info, what", [
    (_special("k.vae.npy", tarfile.SYMTYPE, linkname="/etc/passwd"), "a symbolic link"),
    (_special("k.vae.npy", tarfile.LNKTYPE, linkname="k.dinov3.npy"), "a hard link"),
    (_special("k.vae.npy", tarfile.CHRTYPE, devmajor=1, devminor=3), "a device"),
    (_special("k.vae.npy", tarfile.FIFOTYPE), "a FIFO"),
    (_special("somedir", tarfile.DIRTYPE), "a directory"),
])
def test_non_regular_members_refused(tmp_path, info, what):
    members = _sample_members()
    del members["k.vae.npy"]
    with pytest.raises(ShardError, match=f"member '{info.name}' is {what}, not a regular file"):
        list(prep.load_shards(_one_shard(tmp_path, members, extra=[info])))


def test_truncated_tar_and_duplicates_and_missing(tmp_path):
    src = _write_tar(tmp_path / "full.tar", _sample_members())
    cut = tmp_path / "cut" / "bucket_64x64" / "shard-000000.tar"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(src.read_bytes()[:60_000])
    with pytest.raises(ShardError, match="truncated|not a readable tar"):
        list(prep.load_shards(cut))
    members = _sample_members()
    with tarfile.open(_write_tar(tmp_path / "dup" / "bucket_64x64" / "shard-000000.tar", members), "a") as tar:
        info = tarfile.TarInfo("k.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ShardError, match="duplicate member 'json'"):
        list(prep.load_shards(tmp_path / "dup"))
    members = _sample_members()
    del members["k.t5m.npy"]
    with pytest.raises(ShardError, match="lacks member.*t5m.npy"):
        list(prep.load_shards(_one_shard(tmp_path / "missing", members)))


def test_vae_shape_must_match_the_bucket(tmp_path):
    members = _sample_members(bucket="64x128")  # latent (16, 16, 8) in the 64x64 folder
    with pytest.raises(ShardError, match=r"vae shape \(16, 16, 8\) does not match its bucket 64x64"):
        list(prep.load_shards(_one_shard(tmp_path, members)))


def test_unknown_members_are_skipped_unread(tmp_path):
    members = {"README": b"hello", **_sample_members(), "k.extra.bin": bytes(2 << 20)}
    samples = list(prep.load_shards(_one_shard(tmp_path, members), max_member_bytes=1 << 20))
    assert [s["key"] for s in samples] == ["k"] and set(samples[0]) == {
        "key", "json", "dinov3", "vae", "t5_hidden", "t5_mask"}


def test_decode_sample_raw_bytes():
    members = {k.split(".", 1)[1]: v for k, v in _sample_members().items()}
    sample = shards.decode_sample({"__key__": "k", "__url__": "u", **members})
    assert sample["vae"].shape == (16, 8, 8) and sample["json"]["image_id"] == "k"
    with pytest.raises(ShardError, match="lacks member"):
        shards.decode_sample({"__key__": "k", "json": b"{}"})


def test_case8_index_json_errors_are_clear(data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data["out"], copy)
    index = json.loads((copy / "index.json").read_text())
    del index["shards"][1]["path"]
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"index.json: shards\[1\] has no 'path'"):
        prep.load_shards(copy)
    (copy / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match="index.json: not readable JSON"):
        prep.load_shards(copy)
    index["shards"][1]["path"] = "../../etc/passwd"
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"shards\[1\] 'path': unsafe tar member name"):
        prep.load_shards(copy)


# ------------------------------------------------------------------------ Hub URLs
class FakeHfFileSystem:
    """Stands in for huggingface_hub.HfFileSystem: glob over a local export, open by hf:// URL.

    Only the URL resolution and the opener are tested this way; the real Hub is unreachable here.
    """

    def __init__(self, root: Path, repo: str, index: bool = True):
        self.root, self.repo, self.index, self.globbed, self.opened = root, repo, index, [], []

    def glob(self, pattern: str) -> list[str]:
        self.globbed.append(pattern)
        prefix = pattern.split("/bucket_")[0]
        return [f"{prefix}/{p.relative_to(self.root).as_posix()}" for p in sorted(self.root.rglob("*.tar"))]

    def open(self, url: str, mode: str = "rb"):
        self.opened.append(url)
        relative = url.split("/", 5)[5]  # hf://datasets/OWNER/NAME[@rev]/...
        if relative == "index.json" and not self.index:
            raise FileNotFoundError(url)
        return open(self.root / relative, mode)  # noqa: SIM115


def test_hub_id_resolution_with_fake_fs(data):
    fs = FakeHfFileSystem(data["out"], "me/data")
    urls = shards.resolve_shards("me/data", revision="refs/pr/1", fs=fs)
    assert fs.opened == ["hf://datasets/me/data@refs%2Fpr%2F1/index.json"] and fs.globbed == []
    assert urls["64x64"] == [f"hf://datasets/me/data@refs%2Fpr%2F1/bucket_64x64/shard-{i:06d}.tar" for i in range(3)]
    fs = FakeHfFileSystem(data["out"], "me/data")
    loader = prep.load_shards("hf://datasets/me/data", bucket="bucket_128x64", fs=fs)
    assert loader.urls == {"128x64": [f"hf://datasets/me/data/bucket_128x64/shard-{i:06d}.tar" for i in range(3)]}
    assert [s.samples for s in loader.shards] == [2, 2, 1]  # counts from index.json
    assert [s["key"] for s in loader] == [f"img_{i:04d}" for i in range(10, 15)]
    assert len(fs.opened) == 1 + 3


def test_hub_without_index_globs(data):
    fs = FakeHfFileSystem(data["out"], "me/data", index=False)
    urls = shards.resolve_shards("me/data", revision="refs/pr/1", fs=fs)
    assert fs.globbed == ["datasets/me/data@refs%2Fpr%2F1/bucket_*/*.tar"]
    assert urls["64x64"] == [f"hf://datasets/me/data@refs%2Fpr%2F1/bucket_64x64/shard-{i:06d}.tar" for i in range(3)]


def test_resolve_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError):
        shards.resolve_shards(str(tmp_path / "not" / "a" / "hub id"))
    with pytest.raises(ValueError, match="no shards for bucket"):
        shards.resolve_shards(data["out"], "1024x1024")
    with pytest.raises(FileNotFoundError, match="no shards"):
        shards.resolve_shards(tmp_path)
    # a bucket folder and a single tar also work
    assert list(shards.resolve_shards(data["out"] / "bucket_64x64")) == ["64x64"]
    assert shards.resolve_shards(data["out"] / "bucket_64x64" / "shard-000000.tar")["64x64"][0].endswith(".tar")


# ------------------------------------------------------------- ranks and workers
def _run_rank(source, rank: int, world: int, monkeypatch, num_workers: int = 2, epoch: int | None = None, **kw):
    """One simulated rank: RANK / WORLD_SIZE in the environment, a DataLoader with worker processes."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    ds = prep.load_shards(source, **kw)
    assert (ds.rank, ds.world_size) == ((rank, world) if kw.get("split", True) else (0, 1))
    if epoch is not None:
        ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    return ds, list(loader)


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_two_workers_split_evenly(data, monkeypatch, epoch):
    kw = dict(batch_size=2, shuffle=True, seed=5, shuffle_buffer=3)
    counts, keys = [], collections.Counter()
    for rank in range(2):
        ds, batches = _run_rank(data["out"], rank, 2, monkeypatch, epoch=epoch, **kw)
        counts.append(len(batches))
        assert len(batches) == ds.batches_per_rank(num_workers=2)
        for batch in batches:
            assert len({j["aspect_bucket"] for j in batch["json"]}) == 1  # never mixes buckets
            assert isinstance(batch["vae"], torch.Tensor) and batch["vae"].dtype == torch.float16
            keys.update(batch["key"])
    assert counts[0] == counts[1]  # even epochs: no rank waits at a collective
    assert set(keys) == set(data["ready"])  # every sample at least once ...
    repeated = sum(keys.values()) - len(data["ready"])
    assert repeated <= 2 * 2 * 2  # ... and only padding repeats (at most a batch per worker here)
    # the same split without workers: same counts
    assert [len(list(prep.load_shards(data["out"], rank=r, world_size=2, **kw))) for r in range(2)] == [
        prep.load_shards(data["out"], rank=0, world_size=2, **kw).batches_per_rank(0)
    ] * 2


def test_split_is_exact_when_it_divides(data, monkeypatch):
    # 15 samples, unbatched, 3 ranks: 5 samples each, every sample exactly once
    keys = collections.Counter()
    for rank in range(3):
        _, samples = _run_rank(data["out"], rank, 3, monkeypatch, num_workers=0)
        assert len(samples) == 5
        keys.update(s["key"] for s in samples)
    assert keys == collections.Counter(data["ready"])


def test_unsplit_ranks_see_everything_once(data, monkeypatch):
    for rank in range(2):
        _, batches = _run_rank(data["out"], rank, 2, monkeypatch, split=False, batch_size=2)
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == sorted(data["ready"])  # workers still share the shards out


def test_uneven_without_even_batches(data):
    counts = [len(list(prep.load_shards(data["out"], rank=r, world_size=4, batch_size=4, even_batches=False)))
              for r in range(4)]
    assert sum(counts) == 2 * 3 or len(set(counts)) > 1  # no padding: counts may differ
    keys = [k for r in range(4)
            for b in prep.load_shards(data["out"], rank=r, world_size=4, batch_size=4, even_batches=False)
            for k in b["key"]]
    assert sorted(keys) == sorted(data["ready"])


def test_even_epochs_without_index_and_with_a_wrong_index(data, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(data["out"], bare)
    (bare / "index.json").unlink()
    ds = prep.load_shards(bare, rank=0, world_size=2, batch_size=2)
    assert [s.samples for s in ds.shards] == [2, 2, 1] * 3  # counted from the tar headers
    wrong = tmp_path / "wrong"
    shutil.copytree(data["out"], wrong)
    index = json.loads((wrong / "index.json").read_text())
    index["shards"][0]["samples"] = 9  # lies: the shard holds 2
    (wrong / "index.json").write_text(json.dumps(index))
    caplog.set_level(logging.WARNING)
    counts = [len(list(prep.load_shards(wrong, rank=r, world_size=2, batch_size=2))) for r in range(2)]
    assert counts[0] == counts[1]  # still even: the short rank pads


def test_rank_from_torch_distributed(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert shards.resolve_rank_world() == (3, 4)
    assert shards.resolve_rank_world(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="bad rank 4"):
        shards.resolve_rank_world(4, 4)


def test_plan_covers_every_shard_once():
    refs = [shards.ShardRef(b, f"{b}/{i}", n) for b, counts in (("64x64", [3, 3, 1]), ("64x128", [3, 2]))
            for i, n in enumerate(counts)]
    for world, workers in ((1, 1), (2, 2), (3, 2), (4, 3)):
        plans = [shards.plan_epoch(refs, epoch=1, seed=0, shuffle=True, interleave=False, rank=r, world_size=world,
                                   worker=w, num_workers=workers, batch_size=2, drop_last=False, even=True)
                 for r in range(world) for w in range(workers)]
        assert sorted(s.url for p in plans for s in p.shards) == sorted(s.url for s in refs)
        if world > 1:
            per_rank = [sum(p.quota for p in plans[r * workers:(r + 1) * workers]) for r in range(world)]
            assert len(set(per_rank)) == 1


def test_padding_with_drop_last_when_a_rank_has_no_full_batch(data):
    # batch 4, drop_last: each bucket has 5 samples in shards of 2, 2, 1; some ranks hold no 4 of one bucket
    kw = dict(batch_size=4, drop_last=True, shuffle=True, seed=2)
    for world in (2, 3, 4):
        counts = [len(list(prep.load_shards(data["out"], rank=r, world_size=world, **kw))) for r in range(world)]
        assert len(set(counts)) == 1  # even, and no rank fails to pad
        assert counts[0] >= (1 if world < 4 else 0)  # 4 ranks: no rank holds 4 samples of one bucket
