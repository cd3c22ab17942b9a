"""`prep report` on a real tiny run: self-contained HTML, the VAE's exact crop, flagged panels, seeded samples."""

from __future__ import annotations

import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from prep import report
from prep.cli import main
from prep.manifest import read_manifest
from prep.preprocess import load_bucket_crop, to_vae_pixels
from prep.store import artifact_path, load_npy, read_metadata
from prep.testing import model_flags

BUCKETS = "64x64,64x128,128x64,96x96"
# About 90 tokens with the tiny T5 tokenizer: over the 77-token limit, but not by far.
NASTY_CAPTION = 'a <b>bold</b> "quoted" caption & <script>alert(1)</script> ' + "word " * 6


def model_args(models: dict[str, Path]) -> list[str]:
    return model_flags(models, caption_max_new_tokens=12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_models, sample_images) -> Path:
    """One full tiny run (manifest + derived dir), shared read-only; tests that change it copy it."""
    work = tmp_path_factory.mktemp("report_dataset")
    args = [
        "run",
        "--images", str(sample_images[0].parent),
        "--manifest", str(work / "manifest.jsonl"),
        "--output-base-dir", str(work / "derived"),
        "--buckets", BUCKETS,
        "--min-free-gb", "0",
        "--batch-size", "4",
        "--num-workers", "0",
        *model_args(tiny_models),
    ]
    assert main(args) == 0
    return work


