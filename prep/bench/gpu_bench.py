"""gpu: the passes on a CUDA GPU (`prep bench gpu` on a user's GPU box), or the expected figures on paper.

With CUDA, two parts:

- the pipeline: `prep run` on generated photos with random-weight models of the real sizes
  (Flux VAE, DINOv3 ViT-L/16, T5-Large; captions from sidecars), one bucket of 512^2 and one
  of 1024^2, `--pass dinov3`, `--pass vae` and `--pass all` (DINOv3 + VAE in one image pass,
  then T5), bf16, batches by pixels: images/s per pass, the VAE's achieved TFLOP/s against
  the counted FLOPs per image (4.88 TFLOP at 1024^2), the CPU cores the pass used per GPU
  (CPU seconds of the rank and its decoding workers / pass wall time) and the share of the
  pass's wall time the GPU was busy (time inside the models, synchronised after each batch);
- the models alone (no decoding): warmed up, timed with `torch.cuda.synchronize`, achieved
  TFLOP/s (FLOPs counted by `torch.utils.flop_counter` on the meta device) against the GPU's
  bf16 dense peak.

Without CUDA the same FLOP counts give the expected figures: bytes per sample, images/s per
H100 at 30-50% of its ~990 TFLOP/s bf16 dense peak (realistic for conv-heavy VAEs), and the
CPU cores needed per GPU to keep up with decoding (from this run's preprocess figures when
available). Reported with `measured: false`.
"""

from __future__ import annotations

import time
from pathlib import Path

from prep.bench.common import BenchResult
from prep.bench.vae_bench import FLUX_VAE_CONFIG

H100_BF16_DENSE_TFLOPS = 989.0
MFU_RANGE = (0.30, 0.50)
# Fallbacks (field notes) when FLOPs cannot be counted: TFLOP per sample.
KNOWN_TFLOP = {"vae@1024": 4.9, "vae@512": 1.1, "dinov3@224": 0.126, "t5@77": 0.047}
PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
BYTES = {
    "vae@1024": 16 * 128 * 128 * 2,
    "vae@512": 16 * 64 * 64 * 2,
    "t5@77": 77 * 1024 * 2,
    "dinov3@224": 1024 * 4,
}
DINOV3_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "patch_size": 16, "image_size": 224, "num_register_tokens": 4}
T5_L = {"d_model": 1024, "d_ff": 4096, "num_layers": 24, "num_heads": 16, "d_kv": 64, "vocab_size": 32128}
TINY = {
    "vae": {**FLUX_VAE_CONFIG, "block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
    "dinov3": {**DINOV3_L, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
    "t5": {**T5_L, "d_model": 64, "d_ff": 64, "num_layers": 1, "num_heads": 4, "d_kv": 16},
}


def build(kind: str, tiny: bool = False):
    """An uninitialised-architecture model (caller picks the device with a torch.device context)."""
    if kind == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**(TINY["vae"] if tiny else FLUX_VAE_CONFIG))
    if kind == "dinov3":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        return DINOv3ViTModel(DINOv3ViTConfig(**(TINY["dinov3"] if tiny else DINOV3_L)))
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**(TINY["t5"] if tiny else T5_L)))


def sample_input(kind: str, size: int, batch: int, device, dtype):
    import torch

    if kind == "t5":
        return {"input_ids": torch.randint(3, 1000, (batch, size), device=device)}
    pixels = torch.rand(batch, 3, size, size, device=device, dtype=dtype) * 2 - 1
    return {"pixel_values": pixels} if kind == "dinov3" else {"x": pixels}


def forward(kind: str, model, inputs: dict):
    if kind == "vae":
        return model.encode(inputs["x"]).latent_dist.mean
    if kind == "dinov3":
        return model(**inputs).pooler_output
    return model(**inputs).last_hidden_state


def count_tflop(kind: str, size: int) -> tuple[float, str]:
    """TFLOP per sample counted on the meta device (no memory, no compute); fallback: field notes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build(kind)
            inputs = sample_input(kind, size, 1, "meta", torch.float32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(kind, model, inputs)
        return counter.get_total_flops() / 1e12, "counted"
    except Exception:  # noqa: BLE001 - counting is best effort
        return KNOWN_TFLOP[f"{kind}@{size}"], "field notes"


PASSES = [("vae", 1024, 4), ("vae", 512, 16), ("dinov3", 224, 64), ("t5", 77, 64)]


def measure(kind: str, size: int, batch: int, device: str, *, tiny: bool = False, iters: int = 10,
            warmup: int = 3) -> float:
    """Samples/s of the model alone in bf16 on `device`."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly (no fp32 copy, no cast warning)
    try:
        with torch.device(device):
            model = build(kind, tiny=tiny)
    finally:
        torch.set_default_dtype(previous)
    model = model.eval().requires_grad_(False)
    inputs = sample_input(kind, size, batch, device, torch.bfloat16)
    cuda = str(device).startswith("cuda")
    with torch.inference_mode():
        for _ in range(warmup):
            forward(kind, model, inputs)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(iters):
            forward(kind, model, inputs)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    del model
    if cuda:
        torch.cuda.empty_cache()
    return batch * iters / seconds


