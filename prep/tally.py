"""Counters of a run: what happened to which records, merged across ranks, printed the seeds' way."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    """What happened to which records on one rank; merged on the main rank at the end."""

    new: set[str] = field(default_factory=set)
    migrated: set[str] = field(default_factory=set)
    extracted: set[str] = field(default_factory=set)
    enriched: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    refreshed: dict[str, set[str]] = field(default_factory=dict)  # kind -> ids of stale artifacts redone
    unreadable: int = 0
    skipped_inputs: dict[str, int] = field(default_factory=dict)  # reason -> samples of an input skipped

    def skip_input(self, reason: str) -> None:
        self.skipped_inputs[reason] = self.skipped_inputs.get(reason, 0) + 1

    def refresh(self, kind: str, image_id: str) -> None:
        self.refreshed.setdefault(kind, set()).add(image_id)

    def merge(self, other: Tally) -> None:
        for name in ("new", "migrated", "extracted", "enriched"):
            getattr(self, name).update(getattr(other, name))
        self.failed.update(other.failed)
        for kind, ids in other.refreshed.items():
            self.refreshed.setdefault(kind, set()).update(ids)
        self.unreadable += other.unreadable
        for reason, count in other.skipped_inputs.items():
            self.skipped_inputs[reason] = self.skipped_inputs.get(reason, 0) + count

    def counts(self, total: int) -> dict[str, int]:
        """Each record counted once: failed > new > migrated > extracted > enriched > skipped."""
        failed = set(self.failed)
        new = self.new - failed
        migrated = self.migrated - failed - new
        extracted = self.extracted - failed - new - migrated
        enriched = self.enriched - failed - new - migrated - extracted
        counted = len(failed) + len(new) + len(migrated) + len(extracted) + len(enriched)
        return {
            "new": len(new),
            "migrated": len(migrated),
            "enriched": len(enriched),
            "extracted": len(extracted),
            "skipped": max(0, total - counted),
            "failed": len(failed),
            "total": total,
            "refreshed": sum(len(ids) for ids in self.refreshed.values()),
        }


def progress_line(counts: dict[str, int], rate: float) -> str:
    """The seeds' progress format."""
    return (
        f"progress: {counts['new']} new, {counts['migrated']} migrated, {counts['enriched']} enriched, "
        f"{counts['extracted']} extracted, {counts['skipped']} skipped, {counts['failed']} failed "
        f"(total: {counts['total']}) rate={rate:.1f}/s"
    )


def refreshed_line(tally: Tally) -> str | None:
    """`refreshed: 3 stale artifacts recomputed (t5 2, vae 1)`, or None when there were none."""
    parts = [f"{kind} {len(ids)}" for kind, ids in sorted(tally.refreshed.items()) if ids]
    if not parts:
        return None
    total = sum(len(ids) for ids in tally.refreshed.values())
    return f"refreshed: {total} stale artifacts recomputed ({', '.join(parts)})"
