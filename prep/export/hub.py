"""`prep push`: upload an export folder to a Hugging Face dataset repo.

The folder must be a complete export (`index.json` and `README.md`; every shard listed in
the index present with its recorded size). The repo is created if needed (and the branch,
for a revision), then the folder goes up with the resumable multi-commit upload of the
installed huggingface_hub: `upload_large_folder` where it exists (hub < 2), else
`upload_folder`, which in hub 2.x is the streamed multi-commit upload that skips files
already committed (rerunning an interrupted push resumes it).

Tokens: `token_env` names an environment variable to read; otherwise huggingface_hub
resolves one itself (HF_TOKEN, the login cache). A token is never printed or logged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from prep.export.webdataset import CARD_FILE, INDEX_FILE, STATE_DIR
from prep.fsio import TMP_MARK

logger = logging.getLogger(__name__)

# Local state and temp files never go to the Hub (patterns as huggingface_hub matches them).
IGNORE_PATTERNS = [f"{STATE_DIR}/*", f"*{TMP_MARK}", ".cache/*", ".git/*", "*/.git/*"]
REPO_TYPE = "dataset"


@dataclass
class PushResult:
    """What a push did (or, for a dry run, would do)."""

    repo_id: str
    url: str
    revision: str | None
    files: list[tuple[str, int]] = field(default_factory=list)
    dry_run: bool = False
    method: str | None = None
    commit: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def check_export_folder(folder: Path) -> dict:
    """The parsed index.json of a complete export in `folder`; raises if it is not one."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    missing = [name for name in (INDEX_FILE, CARD_FILE) if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a complete export (no {' / '.join(missing)}): run `prep export webdataset` "
            "(or finish it with --resume) first"
        )
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        shards = index["shards"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / INDEX_FILE} is not a prep export index: {exc}") from exc
    for shard in shards:
        path = folder / shard["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
        if path.stat().st_size != shard["bytes"]:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, {INDEX_FILE} says {shard['bytes']}")
    return index


def list_upload_files(folder: Path) -> list[tuple[str, int]]:
    """(path in repo, size) of every file that would be uploaded, sorted."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS)
    return [(path, (folder / path).stat().st_size) for path in kept]


def repo_url(repo_id: str, revision: str | None = None) -> str:
    url = f"https://huggingface.co/datasets/{repo_id}"
    return f"{url}/tree/{revision}" if revision else url


def _token_from_env(token_env: str | None) -> str | None:
    if token_env is None:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"environment variable {token_env} is not set (it should hold a Hub token)")
    return token


def push_export(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token_env: str | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
    api=None,
) -> PushResult:
    """Create the dataset repo (and branch) if needed and upload the export folder.

    `api`: an `HfApi`-like object (tests inject a fake); None -> `HfApi(token=...)`.
    A dry run checks the folder and lists the files, with no network call.
    """
    folder = Path(folder)
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise ValueError(f"bad --repo-id {repo_id!r}: expected NAME or OWNER/NAME")
    check_export_folder(folder)
    result = PushResult(
        repo_id=repo_id, url=repo_url(repo_id, revision), revision=revision, files=list_upload_files(folder)
    )
    if dry_run:
        result.dry_run = True
        return result
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=_token_from_env(token_env))  # None: the library finds HF_TOKEN / the login cache
    elif token_env is not None:
        _token_from_env(token_env)  # same check; an injected api carries its own credentials

    logger.info("creating (if needed) dataset repo %s", repo_id)
    created = api.create_repo(repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True)
    repo_id = getattr(created, "repo_id", None) or repo_id  # a bare NAME becomes OWNER/NAME
    result.repo_id, result.url = repo_id, repo_url(repo_id, revision)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
    message = commit_message or "Upload prep WebDataset export"
    upload_large = getattr(api, "upload_large_folder", None)
    if callable(upload_large):
        result.method = "upload_large_folder"
        upload_large(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type=REPO_TYPE,
            revision=revision,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    else:
        result.method = "upload_folder"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type=REPO_TYPE,
            revision=revision,
            ignore_patterns=list(IGNORE_PATTERNS),
            commit_message=message,
        )
        result.commit = getattr(info, "oid", None)
    return result


def format_push(result: PushResult) -> str:
    verb = "would upload" if result.dry_run else "uploaded"
    lines = [
        f"{verb} {len(result.files)} files ({result.total_bytes / 1e6:.1f} MB) to {result.url}"
        + (f" [{result.method}]" if result.method else "")
    ]
    if result.dry_run:
        folders: dict[str, list[int]] = {}
        for path, size in result.files:
            top = path.split("/", 1)[0] + "/" if "/" in path else path
            entry = folders.setdefault(top, [0, 0])
            entry[0] += 1
            entry[1] += size
        for top, (count, size) in folders.items():
            lines.append(f"  {top}: {count} file(s), {size} bytes")
    if result.commit:
        lines.append(f"  commit {result.commit}")
    return "\n".join(lines)
