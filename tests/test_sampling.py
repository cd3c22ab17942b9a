"""prep.BucketBatchSampler and prep.collate, and the README's training loop run as written."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_export import SMALL_BUCKETS, build_dataset, side_arrays
from torch.utils.data import ConcatDataset, DataLoader

import prep
from prep import store

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    # laid out as the README's snippets expect: data/manifest.jsonl, data/derived
    root = tmp_path_factory.mktemp("sampling")
    data = build_dataset(root / "data", per_bucket=5)
    write_uncond_state(data["derived"])
    data["root"] = root
    data["ds"] = prep.load_manifest(data["manifest"], data["derived"], ready_only=True)
    return data


def write_uncond_state(derived) -> None:
    """The empty caption's T5 state as the T5 pass leaves it (random values: the fixture has no T5)."""
    from safetensors.numpy import save

    from prep.fsio import atomic_write_bytes
    from prep.provenance import bytes_sha256
    from prep.stages.t5 import UNCOND_FILE

    rng = np.random.default_rng(3)
    mask = np.zeros(77, dtype=np.uint8)
    mask[0] = 1  # "" is the end-of-sequence token alone
    payload = save({"t5_hidden": rng.standard_normal((77, 1024)).astype(np.float16), "t5_mask": mask})
    atomic_write_bytes(derived / UNCOND_FILE, payload)
    store.update_metadata(derived, {"uncond": {"path": UNCOND_FILE, "sha256": bytes_sha256(payload), "caption": ""}})


def _bucket_of(ds, index: int) -> str:
    return ds.with_format(None)[index]["aspect_bucket"]


def test_plain_dataloader_fails_and_collate_says_why(data):
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        for _ in DataLoader(data["ds"], batch_size=14):
            pass
    rows = [data["ds"][0], data["ds"][5]]  # 64x64 and 64x128
    with pytest.raises(ValueError, match="batch mixes vae shapes.*BucketBatchSampler"):
        prep.collate(rows)


