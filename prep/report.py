"""`prep report`: one self-contained HTML page that shows what a dataset really holds.

The page (index.html plus the PNGs beside it, no network needed) has a summary box (records,
ready / not ready by reason, rejected manifest lines, per-type verify status, the models and
the latent convention), charts (images per aspect bucket, original sizes, caption lengths in
words and T5 tokens) and a contact sheet of seeded-sampled records: the original image, the
bucket crop the VAE saw (the pipeline's own preprocessing call) and the VAE decode of the
stored latent. Anything that cannot be shown (missing file, unreadable image, NaN latent)
becomes a red flagged panel with its reason; the report itself never fails on bad data.

`build_report` is the library entry point; `sheet_entries` exposes the panel arrays.
"""

from __future__ import annotations

import logging
import math
import random
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prep import store
from prep.buckets import parse_bucket
from prep.config import T5_MAX_LENGTH
from prep.errors import UserError
from prep.fsio import atomic_write_text
from prep.manifest import read_manifest, rejected_path
from prep.records import has_caption, is_safe_id

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = 16
THUMB_MAX = 384  # longest side of the stored original thumbnail (the sheet shows it smaller)
SHEET_PAGE = 24  # samples per contact-sheet PNG (keeps each image a sane height)
REJECTED_SHOWN = 10  # rejected manifest lines listed on the page (all are counted)
FILTERED_SHOWN = 4  # flagged records shown per reason on the filtered strip (all are counted)


class ReportError(UserError):
    """The report cannot be written (missing dependency, unusable output folder)."""


# ------------------------------------------------------------------------------ panels
@dataclass
class Panel:
    """One cell of the contact sheet: an image, or a flag (red, with the reason), or a neutral note."""

    image: np.ndarray | None = None  # uint8 (H, W, 3)
    flag: str | None = None  # a problem: drawn as a red box with this text
    note: str | None = None  # no image, but nothing wrong (e.g. decode skipped)
    box: tuple[float, float, float, float] | None = None  # crop box drawn on the original, in panel px
    size: tuple[int, int] | None = None  # the source's full (upright) size when `image` is a thumbnail


@dataclass
class SheetEntry:
    """One sampled record and its three panels: original, the VAE's input crop, the decoded latent."""

    image_id: str
    caption: str | None
    bucket: str | None
    width: int | None
    height: int | None
    image_path: str | None
    original: Panel
    crop: Panel
    decoded: Panel
    upscale: float | None = None  # how many times the image was enlarged to cover its bucket (> 1: blurrier)

    @property
    def flags(self) -> list[str]:
        names = ("original", "crop", "decode")
        panels = (self.original, self.crop, self.decoded)
        return [f"{name}: {panel.flag}" for name, panel in zip(names, panels, strict=True) if panel.flag]


