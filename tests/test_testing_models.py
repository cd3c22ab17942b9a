"""The tiny models keep the real classes and output dims, are deterministic and cached; test images too."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep import config
from prep.testing import (
    DEFAULT_IMAGE_SPECS,
    DINOV3_PREPROCESSOR_CONFIG,
    MODEL_NAMES,
    TINY_MODELS_MARKER,
    ImageSpec,
    make_test_images,
    make_tiny_models,
)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_tiny_models_are_the_real_classes_with_real_output_dims(tiny_models) -> None:
    assert set(tiny_models) == set(MODEL_NAMES)
    vae = _config(tiny_models["vae"])
    assert vae["_class_name"] == "AutoencoderKL"
    assert vae["latent_channels"] == config.VAE_LATENT_CHANNELS
    assert len(vae["down_block_types"]) == 4  # 3 downsamples: 8x
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False
    t5 = _config(tiny_models["t5"])
    assert t5["architectures"] == ["T5EncoderModel"] and t5["d_model"] == config.T5_HIDDEN_DIM
    dinov3 = _config(tiny_models["dinov3"])
    assert dinov3["model_type"] == "dinov3_vit" and dinov3["hidden_size"] == config.DINOV3_DIM
    captioner = _config(tiny_models["captioner"])
    assert captioner["architectures"] == ["Gemma3ForConditionalGeneration"]
    preprocessor = json.loads((tiny_models["dinov3"] / "preprocessor_config.json").read_text())
    assert preprocessor == DINOV3_PREPROCESSOR_CONFIG


def test_each_tiny_model_loads_quickly(tiny_models) -> None:
    from diffusers import AutoencoderKL
    from transformers import AutoModel, AutoModelForImageTextToText, T5EncoderModel

    loaders = {
        "vae": AutoencoderKL.from_pretrained,
        "t5": T5EncoderModel.from_pretrained,
        "dinov3": AutoModel.from_pretrained,
        "captioner": AutoModelForImageTextToText.from_pretrained,
    }
    for name, load in loaders.items():
        started = time.perf_counter()
        load(tiny_models[name])
        assert time.perf_counter() - started < 2.0, name


def test_tiny_models_are_cached_by_their_marker(tiny_models) -> None:
    root = tiny_models["vae"].parent
    weights = tiny_models["vae"] / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert (root / TINY_MODELS_MARKER).is_file()

    started = time.perf_counter()
    again = make_tiny_models(root)

    assert again == tiny_models
    assert time.perf_counter() - started < 0.1
    assert weights.stat().st_mtime_ns == before


def test_tiny_models_are_deterministic_from_the_seed(tiny_models, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    rebuilt = make_tiny_models(tmp_path / "same")

    for name in MODEL_NAMES:
        for weights in sorted(tiny_models[name].glob("*.safetensors")):
            original, copy = load_file(weights), load_file(rebuilt[name] / weights.name)
            assert original.keys() == copy.keys()
            assert all(np.array_equal(original[key], copy[key]) for key in original), name
        for tokenizer_file in ("tokenizer.json",):
            if (tiny_models[name] / tokenizer_file).exists():
                assert (tiny_models[name] / tokenizer_file).read_bytes() == (
                    rebuilt[name] / tokenizer_file
                ).read_bytes()


def test_a_different_seed_gives_different_weights(tmp_path: Path, tiny_models) -> None:
    from safetensors.numpy import load_file

    other = make_tiny_models(tmp_path / "other", seed=1)
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(tiny_models["vae"] / name), load_file(other["vae"] / name)
    assert any(not np.array_equal(a[key], b[key]) for key in a)


def test_an_interrupted_build_is_redone(tmp_path: Path, tiny_models) -> None:
    root = tmp_path / "partial"
    (root / "vae").mkdir(parents=True)
    (root / TINY_MODELS_MARKER).write_text('{"version": 0}')

    paths = make_tiny_models(root)

    assert all((paths[name] / "config.json").is_file() for name in MODEL_NAMES)


def test_default_test_images_mix_modes_formats_and_sizes(sample_images: list[Path]) -> None:
    assert len(sample_images) == len(DEFAULT_IMAGE_SPECS) >= 12
    seen_modes, seen_formats = set(), set()
    for path, spec in zip(sample_images, DEFAULT_IMAGE_SPECS, strict=True):
        with Image.open(path) as image:
            assert image.size == (spec.width, spec.height)
            assert max(image.size) <= 256
            seen_modes.add(image.mode)
            seen_formats.add(image.format)
    assert {"RGB", "L", "RGBA", "P", "LA", "CMYK"} <= seen_modes
    assert any(mode.startswith("I") for mode in seen_modes)
    assert {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"} <= seen_formats


def test_test_images_are_deterministic_and_varied(tmp_path: Path) -> None:
    first = make_test_images(tmp_path / "a")
    second = make_test_images(tmp_path / "b")
    other_seed = make_test_images(tmp_path / "c", seed=1)

    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[2].read_bytes() != other_seed[2].read_bytes()
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in first]
    assert len({p.tobytes() for p in pixels}) == len(pixels)
    assert all(p.std() > 10 for p in pixels)  # gradients + noise, not flat colour


def test_custom_specs(tmp_path: Path) -> None:
    specs = [ImageSpec("a.png", 33, 17, mode="RGBA"), ImageSpec("b.jpg", 20, 40, orientation=8)]

    paths = make_test_images(tmp_path, specs)

    assert [p.name for p in paths] == ["a.png", "b.jpg"]
    with Image.open(paths[1]) as image:
        assert image.getexif()[0x0112] == 8


@pytest.mark.parametrize("spec", DEFAULT_IMAGE_SPECS, ids=lambda s: s.name)
def test_each_default_spec_writes_its_mode(tmp_path: Path, spec: ImageSpec) -> None:
    (path,) = make_test_images(tmp_path, [spec])
    with Image.open(path) as image:
        if spec.mode == "I;16":
            assert image.mode in ("I;16", "I")
        else:
            assert image.mode == spec.mode
        assert getattr(image, "n_frames", 1) == spec.frames
