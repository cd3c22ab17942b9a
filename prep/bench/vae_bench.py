"""vae: the model-bound case. A real-size Flux VAE (random weights) through the pipeline's VAE pass.

Architecture as FLUX.1's `vae/`: diffusers AutoencoderKL, block_out_channels 128/256/512/512,
2 layers per block, 16 latent channels, 32 norm groups, no quant convs (34M encoder
parameters). Saved once with save_pretrained to the cache and loaded by the pipeline through
its production `from_pretrained` path. Measured at 512x512 on the CPU, in bf16 where the CPU
computes bf16 natively (avx512_bf16 / amx_bf16: about 2.5x faster than fp32 for this VAE) and
in fp32 elsewhere (emulated bf16 is about 10x slower than fp32: 30 s per 64x64 encode on an
AVX2-only EPYC):

- pipeline: `prep run --pass vae` in a fresh process; images/s and PassStats.model_share
  (share of the pass's wall time spent inside the VAE forward);
- bare: `VAEEncoder.encode` on ready-made pixels in a loop, one image at a time, in another
  fresh process: the ceiling the pipeline is compared with.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prep.bench import data
from prep.bench.common import BenchResult, child_env, run_child
from prep.bench.pipeline_bench import run_pipeline

RUN_SIZES = {
    True: {"n_images": 4, "bare_images": 2, "batch_sizes": (1,)},
    False: {"n_images": 32, "bare_images": 6, "batch_sizes": (1, 2)},
}
FLUX_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def make_flux_vae(path: Path, seed: int = 0) -> Path:
    """Random-weight Flux-architecture AutoencoderKL saved with save_pretrained (reused when present)."""
    marker = path / ".bench-flux-vae.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"seed": seed, "config": FLUX_VAE_CONFIG}:
        return path
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    vae.save_pretrained(path)
    marker.write_text(json.dumps({"seed": seed, "config": FLUX_VAE_CONFIG}))
    return path


def encoder_params(vae_dir: Path) -> int:
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(vae_dir)
    import torch

    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    return sum(p.numel() for p in model.encoder.parameters())


def bare_child(out: Path, vae_dir: Path, n: int, size: int, dtype: str) -> int:
    """VAEEncoder.encode on random pixels, one image at a time (the first call is a warm-up)."""
    import torch

    from prep.stages.vae import VAEEncoder

    started = time.perf_counter()
    encoder = VAEEncoder.load(str(vae_dir), device="cpu", dtype=dtype)
    load = time.perf_counter() - started
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    times = []
    for _ in range(n):
        started = time.perf_counter()
        encoder.encode(pixels)
        times.append(time.perf_counter() - started)
    out.write_text(json.dumps({"load": load, "times": times, "threads": torch.get_num_threads()}))
    return 0


def bench_dtype() -> tuple[str, str]:
    """(dtype, why): bf16 on a GPU or a CPU with native bf16, else fp32."""
    import torch

    from prep.models import cpu_features

    if torch.cuda.is_available():
        return "bfloat16", "CUDA"
    features = cpu_features()
    if features["native_bf16"]:
        return "bfloat16", f"this CPU computes bf16 natively ({', '.join(features['flags'])})"
    return "float32", f"no native bf16 on this CPU ({features['capability']}; bf16 would be emulated, ~10x slower)"


def run_vae_bench(cache: Path, work: Path, *, n_images: int, bare_images: int, size: int = 512,
                  dtype: str | None = None, batch_sizes: tuple[int, ...] = (1, 2)) -> BenchResult:
    from prep.testing import make_tiny_models

    result = BenchResult("vae")
    why = "given"
    if dtype is None:
        dtype, why = bench_dtype()
    vae_dir = make_flux_vae(cache / "flux-vae-random")
    models = dict(make_tiny_models(cache / "tiny-models"))
    models["vae"] = vae_dir
    infos = data.make_image_folder(cache / f"vae-images-n{n_images}", n_images, captions=False)
    result.params = {"images": n_images, "bucket": f"{size}x{size}", "dtype": f"{dtype} ({why})",
                     "batch sizes": list(batch_sizes),
                     "loader workers": 1, "encoder params (M)": round(encoder_params(vae_dir) / 1e6, 1)}

    out = work / "vae-bare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run_child([sys.executable, "-m", "prep.bench.vae_bench", "--bare-child", str(out), str(vae_dir), str(bare_images),
               str(size), dtype], env=child_env(), timeout=1800)
    bare = json.loads(out.read_text())
    bare_s = sum(bare["times"]) / len(bare["times"])  # no warm-up effect here (first call ~ later ones)
    base = "bare VAEEncoder.encode loop, 1 image per call"
    result.add(base, 1 / bare_s, "img/s",
               note=f"{bare_s:.2f} s/img (calls: {', '.join(f'{t:.2f}' for t in bare['times'])} s); load {bare['load']:.1f} s")

    shares = []
    for batch in batch_sizes:
        # the model on as many threads as the bare loop's (torch's default: one per core)
        run = run_pipeline(work, infos[0].path.parent, f"{size}x{size}", models, processes=1, workers=1,
                           batch_size=batch, threads=bare["threads"], pass_="vae", dtype=dtype)
        stats = run["passes"]["vae"]
        share = stats["model_share"]
        shares.append(share)
        result.add(f"pipeline --pass vae, batch {batch}", n_images / stats["encode"], "img/s", baseline=base,
                   note=f"encode {stats['encode']:.1f} s, model {stats['model']:.1f} s "
                        f"({stats['model'] / n_images:.2f} s/img), load {stats['load']:.1f} s, "
                        f"job {run['job']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB")
        result.add(f"pipeline batch {batch}: share of pass wall time inside the VAE forward", 100 * share, "%")
        result.add(f"pipeline batch {batch}: end to end (process start to exit)", n_images / run["wall"], "img/s",
                   baseline=base)
        result.extra[f"pipeline_batch{batch}"] = run
    result.goal("VAE pass: share of pass wall time in the forward (lowest over batch sizes)", 100 * min(shares),
                ">= 98%", min(shares) >= 0.98)
    result.extra["bare"] = bare
    return result


def run(quick: bool, cache: Path, work: Path) -> BenchResult:
    sizes = RUN_SIZES[quick]
    return run_vae_bench(cache, work / "vae", n_images=sizes["n_images"], bare_images=sizes["bare_images"],
                         batch_sizes=sizes["batch_sizes"])


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--bare-child":
        sys.exit(bare_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]))
    sys.exit("usage: python -m prep.bench.vae_bench --bare-child OUT VAE_DIR N SIZE DTYPE")
