"""`prep push`: everything up to the network boundary, with a fake HfApi recording the calls.

The real upload cannot be tested here (the Hub is unreachable); the fake checks which
methods of the installed huggingface_hub API are called, with which arguments.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from helpers_export import build_dataset

from prep.cli import main
from prep.errors import UserError
from prep.export.hub import (
    IGNORE_PATTERNS,
    ExportFolderError,
    HubError,
    format_push,
    list_upload_files,
    push_export,
)
from prep.export.webdataset import export_webdataset

SECRET = "hf_thisIsAFakeSecretToken123456789"
STRAYS = [".env", "manifest.jsonl", "notes/todo.txt", "bucket_64x64/shard-000099.tar", "bucket_[x]/odd*.tar"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hub")
    data = build_dataset(tmp, per_bucket=2, broken=False)
    out = tmp / "shards"
    export_webdataset(data["manifest"], data["derived"], out, shard_size=1, progress_every=0)
    (out / "bucket_64x64" / ".shard-000099.tar.x.prep-tmp").write_bytes(b"temp")  # never uploaded
    for stray in STRAYS:  # not named by index.json: never uploaded, always listed
        (out / stray).parent.mkdir(parents=True, exist_ok=True)
        (out / stray).write_bytes(b"HF_TOKEN=" + SECRET.encode() if stray == ".env" else b"x")
    return out


class FakeApi:
    """Records calls; has upload_folder only (like huggingface_hub 2.x)."""

    instances: list[FakeApi] = []

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", (repo_id,), kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        return None


class FakeLargeApi(FakeApi):
    """An older huggingface_hub with upload_large_folder."""

    def upload_large_folder(self, **kwargs):
        self.calls.append(("upload_large_folder", (), kwargs))


def test_installed_hub_has_the_methods_used():
    api_cls = huggingface_hub.HfApi
    for name in ("create_repo", "create_branch", "upload_folder"):
        assert callable(getattr(api_cls, name))


def test_dry_run_lists_files_and_makes_no_call(export_dir, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("HfApi must not be created in a dry run")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    result = push_export(export_dir, "me/data", dry_run=True)
    paths = [p for p, _ in result.files]
    assert "README.md" in paths and "index.json" in paths and "stats.json" in paths
    assert sum(p.endswith(".tar") for p in paths) == 6
    assert not any(".prep-export" in p or p.endswith(".prep-tmp") for p in paths)
    assert result.total_bytes == sum((export_dir / p).stat().st_size for p in paths)
    assert result.url == "https://huggingface.co/datasets/me/data"


def test_refuses_non_export(tmp_path, export_dir):
    (tmp_path / "some.tar").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a complete export"):
        push_export(tmp_path, "me/data", dry_run=True)
    with pytest.raises(FileNotFoundError):
        push_export(tmp_path / "nope", "me/data", dry_run=True)
    with pytest.raises(ValueError, match="repo-id"):
        push_export(export_dir, "a/b/c", dry_run=True)


def test_refuses_export_with_missing_shard(tmp_path, export_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    (copy / "bucket_64x64" / "shard-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="listed in index.json"):
        push_export(copy, "me/data", dry_run=True)


def test_push_with_fake_api(export_dir):
    api = FakeApi()
    result = push_export(export_dir, "me/data", private=True, revision="v1", api=api)
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == ("me/data",)
    assert api.calls[0][2] == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert api.calls[1][2] == {"branch": "v1", "repo_type": "dataset", "exist_ok": True}
    upload = api.calls[2][2]
    assert upload["repo_id"] == "me/data" and upload["repo_type"] == "dataset" and upload["revision"] == "v1"
    assert Path(upload["folder_path"]) == export_dir
    assert set(IGNORE_PATTERNS) <= set(upload["ignore_patterns"])
    assert result.method == "upload_folder" and result.url.endswith("/tree/v1")

    api = FakeApi()
    push_export(export_dir, "me/data", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]  # no branch without --revision
    assert api.calls[0][2]["private"] is None  # not private: the account default, existing repo unchanged


def test_push_prefers_upload_large_folder_when_present(export_dir):
    api = FakeLargeApi()
    result = push_export(export_dir, "me/data", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_large_folder"]
    assert result.method == "upload_large_folder"


def test_cli_push_never_prints_the_token(export_dir, monkeypatch, capsys, caplog):
    FakeApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    assert main(["push", str(export_dir), "--repo-id", "me/data", "--token-env", "MY_HUB_TOKEN", "-v"]) == 0
    assert FakeApi.instances[-1].token == SECRET  # the token reached the api ...
    assert main(["push", str(export_dir), "--repo-id", "me/data", "--dry-run"]) == 0
    assert main(["push", str(export_dir), "--repo-id", "me/data"]) == 0
    assert FakeApi.instances[-1].token is None  # ... or the library resolves HF_TOKEN / login itself
    monkeypatch.delenv("MY_HUB_TOKEN")
    assert main(["push", str(export_dir), "--repo-id", "me/data", "--token-env", "MY_HUB_TOKEN"]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "MY_HUB_TOKEN is not set" in captured.err
    assert "would upload" in captured.out and "uploaded" in captured.out
    assert SECRET not in text  # ... but was never printed or logged


def test_upload_listing_matches_dry_run(export_dir):
    files = dict(list_upload_files(export_dir))
    assert "bucket_64x64/shard-000000.tar" in files
    assert not [p for p in files if p.startswith(".prep-export")]


def _what_upload_folder_selects(folder: Path, upload: dict) -> set[str]:
    """The files huggingface_hub's upload_folder would take with these arguments (its own listing and
    matcher, as in HfApi._prepare_upload_folder_additions; that method also validates the card online)."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    every = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    ignore = list(upload["ignore_patterns"]) + list(DEFAULT_IGNORE_PATTERNS)
    return set(filter_repo_objects(every, allow_patterns=upload["allow_patterns"], ignore_patterns=ignore))


