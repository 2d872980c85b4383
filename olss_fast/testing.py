"""Small models built in code for tests and examples (no downloads).

``tiny_sd_pipeline()`` builds a StableDiffusionPipeline (or SDXL) from tiny random components and an offline
character-level CLIP tokenizer; ``make_gmm`` (re-exported) builds the analytic Gaussian-mixture pipeline.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .models.gmm import GMMDenoiser, GMMPipeline, make_gmm, ode_solution  # noqa: F401  (re-exports)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte-to-printable-character table (every byte has a token, so any text tokenizes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


DEFAULT_MERGES = ("a b", "ab c</w>", "h e", "l l", "he ll", "w o", "wo r", "t h", "th e</w>")


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 77, merges: Sequence[str] = DEFAULT_MERGES) -> Path:
    """A tiny byte-level CLIP BPE tokenizer (vocab.json + merges.txt), loadable offline with ``from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for m in merges:
        a, b = m.split()
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"})
    )
    return folder


def tiny_clip_tokenizer(folder: str | Path | None = None, max_length: int = 16):
    """A byte-level CLIPTokenizer written to ``folder`` (a temporary one by default); no download."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer(folder or tempfile.mkdtemp(prefix="olss_tok_"), model_max_length=max_length)
    return CLIPTokenizer.from_pretrained(str(folder))


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


def perturbed(schedule: Any, seed: int, channels: int | None = None, scale: float = 0.05) -> Any:
    """The same path with randomly perturbed (optionally per-channel) lower-triangular coefficients (for tests)."""
    from .schedule import OLSSSchedule

    gen = torch.Generator().manual_seed(seed)
    c = schedule.coeffs
    if channels is not None:
        c = c.expand(channels, *c.shape).clone()
    mask = torch.ones(c.shape[-2:], dtype=torch.float64).tril(1)
    noise = torch.randn(c.shape, generator=gen, dtype=torch.float64) * scale * c.abs().clamp(min=0.1)
    return OLSSSchedule(timesteps=schedule.timesteps, indices=schedule.indices, coeffs=c + noise * mask,
                        teacher_steps=schedule.teacher_steps, prediction_type=schedule.prediction_type, path="test")

