"""`prep verify`: load every side file of every record and say what is valid, invalid, missing or stale.

Unlike the passes' readiness filters (headers only), verify reads the data, so it also
catches NaN/Inf values and truncated payloads. A valid artifact is further judged by its
provenance: `stale` (its image, caption, bucket or model changed), `unknown` (made before
provenance existed) or fresh. It exits non-zero when anything is invalid, missing or stale.
`--adopt` stamps the current configuration onto valid `unknown` artifacts, explicitly.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prep import provenance
from prep.manifest import read_manifest, write_manifest
from prep.records import validate_record
from prep.store import ARTIFACTS, MISSING, VALID, check_artifact, read_metadata

ARTIFACT_BLOCKERS = {"missing image_id", "unsafe image_id"}
STATES = ("valid", "invalid", "missing", "stale", "unknown")  # stale / unknown are subsets of valid
LIST_LIMIT = 1000


@dataclass
class VerifyReport:
    """Counts per artifact type and per record problem, plus the first problems by id."""

    records: int = 0
    rejected_lines: int = 0
    artifacts: dict[str, Counter] = field(default_factory=lambda: {kind: Counter() for kind in ARTIFACTS})
    record_problems: Counter = field(default_factory=Counter)
    problems: list[dict] = field(default_factory=list)

    adopted: int = 0

    @property
    def ok(self) -> bool:
        bad = sum(c["invalid"] + c["missing"] + c["stale"] for c in self.artifacts.values())
        return bad == 0 and not self.record_problems and self.rejected_lines == 0

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "records": self.records,
            "rejected_lines": self.rejected_lines,
            "artifacts": {kind: {k: c[k] for k in STATES} for kind, c in self.artifacts.items()},
            "adopted": self.adopted,
            "record_problems": dict(sorted(self.record_problems.items())),
            "problems": self.problems,
        }


def check_record(
    record: dict, base: Path, expected: provenance.Expected | None = None
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(record-level reasons, {kind: file status}, {kind: provenance status of valid files})."""
    reasons = list(validate_record(record))
    statuses, origins = {}, {}
    for kind in ARTIFACTS:
        if ARTIFACT_BLOCKERS & set(reasons) or (
            kind == "vae" and not isinstance(record.get("aspect_bucket"), str)
        ):
            statuses[kind] = "invalid: record has no usable image_id / aspect_bucket"
        else:
            statuses[kind] = check_artifact(base, kind, record, read_data=True)
            if statuses[kind] == VALID:
                origins[kind] = provenance.artifact_status(kind, record, expected)
    return reasons, statuses, origins


def verify_manifest(
    manifest_path: str | Path,
    base: str | Path,
    *,
    workers: int = 8,
    expected: provenance.Expected | None = None,
    adopt_with: dict[str, dict] | None = None,
) -> VerifyReport:
    """Check every record of the manifest and every side file it should have.

    `expected` is the configuration to judge provenance against (default: the models the
    last run recorded in prep_metadata.json). With `adopt_with` ({kind: config fields}),
    valid artifacts of unknown provenance are stamped with it and the manifest is rewritten.
    """
    from tqdm.auto import tqdm

    if expected is None:
        expected = provenance.expected_from_metadata(read_metadata(base))
    manifest = read_manifest(manifest_path)
    report = VerifyReport(records=len(manifest), rejected_lines=len(manifest.rejected))
    for item in manifest.rejected:
        report.problems.append({"line": item.lineno, "kind": "manifest", "reason": item.reason})
    base = Path(base)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        records = list(manifest) if adopt_with is not None else manifest
        results = pool.map(lambda r: (r, *check_record(r, base, expected)), records)
        for record, reasons, statuses, origins in tqdm(
            results, total=len(manifest), desc="verify", unit="rec", leave=False
        ):
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
            for kind, origin in origins.items():
                if origin == provenance.UNKNOWN and adopt_with is not None and kind in adopt_with:
                    report.adopted += adopt(record, kind, adopt_with[kind])
                elif origin == provenance.UNKNOWN:
                    report.artifacts[kind]["unknown"] += 1
                elif provenance.is_stale(origin):
                    report.artifacts[kind]["stale"] += 1
                    if len(report.problems) < LIST_LIMIT:
                        report.problems.append({"image_id": label, "kind": kind, "reason": origin})
    if adopt_with is not None and report.adopted:
        write_manifest(manifest_path, records, manifest.rejected)
    return report


def adopt(record: dict, kind: str, config: dict) -> int:
    """Stamp `config` (plus what the record's inputs say) onto an artifact of unknown provenance."""
    from prep.buckets import parse_bucket
    from prep.journal import apply_update
    from prep.preprocess import cover_crop_box

    update: dict = {}
    stamp = {**config, "format": provenance.PROVENANCE_FORMAT}
    if kind in ("dinov3", "vae"):
        fp = provenance.refresh_fingerprint(record["image_path"], record.get("image_fingerprint"))
        if fp is None:
            return 0  # the image is gone: nothing to vouch for
        update["image_fingerprint"] = fp
        stamp["image_sha256"] = fp["sha256"]
    if kind == "vae":
        width, height = parse_bucket(record["aspect_bucket"])
        stamp["bucket"] = record["aspect_bucket"]
        stamp["crop_box"] = list(cover_crop_box(record["width"], record["height"], width, height))
    if kind == "t5":
        stamp["caption_sha256"] = provenance.text_sha256(record.get("caption"))
    update[f"provenance.{kind}"] = stamp
    apply_update(record, update)
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
    if report.adopted:
        print(
            f"  adopted: {report.adopted} artifacts of unknown provenance stamped with the current configuration"
        )
    for reason, count in sorted(report.record_problems.items()):
        print(f"  record: {reason}: {count}")
    shown = [p for p in report.problems][:20]
    for problem in shown:
        where = problem.get("image_id", f"line {problem.get('line')}")
        print(f"  - {where} [{problem['kind']}]: {problem['reason']}")
    if len(report.problems) > len(shown):
        print(f"  ... {len(report.problems) - len(shown)} more (use --json)")
    print("verify: OK" if report.ok else "verify: PROBLEMS FOUND")


def judging_config(base: str | Path, models: dict[str, str | None], vae_subfolder: str | None = None) -> dict[str, dict]:
    """{kind: {model_id, revision, ...}}: a model flag given wins, else the last run's model (metadata)."""
    from prep.encoders.common import model_revision

    config = {
        kind: {"model_id": entry.get("model_id"), "revision": entry.get("revision")}
        for kind, entry in (read_metadata(base).get("models") or {}).items()
        if isinstance(entry, dict) and kind in ARTIFACTS
    }
    for kind, model_id in models.items():
        if model_id:
            config[kind] = {"model_id": model_id, "revision": model_revision(model_id)}
            if kind == "vae":
                from prep.encoders.vae import effective_vae_subfolder

                config[kind]["subfolder"] = effective_vae_subfolder(model_id, vae_subfolder)
    return config


def expected_of(config: dict[str, dict]) -> provenance.Expected:
    """The yardstick from a config: revisions that could not be resolved are not judged."""
    return provenance.Expected(
        {kind: {k: (None if v == "unknown" else v) for k, v in fields.items()} for kind, fields in config.items()}
    )
