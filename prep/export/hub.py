"""`prep push`: upload an export folder to a Hugging Face dataset repo.

Only what the export names goes up: the shards listed in `index.json`, plus `README.md`,
`index.json`, `stats.json` and the unconditional T5 state file when `index.json` names one
(key "uncond"). Every other file in the folder (a stray `.env`, a manifest, temp files, the
export's state folder) is skipped and listed in the result and the printed summary.

The folder must be a complete export (`index.json` and `README.md`; every shard listed in
the index present with its recorded size). The repo is created if needed (and the branch,
for a revision), then the files go up with the resumable multi-commit upload of the
installed huggingface_hub: `upload_large_folder` where it exists (hub < 2), else
`upload_folder`, which in hub 2.x is the streamed multi-commit upload that skips files
already committed (rerunning an interrupted push resumes it). The file selection is passed
as `allow_patterns` (a folder's files as `folder/*` when all of them go up, else one exact
pattern per file) and checked against huggingface_hub's own matcher before any call.

Failures at the network boundary (no connection, HTTP errors, unauthorised, gated or missing
repo) raise `HubError`, a `prep.errors.UserError` the CLI prints as one line.

Tokens: `token_env` names an environment variable to read; otherwise huggingface_hub
resolves one itself (HF_TOKEN, the login cache). A token is never printed or logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from prep.errors import UserError
from prep.export.webdataset import CARD_FILE, INDEX_FILE, STATE_DIR, STATS_FILE
from prep.fsio import TMP_MARK

logger = logging.getLogger(__name__)

# Local state and temp files never go to the Hub (patterns as huggingface_hub matches them).
IGNORE_PATTERNS = [f"{STATE_DIR}/*", f"*{TMP_MARK}", ".cache/*", ".git/*", "*/.git/*"]
REPO_TYPE = "dataset"
UNCOND_KEY = "uncond"


class ExportFolderError(UserError, ValueError):
    """The folder is not a complete, well-formed export (the message names the file and key)."""


class HubError(UserError):
    """A failure at the network boundary (connection, HTTP status, auth, gated or missing repo)."""

    def __init__(self, message: str):
        super().__init__(message, code=1)


@dataclass
class PushResult:
    """What a push did (or, for a dry run, would do)."""

    repo_id: str
    url: str
    revision: str | None
    files: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dry_run: bool = False
    method: str | None = None
    commit: str | None = None
    allow_patterns: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# --------------------------------------------------------------------- the file set
def _uncond_path(index: dict, where: Path) -> str | None:
    entry = index.get(UNCOND_KEY)
    if entry is None:
        return None
    path = entry.get("path") if isinstance(entry, dict) else entry
    if not isinstance(path, str) or not path:
        raise ExportFolderError(f"{where}: key '{UNCOND_KEY}' must be a relative path or an object with a 'path'")
    return path


def check_export_folder(folder: Path) -> dict:
    """The parsed index.json of a complete export in `folder`; raises if it is not one."""
    from prep.shards import check_member_name, parse_index_shards

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    missing = [name for name in (INDEX_FILE, CARD_FILE) if not (folder / name).is_file()]
    if missing:
        raise ExportFolderError(
            f"{folder} is not a complete export (no {' / '.join(missing)}): run `prep export webdataset` "
            "(or finish it with --resume) first"
        )
    index_path = folder / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportFolderError(f"{index_path} is not valid JSON ({exc})") from None
    try:
        entries = parse_index_shards(index, str(index_path))
    except ValueError as exc:
        raise ExportFolderError(str(exc)) from None
    for i, (_bucket, relative, _samples) in enumerate(entries):
        path = folder / relative
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
        recorded = index["shards"][i].get("bytes")
        if recorded is not None and path.stat().st_size != recorded:
            raise ExportFolderError(f"{path} has {path.stat().st_size} bytes, {INDEX_FILE} says {recorded}")
    uncond = _uncond_path(index, index_path)
    if uncond is not None:
        try:
            check_member_name(uncond)
        except ValueError as exc:
            raise ExportFolderError(f"{index_path}: key '{UNCOND_KEY}': {exc}") from None
        if not (folder / uncond).is_file():
            raise FileNotFoundError(f"{folder / uncond} is named by {INDEX_FILE} ('{UNCOND_KEY}') but missing")
    return index


def named_files(folder: Path, index: dict) -> list[str]:
    """The repo paths an export consists of: card, index, stats, the listed shards, the uncond file."""
    names = {CARD_FILE, INDEX_FILE}
    if (folder / STATS_FILE).is_file():
        names.add(STATS_FILE)
    names.update(shard["path"] for shard in index.get("shards", []))
    uncond = _uncond_path(index, folder / INDEX_FILE)
    if uncond:
        names.add(uncond)
    return sorted(names)


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _escape(path: str) -> str:
    """An fnmatch pattern matching exactly `path`."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def allow_patterns(upload: list[str], every_file: list[str]) -> list[str]:
    """Few patterns selecting exactly `upload` among `every_file`: `dir/*` for a top folder all of whose
    files go up, else one exact pattern per file (huggingface_hub matches every file against every pattern)."""
    chosen = set(upload)
    by_top: dict[str, list[str]] = {}
    for path in every_file:
        if "/" in path:
            by_top.setdefault(path.split("/", 1)[0], []).append(path)
    patterns = []
    whole = {top for top, paths in by_top.items() if all(p in chosen for p in paths)}
    for top in sorted(whole):
        patterns.append(f"{_escape(top)}/*")
    for path in upload:
        if "/" not in path or path.split("/", 1)[0] not in whole:
            patterns.append(_escape(path))
    return patterns