def test_batches_one_bucket_each_and_every_row_once(data, monkeypatch):
    ds = data["ds"]
    calls = []
    real = store.load_npy
    monkeypatch.setattr(store, "load_npy", lambda path: calls.append(path) or real(path))
    sampler = prep.BucketBatchSampler(ds, batch_size=2, seed=1)
    assert calls == []  # only the bucket column was read
    assert sampler.buckets == sorted(SMALL_BUCKETS) and len(sampler) == 3 * 3
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for batch in batches:
        assert len({_bucket_of(ds, i) for i in batch}) == 1
    # seeded, reshuffled per epoch
    assert list(prep.BucketBatchSampler(ds, batch_size=2, seed=1)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    unshuffled = list(prep.BucketBatchSampler(ds, batch_size=2, shuffle=False))
    assert unshuffled[0] == [10, 11]  # buckets in sorted order: 128x64 first
    dropped = prep.BucketBatchSampler(ds, batch_size=2, drop_last=True)
    assert len(dropped) == 6 and all(len(b) == 2 for b in dropped)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_get_equal_batch_counts(data, world):
    ds = data["ds"]
    per_rank = [list(prep.BucketBatchSampler(ds, batch_size=2, seed=0, num_replicas=world, rank=r))
                for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert len(per_rank[0]) == len(prep.BucketBatchSampler(ds, batch_size=2, num_replicas=world, rank=0))
    seen = collections.Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(len(ds)))  # every row ...
    repeated_batches = sum(len(b) for b in per_rank) - 9
    assert 0 <= repeated_batches < world  # ... and at most world - 1 repeated batches
    uneven = [len(prep.BucketBatchSampler(ds, batch_size=2, num_replicas=world, rank=r, even_batches=False))
              for r in range(world)]
    assert sum(uneven) == 9


def test_rank_from_environment(data, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sampler = prep.BucketBatchSampler(data["ds"], batch_size=2, seed=0)
    assert (sampler.rank, sampler.num_replicas) == (1, 2)
    everything = prep.BucketBatchSampler(data["ds"], batch_size=2, seed=0, num_replicas=1, rank=0).epoch_batches()
    padded = everything + everything[:1]  # 9 batches -> 10, the first one repeated
    assert list(sampler) == padded[1::2]


def test_collate_types_and_values(data):
    ds = data["ds"]
    sampler = prep.BucketBatchSampler(ds, batch_size=3, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=prep.collate)
    batch = next(iter(loader))
    assert batch["vae"].dtype == torch.float16 and batch["vae"].shape == (3, 16, 8, 16)
    assert batch["t5_hidden"].dtype == torch.float16 and batch["t5_hidden"].shape == (3, 77, 1024)
    assert batch["dinov3"].dtype == torch.float32 and batch["t5_mask"].dtype == torch.bool
    assert batch["aspect_bucket"] == "128x64" and len(batch["caption"]) == 3
    by_id = {r["image_id"]: r for r in data["records"]}
    for i, image_id in enumerate(batch["image_id"]):
        expected = side_arrays(data["derived"], image_id)
        np.testing.assert_array_equal(batch["vae"][i].numpy(), expected["vae"])
        np.testing.assert_array_equal(batch["t5_hidden"][i].numpy(), expected["t5_hidden"])
        assert batch["t5_mask"][i].tolist() == [bool(v) for v in by_id[image_id]["t5_attention_mask"]]
    # rows as datasets' numpy format gives them (float16 upcast to float32): cast back exactly
    rows = [{"vae.npy": r["vae"].astype(np.float32), "t5h.npy": r["t5_hidden"].astype(np.float32),
             "t5m.npy": np.asarray(r["t5_attention_mask"], np.int64), "dinov3.npy": r["dinov3"],
             "__key__": r["image_id"], "json": {"caption": r["caption"], "aspect_bucket": r["aspect_bucket"]}}
            for r in (ds[0], ds[1])]
    again = prep.collate(rows)
    assert again["vae"].dtype == torch.float16 and again["image_id"] == [ds[0]["image_id"], ds[1]["image_id"]]
    np.testing.assert_array_equal(again["vae"][0].numpy(), ds[0]["vae"])


def test_collate_missing_array_is_clear(data):
    ds = prep.load_manifest(data["manifest"], data["derived"])  # not ready_only: has a missing latent
    row = next(r for r in ds if r["image_id"] == "bad_missing")
    with pytest.raises(ValueError, match="'bad_missing' has no vae array.*ready_only=True"):
        prep.collate([row])


def test_buckets_argument_and_concat(data):
    labels = ["64x64", "bucket_64x128", "64x64", "64x128", "64x64"]
    sampler = prep.BucketBatchSampler(buckets=labels, batch_size=2, shuffle=False)
    assert list(sampler) == [[1, 3], [0, 2], [4]]
    ds = data["ds"]
    halves = ConcatDataset([ds.select(range(0, 7)), ds.select(range(7, len(ds)))])
    batches = list(prep.BucketBatchSampler(halves, batch_size=2, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for batch in batches:
        assert len({halves[i]["aspect_bucket"] for i in batch}) == 1
    with pytest.raises(TypeError, match="buckets="):
        prep.BucketBatchSampler([1, 2, 3], batch_size=2)


def _snippet(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- tested-snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no tested snippet {name!r}"
    return match.group(1)


def test_readme_training_loop(data, monkeypatch):
    """Runs the README's training loop exactly as written (paths data/... under a temp dir)."""
    code = _snippet("training-loop")
    monkeypatch.chdir(data["root"])
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    loss = namespace["loss"]
    assert torch.isfinite(loss) and loss.requires_grad
    batch = namespace["batch"]
    assert batch["vae"].dtype == torch.float16 and batch["t5_mask"].dtype == torch.bool
    assert namespace["optimizer"].state  # one optimiser step was taken
