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

from olss_fast.models.gmm import GMMDenoiser, GMMPipeline, make_gmm, ode_solution  # noqa: F401  (re-exports)


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
    """A byte-level CLIPTokenizer, no download. Without ``folder`` its files are written to a temporary folder that
    is removed once the tokenizer is loaded (it keeps everything in memory); with one they stay there."""
    from transformers import CLIPTokenizer

    if folder is not None:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder, model_max_length=max_length)))
    with tempfile.TemporaryDirectory(prefix="olss_tok_") as tmp:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, model_max_length=max_length)))


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


# ---------------------------------------------------------------------------------------------- flow-matching pipelines
def tiny_t5_tokenizer(model_max_length: int = 32):
    """A character-level T5 tokenizer built in code (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended as T5
    does); no download, no sentencepiece model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in range(32, 127):
        vocab.setdefault(chr(c), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)


def _tiny_t5(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=37, d_kv=8, num_heads=4,
                                   num_layers=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)).eval()  # (built in train mode: dropout)


def _tiny_clip_pair(projection_dim: int = 32, hidden: int = 32):
    from transformers import CLIPTextConfig

    tok = tiny_clip_tokenizer()
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok.get_vocab()),
                         max_position_embeddings=tok.model_max_length, projection_dim=projection_dim,
                         hidden_act="gelu")
    return tok, cfg


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8, shift: float = 3.0, dtype: torch.dtype = torch.float32):
    """A StableDiffusion3Pipeline with tiny random weights (two CLIP encoders with projection, a T5 encoder, an SD3
    transformer, a 16-channel VAE), built in code on CPU. Latents ``[16, sample_size, sample_size]``."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, cfg = _tiny_clip_pair()
    tok2, cfg2 = _tiny_clip_pair()
    te = CLIPTextModelWithProjection(cfg)
    te2 = CLIPTextModelWithProjection(cfg2)
    tok3 = tiny_t5_tokenizer()
    te3 = _tiny_t5(len(tok3.get_vocab()))
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=2 * sample_size,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
        tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
    )
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, sample_size: int = 8, guidance_embeds: bool = True,
                       dtype: torch.dtype = torch.float32):
    """A FluxPipeline with tiny random weights (a CLIP encoder, a T5 encoder, a Flux transformer with a distilled
    guidance embedding, a 4-channel VAE), built in code on CPU, with dynamic shifting like FLUX.1-dev. Latents are
    packed: ``[(h/2)·(w/2), 4·4]`` for an ``h × w`` latent grid."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok, cfg = _tiny_clip_pair()
    te = CLIPTextModel(cfg)
    tok2 = tiny_t5_tokenizer()
    te2 = _tiny_t5(len(tok2.get_vocab()))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=2 * sample_size,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2)
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
