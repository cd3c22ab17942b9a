"""Each encoder equals a direct library call on the same input, loaded via from_pretrained.

The references below call diffusers / transformers directly (never the wrapper under test),
so a wrong transform, dtype, padding side or pooling makes these tests fail.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prep import config
from prep.models import free_model, local_dir_revision, resolve_device, resolve_dtype
from prep.preprocess import load_bucket_image, open_rgb, to_vae_pixels
from prep.stages.caption import Captioner
from prep.stages.dinov3 import DINOv3Encoder
from prep.stages.t5 import T5Encoder
from prep.stages.vae import VAEEncoder
from prep.testing import TEST_CAPTIONS

FP16_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}

# --- common -----------------------------------------------------------------------------------


def test_resolve_device_auto_follows_cuda_availability() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("float32", "cuda", torch.float32),
        ("fp32", "cpu", torch.float32),
        ("bfloat16", "cpu", torch.bfloat16),
        ("bf16", "cuda", torch.bfloat16),
    ],
)
def test_resolve_dtype(name: str, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name, torch.device(device)) == expected


@pytest.mark.parametrize("name", ["float16", "fp16"])
def test_float16_is_refused_with_a_one_line_reason(name: str) -> None:
    with pytest.raises(ValueError, match="overflow") as caught:
        resolve_dtype(name, torch.device("cpu"))
    assert "\n" not in str(caught.value)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError):
        resolve_dtype("int8", torch.device("cpu"))


def test_fp16_is_refused_before_loading(tiny_models) -> None:
    with pytest.raises(ValueError, match="fp16"):
        VAEEncoder.load(str(tiny_models["vae"]), dtype="fp16", device="cpu")
    with pytest.raises(ValueError, match="fp16"):
        T5Encoder.load(str(tiny_models["t5"]), dtype="float16", device="cpu")


def test_free_model_releases_parameter_storage() -> None:
    model = torch.nn.Linear(8, 8)
    free_model(model)
    assert next(model.parameters()).device.type == "meta"


def test_model_revision_of_a_local_dir_tracks_its_content(tmp_path: Path, tiny_models) -> None:
    copy = tmp_path / "t5"
    shutil.copytree(tiny_models["t5"], copy)
    revision = local_dir_revision(copy)
    assert revision.startswith("sha256:") and len(revision) == len("sha256:") + 12
    assert revision == local_dir_revision(Path(tiny_models["t5"]))  # same content, other path

    config_path = copy / "config.json"
    config_path.write_text(config_path.read_text().replace('"d_ff": 64', '"d_ff": 65'))
    assert local_dir_revision(copy) != revision


# --- VAE --------------------------------------------------------------------------------------


def _reference_vae_latents(vae_dir: Path, pixels: torch.Tensor) -> np.ndarray:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    return ((mean - vae.config.shift_factor) * vae.config.scaling_factor).to(torch.float16).numpy()


def _vae_batch(sample_images: list[Path], width: int = 64, height: int = 48) -> torch.Tensor:
    return to_vae_pixels([load_bucket_image(path, width, height) for path in sample_images[:5]])


def test_vae_latents_equal_diffusers_posterior_mean_shifted_and_scaled(tiny_models, sample_images) -> None:
    pixels = _vae_batch(sample_images)
    encoder = VAEEncoder.load(str(tiny_models["vae"]), subfolder=None, device="cpu", dtype="float32")

    latents, finite = encoder.encode(pixels)

    assert latents.dtype == np.float16 and latents.shape == (5, config.VAE_LATENT_CHANNELS, 6, 8)
    assert finite.dtype == np.bool_ and finite.all()
    np.testing.assert_allclose(latents, _reference_vae_latents(tiny_models["vae"], pixels), **FP16_TOLERANCE)
    assert len({latent.tobytes() for latent in latents}) == 5  # every image gives its own latent


def test_vae_loads_root_or_subfolder(tiny_models, tmp_path: Path) -> None:
    pipeline_dir = tmp_path / "pipeline"
    shutil.copytree(tiny_models["vae"], pipeline_dir / "vae")

    from_root = VAEEncoder.load(str(tiny_models["vae"]), subfolder="vae", device="cpu")
    from_subfolder = VAEEncoder.load(str(pipeline_dir), subfolder="vae", device="cpu")

    assert from_root.subfolder is None and from_subfolder.subfolder == "vae"
    assert from_subfolder.shift_factor == pytest.approx(0.1159)
    assert from_subfolder.scaling_factor == pytest.approx(0.3611)


def test_vae_loads_in_the_requested_dtype(tiny_models) -> None:
    encoder = VAEEncoder.load(str(tiny_models["vae"]), device="cpu", dtype="bf16")
    assert encoder.dtype == torch.bfloat16
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    latents, finite = encoder.encode(to_vae_pixels(np.zeros((1, 32, 32, 3), dtype=np.uint8)))
    assert latents.dtype == np.float16 and finite.all()
    assert encoder.convention()["compute_dtype"] == "bfloat16"


def test_vae_convention_says_what_is_stored(tiny_models) -> None:
    encoder = VAEEncoder.load(str(tiny_models["vae"]), subfolder="vae", device="cpu")
    assert encoder.convention() == {
        "latent": "posterior_mean",
        "transform": "(z - shift_factor) * scaling_factor",
        "shift_factor": pytest.approx(0.1159),
        "scaling_factor": pytest.approx(0.3611),
        "model_id": str(tiny_models["vae"]),
        "subfolder": None,
        "dtype": "float16 on disk",
        "compute_dtype": "float32",
    }


def test_vae_flags_non_finite_items(tiny_models) -> None:
    encoder = VAEEncoder.load(str(tiny_models["vae"]), device="cpu")
    pixels = torch.zeros(3, 3, 32, 32)
    pixels[1, 0, 5, 5] = float("nan")

    _, finite = encoder.encode(pixels)

    assert finite.tolist() == [True, False, True]


def test_vae_flags_latents_that_overflow_float16(tiny_models) -> None:
    encoder = VAEEncoder.load(str(tiny_models["vae"]), device="cpu")
    encoder.scaling_factor = 1e9  # finite in float32, inf once cast to float16

    latents, finite = encoder.encode(torch.rand(2, 3, 32, 32) * 2 - 1)

    assert not finite.any()
    assert np.isinf(latents).any()


def test_vae_unload_drops_the_model(tiny_models) -> None:
    encoder = VAEEncoder.load(str(tiny_models["vae"]), device="cpu")
    encoder.unload()
    assert encoder.model is None


# --- T5 ---------------------------------------------------------------------------------------

LONG_CAPTION = " ".join(TEST_CAPTIONS)  # far beyond 77 tokens: truncated


def test_t5_hidden_states_equal_transformers(tiny_models) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    captions = [*TEST_CAPTIONS[:4], LONG_CAPTION, ""]
    encoder = T5Encoder.load(str(tiny_models["t5"]), device="cpu", dtype="float32")

    hidden, masks, finite = encoder.encode(captions)

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["t5"])
    model = T5EncoderModel.from_pretrained(tiny_models["t5"]).eval()
    batch = tokenizer(captions, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).last_hidden_state.to(torch.float16).numpy()
    assert hidden.dtype == np.float16 and hidden.shape == (6, config.T5_MAX_LENGTH, config.T5_HIDDEN_DIM)
    np.testing.assert_allclose(hidden, reference, **FP16_TOLERANCE)
    assert masks == batch["attention_mask"].tolist()
    assert finite.tolist() == [True] * 6


def test_t5_masks_count_tokens_plus_eos_and_truncate(tiny_models) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["t5"])
    encoder = T5Encoder.load_tokenizer_only(str(tiny_models["t5"]))
    assert encoder.model is None

    short, long = encoder.attention_masks([TEST_CAPTIONS[0], LONG_CAPTION])

    n_tokens = len(tokenizer(TEST_CAPTIONS[0])["input_ids"])
    assert tokenizer(TEST_CAPTIONS[0])["input_ids"][-1] == tokenizer.eos_token_id
    assert short == [1] * n_tokens + [0] * (77 - n_tokens)
    assert long == [1] * 77
    with pytest.raises(RuntimeError):
        encoder.encode(["no model loaded"])


def test_t5_flags_hidden_states_that_overflow_float16(tiny_models) -> None:
    encoder = T5Encoder.load(str(tiny_models["t5"]), device="cpu")
    with torch.no_grad():
        encoder.model.encoder.final_layer_norm.weight.fill_(1e6)

    hidden, _, finite = encoder.encode(list(TEST_CAPTIONS[:2]))

    assert finite.tolist() == [False, False]
    assert np.isinf(hidden).any()


# --- DINOv3 -----------------------------------------------------------------------------------


def _model_card_preprocessing(images: list[Image.Image]) -> torch.Tensor:
    """DINOv3's model card recipe in plain torch: 224x224 bilinear, /255, ImageNet mean/std."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tensors = []
    for image in images:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        tensors.append(x)
    return (torch.cat(tensors) - mean) / std


