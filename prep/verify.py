"""`prep verify`: load every side file of every record and say what is valid, invalid or missing.

Unlike the passes' readiness filters (headers only), verify reads the data, so it also
catches NaN/Inf values and truncated payloads. It exits non-zero when anything is wrong.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prep.manifest import read_manifest
from prep.records import validate_record
from prep.store import ARTIFACTS, MISSING, VALID, check_artifact

ARTIFACT_BLOCKERS = {"missing image_id", "unsafe image_id"}
LIST_LIMIT = 1000


@dataclass
class VerifyReport:
    """Counts per artifact type and per record problem, plus the first problems by id."""

    records: int = 0
    rejected_lines: int = 0
    artifacts: dict[str, Counter] = field(default_factory=lambda: {kind: Counter() for kind in ARTIFACTS})
    record_problems: Counter = field(default_factory=Counter)
    problems: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        bad = sum(c["invalid"] + c["missing"] for c in self.artifacts.values())
        return bad == 0 and not self.record_problems and self.rejected_lines == 0

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "records": self.records,
            "rejected_lines": self.rejected_lines,
            "artifacts": {kind: {k: c[k] for k in ("valid", "invalid", "missing")} for kind, c in self.artifacts.items()},
            "record_problems": dict(sorted(self.record_problems.items())),
            "problems": self.problems,
        }


def check_record(record: dict, base: Path) -> tuple[list[str], dict[str, str]]:
    """(record-level reasons, {kind: artifact status}) for one record, reading the data."""
    reasons = [r for r in validate_record(record)]
    statuses = {}
    for kind in ARTIFACTS:
        if ARTIFACT_BLOCKERS & set(reasons) or (kind == "vae" and not isinstance(record.get("aspect_bucket"), str)):
            statuses[kind] = "invalid: record has no usable image_id / aspect_bucket"
        else:
            statuses[kind] = check_artifact(base, kind, record, read_data=True)
    return reasons, statuses


def verify_manifest(manifest_path: str | Path, base: str | Path, *, workers: int = 8) -> VerifyReport:
    """Check every record of the manifest and every side file it should have."""
    from tqdm.auto import tqdm

    manifest = read_manifest(manifest_path)
    report = VerifyReport(records=len(manifest), rejected_lines=len(manifest.rejected))
    for item in manifest.rejected:
        report.problems.append({"line": item.lineno, "kind": "manifest", "reason": item.reason})
    base = Path(base)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda r: (r, *check_record(r, base)), manifest)
        for record, reasons, statuses in tqdm(results, total=len(manifest), desc="verify", unit="rec", leave=False):
            label = record.get("image_id") or record.get("image_path")
            for reason in reasons:
                report.record_problems[reason] += 1
                if len(report.problems) < LIST_LIMIT:
                    report.problems.append({"image_id": label, "kind": "record", "reason": reason})
            for kind, status in statuses.items():
                bucket = "valid" if status == VALID else "missing" if status == MISSING else "invalid"
                report.artifacts[kind][bucket] += 1
                if bucket != "valid" and len(report.problems) < LIST_LIMIT:
                    report.problems.append({"image_id": label, "kind": kind, "reason": status})
    return report


def print_report(report: VerifyReport, as_json: bool = False) -> None:
    """Human table or JSON on stdout."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(f"verify: {report.records} records, {report.rejected_lines} rejected manifest lines")
    for kind, counter in report.artifacts.items():
        print(f"  {kind:<7} valid {counter['valid']:>8}  invalid {counter['invalid']:>8}  missing {counter['missing']:>8}")
    for reason, count in sorted(report.record_problems.items()):
        print(f"  record: {reason}: {count}")
    shown = [p for p in report.problems][:20]
    for problem in shown:
        where = problem.get("image_id", f"line {problem.get('line')}")
        print(f"  - {where} [{problem['kind']}]: {problem['reason']}")
    if len(report.problems) > len(shown):
        print(f"  ... {len(report.problems) - len(shown)} more (use --json)")
    print("verify: OK" if report.ok else "verify: PROBLEMS FOUND")
