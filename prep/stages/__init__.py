"""The stage registry: every encoder pass, in run order, and the artifact table derived from it.

Everything that depends on "which kinds exist" (the pass runner, `needs`, provenance, verify,
export members, loading columns, the dataset card, the CLI model flags) loops over `STAGES`
or `artifacts()`. Adding a stage is one new module and one `register(...)` call.
"""

from __future__ import annotations

from prep.stages.base import CAPTION, IMAGE, Artifact, Encoder, ImageInput, ModelSpec, Output, Stage
from prep.stages.caption import CaptionStage
from prep.stages.dinov3 import DINOv3Stage
from prep.stages.t5 import MASK as T5_MASK
from prep.stages.t5 import T5Stage
from prep.stages.vae import VAEFlipStage, VAEStage

__all__ = [
    "ALL", "CAPTION", "IMAGE", "STAGES", "Artifact", "Encoder", "ImageInput", "ModelSpec", "Output", "Stage",
    "artifact_stages", "artifacts", "file_artifacts", "get", "model_spec", "register", "unregister",
]  # fmt: skip

STAGES: dict[str, Stage] = {}
_RECORD_ARTIFACTS: dict[str, tuple[str, Artifact]] = {}  # kind -> (owning stage, artifact from a record field)


def register(stage: Stage, *, before: str | None = None, record_artifacts: tuple[Artifact, ...] = ()) -> Stage:
    """Add a stage to the run order (at the end, or before the stage named `before`)."""
    if stage.name in STAGES:
        raise ValueError(f"a stage named {stage.name!r} is already registered")
    items = list(STAGES.items())
    position = len(items) if before is None else [name for name, _ in items].index(before)
    items.insert(position, (stage.name, stage))
    STAGES.clear()
    STAGES.update(items)
    for artifact in record_artifacts:
        _RECORD_ARTIFACTS[artifact.kind] = (stage.name, artifact)
    return stage


def unregister(name: str) -> None:
    """Remove a stage (tests that register a temporary one)."""
    STAGES.pop(name, None)
    for kind in [k for k, (owner, _) in _RECORD_ARTIFACTS.items() if owner == name]:
        del _RECORD_ARTIFACTS[kind]


def get(name: str) -> Stage:
    return STAGES[name]


ALL = "all"  # `active=ALL`: every registered stage, optional ones included


def _active(stage: Stage, active) -> bool:
    """A stage's artifacts belong to a dataset unless the stage is optional and the dataset never ran it."""
    return not stage.optional or active == ALL or (active is not None and stage.name in active)


def artifact_stages(active=None) -> list[Stage]:
    """Stages that write a side file, in run order (optional ones only when named in `active`)."""
    return [stage for stage in STAGES.values() if stage.artifact is not None and _active(stage, active)]


def file_artifacts(active=None) -> dict[str, Artifact]:
    """{kind: artifact} of the side files (dinov3/, vae_latents/, t5_hidden/, ...)."""
    return {stage.artifact.kind: stage.artifact for stage in artifact_stages(active)}


def artifacts(active=None) -> dict[str, Artifact]:
    """The whole artifact table: side files, then arrays built from record fields (the T5 mask).

    `active`: the optional stages a dataset ran (`prep_metadata.json` "optional_stages"), or ALL."""
    table = file_artifacts(active)
    for kind, (owner, artifact) in _RECORD_ARTIFACTS.items():
        if owner in STAGES and _active(STAGES[owner], active):
            table[kind] = artifact
    return table


def model_spec(stage: Stage) -> ModelSpec | None:
    """The model flag a stage loads from: its own, or the one of the stage it shares a model with."""
    return STAGES[stage.model_from].model if stage.model_from else stage.model


# Run order: the image stages first (one image pass: they share each image's read and decode),
# then the text stage, which needs the captions the first one wrote.
register(CaptionStage())
register(DINOv3Stage())
register(VAEStage())
register(VAEFlipStage())
register(T5Stage(), record_artifacts=(T5_MASK,))