def test_dinov3_preprocessing_matches_the_model_card_recipe(tiny_models, sample_images) -> None:
    images = [open_rgb(path) for path in sample_images]
    encoder = DINOv3Encoder.load(str(tiny_models["dinov3"]), device="cpu")

    pixels = encoder.preprocess(images)

    assert pixels.shape == (len(images), 3, 224, 224) and pixels.dtype == torch.float32
    diff = (pixels - _model_card_preprocessing(images)).abs()
    assert diff.max() < 0.02


def test_dinov3_embedding_equals_the_pooler_output(tiny_models, sample_images) -> None:
    from transformers import AutoModel

    images = [open_rgb(path) for path in sample_images[:4]]
    encoder = DINOv3Encoder.load(str(tiny_models["dinov3"]), device="cpu", dtype="float32")

    embeddings, finite = encoder.encode(images)

    model = AutoModel.from_pretrained(tiny_models["dinov3"]).eval()
    with torch.no_grad():
        output = model(pixel_values=_model_card_preprocessing(images))
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, config.DINOV3_DIM)
    assert finite.all()
    # the pooled output is the CLS token of the (layer-normed) last hidden state
    cls = output.last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(output.pooler_output.numpy(), cls, rtol=1e-5, atol=1e-5)
    # and ours equals it up to the ~0.02 preprocessing difference between PIL and torch resizing
    cosine = (embeddings * cls).sum(1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(cls, axis=1)
    assert (cosine > 0.99).all()
    with torch.no_grad():
        exact = model(pixel_values=encoder.preprocess(images)).pooler_output.numpy()
    np.testing.assert_allclose(embeddings, exact, rtol=1e-5, atol=1e-5)
    assert len({e.tobytes() for e in embeddings}) == 4
    from_pixels, _ = encoder.encode_pixels(encoder.preprocess(images))
    np.testing.assert_array_equal(from_pixels, embeddings)


def test_dinov3_processor_pickles_for_dataloader_workers(tiny_models, sample_images) -> None:
    encoder = DINOv3Encoder.load(str(tiny_models["dinov3"]), device="cpu")
    processor = pickle.loads(pickle.dumps(encoder.processor))
    image = open_rgb(sample_images[0])
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, encoder.preprocess([image]))