def select_upload(folder: Path, index: dict) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """(files to upload with sizes, files skipped, allow_patterns) for an export folder."""
    from huggingface_hub.utils import filter_repo_objects

    every_file = _all_files(folder)
    upload = [p for p in named_files(folder, index) if (folder / p).is_file()]
    chosen = set(upload)
    skipped = [p for p in every_file if p not in chosen]
    patterns = allow_patterns(upload, every_file)
    matched = set(filter_repo_objects(every_file, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS))
    if matched != chosen:  # a name the folder patterns cannot express: one exact pattern per file
        patterns = [_escape(p) for p in upload]
        matched = set(filter_repo_objects(every_file, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS))
        if matched != chosen:
            raise ExportFolderError(
                f"cannot select exactly the export's files for upload (would differ on: "
                f"{', '.join(sorted(matched ^ chosen)[:5])})"
            )
    return [(p, (folder / p).stat().st_size) for p in upload], skipped, patterns


def list_upload_files(folder: Path) -> list[tuple[str, int]]:
    """(path in repo, size) of every file that would be uploaded, sorted."""
    folder = Path(folder)
    return select_upload(folder, check_export_folder(folder))[0]


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


# -------------------------------------------------------------------- network errors
def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # HfHubHTTPError, ConnectionError, timeouts, xet errors
    for module in ("httpx2", "httpx", "requests"):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        base = getattr(imported, "HTTPError", None) or getattr(getattr(imported, "exceptions", None), "RequestException", None)
        if isinstance(base, type) and issubclass(base, BaseException):
            errors.append(base)
    return tuple(errors)