class LatentDecoder:
    """The Flux VAE's decoder half: a stored (normalised) latent back to 8-bit RGB pixels."""

    def __init__(self, vae, *, shift_factor: float, scaling_factor: float, device, dtype, model_id: str = ""):
        self.vae = vae
        self.shift_factor = float(shift_factor)
        self.scaling_factor = float(scaling_factor)
        self.device = device
        self.dtype = dtype
        self.model_id = model_id

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        subfolder: str | None,
        device: str = "auto",
        dtype: str = "auto",
        shift_factor: float | None = None,
        scaling_factor: float | None = None,
    ) -> LatentDecoder:
        """Load the VAE the way the encoder pass does; factors default to the VAE's own config."""
        from prep.stages.vae import VAEEncoder

        encoder = VAEEncoder.load(model_id, subfolder=subfolder, device=device, dtype=dtype)
        return cls(
            encoder.model,
            shift_factor=encoder.shift_factor if shift_factor is None else shift_factor,
            scaling_factor=encoder.scaling_factor if scaling_factor is None else scaling_factor,
            device=encoder.device,
            dtype=encoder.dtype,
            model_id=model_id,
        )

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """(16, h, w) stored latent -> uint8 (8h, 8w, 3): z = latent / scale + shift, then decode."""
        import torch

        stored = torch.from_numpy(np.asarray(latent, dtype=np.float32))[None]
        z = stored / self.scaling_factor + self.shift_factor
        with torch.inference_mode():
            sample = self.vae.decode(z.to(device=self.device, dtype=self.dtype)).sample.float()
        if not torch.isfinite(sample).all():
            raise FloatingPointError("decoder output has NaN/Inf values")
        pixels = ((sample[0].clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()


def resolve_image_path(image_path: str, manifest_path: str | Path | None) -> Path | str:
    """The record's path as written; a relative one that does not exist is tried beside the manifest.

    A locator of a tar member or a dataset row (`prep.sources`) is returned as it is.
    """
    from prep.sources import is_uri

    if is_uri(image_path):
        return image_path
    path = Path(image_path)
    if not path.is_absolute() and not path.exists() and manifest_path is not None:
        beside = Path(manifest_path).parent / path
        if beside.exists():
            return beside
    return path


def bucket_size(record: dict) -> tuple[int, int] | None:
    try:
        return parse_bucket(record.get("aspect_bucket"))
    except (ValueError, TypeError, AttributeError):
        return None


def upscale_of(record: dict) -> float | None:
    """The resize-to-cover factor of a record's image into its bucket (> 1: enlarged), None when unknown."""
    size = bucket_size(record)
    width, height = record.get("width"), record.get("height")
    if size is None or type(width) is not int or type(height) is not int or width <= 0 or height <= 0:
        return None
    return max(size[0] / width, size[1] / height)


def original_panel(path: Path | str | None) -> Panel:
    """The upright RGB original (as every pass decodes it), as a thumbnail with the crop box outlined."""
    from PIL import Image

    from prep.preprocess import ImageDecodeError, open_rgb
    from prep.sources import image_exists

    if path is None:
        return Panel(flag="record has no image_path")
    if not image_exists(str(path)):
        return Panel(flag=f"image file missing: {path}")
    try:
        image = open_rgb(path)
    except ImageDecodeError as exc:
        return Panel(flag=f"unreadable image: {exc}")
    width, height = image.size
    thumb = image.copy()
    thumb.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
    return Panel(image=np.asarray(thumb, dtype=np.uint8).copy(), size=(width, height))


def crop_panel(record: dict, path: Path | str | None) -> tuple[Panel, tuple[int, int, int, int] | None]:
    """The bucket crop the VAE saw and its box in original pixels.

    `preprocess.load_bucket_crop(path, width, height)` is the very call the VAE pass's data
    loader makes (prep.passes.image_transform), so these are the pixels that were encoded.
    """
    from prep.preprocess import ImageDecodeError, load_bucket_crop

    size = bucket_size(record)
    if size is None:
        return Panel(flag=f"bad aspect_bucket {record.get('aspect_bucket')!r}"), None
    from prep.sources import image_exists

    if path is None or not image_exists(str(path)):
        return Panel(flag="no image to crop"), None
    try:
        array, box = load_bucket_crop(str(path), width=size[0], height=size[1])
    except ImageDecodeError as exc:
        return Panel(flag=f"unreadable image: {exc}"), None
    return Panel(image=np.asarray(array, dtype=np.uint8)), tuple(int(v) for v in box)


def latent_problem(record: dict, base: Path) -> tuple[np.ndarray | None, str | None]:
    """(the stored latent, None) or (None, why it cannot be decoded)."""
    image_id = record.get("image_id")
    if not is_safe_id(image_id):
        return None, "record has no usable image_id"
    try:
        shape = store.expected_shape("vae", record)
    except (KeyError, ValueError, TypeError):
        return None, f"bad aspect_bucket {record.get('aspect_bucket')!r}"
    path = store.artifact_path(base, "vae", image_id)
    try:
        latent = store.read_npy(path, shape)  # header and size checked before any data is read
    except FileNotFoundError:
        return None, "latent missing"
    except store.BadArray as exc:
        return None, f"latent {exc}" if "shape" in str(exc) else f"latent unreadable ({exc})"
    if not np.issubdtype(latent.dtype, np.floating):
        return None, f"latent dtype {latent.dtype} is not floating point"
    finite = np.isfinite(latent)
    if not finite.all():
        bad = int(latent.size - finite.sum())
        return None, f"latent has NaN/Inf values ({bad} of {latent.size})"
    return latent, None


def decoded_panel(record: dict, base: Path, decoder: LatentDecoder | None, decode_note: str) -> Panel:
    """The VAE decode of the stored latent, a red flag when the latent is bad, or a neutral note."""
    latent, problem = latent_problem(record, base)
    if problem:
        return Panel(flag=problem)
    if decoder is None:
        return Panel(note=decode_note)
    try:
        return Panel(image=decoder.decode(latent))
    except Exception as exc:  # one bad latent or a model error is a flagged panel, not a failed report
        text = " ".join(str(exc).split())[:160]
        return Panel(flag=f"decode failed: {type(exc).__name__}: {text}")


def sheet_entries(
    records: list[dict],
    base: str | Path,
    *,
    decoder: LatentDecoder | None = None,
    decode_note: str = "not decoded (--no-decode)",
    manifest_path: str | Path | None = None,
    progress: bool = True,
) -> list[SheetEntry]:
    """The contact-sheet panels of `records` (full-resolution crop, thumbnail original, decode)."""
    from tqdm.auto import tqdm

    base = Path(base)
    entries = []
    for record in tqdm(records, desc="contact sheet", unit="img", leave=False, disable=not progress):
        image_path = record.get("image_path") if isinstance(record.get("image_path"), str) else None
        path = resolve_image_path(image_path, manifest_path) if image_path else None
        original = original_panel(path)
        crop, box = crop_panel(record, path)
        if original.image is not None and box is not None:
            scale = original.image.shape[1] / original.size[0]
            original.box = tuple(v * scale for v in box)
        entries.append(
            SheetEntry(
                image_id=str(record.get("image_id") or image_path or "?"),
                caption=record.get("caption") if has_caption(record) else None,
                bucket=record.get("aspect_bucket") if isinstance(record.get("aspect_bucket"), str) else None,
                width=record.get("width") if type(record.get("width")) is int else None,
                height=record.get("height") if type(record.get("height")) is int else None,
                image_path=image_path,
                original=original,
                crop=crop,
                decoded=decoded_panel(record, base, decoder, decode_note),
                upscale=upscale_of(record),
            )
        )
    return entries


# ------------------------------------------------------------------------------ sampling
def sample_indices(total: int, count: int, seed: int) -> list[int]:
    """`count` distinct positions out of `total`, reproducible from `seed`, in manifest order."""
    count = max(0, min(count, total))
    return sorted(random.Random(seed).sample(range(total), count))


def sample_positions(manifest, count: int, seed: int) -> tuple[set[int], set[int]]:
    """(positions of the contact sheet: records not flagged, the flagged examples: FILTERED_SHOWN per reason)."""
    reasons = manifest.table.column("filtered").to_pylist()
    unflagged = [row for row, reason in enumerate(reasons) if reason is None]
    sheet = {unflagged[i] for i in sample_indices(len(unflagged), count, seed)}
    by_reason: dict[str, list[int]] = {}
    for row, reason in enumerate(reasons):
        if reason is not None:
            by_reason.setdefault(reason, []).append(row)
    examples = set()
    for reason in sorted(by_reason):
        rows = by_reason[reason]
        examples.update(rows[i] for i in sample_indices(len(rows), FILTERED_SHOWN, seed))
    return sheet, examples


@dataclass
class FilteredEntry:
    """One flagged record on the filtered strip: its image, why it is not used, and the image it duplicates."""

    image_id: str
    reason: str
    detail: str
    original: Panel
    kept_id: str | None = None
    kept: Panel | None = None
    upscale: float | None = None


def filtered_entries(records: list[dict], manifest, manifest_path: Path | None) -> list[FilteredEntry]:
    """The strip's examples, in reason order; duplicates show the kept image beside them."""
    from prep.curate import REASONS

    wanted = {r["filtered"].get("duplicate_of") for r in records if isinstance(r.get("filtered"), dict)} - {None}
    kept_rows = {}
    if wanted:
        kept_rows = {i: row for row, i in enumerate(manifest.table.column("image_id").to_pylist()) if i in wanted}
    entries = []
    for record in records:
        flag = record["filtered"]
        image_path = record.get("image_path") if isinstance(record.get("image_path"), str) else None
        kept_id = flag.get("duplicate_of") if isinstance(flag.get("duplicate_of"), str) else None
        kept = None
        if kept_id in kept_rows:
            kept_path = manifest.record(kept_rows[kept_id]).get("image_path")
            kept = original_panel(resolve_image_path(kept_path, manifest_path) if isinstance(kept_path, str) else None)
        entries.append(FilteredEntry(
            image_id=str(record.get("image_id") or image_path), reason=str(flag.get("reason")),
            detail=str(flag.get("detail") or ""), upscale=upscale_of(record), kept_id=kept_id, kept=kept,
            original=original_panel(resolve_image_path(image_path, manifest_path) if image_path else None),
        ))  # fmt: skip
    order = {reason: i for i, reason in enumerate(REASONS)}
    return sorted(entries, key=lambda e: (order.get(e.reason, len(order)), e.reason, e.image_id))


# ------------------------------------------------------------------------------ statistics
@dataclass
class DatasetStats:
    """Everything the summary and the charts show, gathered in one pass over the manifest."""

    records: int = 0
    ready: int = 0
    not_ready_reasons: Counter = field(default_factory=Counter)
    ready_but_invalid: int = 0  # header-ready records whose data fails verify (e.g. NaN)
    rejected_now: int = 0  # lines the manifest reader sets aside today
    rejected_saved: int = 0  # lines earlier rewrites moved to <manifest>.rejected.jsonl
    rejected_examples: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason), first few
    artifacts: dict[str, Counter] = field(default_factory=lambda: {kind: Counter() for kind in store.file_artifacts(frozenset())})
    buckets: Counter = field(default_factory=Counter)
    megapixels: list[float] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    no_caption: int = 0
    token_counts: list[int] | None = None
    token_note: str | None = None
    tokenizer_id: str | None = None
    filtered: Counter = field(default_factory=Counter)  # reason -> records flagged by curation (not verified)
    max_upscale: float | None = 2.0  # the curation limit in force: sheet cards above it are marked

    @property
    def not_ready(self) -> int:
        return self.records - self.ready

    @property
    def truncated(self) -> int:
        return sum(1 for n in self.token_counts or () if n > T5_MAX_LENGTH)


def _check_one(record: dict, base: Path, expected) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(readiness reasons, {kind: verify file status}, {kind: provenance of the valid files}).

    Readiness is `store.readiness_reasons` exactly as export asks it (headers only, stale
    artifacts not ready); file status and provenance are `prep verify`'s own per-record
    check, which reads the data.
    """
    from prep.verify import check_record

    reasons = store.readiness_reasons(record, base, stale_against=expected)
    if isinstance(record.get("filtered"), dict):  # flagged: not verified (no model ran on it), as `prep verify`
        return reasons, {}, {}
    _, statuses, origins = check_record(record, base, expected)
    return reasons, statuses, origins


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_rejected_saved(manifest_path: Path) -> int:
    side = rejected_path(manifest_path)
    try:
        with open(side, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def gather_stats(manifest, base: Path, sample_at: set[int], *, workers: int = 8, progress: bool = True,
                 filtered_at: set[int] = frozenset()):
    """(DatasetStats, captions, the sampled records, the filtered examples): readiness, verify status and
    distributions of the records used for training; flagged records are counted by reason only."""
    from tqdm.auto import tqdm

    from prep import provenance

    stats = DatasetStats(records=len(manifest), rejected_now=len(manifest.rejected))
    expected = provenance.expected_from_metadata(store.read_metadata(base))
    stats.rejected_saved = count_rejected_saved(manifest.path)
    stats.rejected_examples = [(item.lineno, item.reason) for item in manifest.rejected[:REJECTED_SHOWN]]
    captions: list[str] = []
    sampled: list[dict] = []
    examples: list[dict] = []
    position = 0
    bar = tqdm(total=len(manifest), desc="report: check records", unit="rec", leave=False, disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk in _chunks(manifest, 512):
            results = pool.map(lambda r: _check_one(r, base, expected), chunk)
            for record, (reasons, statuses, origins) in zip(chunk, results, strict=True):
                if position in sample_at:
                    sampled.append(record)
                if position in filtered_at:
                    examples.append(record)
                position += 1
                if isinstance(record.get("filtered"), dict):
                    stats.filtered[reasons[0].removeprefix("filtered: ")] += 1
                    stats.not_ready_reasons.update(reasons)
                    continue
                if reasons:
                    stats.not_ready_reasons.update(reasons)
                else:
                    stats.ready += 1
                    if any(status != store.VALID for status in statuses.values()):
                        stats.ready_but_invalid += 1
                for kind, status in statuses.items():
                    label = "valid" if status == store.VALID else "missing" if status == store.MISSING else "invalid"
                    stats.artifacts.setdefault(kind, Counter())[label] += 1
                for kind, origin in origins.items():
                    if origin == provenance.UNKNOWN:
                        stats.artifacts.setdefault(kind, Counter())["unknown"] += 1
                    elif provenance.is_stale(origin):
                        stats.artifacts.setdefault(kind, Counter())["stale"] += 1
                _distributions(record, stats, captions)
            bar.update(len(chunk))
    bar.close()
    return stats, captions, sampled, examples


def _distributions(record: dict, stats: DatasetStats, captions: list[str]) -> None:
    bucket = record.get("aspect_bucket")
    stats.buckets[bucket if isinstance(bucket, str) else "(none)"] += 1
    width, height = record.get("width"), record.get("height")
    if type(width) is int and type(height) is int and width > 0 and height > 0:
        stats.megapixels.append(width * height / 1e6)
    if has_caption(record):
        captions.append(record["caption"])
        stats.caption_words.append(len(record["caption"].split()))
    else:
        stats.no_caption += 1


def count_tokens(captions: list[str], tokenizer_id: str | None, stats: DatasetStats) -> None:
    """T5 token counts per caption (untruncated, with </s>); a note instead when no tokenizer loads."""
    if not tokenizer_id:
        stats.token_note = "T5 token counts skipped: no tokenizer (pass --t5-model)."
        return
    stats.tokenizer_id = tokenizer_id
    try:
        from prep.stages.t5 import T5Encoder

        tokenizer = T5Encoder.load_tokenizer_only(tokenizer_id).tokenizer
        tokenizer.model_max_length = 1 << 30  # counting, not encoding: no "longer than maximum" warning
    except Exception as exc:  # any load failure (offline, wrong id) is a note, not a failed report
        text = " ".join(str(exc).split())[:200]
        stats.token_note = f"T5 token counts skipped: tokenizer {tokenizer_id!r} could not be loaded ({type(exc).__name__}: {text})."
        return
    counts: list[int] = []
    for start in range(0, len(captions), 1000):
        batch = captions[start : start + 1000]
        ids = tokenizer(batch, truncation=False, padding=False)["input_ids"]
        counts.extend(len(x) for x in ids)
    stats.token_counts = counts


# ------------------------------------------------------------------------------ contact sheet image
CELL = 176
GAP = 10
PAD = 12
CARD_GUTTER = 16
SHEET_COLUMNS = 2
CAPTION_LINES = 6  # at most; a row of cards is as tall as its longest caption
LINE = 16
BG = (255, 255, 255)
CARD_BG = (248, 249, 251)
CARD_BORDER = (214, 218, 224)
CELL_BG = (232, 235, 239)
TEXT = (28, 32, 38)
MUTED = (96, 104, 116)
FLAG_BG = (253, 232, 232)
FLAG_BORDER = (200, 30, 30)
FLAG_TEXT = (150, 20, 20)
WARN_TEXT = (180, 83, 9)
BOX_COLOR = (255, 200, 0)


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return ImageFont.load_default(size)


def wrap_pixels(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; long words are split; an ellipsis marks a cut."""
    words = " ".join(str(text).split()).split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = len(current)
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + " …") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    return lines


