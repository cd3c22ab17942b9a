"""What a stage is: one model, the artifact it makes, and how a pass feeds it.

A stage (datatrove's `PipelineStep` is the model) declares everything the rest of `prep`
needs to know about one kind of output, so the pass runner, the `needs` filters, provenance,
verify, export, loading, the dataset card and the CLI all loop over the registry
(`prep.stages`) instead of naming kinds:

- `artifact`: the side file it writes (folder, export member, loading column, dtype, shape);
- `model`: its model flag (`--{name}-model`, `--{name}-revision`, default id, licence);
- `options`: a dataclass of its own flags (declared once, with help);
- `reads`: what a pass feeds it, decoded images (`IMAGE`) or captions (`CAPTION`);
- `load` / `image_input` / `encode`: how the model loads, what a DataLoader worker derives for
  it from the image pass's one shared decode of an image, and how a batch encodes into
  `Output`s (`worker_transform(path)`, a stage's own decode in the worker, is the older form
  and still works: it costs a second decode of every image);
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


@dataclass(frozen=True)
class ImageInput:
    """What an image stage takes from the one decode of an image that the stages of a pass share.

    `make(decoded) -> item` runs in a DataLoader worker on a `prep.preprocess.Decoded`; it must
    be picklable (a top-level function or a `functools.partial` of one) and must not modify
    `decoded.image`. `draft_to` is the size the stage resizes to (a big JPEG may then be decoded
    at a reduced DCT scale; stages whose requests give the same scale share that decode; None:
    a full decode). `pixels` is the size of one model input, for sizing batches by pixels
    (None: the stage's own batch size).
    """

    make: Callable[[Any], Any]
    draft_to: tuple[int, int] | None = None
    pixels: int | None = None


# --batch-pixels default on a GPU: a 1024x1024 batch holds 8 images, a 512x512 batch 32.
DEFAULT_BATCH_PIXELS = 8 * 1024 * 1024
MAX_BATCH_SIZE = 256


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

    def compile(self) -> bool:
        """`torch.compile` the model's forward in place (--compile); False when this encoder is not compiled."""
        from prep.models import compile_module

        if self.model is None:
            return False
        compile_module(self.model)
        return True


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

    def batch_size_for(self, opts, device, pixels: int | None) -> int:
        """Items per batch of inputs of `pixels` pixels: --batch-size when given, else --batch-pixels
        // pixels (on a GPU 8 Mpx by default: 8 images of 1024^2, 32 of 512^2), else `batch_size`."""
        budget = getattr(opts, "batch_pixels", None)
        if budget is None and str(device).startswith("cuda"):
            budget = DEFAULT_BATCH_PIXELS
        if not opts.batch_size and budget and pixels:
            return max(1, min(MAX_BATCH_SIZE, budget // pixels))
        return self.batch_size(opts, device)

    def load(self, model, *, device, dtype: str, opts) -> Encoder:
        raise NotImplementedError

    def image_input(self, encoder: Encoder, bucket: str | None) -> ImageInput | None:
        """What a DataLoader worker derives for this stage from the shared decode of an image
        (IMAGE stages); None: the stage decodes on its own with `worker_transform`."""
        return None

    def worker_transform(self, encoder: Encoder, bucket: str | None) -> Callable[[str], Any]:
        """The older form of `image_input`: a picklable fn(path) -> item that reads and decodes the
        image itself in the worker (a second decode of every image, counted as such)."""
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
