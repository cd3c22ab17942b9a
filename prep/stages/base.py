"""What a stage is: one model, the artifact it makes, and how a pass feeds it.

A stage (datatrove's `PipelineStep` is the model) declares everything the rest of `prep`
needs to know about one kind of output, so the pass runner, the `needs` filters, provenance,
verify, export, loading, the dataset card and the CLI all loop over the registry
(`prep.stages`) instead of naming kinds:

- `artifact`: the side file it writes (folder, export member, loading column, dtype, shape);
- `model`: its model flag (`--{name}-model`, `--{name}-revision`, default id, licence);
- `options`: a dataclass of its own flags (declared once, with help);
- `reads`: what a pass feeds it, decoded images (`IMAGE`) or captions (`CAPTION`);
- `load` / `worker_transform` / `encode`: how the model loads, what a DataLoader worker does to
  one image for it, and how a batch encodes into `Output`s;
- `settings`: what its provenance stamps record besides model, revision and dtype.

A fifth encoder is one new file with a `Stage` subclass and one `register(...)` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

IMAGE, CAPTION = "image", "caption"


@dataclass(frozen=True)
class Artifact:
    """One kind of array in the dataset: where it lives and what it is called everywhere.

    `folder` is the side-file folder under the derived dir (None for an array built from a
    record field, like the T5 attention mask); `member` the WebDataset member suffix
    (`{key}.{member}`); `column` the name in `load_manifest` rows and `load_shards` samples.
    """

    kind: str
    folder: str | None
    member: str
    column: str
    dtype: np.dtype
    shape: Callable[[dict], tuple[int, ...]]
    description: str
    record_field: str | None = None  # for arrays made from a record field
    by_bucket: bool = False  # its shape follows the record's aspect bucket
    collate_dtype: str | None = None  # torch dtype name a training batch gets, when not the stored one

    def shape_for(self, record: dict) -> tuple[int, ...]:
        return tuple(self.shape(record))

    def fixed_shape(self) -> tuple[int, ...] | None:
        """The shape of every array of this kind, or None when it follows the bucket."""
        return None if self.by_bucket else self.shape_for({})


@dataclass(frozen=True)
class ModelSpec:
    """A stage's model flag: `--{stage}-model` (and `-revision`, `-subfolder`)."""

    default: str
    help: str
    subfolder: str | None = None
    license: str = ""


@dataclass
class Output:
    """What a stage made of one item: an array for its side file and/or record fields."""

    array: np.ndarray | None = None
    fields: dict = field(default_factory=dict)  # record fields to set (caption, t5_attention_mask)
    inputs: dict = field(default_factory=dict)  # provenance of the input (crop_box, input_size)
    error: str | None = None


class Encoder:
    """The loaded model of a stage: its weights, device and dtype; `unload` frees them."""

    def __init__(self, model, *, device, dtype, model_id: str = "") -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.model_id = model_id

    def unload(self) -> None:
        """Free the weights (GPU memory included) before another pass loads its model."""
        from prep.models import free_model

        model, self.model = self.model, None
        free_model(model)


def to_eval(model, device):
    """Move a freshly loaded model to its device, inference only."""
    model.to(device).eval().requires_grad_(False)
    return model


class Stage:
    """One encoder pass. Subclasses set the class attributes and implement load/encode."""

    name: ClassVar[str]
    reads: ClassVar[str] = IMAGE
    artifact: ClassVar[Artifact | None] = None
    model: ClassVar[ModelSpec | None] = None
    options: ClassVar[type | None] = None  # a dataclass of this stage's own flags
    by_bucket: ClassVar[bool] = False  # batches must share a bucket (the array shape follows it)
    fields_column: ClassVar[str | None] = None  # manifest column, True when the record fields it writes are valid
    optional: ClassVar[bool] = False  # runs only when asked (`enabled`); a dataset has its artifact once it did
    model_from: ClassVar[str | None] = None  # the stage whose model flag this one uses (None: its own `model`)
    description: ClassVar[str] = ""

    def settings(self, opts) -> dict:
        """Provenance fields of this stage's configuration besides model, revision and dtype."""
        return {}

    def enabled(self, opts) -> bool:
        """Whether a run with `opts` runs this stage (an optional stage says which flag turns it on)."""
        return not self.optional

    def batch_size(self, opts, device) -> int:
        """Items per batch: --batch-size, else 8 on a GPU and 1 on a CPU (batching the VAE is slower there)."""
        if opts.batch_size:
            return opts.batch_size
        return 8 if str(device).startswith("cuda") else 1

    def load(self, model, *, device, dtype: str, opts) -> Encoder:
        raise NotImplementedError

    def worker_transform(self, encoder: Encoder, bucket: str | None) -> Callable[[str], Any]:
        """The picklable per-image work a DataLoader worker does for this stage (IMAGE stages)."""
        raise NotImplementedError

    def encode(self, encoder: Encoder, items: list[Any]) -> list[Output]:
        raise NotImplementedError

    def metadata(self, model, *, compute_dtype) -> dict:
        """What prep_metadata.json should say about this stage's outputs besides the model (the VAE:
        its latent convention); recorded before the pass writes anything."""
        return {}

    def finish(self, *, opts, model, device, config: dict) -> dict:
        """Dataset-level outputs after the pass, on the main rank (T5: the empty caption's state);
        returns prep_metadata.json updates. `config` is what this run expects of the stage."""
        return {}

    def stage_options(self, opts):
        """This stage's options object from the run options (its dataclass defaults if absent)."""
        if self.options is None:
            return None
        found = getattr(opts, "stage_options", {}).get(self.name)
        return found if found is not None else self.options()