def test_dinov3_flags_non_finite_items(tiny_models) -> None:
    encoder = DINOv3Encoder.load(str(tiny_models["dinov3"]), device="cpu")
    pixels = torch.zeros(2, 3, 224, 224)
    pixels[0, 1, 100, 100] = float("inf")

    _, finite = encoder.encode_pixels(pixels)

    assert finite.tolist() == [False, True]


def test_dinov3_processor_is_pil_backed_without_torchvision(tiny_models) -> None:
    from transformers.utils import is_torchvision_available

    encoder = DINOv3Encoder.load(str(tiny_models["dinov3"]), device="cpu")
    expected = "DINOv3ViTImageProcessor" if is_torchvision_available() else "ViTImageProcessorPil"
    assert encoder.processor_name == expected


# --- captioner --------------------------------------------------------------------------------

MAX_NEW_TOKENS = 12


def _reference_caption(model, processor, image: Image.Image, prompt: str) -> str:
    """The documented single-image path: chat template with the image, greedy generate."""
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def captioner(tiny_models) -> Captioner:
    return Captioner.load(str(tiny_models["captioner"]), device="cpu", max_new_tokens=MAX_NEW_TOKENS)


def test_captions_equal_direct_greedy_generation(captioner, tiny_models, sample_images) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    images = [open_rgb(path) for path in sample_images[:5]]
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["captioner"]).eval()
    processor = AutoProcessor.from_pretrained(tiny_models["captioner"])
    reference = [_reference_caption(model, processor, image, config.CAPTION_PROMPT) for image in images]

    singles = [captioner.caption([image])[0] for image in images]
    batched = captioner.caption(images)

    assert singles == reference
    assert batched == reference
    assert len(set(reference)) > 1  # the image reaches the model


def test_caption_request_is_one_user_turn_with_image_and_prompt(captioner) -> None:
    text = captioner.prompt_text
    assert text.startswith("<bos><start_of_turn>user\n<start_of_image>")
    assert config.CAPTION_PROMPT in text and text.endswith("<start_of_turn>model\n")
    inputs = captioner._batch_inputs([Image.new("RGB", (20, 30))])
    bos = captioner.processor.tokenizer.bos_token_id
    assert inputs["input_ids"][0].tolist().count(bos) == 1


def test_captioner_pads_on_the_left_and_handles_empty_batches(captioner) -> None:
    assert captioner.processor.tokenizer.padding_side == "left"
    assert captioner.caption([]) == []


def test_captioner_accepts_other_modes(captioner) -> None:
    gray = Image.new("L", (40, 40), 128)
    assert captioner.caption([gray]) == captioner.caption([gray.convert("RGB")])


def test_common_free_model_is_used_by_unload(tiny_models, monkeypatch) -> None:
    freed = []
    monkeypatch.setattr("prep.models.free_model", freed.append)
    encoder = DINOv3Encoder.load(str(tiny_models["dinov3"]), device="cpu")
    model = encoder.model
    encoder.unload()
    assert freed == [model] and encoder.model is None
