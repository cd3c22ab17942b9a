"""Everything a run needs, as one dataclass built from the CLI or directly from Python."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from prep.buckets import ASPECT_BUCKETS, Bucket, parse_bucket_list
from prep.config import DEFAULT_MIN_FREE_GB, PASSES, ModelConfig


@dataclass
class RunOptions:
    """Everything a run needs; built from the CLI or directly from Python."""

    manifest: Path
    output_base_dir: Path
    images: Path | None = None
    pass_: str = "all"
    buckets: list[Bucket] = field(default_factory=lambda: list(ASPECT_BUCKETS))
    models: ModelConfig = field(default_factory=ModelConfig)
    recaption: bool = False
    keep_stale: bool = False
    sidecar_captions: bool = True
    verify: bool = False
    no_resume: bool = False
    min_free_gb: float = DEFAULT_MIN_FREE_GB
    batch_size: int | None = None  # None: 8 on a GPU, 1 on a CPU
    text_batch_size: int = 64
    caption_batch_size: int = 4
    num_workers: int = 2
    checkpoint_every: int = 50
    verbose: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        models = ModelConfig(
            vae_model=args.vae_model,
            vae_subfolder=args.vae_subfolder or None,
            t5_model=args.t5_model,
            dinov3_model=args.dinov3_model,
            caption_model=args.caption_model,
            caption_prompt=args.caption_prompt,
            caption_max_new_tokens=args.caption_max_new_tokens,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
        return cls(
            manifest=args.manifest,
            output_base_dir=args.output_base_dir,
            images=args.images,
            pass_=args.pass_,
            buckets=parse_bucket_list(args.buckets) if args.buckets else list(ASPECT_BUCKETS),
            models=models,
            recaption=args.recaption,
            keep_stale=args.keep_stale,
            sidecar_captions=not args.no_sidecar_captions,
            verify=args.verify,
            no_resume=args.no_resume,
            min_free_gb=args.min_free_gb,
            batch_size=args.batch_size,
            text_batch_size=args.text_batch_size,
            caption_batch_size=args.caption_batch_size,
            num_workers=args.num_workers,
            checkpoint_every=args.checkpoint_every,
            verbose=args.verbose,
        )

    def selected_passes(self) -> tuple[str, ...]:
        return PASSES if self.pass_ == "all" else (self.pass_,)
