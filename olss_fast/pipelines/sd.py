"""Stable Diffusion 1.x / 2.x (``diffusers.StableDiffusionPipeline``): CLIP text encoder → UNet2DConditionModel →
AutoencoderKL; epsilon or v-prediction (the OLSS coefficients absorb the parametrisation)."""
from __future__ import annotations

from typing import Any

import torch

from olss_fast.pipelines.base import (
    CondInput, ExportSpec, PipelineAdapter, Prepared, TextEncodingMixin, as_prompt_list, check_prompt_args, negatives,
    repeat_each,
)


class TextEncoder(torch.nn.Module):
    """``input_ids → encoder_hidden_states`` as the program's ``encode`` computes it (for the exporter)."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0].to(self.text_encoder.dtype)


class SDUNet(torch.nn.Module):
    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]


class VAEDecoder(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


class StableDiffusionAdapter(TextEncodingMixin, PipelineAdapter):
    name = "StableDiffusionPipeline"
    module_names = ("vae", "text_encoder")
    options_supported = ("clip_skip", "lora_scale", "guidance_rescale")
    export_unsupported = None

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import StableDiffusionPipeline

        return isinstance(pipe, StableDiffusionPipeline)

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                "UNets with a guidance embedding (time_cond_proj_dim, e.g. LCM) are not supported by the OLSS runner"
            )

    @property
    def use_mask(self) -> bool:
        te = self.pipe.text_encoder
        return bool(getattr(te.config, "use_attention_mask", False)) if te is not None else False

    def default_size(self) -> tuple[int, int]:
        return self.unet_pixel_size()

    def check_size(self, height: int, width: int) -> None:
        self.check_multiple_of_8(height, width)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (batch, self.latent_channels, int(height) // f, int(width) // f)

    def prepare(self, args, guided, num_images, text_in_graph, height, width, options):  # type: ignore[override]
        pipe = self.pipe
        device = self.device
        prompt, negative = args.get("prompt"), args.get("negative_prompt")
        pe, npe = args.get("prompt_embeds"), args.get("negative_prompt_embeds")
        check_prompt_args(args, exclusive_negative=True, same_shape=True)
        use_tokens = (text_in_graph and pe is None and npe is None and pipe.text_encoder is not None
                      and pipe.tokenizer is not None)
        if use_tokens:
            prompts = as_prompt_list(prompt, "prompt")
            negs = negatives(negative, len(prompts))
            prompts, negs = repeat_each(prompts, num_images), repeat_each(negs, num_images)
            enc = self.tokenize(pipe.tokenizer, prompts)
            ids, mask = enc.input_ids, enc.get("attention_mask")
            if guided:
                neg_enc = self.tokenize(pipe.tokenizer, negs, ids.shape[-1])
                ids = torch.cat([neg_enc.input_ids, ids])
                mask = torch.cat([neg_enc["attention_mask"], mask]) if self.use_mask else None
            inputs = {"ids": ids.to(device)}
            if self.use_mask:  # text encoders that take the padding mask (not CLIP's default)
                inputs["mask"] = mask.to(device)
            return Prepared(len(prompts), "tokens", inputs)
        # eager encoding (embeddings given, or the text encoder runs outside the graph); lists normalised first so
        # that the batch-size rules are the token path's
        prompts = as_prompt_list(prompt, "prompt") if prompt is not None else None
        n_base = len(prompts) if prompts is not None else int(pe.shape[0])
        negs = negatives(negative, n_base) if (guided and npe is None) else None
        pos, neg = pipe.encode_prompt(prompts, device, num_images, guided, negs, prompt_embeds=pe,
                                      negative_prompt_embeds=npe, lora_scale=options.lora_scale,
                                      clip_skip=options.clip_skip)
        emb = torch.cat([neg, pos]) if guided else pos
        return Prepared(int(pos.shape[0]), "embeds", {"embeds": emb.to(device)})

    def encode(self, inputs, mode, guided, options):  # type: ignore[override]
        if mode == "embeds":
            return {"encoder_hidden_states": inputs["embeds"]}
        te = self.pipe.text_encoder
        mask = inputs["mask"] if "mask" in inputs else None
        with self.lora_scaled(te, options.lora_scale):
            if options.clip_skip is None:
                emb = te(inputs["ids"], attention_mask=mask)[0]
            else:  # as StableDiffusionPipeline.encode_prompt: the prompts from an earlier layer + the final layer
                out = te(inputs["ids"], attention_mask=mask, output_hidden_states=True)  # norm; negatives unchanged
                final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 flattened CLIPTextModel
                emb = final_norm(out[-1][-(options.clip_skip + 1)])
                if guided:
                    half = emb.shape[0] // 2
                    emb = torch.cat([out[0][:half], emb[half:]])
        return {"encoder_hidden_states": emb.to(dtype=te.dtype)}

    def decode(self, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        images = self.pipe.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=[True] * image.shape[0]
        )
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    def export_spec(self, batch: int, height: int, width: int, guided: bool, args: Any = None,
                    example: Any = None) -> ExportSpec:
        te, tok = self.pipe.text_encoder, self.pipe.tokenizer
        if te is None or tok is None:
            raise ValueError("exporting a StableDiffusionPipeline needs its text_encoder and tokenizer")
        if self.use_mask:
            raise ValueError("text encoders that take an attention mask are not supported by the ONNX export")
        if len(tok) > int(te.config.vocab_size):
            raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the text encoder's vocabulary of "
                             f"{te.config.vocab_size}: the export would refuse the ids beyond it")
        m = 2 * batch if guided else batch
        length = int(tok.model_max_length)
        uncond = [int(v) for v in self.tokenize(tok, [""]).input_ids[0].tolist()]  # the default negative
        return ExportSpec(
            text_encoder=TextEncoder(te), text_input="encoder_hidden_states", token_length=length,
            denoiser=SDUNet(self.denoiser), decoder=VAEDecoder(self.pipe.vae),
            cond=[CondInput("encoder_hidden_states", "embeds", (m, length, int(te.config.hidden_size)), "model")],
            uncond=uncond, id_limit=int(te.config.vocab_size), image_range="[-1,1]",
            modules={"text_encoder": te, "unet": self.denoiser, "vae": self.pipe.vae},
        )
