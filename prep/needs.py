"""`needs_*`: which records a pass must (re)do, as batched `Dataset.filter` functions.

A record needs a pass when its artifact is missing or invalid (header check, no data read)
or, unless `--keep-stale`, when the artifact's provenance says it is stale. Stale ids are
collected so the run can count them as `refreshed`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from prep import provenance, store
from prep.options import RunOptions


@dataclass
class NeedsPlan:
    """A pass's yardstick: options, what the configuration expects, and the stale ids found."""

    opts: RunOptions
    expected: provenance.Expected
    stale: dict[str, str] = field(default_factory=dict)

    def is_stale(self, kind: str, record: dict) -> bool:
        status = provenance.artifact_status(kind, record, self.expected)
        if provenance.is_stale(status):
            self.stale[record["image_id"]] = status
            return not self.opts.keep_stale
        return False


def row_record(batch: dict, i: int) -> dict:
    """The fields provenance needs, rebuilt from the projected columns of row `i`."""
    record = {
        "image_id": batch["image_id"][i],
        "aspect_bucket": batch["aspect_bucket"][i],
        "caption": batch["caption"][i],
    }
    if batch["provenance"][i]:
        record["provenance"] = json.loads(batch["provenance"][i])
    if batch["image_fingerprint"][i]:
        record["image_fingerprint"] = json.loads(batch["image_fingerprint"][i])
    return record


def eligible(batch: dict, i: int, kind: str) -> bool:
    """Migrated records with an id (and, for the VAE, a bucket) are the only ones a pass touches."""
    if batch["image_id"][i] is None or batch["needs_migration"][i]:
        return False
    return not (kind == "vae" and batch["aspect_bucket"][i] is None)


def needs_caption(batch: dict, plan: NeedsPlan) -> list[bool]:
    out = []
    for i in range(len(batch["image_id"])):
        if not eligible(batch, i, "caption"):
            out.append(False)
        elif batch["caption"][i] is None or plan.opts.recaption:
            out.append(True)
        else:
            out.append(plan.is_stale("caption", row_record(batch, i)))
    return out


def needs_artifact(kind: str, batch: dict, plan: NeedsPlan) -> list[bool]:
    out = []
    base = plan.opts.output_base_dir
    for i in range(len(batch["image_id"])):
        if not eligible(batch, i, kind) or (kind == "t5" and batch["caption"][i] is None):
            out.append(False)
            continue
        record = row_record(batch, i)
        if not store.artifact_ok(base, kind, record) or (kind == "t5" and not batch["mask_ok"][i]):
            out.append(True)
        else:
            out.append(plan.is_stale(kind, record))
    return out


def needs_t5(batch: dict, plan: NeedsPlan) -> list[bool]:
    return needs_artifact("t5", batch, plan)


def needs_dinov3(batch: dict, plan: NeedsPlan) -> list[bool]:
    return needs_artifact("dinov3", batch, plan)


def needs_vae(batch: dict, plan: NeedsPlan) -> list[bool]:
    return needs_artifact("vae", batch, plan)


NEEDS: dict[str, Callable[[dict, NeedsPlan], list[bool]]] = {
    "caption": needs_caption,
    "t5": needs_t5,
    "dinov3": needs_dinov3,
    "vae": needs_vae,
}
