"""Small models built in code for tests and examples (no downloads).

``tiny_sd_pipeline()`` builds a StableDiffusionPipeline (or SDXL) from tiny random components and an offline
character-level CLIP tokenizer; ``make_gmm`` (re-exported) builds the analytic Gaussian-mixture pipeline.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from .models.gmm import GMMDenoiser, GMMPipeline, make_gmm, ode_solution  # noqa: F401  (re-exports)


def tiny_clip_tokenizer(folder: str | Path | None = None, max_length: int = 16):
    """A character-level CLIPTokenizer written to ``folder`` (a temporary one by default); no download."""
    from transformers import CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="olss_tok_"))
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    return tok


def tiny_sd_pipeline(
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 8,
    scheduler: Any | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A StableDiffusionPipeline with tiny random weights (deterministic in ``seed``), on CPU.

    Latents are ``[4, sample_size, sample_size]``; the tiny VAE has two blocks, so images are ``2·sample_size``
    pixels square.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=2 * sample_size,
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
            num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tokenizer.get_vocab()),
            max_position_embeddings=tokenizer.model_max_length, projection_dim=16,
        )
    )
    if scheduler is None:
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, prediction_type=prediction_type, timestep_spacing="trailing",
        )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8, scheduler: Any | None = None):
    """A StableDiffusionXLPipeline with tiny random weights (two text encoders, added time conditioning), on CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    cfg = dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer.get_vocab()),
        max_position_embeddings=tokenizer.model_max_length, projection_dim=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
        transformer_layers_per_block=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=2 * sample_size,
    )
    if scheduler is None:
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, timestep_spacing="trailing",
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
