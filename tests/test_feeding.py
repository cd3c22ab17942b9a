"""Feeding the models: shared decodes, uint8 transfers, pinned batches, batch sizes by pixels, residency,
batched captions, --compile and --cpu-threads. The CUDA code paths run here on the CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from prep import preprocess, residency, stages
from prep.cli import build_parser, main
from prep.loader import fingerprint_of, merge_needs
from prep.models import cpu_features, stack_on_host
from prep.options import run_options_from
from prep.pipeline import run_job
from prep.preprocess import ImageDecodeError, ImageSource, open_rgb, to_vae_pixels, vae_pixel_table
from prep.stages.base import DEFAULT_BATCH_PIXELS, MAX_BATCH_SIZE
from prep.stages.caption import Captioner
from prep.stages.vae import VAEEncoder
from prep.testing import model_flags, synthetic_rgb


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(synthetic_rgb(1600, 1200, np.random.default_rng(3))).save(path, quality=90)
    return path


# --- one read, decodes shared by draft scale ------------------------------------------------
def test_requests_with_the_same_draft_scale_share_one_exact_decode(big_jpeg: Path) -> None:
    source, _ = ImageSource.read(big_jpeg)
    a = source.decode((224, 224))  # DINOv3: 448 px needed of 1200 -> 1/2
    b = source.decode((256, 256))  # 512 px needed -> still 1/2
    assert a is b and source.decodes == 1 and a.scale == 0.5
    assert np.array_equal(np.asarray(b.image), np.asarray(open_rgb(big_jpeg, draft_to=(256, 256))))
    c = source.decode((64, 64))  # 1/8
    full = source.decode(None)
    assert source.decodes == 3 and c.scale == 0.125 and full.scale == 1.0
    assert np.array_equal(np.asarray(c.image), np.asarray(open_rgb(big_jpeg, draft_to=(64, 64))))
    assert np.array_equal(np.asarray(full.image), np.asarray(open_rgb(big_jpeg)))


def test_a_draft_of_scale_one_decodes_like_no_draft(big_jpeg: Path) -> None:
    with Image.open(big_jpeg) as drafted, Image.open(big_jpeg) as plain:
        assert drafted.draft(None, drafted.size)[1][2] == drafted.size[0]  # Pillow chose 1/1
        assert np.array_equal(np.asarray(drafted.convert("RGB")), np.asarray(plain.convert("RGB")))


def test_the_bucket_crop_of_a_shared_decode_is_the_vae_pass_crop(big_jpeg: Path, sample_images) -> None:
    for path in [big_jpeg, *sample_images]:
        source, _ = ImageSource.read(path)
        crop, box = preprocess.bucket_crop(source.decode((96, 64)), 96, 64)
        want, want_box = preprocess.load_bucket_crop(path, 96, 64)
        assert box == want_box and np.array_equal(crop, want), path.name


def test_read_refuses_what_is_not_an_image_file(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ImageDecodeError, match="FileNotFoundError"):
        ImageSource.read(tmp_path / "missing.jpg")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        ImageSource.read(fifo)
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 2048)
    monkeypatch.setattr(preprocess, "MAX_FILE_BYTES", 1024)
    with pytest.raises(ImageDecodeError, match="over the 1024 byte limit"):
        ImageSource.read(big)


def test_a_decode_error_is_kept_not_retried(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(synthetic_rgb(64, 64, np.random.default_rng(0))).save(path)
    path.write_bytes(path.read_bytes()[:80])
    source, _ = ImageSource.read(path)
    for _ in range(2):
        with pytest.raises(ImageDecodeError):
            source.decode(None)
    assert source.decodes == 1


def test_fingerprint_comes_from_the_bytes_read(tmp_path: Path) -> None:
    from prep.provenance import sha256_file

    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    source, stat = ImageSource.read(path)
    fresh = fingerprint_of(source.data, stat, None)
    assert fresh == {"size": 3, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
    kept = {"size": 3, "mtime_ns": stat.st_mtime_ns, "sha256": "0" * 64}
    assert fingerprint_of(source.data, stat, kept) is kept  # unchanged size and mtime: not re-hashed
    assert fingerprint_of(source.data, stat, {**kept, "size": 4})["sha256"] == fresh["sha256"]


def test_merge_needs_is_in_row_order_with_every_stage_that_needs_a_row() -> None:
    merged = merge_needs([("caption", [2, 5], [("c",), ("f",)]), ("vae", [0, 2, 9], [("a",), ("c",), ("j",)])])
    assert merged == [(0, ("vae",), ("a",)), (2, ("caption", "vae"), ("c",)), (5, ("caption",), ("f",)),
                      (9, ("vae",), ("j",))]


# --- the VAE gets uint8 bytes and a lookup table --------------------------------------------
def test_the_pixel_table_is_to_vae_pixels_bit_for_bit(sample_images) -> None:
    table = vae_pixel_table()
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    assert torch.equal(table[torch.arange(256)], to_vae_pixels(levels)[0, 0].reshape(256))
    crop, _ = preprocess.load_bucket_crop(sample_images[0], 96, 64)
    batch = torch.from_numpy(crop)[None]
    assert torch.equal(table[batch.to(torch.int32)].permute(0, 3, 1, 2).contiguous(), to_vae_pixels(crop[None]))


def test_uint8_batches_encode_exactly_like_float_ones(tiny_models, sample_images) -> None:
    encoder = VAEEncoder.load(str(tiny_models["vae"]), device="cpu", dtype="float32")
    crops = [preprocess.load_bucket_crop(path, 64, 64)[0] for path in sample_images[:3]]
    want, _ = encoder.encode(to_vae_pixels(np.stack(crops)))
    got, finite = encoder.encode_uint8([torch.from_numpy(c) for c in crops])
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16)) and finite.all()
    encoder.use_channels_last()  # what a CUDA encoder does; on a CPU kernels may round otherwise
    again, _ = encoder.encode_uint8([torch.from_numpy(c) for c in crops])
    assert encoder.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(again.astype(np.float32), want.astype(np.float32), atol=2e-3)


def test_batches_are_stacked_on_the_host_and_pinned_only_for_a_gpu() -> None:
    items = [torch.full((2, 3), float(i)) for i in range(4)]
    batch = stack_on_host(items, "cpu")
    assert batch.shape == (4, 2, 3) and torch.equal(batch[3], items[3]) and not batch.is_pinned()
    assert stack_on_host([np.zeros((2, 2), np.uint8)], torch.device("cpu")).dtype == torch.uint8


# --- batch sizes by pixels ----------------------------------------------------------------
def opts(**values) -> SimpleNamespace:
    return SimpleNamespace(**{"batch_size": None, "batch_pixels": None, **values})


def test_batches_hold_pixels_not_a_fixed_count() -> None:
    vae = stages.get("vae")
    assert vae.batch_size_for(opts(), "cuda", 1024 * 1024) == 8
    assert vae.batch_size_for(opts(), "cuda:1", 512 * 512) == 32
    assert vae.batch_size_for(opts(), "cuda", 64 * 64) == MAX_BATCH_SIZE
    assert vae.batch_size_for(opts(), "cpu", 1024 * 1024) == 1  # a CPU: one at a time by default
    assert vae.batch_size_for(opts(batch_pixels=2 * 512 * 512), "cpu", 512 * 512) == 2
    assert vae.batch_size_for(opts(batch_size=3, batch_pixels=10**9), "cuda", 512 * 512) == 3  # the override
    assert vae.batch_size_for(opts(), "cuda", 4096 * 4096) == 1
    assert stages.get("dinov3").batch_size_for(opts(), "cuda", 224 * 224) == DEFAULT_BATCH_PIXELS // (224 * 224)
    caption_opts = opts(stage_options={"caption": stages.get("caption").options(caption_batch_size=5)})
    assert stages.get("caption").batch_size_for(caption_opts, "cuda", None) == 5


def test_the_vae_pass_batches_by_pixels_per_bucket(tmp_path, tiny_models, sample_images, monkeypatch) -> None:
    sizes = []
    vae = stages.get("vae")
    encode = vae.encode
    monkeypatch.setattr(type(vae), "encode", lambda self, encoder, items: sizes.append(
        (items[0][0].shape[1], items[0][0].shape[0], len(items))) or encode(encoder, items))
    assert main(["run", "--images", str(sample_images[0].parent), "--manifest", str(tmp_path / "m.jsonl"),
                 "--derived-dir", str(tmp_path / "d"), "--buckets", "64x64,64x128,128x64,96x96", "--min-free-gb", "0",
                 "--num-workers", "1", "--pass", "vae", "--batch-pixels", str(2 * 64 * 128),
                 *model_flags(tiny_models)]) == 0
    by_bucket: dict[str, list[int]] = {}
    for width, height, count in sizes:
        by_bucket.setdefault(f"{width}x{height}", []).append(count)
    members: dict[str, int] = {}
    for line in (tmp_path / "m.jsonl").read_text().splitlines():
        bucket = json.loads(line)["aspect_bucket"]
        members[bucket] = members.get(bucket, 0) + 1
    assert {bucket: sum(counts) for bucket, counts in by_bucket.items()} == members
    for bucket, counts in by_bucket.items():
        width, height = map(int, bucket.split("x"))
        size = max(1, 2 * 64 * 128 // (width * height))  # 4 of 64x64, 2 of 64x128, 1 of 96x96
        assert counts == [size] * (members[bucket] // size) + ([members[bucket] % size] if members[bucket] % size else [])
    assert len(set(by_bucket)) > 1 and max(max(c) for c in by_bucket.values()) > 1


# --- residency ------------------------------------------------------------------------------
def test_weights_are_counted_from_safetensors_headers(tiny_models) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["dinov3"])
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert residency.weight_bytes(tiny_models["dinov3"], 2) == pytest.approx(2 * params, rel=0.01)
    assert residency.weight_bytes(tiny_models["dinov3"], 4) == 2 * residency.weight_bytes(tiny_models["dinov3"], 2)
    assert residency.weight_bytes(tiny_models["dinov3"].parent / "absent", 2) is None
    assert residency.values_per_pixel(tiny_models["vae"]) == 6 * 8  # first block width 8
    assert residency.values_per_pixel(tiny_models["dinov3"]) == residency.TRANSFORMER_VALUES_PER_PIXEL


def test_stages_are_grouped_by_what_fits() -> None:
    gb = 10**9
    items = [residency.Footprint("caption", 8 * gb), residency.Footprint("dinov3", gb),
             residency.Footprint("vae", gb // 5)]
    assert residency.resident_groups(items, 80 * gb, 20 * gb) == [["caption", "dinov3", "vae"]]
    assert residency.resident_groups(items, 11 * gb, 3 * gb) == [["caption"], ["dinov3", "vae"]]
    assert residency.resident_groups(items, 0, 0) == [["caption"], ["dinov3"], ["vae"]]
    unknown = [items[0], residency.Footprint("dinov3", None), items[2]]
    assert residency.resident_groups(unknown, 80 * gb, 0) == [["caption"], ["dinov3"], ["vae"]]
    assert residency.working_reserve(items, 1000, 2) == residency.FIXED_RESERVE_BYTES + 64 * 2 * 1000


def test_a_hub_model_is_found_in_the_local_cache(tmp_path, tiny_models, monkeypatch) -> None:
    from prep.models import ResolvedModel

    commit = "a" * 40
    snapshot = tmp_path / "models--org--vae" / "snapshots" / commit / "vae"
    snapshot.mkdir(parents=True)
    for file in Path(tiny_models["vae"]).iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "models--org--vae" / "refs").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    model = ResolvedModel("--vae-model", "org/vae", False, "vae", commit)
    assert residency.checkpoint_folder(model) == snapshot
    missing = ResolvedModel("--vae-model", "org/other", False, None, commit)
    assert residency.checkpoint_folder(missing) is None


# --- the captioner: one request per image in the workers, one generate per batch ---------------
def test_prepared_requests_collate_to_the_processors_own_batch(tiny_models, sample_images) -> None:
    captioner = Captioner.load(str(tiny_models["captioner"]), device="cpu", max_new_tokens=4)
    images = [open_rgb(path) for path in sample_images[:3]]
    texts = [captioner.prompt_text, captioner.prompt_text.replace("<start_of_turn>model", "<start_of_turn>model\nA"),
             captioner.prompt_text]
    processor = captioner.processor
    want = processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt",
                     add_special_tokens=False)
    requests = [dict(processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False))
                for text, image in zip(texts, images, strict=True)]
    got = captioner._collate(requests)
    assert set(got) == set(want)
    assert want["input_ids"].shape[1] > requests[0]["input_ids"].shape[1]  # really padded, on the left
    for key in want:
        assert torch.equal(got[key], want[key]), key


# --- --compile and --cpu-threads ------------------------------------------------------------
def run_summary(args: list[str]):
    return run_job(run_options_from(build_parser().parse_args(["run", *args])))


def test_compile_compiles_the_image_models_and_reports_the_warmup(tmp_path, tiny_models, sample_images,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr("prep.models.COMPILE_OPTIONS", {"backend": "eager"})  # dynamo without a C++ toolchain
    compiled = []
    monkeypatch.setattr("prep.models.compile_module", lambda module: compiled.append(type(module).__name__)
                        or module.compile(backend="eager"))
    args = ["--images", str(sample_images[0].parent), "--buckets", "64x64,96x96", "--min-free-gb", "0",
            "--num-workers", "0", *model_flags(tiny_models)]
    plain = run_summary([*args, "--manifest", str(tmp_path / "a.jsonl"), "--derived-dir", str(tmp_path / "a")])
    fast = run_summary([*args, "--manifest", str(tmp_path / "b.jsonl"), "--derived-dir", str(tmp_path / "b"),
                        "--compile"])
    assert sorted(compiled) == ["DINOv3ViTModel", "Encoder", "T5EncoderModel"]
    assert plain.passes[0].warmup_seconds == 0 and fast.passes[0].warmup_seconds > 0
    for folder in ("vae_latents", "dinov3"):
        for file in (tmp_path / "a" / folder).glob("*.npy"):
            assert file.read_bytes() == (tmp_path / "b" / folder / file.name).read_bytes()


def test_cpu_threads_are_fixed_per_process(tmp_path, tiny_models, sample_images) -> None:
    before = torch.get_num_threads()
    try:
        assert main(["run", "--images", str(sample_images[0].parent), "--manifest", str(tmp_path / "m.jsonl"),
                     "--derived-dir", str(tmp_path / "d"), "--min-free-gb", "0", "--pass", "migrate",
                     "--cpu-threads", "3", *model_flags(tiny_models)]) == 0
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flag", [["--batch-pixels", "0"], ["--cpu-threads", "0"], ["--memory-budget-gb", "-1"]])
def test_bad_speed_flags_are_one_line_errors(tmp_path, flag, capsys) -> None:
    assert main(["run", "--images", str(tmp_path), "--manifest", str(tmp_path / "m.jsonl"), *flag]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prep: error: ")


def test_cpu_features_name_the_flags_that_matter() -> None:
    found = cpu_features()
    assert found["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(found) >= {"capability", "flags", "native_bf16", "threads"}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert found["native_bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)
    json.dumps(found)


def test_every_model_attends_with_pytorch_sdpa(tiny_models) -> None:
    """transformers picks SDPA where a model supports it and diffusers' attention uses it: no eager fallback."""
    from prep.stages.dinov3 import DINOv3Encoder
    from prep.stages.t5 import T5Encoder

    assert DINOv3Encoder.load(str(tiny_models["dinov3"]), device="cpu").model.config._attn_implementation == "sdpa"
    captioner = Captioner.load(str(tiny_models["captioner"]), device="cpu")
    assert captioner.model.config._attn_implementation == "sdpa"
    assert captioner.model.config.text_config._attn_implementation == "sdpa"
    vae = VAEEncoder.load(str(tiny_models["vae"]), device="cpu")
    assert {type(p).__name__ for p in vae.model.attn_processors.values()} == {"AttnProcessor2_0"}
    t5 = T5Encoder.load(str(tiny_models["t5"]), device="cpu")
    assert t5.model.config._attn_implementation == "sdpa"
