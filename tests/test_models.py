"""Model flags: checked before any pass, one-line errors naming the flag, the loaded revision recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prep.cli import main
from prep.models import ModelError, public_model_name, resolve_model
from prep.testing import model_flags

REPO = Path(__file__).resolve().parent.parent


def fake_hub_cache(cache: Path, repo: str, commits: dict[str, Path], main_ref: str) -> None:
    """A Hugging Face cache folder holding snapshots of `repo` (commit -> a model folder to copy)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    for commit, source in commits.items():
        shutil.copytree(source, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(main_ref)


def test_a_missing_local_folder_names_its_flag(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"^--vae-model \./tiny/vae: no such folder$"):
        resolve_model("--vae-model", "./tiny/vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model("--t5-model", str(tmp_path / "empty"))


def test_an_uncached_hub_id_offline_is_one_line_saying_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as caught:
        resolve_model("--caption-model", "someone/not-cached")
    message = str(caught.value)
    assert message.startswith("--caption-model someone/not-cached is not in the local Hugging Face cache")
    assert "hf download someone/not-cached" in message and "\n" not in message


def test_the_recorded_revision_is_the_snapshot_loaded_not_refs_main(tmp_path: Path, tiny_models, monkeypatch) -> None:
    old, new = "a" * 40, "b" * 40
    fake_hub_cache(tmp_path, "org/vae", {old: tiny_models["vae"], new: tiny_models["vae"]}, main_ref=new)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("--vae-model", "org/vae", subfolder=None).revision == new
    pinned = resolve_model("--vae-model", "org/vae", revision=old, subfolder=None)
    assert pinned.revision == old and pinned.load_revision == old
    assert public_model_name(str(tmp_path / "models--org--vae" / "snapshots" / old)) == "org/vae"
    assert public_model_name("/home/alice/models/flux-vae") == "local folder flux-vae"


def test_a_typo_in_the_last_stage_model_fails_before_any_pass_runs(tmp_path: Path, tiny_models, sample_images,
                                                                   capsys) -> None:
    flags = model_flags({**tiny_models, "t5": tmp_path / "no-such-t5"})
    code = main(["run", "--images", str(sample_images[0].parent), "--manifest", str(tmp_path / "m.jsonl"),
                 "--derived-dir", str(tmp_path / "d"), "--min-free-gb", "0", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"prep: error: --t5-model {tmp_path / 'no-such-t5'}: no such folder"
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "d").exists()


def test_config_file_sets_options_and_flags_override_it(tmp_path: Path, tiny_models, sample_images, capsys) -> None:
    config = tmp_path / "prep.yaml"
    config.write_text(
        f"images: {sample_images[0].parent}\nmanifest: {tmp_path / 'm.jsonl'}\nderived-dir: {tmp_path / 'd'}\n"
        f"buckets: [64x64, 96x96]\nmin_free_gb: 0\npass: migrate\nvae_model: {tiny_models['vae']}\n"
    )
    assert main(["run", "--config", str(config), "--buckets", "96x96"]) == 0
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(records) == 14 and {r["aspect_bucket"] for r in records} == {"96x96"}
    config.write_text("shard_sise: 3\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "unknown option(s) for this command: shard_sise" in capsys.readouterr().err


def test_debug_works_after_the_run_py_entry_point(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "prep" / "run.py"), "--manifest", str(tmp_path / "none.jsonl"), "--min-free-gb", "0"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_the_seeds_flag_names_stay_aliases(tmp_path: Path) -> None:
    from prep.cli import build_parser

    parsed = build_parser().parse_args(["export", "webdataset", "--input-jsonl", "a.jsonl", "--output-base-dir", "d",
                                        "--num-proc", "3"])
    assert (str(parsed.manifest), str(parsed.derived_dir), parsed.num_workers) == ("a.jsonl", "d", 3)
    parsed = build_parser().parse_args(["verify", "--workers", "4", "--derived-dir", "x"])
    assert parsed.num_workers == 4
