"""The dataset card: huggingface_hub DatasetCard data, configs (default `all`), features, licence, model ids;
and `datasets.load_dataset(folder)` without a config name on a real export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_export import SMALL_BUCKETS, build_dataset, side_arrays
from huggingface_hub import DatasetCard
from torch.utils.data import DataLoader

import prep
from prep import store
from prep.export.card import SIZE_CATEGORIES, public_model_id, render_card, size_category
from prep.export.webdataset import export_webdataset

HUB_SIZE_CATEGORIES = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                       "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T"}
CACHE_PATH = ("/home/someone/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-dev/snapshots/"
              "0ef5fff789c832c5c7f4e127f94c8b54bbcced44/vae")
METADATA = {
    "vae": {"latent": "posterior_mean", "transform": "(z - shift_factor) * scaling_factor", "shift_factor": 0.1159,
            "scaling_factor": 0.3611, "model_id": CACHE_PATH, "subfolder": "vae"},
    "models": {
        "vae": {"model_id": CACHE_PATH, "revision": "unknown"},
        "t5": {"model_id": "/data/private/models/my-t5", "revision": "sha256:0123456789abcdef"},
        "dinov3": {"model_id": "facebook/dinov3-vitl16-pretrain-lvd1689m", "revision": "abc123"},
        "caption": {"model_id": "C:\\Users\\me\\models\\gemma-3-4b-it", "revision": "sha256:feedbeef"},
    },
}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("card")
    data = build_dataset(tmp, per_bucket=5, broken=False)
    store.update_metadata(data["derived"], METADATA)
    data["out"] = tmp / "shards"
    export_webdataset(data["manifest"], data["derived"], data["out"], shard_size=2, progress_every=0)
    data["index"] = json.loads((data["out"] / "index.json").read_text())
    return data


def _card(tmp_path: Path, text: str):
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return DatasetCard.load(path).data


def test_card_data_loads_back(export, tmp_path):
    data = _card(tmp_path, (export["out"] / "README.md").read_text())
    assert data.license == "other"
    assert data.size_categories == ["n<1K"]
    assert data.task_categories == ["text-to-image"] and "webdataset" in data.tags
    configs = data.configs
    assert configs[0] == {"config_name": "all", "default": True,
                          "data_files": [{"split": "train", "path": "bucket_*/*.tar"}]}
    assert configs[1:] == [{"config_name": f"bucket_{b}", "data_files": [{"split": "train", "path": f"bucket_{b}/*.tar"}]}
                           for b in sorted(SMALL_BUCKETS)]
    infos = {info["config_name"]: {f["name"]: f for f in info["features"]} for info in data.dataset_info}
    assert set(infos) == {"all", *(f"bucket_{b}" for b in SMALL_BUCKETS)}
    assert infos["bucket_64x128"]["vae.npy"]["dtype"] == {"array3_d": {"shape": [16, 16, 8], "dtype": "float16"}}
    assert infos["all"]["vae.npy"] == {"name": "vae.npy", "list": {"list": {"list": "float16"}}}
    assert infos["all"]["t5h.npy"]["dtype"] == {"array2_d": {"shape": [77, 1024], "dtype": "float16"}}
    assert infos["all"]["dinov3.npy"]["list"] == "float32" and infos["all"]["t5m.npy"]["list"] == "uint8"


def test_license_keyword_and_model_licences(export, tmp_path):
    text = render_card(export["index"], METADATA, license="cc-by-nc-4.0")
    assert _card(tmp_path, text).license == "cc-by-nc-4.0"
    for licence in ("FLUX.1 [dev] Non-Commercial License", "DINOv3 License", "Apache-2.0", "Gemma Terms of Use"):
        assert licence in text


def test_size_categories_are_hub_values():
    labels = [size_category(n) for n in (0, 999, 1000, 9_999, 10**5, 10**6, 10**7, 10**8, 10**9, 10**10, 10**11,
                                         10**12, 10**15)]
    assert set(labels) <= HUB_SIZE_CATEGORIES
    assert labels[:3] == ["n<1K", "n<1K", "1K<n<10K"] and labels[-1] == "n>1T"
    assert {label for _, label in SIZE_CATEGORIES} | {"n>1T"} == HUB_SIZE_CATEGORIES


def test_case11_card_model_ids_never_local_paths(export):
    assert public_model_id(CACHE_PATH) == ("black-forest-labs/FLUX.1-dev", "0ef5fff789c832c5c7f4e127f94c8b54bbcced44")
    assert public_model_id("/data/private/models/my-t5", "sha256:0123") == ("local model 'my-t5'", "sha256:0123")
    assert public_model_id("models/tiny-vae", "sha256:0123")[0] == "local model 'tiny-vae'"
    assert public_model_id("google-t5/t5-large", "abc") == ("google-t5/t5-large", "abc")
    text = (export["out"] / "README.md").read_text()
    for private in ("/home/someone", "/data/private", "C:\\Users", ".cache", "snapshots"):
        assert private not in text
    for shown in ("`black-forest-labs/FLUX.1-dev`", "0ef5fff789c832c5c7f4e127f94c8b54bbcced44",
                  "`local model 'my-t5'` | sha256:0123456789abcdef", "`local model 'gemma-3-4b-it'`",
                  "| `bucket_64x128` | (16, 16, 8) | 5 | 3 |"):
        assert shown in text


def test_load_dataset_without_a_config_name(export, tmp_path):
    from datasets import load_dataset

    ds = load_dataset(str(export["out"]), split="train", cache_dir=str(tmp_path / "c"))  # the default config "all"
    assert len(ds) == 15 and sorted(ds["__key__"]) == sorted(export["ready"])
    assert str(ds.features["vae.npy"]) == "List(List(List(Value('float16'))))"  # stored float16, shapes vary
    row = ds.with_format("numpy")[0]
    expected = side_arrays(export["derived"], row["__key__"])
    np.testing.assert_array_equal(row["vae.npy"], expected["vae"])
    assert row["json"]["aspect_bucket"] in SMALL_BUCKETS
    # datasets' formatters upcast float16 (the card says so); prep.collate restores it exactly
    assert row["vae.npy"].dtype == np.float32
    sampler = prep.BucketBatchSampler(ds, batch_size=2, seed=0)
    batches = list(DataLoader(ds.with_format("numpy"), batch_sampler=sampler, collate_fn=prep.collate))
    assert sum(len(b["image_id"]) for b in batches) == 15
    for batch in batches:
        assert batch["vae"].dtype == torch.float16 and isinstance(batch["aspect_bucket"], str)
        for i, image_id in enumerate(batch["image_id"]):
            np.testing.assert_array_equal(batch["vae"][i].numpy(), side_arrays(export["derived"], image_id)["vae"])

    one = load_dataset(str(export["out"]), name="bucket_64x128", split="train", cache_dir=str(tmp_path / "c"))
    assert str(one.features["vae.npy"]) == "Array3D(shape=(16, 16, 8), dtype='float16')"
    assert one.with_format("numpy")[0:2]["vae.npy"].shape == (2, 16, 16, 8)
    half = one.with_format("torch", columns=["vae.npy", "t5h.npy"], dtype=torch.float16, output_all_columns=True)
    assert half[0]["vae.npy"].dtype == torch.float16  # the card's one-line fix


def test_typed_json_when_types_are_known(export, tmp_path):
    from datasets import load_dataset

    index = dict(export["index"], json_types={"score": "float", "source": "str"})
    text = render_card(index, METADATA)
    assert "declared as `Json()`" not in text
    folder = tmp_path / "typed"
    shutil.copytree(export["out"], folder)
    (folder / "README.md").write_text(text)
    ds = load_dataset(str(folder), name="bucket_64x64", split="train", cache_dir=str(tmp_path / "c"))
    assert ds.features["json"]["score"].dtype == "float64" and ds[0]["json"]["source"] == "unit-test"
    untyped = render_card({k: v for k, v in export["index"].items() if k != "json_field_types"}, METADATA)
    assert "declared as `Json()`" in untyped


def test_empty_export_card(tmp_path):
    text = render_card({"samples": 0, "buckets": {}, "shards": []})
    data = _card(tmp_path, text)
    assert not data.to_dict().get("configs") and not data.to_dict().get("dataset_info")
    assert data.size_categories == ["n<1K"] and "declared as `Json()`" not in text