def _fit(array: np.ndarray, size: int):
    """Scale an RGB array to fit inside size x size (never up by more than 4x, to stay crisp)."""
    from PIL import Image

    image = Image.fromarray(array)
    scale = min(size / image.width, size / image.height, 4.0)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return image.resize(target, resample), scale


def _draw_panel(sheet, draw, panel: Panel, x: int, y: int, fonts: dict) -> None:
    """One CELL x CELL panel at (x, y): the image centred, or a red flag box, or a grey note."""
    if panel.flag:
        draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=FLAG_BG, outline=FLAG_BORDER, width=3)
        draw.text((x + 10, y + 10), "FLAGGED", font=fonts["bold"], fill=FLAG_BORDER)
        lines = wrap_pixels(panel.flag, fonts["small"], CELL - 20, 8)
        for i, line in enumerate(lines):
            draw.text((x + 10, y + 32 + i * 15), line, font=fonts["small"], fill=FLAG_TEXT)
        return
    draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=CELL_BG)
    if panel.image is None:
        lines = wrap_pixels(panel.note or "", fonts["small"], CELL - 20, 4)
        top = y + CELL // 2 - 8 * len(lines)
        for i, line in enumerate(lines):
            width = fonts["small"].getlength(line)
            draw.text((x + (CELL - width) / 2, top + i * 15), line, font=fonts["small"], fill=MUTED)
        return
    fitted, scale = _fit(panel.image, CELL)
    ox, oy = x + (CELL - fitted.width) // 2, y + (CELL - fitted.height) // 2
    sheet.paste(fitted, (ox, oy))
    if panel.box is not None:
        left, top, right, bottom = (v * scale for v in panel.box)
        full = left <= 0.5 and top <= 0.5 and right >= fitted.width - 0.5 and bottom >= fitted.height - 0.5
        if not full:  # outline only when the crop actually cuts something away
            draw.rectangle(
                [ox + left, oy + top, ox + right - 1, oy + bottom - 1], outline=BOX_COLOR, width=2
            )