def gpu_peak(name: str) -> float | None:
    for key, peak in PEAKS_TFLOPS.items():
        if key.lower() in name.lower():
            return peak
    return None


def run_gpu_bench(*, device: str | None = None, tiny: bool = False, iters: int = 10,
                  passes: list[tuple[str, int, int]] | None = None, preprocess_figures: dict | None = None,
                  ) -> BenchResult:
    """`device=None`: CUDA when available, else paper figures. `tiny`: small configs (code-path tests)."""
    import torch

    result = BenchResult("gpu")
    passes = passes or PASSES
    if device is None and torch.cuda.is_available():
        device = "cuda"
    measured = device is not None
    result.extra["measured"] = measured
    result.params["measured"] = measured
    flops = {f"{k}@{s}": count_tflop(k, s) for k, s, _ in passes}
    for key, (tflop, source) in flops.items():
        result.add(f"{key}: TFLOP per sample", tflop, "TFLOP", note=f"{source}; {BYTES.get(key, 0) / 1024:.0f} KiB stored")
    if measured:
        name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
        peak = gpu_peak(name) if device.startswith("cuda") else None
        result.params.update({"device": name, "dtype": "bfloat16", "peak TFLOP/s": peak, "tiny models": tiny})
        for kind, size, batch in passes:
            rate = measure(kind, size, batch, device, tiny=tiny, iters=iters)
            tflop = flops[f"{kind}@{size}"][0]
            achieved = rate * tflop if not tiny else None
            note = f"batch {batch}"
            if achieved is not None:
                note += f"; {achieved:.0f} TFLOP/s achieved" + (f" = {100 * achieved / peak:.0f}% of peak" if peak else "")
            result.add(f"{kind}@{size}: measured", rate, "samples/s", note=note)
            if kind == "vae" and achieved is not None:
                result.add(f"vae@{size}: achieved TFLOP/s", achieved, "TFLOP/s")
                if peak:
                    result.goal(f"vae@{size}: MFU", 100 * achieved / peak, "30-50% realistic", None)
    else:
        result.params.update({"device": "none (no CUDA)", "assumed GPU": "H100 SXM",
                              "peak TFLOP/s": H100_BF16_DENSE_TFLOPS, "MFU": f"{MFU_RANGE[0]:.0%}-{MFU_RANGE[1]:.0%}"})
        for key, (tflop, _) in flops.items():
            low, high = (H100_BF16_DENSE_TFLOPS * m / tflop for m in MFU_RANGE)
            result.add(f"{key}: expected on H100", low, "samples/s", note=f"{low:,.0f}-{high:,.0f} at 30-50% MFU")
        vae_rate = H100_BF16_DENSE_TFLOPS * MFU_RANGE[0] / flops["vae@1024"][0] if "vae@1024" in flops else None
        figures = preprocess_figures or {}
        per_core = figures.get("pipeline_img_per_cpu_s_1024")
        if vae_rate and per_core:
            result.add("CPU cores per H100 to decode+resize 1024^2 at the VAE's pace", vae_rate / per_core, "cores",
                       note=f"{vae_rate:.0f} img/s / {per_core:.1f} img/CPU-s measured by preprocess")
        both = figures.get("image_pass_img_per_cpu_s_1024")
        if vae_rate and both:
            result.add("CPU cores per H100 for the image pass's inputs (VAE crop + DINOv3) at the VAE's pace",
                       vae_rate / both, "cores", note=f"{vae_rate:.0f} img/s / {both:.1f} img/CPU-s measured by preprocess")
        if vae_rate:
            mb_s = vae_rate * sum(BYTES[k] for k in ("vae@1024", "t5@77", "dinov3@224")) / 1e6
            result.add("output written per H100 at that pace (latent + T5 + DINOv3)", mb_s, "MB/s")
        result.notes.append("No CUDA device: figures are expected values on paper (measured: false).")
    return result


# ------------------------------------------------------------------------------ the pipeline
PIPELINE_SIZES = {True: {"images": 48, "sizes": (512, 1024)}, False: {"images": 256, "sizes": (512, 1024)}}
PIPELINE_PASSES = ("dinov3", "vae", "all")


