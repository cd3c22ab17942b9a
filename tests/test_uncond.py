"""prep.load_uncond: the empty-caption T5 state an export names in index.json ("uncond")."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers_export import build_dataset
from safetensors.numpy import save

import prep
from prep.export.webdataset import export_webdataset
from prep.shards import ShardError


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros(77, np.uint8)
    mask[0] = 1  # "</s>" only: the empty caption
    return {"t5_hidden": rng.standard_normal((77, 1024)).astype(np.float16), "t5_mask": mask}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uncond")
    data = build_dataset(tmp, per_bucket=1, broken=False)
    out = tmp / "shards"
    export_webdataset(data["manifest"], data["derived"], out, shard_size=1, progress_every=0)
    return out


def _with_uncond(export: Path, tmp_path: Path, entry, payload: bytes | None = None, name: str = "uncond/t5_empty.safetensors"):
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    if payload is not None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(payload)
    index = json.loads((folder / "index.json").read_text())
    index["uncond"] = entry
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def test_load_uncond_from_index(export, tmp_path):
    state = _state()
    payload = save(state)
    folder = _with_uncond(export, tmp_path, {"path": "uncond/t5_empty.safetensors", "caption": "",
                                             "sha256": hashlib.sha256(payload).hexdigest()}, payload)
    loaded = prep.load_uncond(folder)
    assert loaded["t5_hidden"].dtype == np.float16 and loaded["t5_hidden"].shape == (77, 1024)
    assert loaded["t5_mask"].dtype == np.uint8 and loaded["t5_mask"].shape == (77,)
    np.testing.assert_array_equal(loaded["t5_hidden"], state["t5_hidden"])
    np.testing.assert_array_equal(loaded["t5_mask"], state["t5_mask"])
    assert loaded["caption"] == ""
    shards = prep.load_shards(folder, uncond=True)
    np.testing.assert_array_equal(shards.uncond["t5_hidden"], state["t5_hidden"])
    assert prep.load_shards(folder).uncond is None
    # the file itself, and a bare relative path in index.json
    np.testing.assert_array_equal(prep.load_uncond(folder / "uncond" / "t5_empty.safetensors")["t5_mask"],
                                  state["t5_mask"])


def test_load_uncond_npz_and_derived_dir(tmp_path):
    state = _state(1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:  # what np.savez writes, without going through np.load
        for key, value in state.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, value, allow_pickle=False)
            archive.writestr(f"{key}.npy", member.getvalue())
    (tmp_path / "uncond.npz").write_bytes(buf.getvalue())
    (tmp_path / "prep_metadata.json").write_text(json.dumps({"uncond": "uncond.npz"}))
    np.testing.assert_array_equal(prep.load_uncond(tmp_path)["t5_hidden"], state["t5_hidden"])


def test_load_uncond_from_hub_with_fake_fs(export, tmp_path):
    from test_shards import FakeHfFileSystem

    folder = _with_uncond(export, tmp_path, "uncond/t5_empty.safetensors", save(_state()))
    fs = FakeHfFileSystem(folder, "me/data")
    loaded = prep.load_uncond("me/data", revision="v1", fs=fs)
    assert fs.opened == ["hf://datasets/me/data@v1/index.json", "hf://datasets/me/data@v1/uncond/t5_empty.safetensors"]
    assert loaded["t5_hidden"].shape == (77, 1024)


def test_load_uncond_errors(export, tmp_path):
    with pytest.raises(FileNotFoundError, match="names no unconditional .empty-caption. T5 state"):
        prep.load_uncond(export)
    with pytest.raises(FileNotFoundError, match="names no unconditional"):
        prep.load_shards(export, uncond=True)
    bad = _state()
    bad["t5_hidden"] = bad["t5_hidden"].astype(np.float32)
    folder = _with_uncond(export, tmp_path / "a", "u.safetensors", save(bad), name="u.safetensors")
    with pytest.raises(ShardError, match=r"t5_hidden must be float16 \(77, 1024\), got float32"):
        prep.load_uncond(folder)
    folder = _with_uncond(export, tmp_path / "b", {"path": "u.safetensors", "sha256": "0" * 64}, save(_state()),
                          name="u.safetensors")
    with pytest.raises(ShardError, match="sha256 does not match"):
        prep.load_uncond(folder)
    folder = _with_uncond(export, tmp_path / "c", "../secret.safetensors")
    with pytest.raises(ShardError, match="'uncond' path: unsafe tar member name"):
        prep.load_uncond(folder)
    folder = _with_uncond(export, tmp_path / "d", "u.pkl", b"\x80\x04K\x01.", name="u.pkl")
    with pytest.raises(ShardError, match="unknown uncond file type"):
        prep.load_uncond(folder)