def card_width() -> int:
    return 3 * CELL + 2 * GAP + 2 * PAD


def card_height(caption_lines: int) -> int:
    return PAD + 20 + 18 + CELL + 8 + max(1, caption_lines) * LINE + PAD


def _caption_lines(entry: SheetEntry, font) -> list[str]:
    caption = entry.caption if entry.caption is not None else "(no caption)"
    return wrap_pixels(caption, font, card_width() - 2 * PAD, CAPTION_LINES)


def upscale_text(upscale: float | None) -> str | None:
    """"enlarged 1.50×" when the image was scaled up to cover its bucket, else None."""
    return f"enlarged {upscale:.2f}×" if upscale is not None and upscale > 1.005 else None


def upscale_colour(upscale: float | None, limit: float | None) -> tuple[int, int, int]:
    if upscale is None or upscale <= 1.005:
        return MUTED
    return FLAG_TEXT if limit is not None and upscale > limit else WARN_TEXT


def _draw_card(sheet, draw, entry: SheetEntry, x: int, y: int, height: int, fonts: dict,
               limit: float | None = None) -> None:
    width = card_width()
    flagged = bool(entry.flags)
    draw.rounded_rectangle(
        [x, y, x + width - 1, y + height - 1],
        radius=8,
        fill=CARD_BG,
        outline=FLAG_BORDER if flagged else CARD_BORDER,
        width=2 if flagged else 1,
    )
    meta = []
    if entry.bucket:
        meta.append(f"bucket {entry.bucket}")
    if entry.width and entry.height:
        meta.append(f"{entry.width}×{entry.height}")
    if enlarged := upscale_text(entry.upscale):
        meta.append(enlarged)
    meta_text = " · ".join(meta)
    meta_w = fonts["small"].getlength(meta_text)
    title = wrap_pixels(entry.image_id, fonts["bold"], int(width - 2 * PAD - meta_w - 12), 1)[0]
    draw.text((x + PAD, y + PAD), title, font=fonts["bold"], fill=FLAG_TEXT if flagged else TEXT)
    draw.text((x + width - PAD - meta_w, y + PAD + 2), meta_text, font=fonts["small"],
              fill=upscale_colour(entry.upscale, limit))
    labels = ("original", f"VAE input {entry.bucket or ''}".strip(), "VAE decode")
    panels = (entry.original, entry.crop, entry.decoded)
    top = y + PAD + 20
    for i, (label, panel) in enumerate(zip(labels, panels, strict=True)):
        px = x + PAD + i * (CELL + GAP)
        draw.text((px, top), label, font=fonts["small"], fill=MUTED)
        _draw_panel(sheet, draw, panel, px, top + 18, fonts)
    text_top = top + 18 + CELL + 8
    for i, line in enumerate(_caption_lines(entry, fonts["caption"])):
        draw.text(
            (x + PAD, text_top + i * LINE),
            line,
            font=fonts["caption"],
            fill=TEXT if entry.caption is not None else MUTED,
        )


