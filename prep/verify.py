"""`prep verify`: read every side file of every record and say what is valid, invalid, missing or stale.

Unlike the passes' `needs` filters (a stat per file), verify reads the data, so it also catches
NaN/Inf values and bytes changed behind a kept size and mtime. A valid file is then judged by
its provenance: `stale` (not stamped for this record, or its image, caption, bucket or model
changed) or `unknown` (adopted from an older manifest) or fresh. Whatever verify finds invalid
it lists in `<derived>/.prep/redo.json`, so the next `prep run` redoes it; export and
`load_manifest(ready_only=True)` never serve it. Exits non-zero when anything is invalid,
missing or stale; a missing manifest is an error, not an empty success.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prep import provenance, stages
from prep.errors import UserError
from prep.manifest import lock_manifest, read_manifest, resolve_manifest_path, rewrite
from prep.parallel import bounded_map
from prep.records import validate_record
from prep.store import MISSING, VALID, artifact_path, check_artifact, read_metadata

ARTIFACT_BLOCKERS = {"missing image_id", "unsafe image_id"}
STATES = ("valid", "invalid", "missing", "stale", "unknown")  # stale / unknown are subsets of valid
LIST_LIMIT = 1000


@dataclass
class VerifyReport:
    """Counts per artifact type and per record problem, plus the first problems by id."""

    records: int = 0
    rejected_lines: int = 0
    filtered: Counter = field(default_factory=Counter)
    artifacts: dict[str, Counter] = field(default_factory=dict)  # kind -> Counter of states
    record_problems: Counter = field(default_factory=Counter)
    problems: list[dict] = field(default_factory=list)
    redo: dict[str, list[str]] = field(default_factory=dict)
    adopted: int = 0

    @property
    def ok(self) -> bool:
        bad = sum(c["invalid"] + c["missing"] + c["stale"] for c in self.artifacts.values())
        return bad == 0 and not self.record_problems and self.rejected_lines == 0

    def note(self, problem: dict) -> None:
        if len(self.problems) < LIST_LIMIT:
            self.problems.append(problem)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "records": self.records,
            "rejected_lines": self.rejected_lines,
            "filtered": dict(sorted(self.filtered.items())),
            "artifacts": {kind: {k: c[k] for k in STATES} for kind, c in self.artifacts.items()},
            "adopted": self.adopted,
            "record_problems": dict(sorted(self.record_problems.items())),
            "problems": self.problems,
        }


def check_record(
    record: dict, base: Path, expected: provenance.Expected | None = None, active: frozenset[str] | None = None
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(record-level reasons, {kind: file status}, {kind: provenance status of valid files})."""
    from prep.store import active_stages

    reasons = list(validate_record(record))
    statuses, origins = {}, {}
    for stage in stages.artifact_stages(active_stages(base) if active is None else active):
        kind = stage.name
        if ARTIFACT_BLOCKERS & set(reasons) or (stage.by_bucket and not isinstance(record.get("aspect_bucket"), str)):
            statuses[kind] = "invalid: record has no usable image_id / aspect_bucket"
            continue
        statuses[kind] = check_artifact(base, kind, record, read_data=True)
        if statuses[kind] == VALID:
            path = artifact_path(base, kind, record["image_id"])
            origins[kind] = provenance.artifact_status(
                kind, record, expected, reads_caption=stage.reads == "caption", path=path
            )
    return reasons, statuses, origins


def verify_manifest(
    manifest_path: str | Path,
    base: str | Path,
    *,
    workers: int = 8,
    expected: provenance.Expected | None = None,
    adopt_with: dict[str, dict] | None = None,
    write_redo_list: bool = True,
) -> VerifyReport:
    """Check every record of the manifest and every side file it should have.

    `expected` is the configuration to judge provenance against (default: the models the
    last run recorded in prep_metadata.json). With `adopt_with` ({kind: config fields}),
    valid artifacts of unknown provenance are stamped with it and the manifest is rewritten
    (under the manifest's lock).
    """
    from prep.progress import progress

    path = Path(manifest_path)
    if not path.exists():
        raise UserError(f"manifest {path} does not exist (pass --manifest)")
    if not resolve_manifest_path(path).is_file():
        raise UserError(f"manifest {path} is not a file")
    if expected is None:
        expected = provenance.expected_from_metadata(read_metadata(base))
    lock = lock_manifest(path, "--adopt rewrites the manifest; wait for the other job") if adopt_with is not None else None
    try:
        return _verify(path, Path(base), workers, expected, adopt_with, write_redo_list, progress)
    finally:
        if lock is not None:
            from prep.fsio import release_lock

            release_lock(lock)