def test_case12_push_uploads_only_what_index_json_names(export_dir, capsys):
    index = json.loads((export_dir / "index.json").read_text())
    expected = {"README.md", "index.json", "stats.json", *(s["path"] for s in index["shards"])}
    api = FakeApi()
    result = push_export(export_dir, "me/data", api=api)
    assert {p for p, _ in result.files} == expected
    assert _what_upload_folder_selects(export_dir, api.calls[-1][2]) == expected
    for stray in STRAYS + ["bucket_64x64/.shard-000099.tar.x.prep-tmp"]:
        assert stray in result.skipped
    assert any(p.startswith(".prep-export/") for p in result.skipped)
    text = format_push(result)
    assert f"skipped {len(result.skipped)} file(s) that index.json does not name" in text
    for stray in STRAYS:
        assert f"    {stray}" in text
    assert ".prep-export/ (" in text and SECRET not in text
    # the dry run lists the same
    dry = push_export(export_dir, "me/data", dry_run=True)
    assert dry.files == result.files and dry.skipped == result.skipped


def test_uncond_file_named_by_index_goes_up(export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    index = json.loads((copy / "index.json").read_text())
    index["uncond"] = {"path": "uncond/t5_empty.safetensors"}
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="named by index.json .'uncond'. but missing"):
        push_export(copy, "me/data", dry_run=True)
    (copy / "uncond").mkdir()
    (copy / "uncond" / "t5_empty.safetensors").write_bytes(b"x")
    (copy / "uncond" / "other.bin").write_bytes(b"x")
    api = FakeApi()
    result = push_export(copy, "me/data", api=api)
    assert "uncond/t5_empty.safetensors" in dict(result.files) and "uncond/other.bin" in result.skipped
    assert "uncond/t5_empty.safetensors" in _what_upload_folder_selects(copy, api.calls[-1][2])


@pytest.mark.parametrize("mutate, match", [
    (lambda index: index["shards"][2].pop("path"), r"index.json: shards\[2\] has no 'path'"),
    (lambda index: index.pop("shards"), "key 'shards' is missing"),
    (lambda index: index["shards"][0].update(path="../../etc/passwd"), r"shards\[0\] 'path': unsafe"),
    (lambda index: index.update(uncond=7), "key 'uncond' must be a relative path"),
])
def test_bad_index_is_a_clear_error(export_dir, tmp_path, capsys, mutate, match):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    index = json.loads((copy / "index.json").read_text())
    mutate(index)
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ExportFolderError, match=match):
        push_export(copy, "me/data", dry_run=True)
    assert main(["push", str(copy), "--repo-id", "me/data", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prep: error: ") and "Traceback" not in err[0]


def test_index_not_json_is_a_clear_error(export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    (copy / "index.json").write_text("{oops")
    with pytest.raises(ExportFolderError, match=r"index.json is not valid JSON"):
        push_export(copy, "me/data", dry_run=True)


def _http_error(status: int, cls=None):
    import httpx2

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    response = httpx2.Response(status, request=request)
    cls = cls or huggingface_hub.errors.HfHubHTTPError
    return cls(f"{status} Client Error for url {request.url} (token {SECRET})", response=response)


def _connect_error():
    import httpx2

    return httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize("make_error, where, match", [
    (lambda: _http_error(401), "create_repo", "not authorised .HTTP 401."),
    (lambda: _http_error(403), "upload_folder", "forbidden .HTTP 403.: the token cannot write to me/data"),
    (lambda: _http_error(404, huggingface_hub.errors.RepositoryNotFoundError), "create_branch", "not found"),
    (lambda: _http_error(403, huggingface_hub.errors.GatedRepoError), "create_repo", "me/data is gated"),
    (lambda: _http_error(500), "upload_folder", "HTTP 500 from the Hub"),
    (_connect_error, "create_repo", "could not reach the Hub .ConnectError"),
    (lambda: ConnectionResetError("reset by peer"), "upload_folder", "could not reach the Hub"),
])
def test_case8_push_network_failures_are_one_line(export_dir, monkeypatch, capsys, make_error, where, match):
    class FailingApi(FakeApi):
        def __getattribute__(self, name):
            if name == where:
                def fail(*args, **kwargs):
                    raise make_error()
                return fail
            return super().__getattribute__(name)

    with pytest.raises(HubError, match=match) as info:
        push_export(export_dir, "me/data", revision="v1", api=FailingApi(), token_env=None)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    assert main(["push", str(export_dir), "--repo-id", "me/data", "--revision", "v1", "--token-env", "MY_HUB_TOKEN"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prep: error: push to me/data failed while ")
    assert "Traceback" not in captured.err and SECRET not in captured.err + captured.out