def render_sheet(entries: list[SheetEntry], path: Path, limit: float | None = None) -> tuple[int, int]:
    """Draw the cards (two per row) into one PNG with Pillow; returns its (width, height)."""
    from PIL import Image, ImageDraw

    fonts = {"bold": _font(14, bold=True), "small": _font(12), "caption": _font(13)}
    card_w = card_width()
    rows = [entries[i : i + SHEET_COLUMNS] for i in range(0, len(entries), SHEET_COLUMNS)] or [[]]
    heights = [card_height(max((len(_caption_lines(e, fonts["caption"])) for e in row), default=1)) for row in rows]
    width = SHEET_COLUMNS * card_w + (SHEET_COLUMNS - 1) * CARD_GUTTER + 2 * CARD_GUTTER
    height = sum(heights) + (len(rows) - 1) * CARD_GUTTER + 2 * CARD_GUTTER
    sheet = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(sheet)
    y = CARD_GUTTER
    for row, row_height in zip(rows, heights, strict=True):
        for col, entry in enumerate(row):
            _draw_card(sheet, draw, entry, CARD_GUTTER + col * (card_w + CARD_GUTTER), y, row_height, fonts, limit)
        y += row_height + CARD_GUTTER
    sheet.save(path, optimize=True)
    return width, height