@pytest.fixture
def work(dataset: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(dataset, copy)
    return copy


def records_of(work: Path) -> list[dict]:
    return list(read_manifest(work / "manifest.jsonl"))


def rewrite_record(work: Path, image_id: str, **fields) -> None:
    """Change fields of one record of the copied manifest (the shared images are never touched)."""
    path = work / "manifest.jsonl"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["image_id"] == image_id:
            record.update(fields)
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr"}


class PageParser(HTMLParser):
    """Collects every tag, every URL-bearing attribute and the text of the page; checks nesting."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.attrs: dict[str, list[dict]] = {}
        self.text: list[str] = []
        self.doctype: str | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in VOID:
            self.open.append(tag)
        self.attrs.setdefault(tag, []).append(dict(attrs))
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action") and value is not None:
                self.urls.append(value)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_report_builds_a_self_contained_valid_page(work: Path, capsys) -> None:
    rewrite_record(work, "rgb_square", caption=NASTY_CAPTION)
    out = work / "report"
    code = main([
        "report", "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived"),
        "--out", str(out), "--samples", "14", "--seed", "1",
    ])
    assert code == 0, capsys.readouterr().err
    page_path = out / "index.html"
    raw = page_path.read_text(encoding="utf-8")
    page = parse_page(page_path)

    assert page.doctype and page.doctype.lower() == "doctype html"
    assert page.errors == [] and page.open == []  # every element closed, properly nested
    assert page.tags.count("html") == page.tags.count("head") == page.tags.count("body") == 1
    assert page.attrs["html"][0].get("lang") == "en"
    assert any(meta.get("charset", "").lower() == "utf-8" for meta in page.attrs["meta"])
    # Nothing from the network: no URL scheme other than a data: URI, every file referenced exists.
    assert "http://" not in raw and "https://" not in raw and "//" not in "".join(page.urls)
    assert "link" not in page.tags and "script" not in page.tags
    images = [attrs["src"] for attrs in page.attrs["img"]]
    assert len(images) >= 5  # 4 charts (words, tokens, buckets, sizes) + the contact sheet
    for url in page.urls:
        if url.startswith("data:"):
            continue
        target = (out / url).resolve()
        assert target.is_file() and out.resolve() in target.parents, url
    for name in ("buckets.png", "sizes.png", "caption_words.png", "caption_tokens.png", "contact_sheet_01.png"):
        assert name in images
    # The caption's markup is text, not tags; and it is on the page in full.
    assert "<b>bold</b>" not in raw and "<script>" not in raw
    assert "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; caption &amp; &lt;script&gt;" in raw
    assert "b" not in page.tags
    assert any("<script>alert(1)</script>" in text for text in page.text)
    # The summary comes first, then the charts, then the sheet.
    sections = [attrs.get("aria-label") for attrs in page.attrs["section"]]
    assert sections == ["summary", "charts", "contact sheet"]
    assert "14 of 14 records sampled with seed 1" in " ".join(page.text)


def test_report_counts_and_token_truncation(work: Path, tiny_models) -> None:
    from transformers import AutoTokenizer

    rewrite_record(work, "rgb_square", caption=NASTY_CAPTION)
    result = report.build_report(
        work / "manifest.jsonl", work / "derived", work / "report", samples=0, decode=False, progress=False
    )
    stats = result.stats
    assert stats.records == 14 and stats.rejected_now == 0
    assert sum(stats.buckets.values()) == 14 and set(stats.buckets) <= set(BUCKETS.split(","))
    assert len(stats.megapixels) == 14 and len(stats.caption_words) == 14
    assert stats.token_counts is not None and len(stats.token_counts) == 14
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["t5"])
    captions = [r["caption"] for r in records_of(work)]
    expected = [len(tokenizer(c, truncation=False)["input_ids"]) for c in captions]
    assert stats.token_counts == expected
    assert 77 < max(expected) < 120 and sorted(expected)[-2] <= 77
    assert stats.truncated == 1  # only the long caption exceeds 77 T5 tokens
    assert stats.artifacts["vae"]["valid"] == 14
    # The caption changed after T5 encoded it: verify calls that t5 file stale, and so does the page.
    assert stats.artifacts["t5"]["stale"] == 1
    assert stats.ready == 13 and stats.not_ready_reasons == {"t5 stale": 1}  # as export judges readiness
    assert result.entries == []


def test_crop_panel_is_exactly_what_the_vae_encoded(dataset: Path, tiny_models) -> None:
    from prep.stages.vae import VAEEncoder

    records = records_of(dataset)
    entries = report.sheet_entries(records, dataset / "derived", decoder=None, progress=False)
    assert [e.image_id for e in entries] == [r["image_id"] for r in records]
    encoder = VAEEncoder.load(str(tiny_models["vae"]), subfolder=None, device="cpu", dtype="float32")
    for record, entry in zip(records, entries, strict=True):
        width, height = (int(v) for v in record["aspect_bucket"].split("x"))
        assert entry.crop.flag is None and entry.crop.image is not None
        assert entry.crop.image.shape == (height, width, 3) and entry.crop.image.dtype == np.uint8
        expected, _ = load_bucket_crop(record["image_path"], width, height)
        np.testing.assert_array_equal(entry.crop.image, expected)
        # Encoding the panel reproduces the stored latent: these are the pixels the VAE saw.
        latent, finite = encoder.encode(to_vae_pixels([entry.crop.image]))
        stored = load_npy(artifact_path(dataset / "derived", "vae", record["image_id"]))
        assert finite.all()
        np.testing.assert_allclose(latent[0].astype(np.float32), stored.astype(np.float32), atol=2e-3, rtol=1e-2)


def test_bad_latent_missing_and_unreadable_images_are_flagged_not_fatal(work: Path) -> None:
    base = work / "derived"
    nan_path = artifact_path(base, "vae", "rgb_portrait")
    latent = load_npy(nan_path).copy()
    latent[0, 0, :3] = np.nan
    latent[1, 2, 0] = np.inf
    np.save(nan_path, latent)
    rewrite_record(work, "wide", image_path=str(work / "moved_away.webp"))
    records = {r["image_id"]: r for r in records_of(work)}
    out = work / "report"
    result = report.build_report(work / "manifest.jsonl", base, out, samples=14, seed=0, progress=False)
    by_id = {entry.image_id: entry for entry in result.entries}
    assert set(by_id) == set(records)

    bad = by_id["rgb_portrait"]
    assert bad.decoded.image is None and "NaN/Inf" in bad.decoded.flag and "4 of" in bad.decoded.flag
    assert bad.crop.image is not None and bad.original.image is not None
    missing = by_id["wide"]
    assert missing.original.flag.startswith("image file missing") and missing.crop.flag
    healthy = [e for e in result.entries if e.image_id not in ("rgb_portrait", "wide")]
    for entry in healthy:
        assert not entry.flags, entry.flags
        width, height = (int(v) for v in entry.bucket.split("x"))
        assert entry.decoded.image.shape == (height, width, 3) and entry.decoded.image.dtype == np.uint8
    assert result.stats.artifacts["vae"]["invalid"] == 1
    # the NaN file is not the one its record stamped, so it is not ready (export would not ship it)
    assert result.stats.not_ready_reasons["vae not stamped for this record"] == 1
    assert result.stats.ready_but_invalid == 0
    raw = (out / "index.html").read_text(encoding="utf-8")
    assert "latent has NaN/Inf values" in raw and "image file missing" in raw
    assert 'class="flagged"' in raw


def test_unreadable_image_is_flagged(work: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    record = dict(records_of(work)[0], image_path=str(broken))
    [entry] = report.sheet_entries([record], work / "derived", progress=False)
    assert entry.original.flag.startswith("unreadable image") and entry.crop.flag.startswith("unreadable image")
    assert entry.decoded.flag is None and entry.decoded.note  # the latent itself is fine, just not decoded


def test_decoder_undoes_the_latent_normalisation() -> None:
    seen = {}

    class FakeVAE:
        def decode(self, z):
            seen["z"] = z.clone()
            return type("Out", (), {"sample": torch.zeros(1, 3, 8 * z.shape[2], 8 * z.shape[3])})()

    decoder = report.LatentDecoder(
        FakeVAE(), shift_factor=0.1159, scaling_factor=0.3611, device="cpu", dtype=torch.float32
    )
    latent = np.random.default_rng(0).normal(size=(16, 4, 6)).astype(np.float16)
    pixels = decoder.decode(latent)
    expected = latent.astype(np.float32) / 0.3611 + 0.1159
    np.testing.assert_allclose(seen["z"][0].numpy(), expected, rtol=1e-6)
    assert pixels.shape == (32, 48, 3) and pixels.dtype == np.uint8
    assert (pixels == 128).all()  # 0 in [-1, 1] maps to mid grey (127.5 rounds to 128)


def test_no_decode_loads_no_model(work: Path, monkeypatch, capsys) -> None:
    import diffusers
    import transformers

    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("a model was loaded with --no-decode")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(report.LatentDecoder, "load", classmethod(refuse))
    out = work / "report"
    code = main([
        "report", "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived"),
        "--out", str(out), "--samples", "3", "--no-decode",
    ])
    assert code == 0, capsys.readouterr().err
    assert loads == []
    assert "3 samples (0 flagged)" in capsys.readouterr().out
    assert "no decode (the latent is only checked)" in (out / "index.html").read_text(encoding="utf-8")


def test_unloadable_tokenizer_is_a_note(work: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    out = work / "report"
    result = report.build_report(
        work / "manifest.jsonl", work / "derived", out, samples=0, decode=False, t5_model=str(empty), progress=False
    )
    assert result.stats.token_counts is None
    assert not (out / "caption_tokens.png").exists()
    assert "T5 token counts skipped" in (out / "index.html").read_text(encoding="utf-8")


def test_sampling_is_seeded(work: Path) -> None:
    assert report.sample_indices(1000, 16, 7) == report.sample_indices(1000, 16, 7)
    assert report.sample_indices(1000, 16, 7) != report.sample_indices(1000, 16, 8)
    assert report.sample_indices(5, 16, 0) == [0, 1, 2, 3, 4]

    def ids(seed: int) -> list[str]:
        result = report.build_report(
            work / "manifest.jsonl", work / "derived", work / f"r{seed}", samples=5, seed=seed,
            decode=False, progress=False,
        )
        return result.sample_ids

    first = ids(3)
    assert len(first) == 5 and first == ids(3)
    assert first != ids(4)


def test_missing_matplotlib_is_a_one_line_error(work: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["report", "--manifest", str(work / "manifest.jsonl"), "--derived-dir", str(work / "derived"),
                 "--out", str(work / "report"), "--no-decode"])
    err = capsys.readouterr().err
    assert code != 0 and "pip install 'prep[report]'" in err and len(err.strip().splitlines()) == 1


def test_metadata_of_the_run_is_on_the_page(work: Path) -> None:
    out = work / "report"
    result = report.build_report(work / "manifest.jsonl", work / "derived", out, samples=0, decode=False, progress=False)
    raw = (out / "index.html").read_text(encoding="utf-8")
    metadata = read_metadata(work / "derived")
    for kind, entry in metadata["models"].items():
        assert entry["revision"] in raw and kind in raw
    assert "(z - shift_factor) * scaling_factor" in raw and "0.3611" in raw and "0.1159" in raw
    assert result.metadata == metadata