def make_real_size_models(cache: Path) -> dict[str, Path]:
    """Random-weight Flux VAE, DINOv3 ViT-L/16 and T5-Large saved with save_pretrained (reused when present);
    the tiny captioner (the runs take captions from sidecars) and the tiny T5's tokenizer."""
    import json
    import shutil

    import torch

    from prep.bench.vae_bench import make_flux_vae
    from prep.testing import DINOV3_PREPROCESSOR_CONFIG, make_tiny_models

    tiny = make_tiny_models(cache / "tiny-models")
    models = {"vae": make_flux_vae(cache / "flux-vae-random"), "captioner": tiny["captioner"]}
    for kind in ("dinov3", "t5"):
        folder = cache / f"{kind}-real-size-random"
        marker = folder / ".bench-model.json"
        if not (marker.is_file() and json.loads(marker.read_text()) == {"version": 1}):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                build(kind).save_pretrained(folder)
            if kind == "dinov3":
                (folder / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR_CONFIG))
            else:
                for file in Path(tiny["t5"]).glob("tokenizer*"):
                    shutil.copy(file, folder / file.name)
            marker.write_text(json.dumps({"version": 1}))
        models[kind] = folder
    return models


def pipeline_figures(run: dict, kind: str, n: int, size: int) -> dict:
    """images/s, VAE TFLOP/s, CPU cores and GPU-busy share of one pass of a `run_pipeline` result."""
    stats = run["passes"][kind]
    encode = max(stats["encode"], 1e-9)
    vae_seconds = stats["stages"].get("vae")
    tflop = count_tflop("vae", size)[0] if vae_seconds else None
    return {
        "images_per_s": stats["records"] / encode,
        "vae_tflops": n * tflop / vae_seconds if vae_seconds and tflop else None,
        "cpu_cores": stats["cpu"] / encode,
        "busy_share": stats["model"] / encode,
        "decodes_per_image": stats["decodes"] / max(stats["records"], 1),
        "encode_s": stats["encode"],
    }


def run_pipeline_on_device(result: BenchResult, cache: Path, work: Path, device: str, *, images: int,
                           sizes: tuple[int, ...], models: dict | None = None, workers: int | None = None,
                           dtype: str = "bfloat16", peak: float | None = None) -> dict:
    """`prep run` per pass and size on `device`; rows and goals into `result`; the figures returned."""
    import os

    from prep.bench import data
    from prep.bench.pipeline_bench import run_pipeline

    models = models or make_real_size_models(cache)
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    folder = data.make_image_folder(cache / f"gpu-images-n{images}", images)[0].path.parent
    figures = {}
    for size in sizes:
        for pass_ in PIPELINE_PASSES:
            run = run_pipeline(work / f"{size}", folder, f"{size}x{size}", models, processes=1, workers=workers,
                               batch_size=None, pass_=pass_, dtype=dtype, extra=("--device", device))
            kind = next(k for k in run["passes"] if k != "t5" and run["passes"][k]["records"])
            found = figures[f"{pass_}@{size}"] = pipeline_figures(run, kind, images, size)
            note = (f"{kind}; {found['cpu_cores']:.1f} CPU cores busy ({workers} decoding workers); GPU busy "
                    f"{100 * found['busy_share']:.0f}% of the pass; {found['decodes_per_image']:.2f} decodes/image")
            if found["vae_tflops"]:
                note += f"; VAE {found['vae_tflops']:.1f} TFLOP/s" + (
                    f" = {100 * found['vae_tflops'] / peak:.0f}% of peak" if peak else "")
            result.add(f"pipeline --pass {pass_} @ {size}^2", found["images_per_s"], "img/s", note=note)
    for size in sizes:
        vae = figures[f"vae@{size}"]
        if vae["vae_tflops"]:
            result.add(f"pipeline vae@{size}: VAE achieved TFLOP/s", vae["vae_tflops"], "TFLOP/s",
                       note=f"{count_tflop('vae', size)[0]:.2f} TFLOP per image counted")
        result.add(f"pipeline all@{size}: CPU cores used per GPU", figures[f"all@{size}"]["cpu_cores"], "cores")
        result.add(f"pipeline all@{size}: share of GPU time busy", 100 * figures[f"all@{size}"]["busy_share"], "%")
    return figures


def run(quick: bool, cache: Path, work: Path, preprocess_figures: dict | None = None) -> BenchResult:
    import torch

    result = run_gpu_bench(iters=5 if quick else 20, preprocess_figures=preprocess_figures)
    if torch.cuda.is_available():
        sizes = PIPELINE_SIZES[quick]
        peak = gpu_peak(torch.cuda.get_device_name(0))
        result.extra["pipeline"] = run_pipeline_on_device(result, cache, work / "gpu", "cuda", images=sizes["images"],
                                                          sizes=sizes["sizes"], peak=peak)
    return result