STRIP_COLUMNS = 3
DETAIL_LINES = 5


def strip_card_width() -> int:
    return 2 * CELL + GAP + 2 * PAD


def strip_card_height() -> int:
    return PAD + 20 + 18 + CELL + 8 + 18 + DETAIL_LINES * 15 + PAD


def _draw_filtered_card(sheet, draw, entry: FilteredEntry, x: int, y: int, fonts: dict) -> None:
    """One flagged record: its image (and the kept image it duplicates), the reason and the detail."""
    width, height = strip_card_width(), strip_card_height()
    draw.rounded_rectangle([x, y, x + width - 1, y + height - 1], radius=8, fill=CARD_BG, outline=FLAG_BORDER, width=2)
    title = wrap_pixels(entry.image_id, fonts["bold"], width - 2 * PAD, 1)[0]
    draw.text((x + PAD, y + PAD), title, font=fonts["bold"], fill=TEXT)
    top = y + PAD + 20
    labels = ("flagged image", f"kept: {entry.kept_id}" if entry.kept_id else "")
    for i, (label, panel) in enumerate(zip(labels, (entry.original, entry.kept), strict=True)):
        px = x + PAD + i * (CELL + GAP)
        if label:
            draw.text((px, top), wrap_pixels(label, fonts["small"], CELL, 1)[0], font=fonts["small"], fill=MUTED)
        if panel is not None:
            _draw_panel(sheet, draw, panel, px, top + 18, fonts)
    text_top = top + 18 + CELL + 8
    draw.text((x + PAD, text_top), entry.reason, font=fonts["bold"], fill=FLAG_TEXT)
    for i, line in enumerate(wrap_pixels(entry.detail, fonts["small"], width - 2 * PAD, DETAIL_LINES)):
        draw.text((x + PAD, text_top + 18 + i * 15), line, font=fonts["small"], fill=TEXT)