def describe_hub_error(exc: BaseException, repo_id: str) -> str:
    """One line saying what went wrong at the Hub and what to do."""
    from huggingface_hub import errors as hub_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = (str(exc).strip().splitlines() or [""])[0]
    name = type(exc).__name__
    if isinstance(exc, hub_errors.GatedRepoError):
        return f"{repo_id} is gated: request access on the Hub with this account first ({first})"
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return f"{repo_id} was not found or this token cannot see it (HTTP {status}): check --repo-id and the token"
    if isinstance(exc, hub_errors.LocalTokenNotFoundError):
        return "no Hub token: run `hf auth login`, set HF_TOKEN, or pass --token-env VAR"
    if isinstance(exc, hub_errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push"
    if status == 401:
        return "not authorised (HTTP 401): the token is missing or invalid; run `hf auth login` or set HF_TOKEN"
    if status == 403:
        return f"forbidden (HTTP 403): the token cannot write to {repo_id} (it needs write access)"
    if status == 429:
        return "rate limited by the Hub (HTTP 429): wait and rerun the same command; the push resumes"
    if status is not None:
        return f"HTTP {status} from the Hub: {first}"
    if isinstance(exc, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        return f"could not reach the Hub ({name}: {first}); check the network and rerun: the push resumes"
    return f"{name}: {first}"


def _call(what: str, repo_id: str, token: str | None, fn, /, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _network_errors() as exc:
        message = f"push to {repo_id} failed while {what}: {describe_hub_error(exc, repo_id)}"
        if token:
            message = message.replace(token, "***")
        raise HubError(message) from exc


# ---------------------------------------------------------------------------- push
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
    """Create the dataset repo (and branch) if needed and upload the export's files (see module doc).

    `api`: an `HfApi`-like object (tests inject a fake); None -> `HfApi(token=...)`.
    A dry run checks the folder and lists the files, with no network call.
    """
    folder = Path(folder)
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise ValueError(f"bad --repo-id {repo_id!r}: expected NAME or OWNER/NAME")
    index = check_export_folder(folder)
    files, skipped, patterns = select_upload(folder, index)
    result = PushResult(
        repo_id=repo_id,
        url=repo_url(repo_id, revision),
        revision=revision,
        files=files,
        skipped=skipped,
        allow_patterns=patterns,
    )
    if skipped:
        logger.info("not uploading %d file(s) that index.json does not name", len(skipped))
    if dry_run:
        result.dry_run = True
        return result
    token = _token_from_env(token_env)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)  # None: the library finds HF_TOKEN / the login cache
    _ensure_repo(api, result, token, private)
    _upload(api, result, folder, token, commit_message or "Upload prep WebDataset export")
    return result


def _ensure_repo(api, result: PushResult, token: str | None, private: bool) -> None:
    """Create the dataset repo (and the branch) when missing; a bare NAME becomes OWNER/NAME."""
    logger.info("creating (if needed) dataset repo %s", result.repo_id)
    created = _call(
        "creating the repo", result.repo_id, token, api.create_repo,
        result.repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True,
    )
    repo_id = getattr(created, "repo_id", None) or result.repo_id
    result.repo_id, result.url = repo_id, repo_url(repo_id, result.revision)
    if result.revision:
        _call(
            f"creating branch {result.revision}", repo_id, token, api.create_branch,
            repo_id, branch=result.revision, repo_type=REPO_TYPE, exist_ok=True,
        )


def _upload(api, result: PushResult, folder: Path, token: str | None, message: str) -> None:
    """The resumable upload of the selected files (`upload_large_folder` where it exists)."""
    common = dict(
        repo_id=result.repo_id,
        folder_path=str(folder),
        repo_type=REPO_TYPE,
        revision=result.revision,
        allow_patterns=list(result.allow_patterns),
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    upload_large = getattr(api, "upload_large_folder", None)
    if callable(upload_large):
        result.method = "upload_large_folder"
        _call("uploading", result.repo_id, token, upload_large, **common)
    else:
        result.method = "upload_folder"
        info = _call("uploading", result.repo_id, token, api.upload_folder, commit_message=message, **common)
        result.commit = getattr(info, "oid", None)


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
    if result.skipped:
        state = [p for p in result.skipped if p.startswith(f"{STATE_DIR}/")]
        lines.append(f"  skipped {len(result.skipped)} file(s) that index.json does not name:")
        lines += [f"    {path}" for path in result.skipped if not path.startswith(f"{STATE_DIR}/")]
        if state:
            lines.append(f"    {STATE_DIR}/ ({len(state)} file(s): the export's own state)")
    return "\n".join(lines)