def _verify(path, base, workers, expected, adopt_with, write_redo_list, progress) -> VerifyReport:
    from prep.store import active_stages

    manifest = read_manifest(path)
    active = active_stages(base)
    report = VerifyReport(records=len(manifest), rejected_lines=len(manifest.rejected))
    report.artifacts = {kind: Counter() for kind in stages.file_artifacts(active)}
    for item in manifest.rejected:
        report.note({"line": item.lineno, "kind": "manifest", "reason": item.reason})
    changed: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def check(row: int):
            record = manifest.record(row)
            return (row, record, *check_record(record, base, expected, active))

        checked = bounded_map(pool, check, range(len(manifest)))
        for row, record, reasons, statuses, origins in progress(checked, total=len(manifest), desc="verify", unit="rec"):
            if isinstance(record.get("filtered"), dict):
                report.filtered[str(record["filtered"].get("reason"))] += 1
                continue
            _count(report, record, reasons, statuses, origins, adopt_with, changed, row)
    if changed:
        rewrite(manifest, changed)
    if write_redo_list:
        from prep.needs import write_redo

        write_redo(base, report.redo)
    return report


def _count(report, record, reasons, statuses, origins, adopt_with, changed, row) -> None:
    label = record.get("image_id") or record.get("image_path")
    for reason in reasons:
        report.record_problems[reason] += 1
        report.note({"image_id": label, "kind": "record", "reason": reason})
    for kind, status in statuses.items():
        state = "valid" if status == VALID else "missing" if status == MISSING else "invalid"
        report.artifacts[kind][state] += 1
        if state == "invalid" and isinstance(record.get("image_id"), str):
            report.redo.setdefault(kind, []).append(record["image_id"])
        if state != "valid":
            report.note({"image_id": label, "kind": kind, "reason": status})
    for kind, origin in origins.items():
        if origin == provenance.UNKNOWN and adopt_with is not None and kind in adopt_with:
            report.adopted += adopt(record, kind, adopt_with[kind])
            changed[row] = record
        elif origin == provenance.UNKNOWN:
            report.artifacts[kind]["unknown"] += 1
        elif provenance.is_stale(origin):
            report.artifacts[kind]["stale"] += 1
            report.note({"image_id": label, "kind": kind, "reason": origin})


def adopt(record: dict, kind: str, config: dict) -> int:
    """Stamp `config` onto an artifact of unknown provenance (its file and input stamps are kept)."""
    stamp = dict(provenance.stamp_of(record, kind) or {})
    stamp.pop("origin", None)
    stamp.update({k: v for k, v in config.items() if v is not None})
    stamp["format"] = provenance.PROVENANCE_FORMAT
    record["provenance"][kind] = stamp
    return 1


def print_report(report: VerifyReport, as_json: bool = False) -> None:
    """Human table or JSON on stdout."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(f"verify: {report.records} records, {report.rejected_lines} rejected manifest lines")
    for kind, counter in report.artifacts.items():
        print(
            f"  {kind:<7} valid {counter['valid']:>8}  invalid {counter['invalid']:>8}  missing {counter['missing']:>8}"
            f"  (of the valid: stale {counter['stale']:>6}, unknown provenance {counter['unknown']:>6})"
        )
    if report.filtered:
        total = sum(report.filtered.values())
        print(f"  filtered out (flagged, not checked): {total} ("
              + ", ".join(f"{r} {n}" for r, n in sorted(report.filtered.items()))
              + "); `prep curate --dry-run` says why, `prep prune` moves them aside")
    if report.adopted:
        print(f"  adopted: {report.adopted} artifacts of unknown provenance stamped with the given configuration")
    for reason, count in sorted(report.record_problems.items()):
        print(f"  record: {reason}: {count}")
    shown = report.problems[:20]
    for problem in shown:
        where = problem.get("image_id", f"line {problem.get('line')}")
        print(f"  - {where} [{problem['kind']}]: {problem['reason']}")
    if len(report.problems) > len(shown):
        print(f"  ... {len(report.problems) - len(shown)} more (use --json)")
    if any(report.redo.values()):
        print("  the next `prep run` redoes the invalid side files")
    print("verify: OK" if report.ok else "verify: PROBLEMS FOUND")


def judging_config(base: str | Path, models: dict) -> dict[str, dict]:
    """{kind: {model_id, revision, ...}}: a model flag given wins, else the last run's model (metadata)."""
    from prep.models import known_revision

    config = {
        kind: {"model_id": entry.get("model_id"), "revision": entry.get("revision")}
        for kind, entry in (read_metadata(base).get("models") or {}).items()
        if isinstance(entry, dict) and kind in stages.STAGES
    }
    for kind, choice in models.items():
        config[kind] = {"model_id": choice.source, "revision": known_revision(choice.source, choice.subfolder)}
        if stages.STAGES[kind].model.subfolder is not None:
            from prep.models import effective_subfolder, looks_like_path

            local = looks_like_path(choice.source)
            config[kind]["subfolder"] = effective_subfolder(Path(choice.source), choice.subfolder) if local else choice.subfolder
    return config


def expected_of(config: dict[str, dict]) -> provenance.Expected:
    """The yardstick from a config: revisions that could not be resolved are not judged."""
    return provenance.Expected(
        {kind: {k: (None if v == "unknown" else v) for k, v in fields.items()} for kind, fields in config.items()}
    )