def render_filtered_strip(entries: list[FilteredEntry], path: Path) -> tuple[int, int]:
    """The flagged examples, STRIP_COLUMNS cards per row, in one PNG; returns its (width, height)."""
    from PIL import Image, ImageDraw

    fonts = {"bold": _font(14, bold=True), "small": _font(12), "caption": _font(13)}
    rows = math.ceil(len(entries) / STRIP_COLUMNS)
    card_w, card_h = strip_card_width(), strip_card_height()
    width = STRIP_COLUMNS * card_w + (STRIP_COLUMNS + 1) * CARD_GUTTER
    height = rows * card_h + (rows + 1) * CARD_GUTTER
    sheet = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(sheet)
    for i, entry in enumerate(entries):
        row, col = divmod(i, STRIP_COLUMNS)
        x = CARD_GUTTER + col * (card_w + CARD_GUTTER)
        _draw_filtered_card(sheet, draw, entry, x, CARD_GUTTER + row * (card_h + CARD_GUTTER), fonts)
    sheet.save(path, optimize=True)
    return width, height


# ------------------------------------------------------------------------------ the report
@dataclass
class ReportResult:
    """What `build_report` wrote and what it found."""

    out_dir: Path
    html: Path
    stats: DatasetStats
    entries: list[SheetEntry]
    sheets: list[Path]
    charts: list[Path]
    notes: list[str]
    metadata: dict
    filtered: list[FilteredEntry] = field(default_factory=list)

    @property
    def sample_ids(self) -> list[str]:
        return [entry.image_id for entry in self.entries]


def upscale_limit(metadata: dict) -> float | None:
    """The --max-upscale in force for this dataset (what prep_metadata.json keeps, else the default)."""
    from prep.curate import DEFAULTS, resolve_rules

    try:
        return resolve_rules({}, {**(metadata.get("curation") or {}), "keep_ids": None}).max_upscale
    except (UserError, TypeError, AttributeError):
        return DEFAULTS.max_upscale


def require_matplotlib():
    """matplotlib with the Agg canvas (no display, no global pyplot state), or a one-line error."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("prep report needs matplotlib: pip install 'prep[report]'") from None
    return Figure, FigureCanvasAgg


def prepare_out_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create --out {out}: {exc}") from None
    for stale in out.glob("contact_sheet_*.png"):  # a previous report may have had more pages
        stale.unlink(missing_ok=True)
    return out


def load_decoder(
    metadata: dict,
    vae_model: str | None,
    vae_subfolder: str | None,
    device: str,
    dtype: str,
    notes: list[str],
) -> tuple[LatentDecoder | None, str]:
    """The decoder for the stored latents, or (None, why) after a note: never fails the report."""
    from prep import config

    convention = metadata.get("vae") if isinstance(metadata.get("vae"), dict) else {}
    recorded = convention.get("model_id")
    if vae_model is None:
        model_id = recorded or config.VAE_MODEL
        subfolder = vae_subfolder if vae_subfolder is not None else convention.get("subfolder", config.VAE_SUBFOLDER)
    else:
        model_id = vae_model
        subfolder = vae_subfolder if vae_subfolder is not None else config.VAE_SUBFOLDER
        if recorded and str(recorded) != str(vae_model):
            notes.append(f"Decoding with --vae-model {vae_model}, but the latents were encoded with {recorded}.")
    shift, scale = convention.get("shift_factor"), convention.get("scaling_factor")
    if not isinstance(shift, (int, float)) or not isinstance(scale, (int, float)) or not scale:
        shift = scale = None
        notes.append("prep_metadata.json has no latent convention: decoding with the VAE config's shift/scale.")
    try:
        decoder = LatentDecoder.load(
            str(model_id), subfolder=subfolder, device=device, dtype=dtype, shift_factor=shift, scaling_factor=scale
        )
    except Exception as exc:  # offline, gated, wrong path: report everything else, flag the decodes
        text = " ".join(str(exc).split())[:200]
        notes.append(f"VAE {model_id!r} could not be loaded, so no latent is decoded ({type(exc).__name__}: {text}).")
        return None, "not decoded (VAE not loaded)"
    config_shift = float(decoder.vae.config.shift_factor or 0.0)
    config_scale = float(decoder.vae.config.scaling_factor)
    if shift is not None and (abs(config_scale - scale) > 1e-6 or abs(config_shift - shift) > 1e-6):
        notes.append(
            f"The VAE config's factors (shift {decoder.vae.config.shift_factor}, scale "
            f"{decoder.vae.config.scaling_factor}) differ from the dataset's convention "
            f"(shift {shift}, scale {scale}); decoding with the dataset's."
        )
    return decoder, ""


def build_report(
    manifest_path: str | Path,
    derived_dir: str | Path,
    out: str | Path,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    decode: bool = True,
    vae_model: str | None = None,
    vae_subfolder: str | None = None,
    t5_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    workers: int = 8,
    progress: bool = True,
) -> ReportResult:
    """Write `out/index.html` and its PNGs for the manifest and its derived dir; returns what it found.

    `vae_model` / `t5_model` default to the models recorded in prep_metadata.json. Nothing
    about the data makes this fail: problems are counted, noted and flagged on the page.
    """
    from prep import report_html

    figure_classes = require_matplotlib()
    manifest_path, base = Path(manifest_path), Path(derived_dir)
    check_report_inputs(manifest_path, base)
    out = prepare_out_dir(Path(out))
    notes: list[str] = []
    metadata = store.read_metadata(base)
    if not metadata:
        notes.append(f"{base / store.METADATA_FILE} is missing or unreadable: models and latent convention unknown.")

    manifest = read_manifest(manifest_path)
    sample_at, filtered_at = sample_positions(manifest, samples, seed)
    stats, captions, sampled, examples = gather_stats(manifest, base, sample_at, workers=workers, progress=progress,
                                                      filtered_at=filtered_at)
    stats.max_upscale = upscale_limit(metadata)
    flagged_entries = filtered_entries(examples, manifest, manifest_path)
    count_tokens(captions, t5_model or recorded_model(metadata, "t5"), stats)
    notes.extend(stats_notes(stats))
    entries, decoded = decoded_entries(sampled, base, manifest_path, metadata, notes, decode=decode,
                                       vae_model=vae_model, vae_subfolder=vae_subfolder, device=device,
                                       dtype=dtype, progress=progress)
    sheets = render_sheets(entries, out, stats.max_upscale)
    strip = render_strip(flagged_entries, out)
    charts = report_html.render_charts(stats, out, figure_classes)
    html_path = out / "index.html"
    page = report_html.render_page(manifest_path=manifest_path, derived_dir=base, stats=stats, metadata=metadata,
                                   entries=entries, sheets=sheets, charts=charts, notes=notes, samples=samples,
                                   seed=seed, decoded=decoded, filtered=flagged_entries, strip=strip)
    atomic_write_text(html_path, page)
    return ReportResult(out, html_path, stats, entries, sheets, [c.path for c in charts], notes, metadata,
                        flagged_entries)


def render_strip(flagged_entries: list, out: Path) -> Path | None:
    """The strip of filtered examples, or None (a stale strip from an earlier report is removed)."""
    strip = out / "filtered_strip.png"
    strip.unlink(missing_ok=True)
    if not flagged_entries:
        return None
    render_filtered_strip(flagged_entries, strip)
    return strip


def check_report_inputs(manifest_path: Path, base: Path) -> None:
    if not manifest_path.is_file():
        raise ReportError(f"manifest {manifest_path} not found")
    if not base.is_dir():
        raise ReportError(f"derived dir {base} not found")


def recorded_model(metadata: dict, stage: str) -> str | None:
    """The model id prep_metadata.json records for `stage`, or None."""
    models = metadata.get("models")
    recorded = models.get(stage, {}) if isinstance(models, dict) else {}
    return recorded.get("model_id") if isinstance(recorded, dict) else None


def stats_notes(stats: DatasetStats) -> list[str]:
    notes = [stats.token_note] if stats.token_note else []
    if stats.ready_but_invalid:
        notes.append(
            f"{stats.ready_but_invalid} record{'' if stats.ready_but_invalid == 1 else 's'} pass the header-only "
            "readiness check (the one export uses) but fail verify (non-finite values or truncated data): "
            "export would ship them; run `prep verify` and re-encode them."
        )
    return notes


def decoded_entries(sampled, base: Path, manifest_path: Path, metadata: dict, notes: list[str], *, decode: bool,
                    vae_model, vae_subfolder, device: str, dtype: str, progress: bool):
    """The contact-sheet entries, latents decoded when asked and a VAE loads; (entries, decoded)."""
    decoder, decode_note = None, "not decoded (--no-decode)"
    if decode and sampled:
        decoder, decode_note = load_decoder(metadata, vae_model, vae_subfolder, device, dtype, notes)
        if decoder is not None and str(decoder.device) == "cpu":
            logger.info("decoding %d latents on the CPU (slow for 1024px buckets; --no-decode skips it)", len(sampled))
    entries = sheet_entries(
        sampled, base, decoder=decoder, decode_note=decode_note, manifest_path=manifest_path, progress=progress
    )
    if decoder is not None:
        from prep.models import free_model

        free_model(decoder.vae)
    return entries, decoder is not None


def render_sheets(entries, out: Path, max_upscale) -> list[Path]:
    sheets = []
    for page, start in enumerate(range(0, len(entries), SHEET_PAGE), start=1):
        sheet = out / f"contact_sheet_{page:02d}.png"
        render_sheet(entries[start : start + SHEET_PAGE], sheet, max_upscale)
        sheets.append(sheet)
    return sheets


def summary_line(result: ReportResult) -> str:
    stats = result.stats
    flagged = sum(1 for entry in result.entries if entry.flags)
    return textwrap.shorten(
        f"report: {stats.records} records, {stats.ready} ready, {stats.not_ready} not ready, "
        f"{stats.rejected_now} rejected lines; {len(result.entries)} samples ({flagged} flagged) -> {result.html}",
        width=400,
    )
