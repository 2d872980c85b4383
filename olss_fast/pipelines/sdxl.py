"""Stable Diffusion XL (``diffusers.StableDiffusionXLPipeline``): two CLIP text encoders, pooled ``text_embeds`` and
``time_ids`` added conditioning, a VAE that is decoded in float32 when the pipeline would upcast it."""
from __future__ import annotations

import copy
from typing import Any

import torch

from olss_fast.pipelines.base import (PipelineAdapter, Prepared, TextEncodingMixin, as_prompt_list, check_prompt_args, negatives,
                   repeat_each)


class StableDiffusionXLAdapter(TextEncodingMixin, PipelineAdapter):
    name = "StableDiffusionXLPipeline"
    module_names = ("vae", "text_encoder", "text_encoder_2")
    extra_kwargs = (
        "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "original_size", "crops_coords_top_left", "target_size",
    )
    options_supported = ("clip_skip", "lora_scale", "guidance_rescale")
    export_unsupported = "yet (two text encoders and added time conditioning)"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import StableDiffusionXLPipeline

        return isinstance(pipe, StableDiffusionXLPipeline)

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                "UNets with a guidance embedding (time_cond_proj_dim, e.g. LCM) are not supported by the OLSS runner"
            )
        self._vae32: Any = None
        self.refresh()

    def refresh(self) -> None:
        # SDXL's VAE overflows in fp16; the pipeline upcasts it for the decode. Keep a float32 copy instead of
        # converting the pipeline's VAE back and forth (which a CUDA graph could not capture).
        vae = self.pipe.vae
        needs_upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        self._vae32 = copy.deepcopy(vae).to(torch.float32) if needs_upcast else None

    def default_size(self) -> tuple[int, int]:
        return self.unet_pixel_size()

    def check_size(self, height: int, width: int) -> None:
        self.check_multiple_of_8(height, width)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (batch, self.latent_channels, int(height) // f, int(width) // f)

    def _encoders(self) -> tuple[list, list]:
        p = self.pipe
        if p.tokenizer is not None:
            return [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2]
        return [p.tokenizer_2], [p.text_encoder_2]

    def prepare(self, args, guided, num_images, text_in_graph, height, width, options):  # type: ignore[override]
        pipe = self.pipe
        device = self.device
        prompt, prompt_2 = args.get("prompt"), args.get("prompt_2")
        negative, negative_2 = args.get("negative_prompt"), args.get("negative_prompt_2")
        pe, npe = args.get("prompt_embeds"), args.get("negative_prompt_embeds")
        ppe, nppe = args.get("pooled_prompt_embeds"), args.get("negative_pooled_prompt_embeds")
        check_prompt_args(args, pooled_by="SDXL", same_shape=True)
        te2 = pipe.text_encoder_2
        zero_negative = negative is None and bool(pipe.config.force_zeros_for_empty_prompt)
        inputs: dict[str, torch.Tensor] = {}
        use_tokens = text_in_graph and pe is None and npe is None and te2 is not None
        if use_tokens:
            prompts = repeat_each(as_prompt_list(prompt, "prompt"), num_images)
            prompts_2 = repeat_each(
                as_prompt_list(prompt_2, "prompt_2") if prompt_2 is not None else as_prompt_list(prompt, "prompt"),
                num_images,
            )
            if len(prompts_2) != len(prompts):
                raise ValueError(
                    f"batch size mismatch: `prompt_2` has {len(prompts_2)} entries, `prompt` {len(prompts)}"
                )
            batch = len(prompts)
            n_base = batch // num_images
            negs = repeat_each(negatives(negative, n_base), num_images)
            negs_2 = repeat_each(
                negatives(negative_2, n_base, "negative_prompt_2") if negative_2 is not None
                else negatives(negative, n_base), num_images,
            )
            tokenizers, _ = self._encoders()
            # zip as the pipeline does: (prompt, tokenizer[_2]) first, then (prompt_2, tokenizer_2)
            for k, (tok, pos_text, neg_text) in enumerate(zip(tokenizers, [prompts, prompts_2], [negs, negs_2])):
                ids = self.tokenize(tok, pos_text).input_ids
                if guided and not zero_negative:
                    ids = torch.cat([self.tokenize(tok, neg_text, ids.shape[-1]).input_ids, ids])
                inputs[f"ids{k}"] = ids.to(device)
            mode = "tokens_zero_negative" if (guided and zero_negative) else "tokens"
            emb_dtype = te2.dtype
        else:
            prompts = as_prompt_list(prompt, "prompt") if prompt is not None else None
            prompts_2 = as_prompt_list(prompt_2, "prompt_2") if prompt_2 is not None else None
            n_base = len(prompts) if prompts is not None else int(pe.shape[0])
            negs = negatives(negative, n_base) if negative is not None else None  # None keeps the zeroed negative
            negs_2 = negatives(negative_2, n_base, "negative_prompt_2") if negative_2 is not None else None
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=prompts_2, device=device, num_images_per_prompt=num_images,
                do_classifier_free_guidance=guided, negative_prompt=negs, negative_prompt_2=negs_2,
                prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                negative_pooled_prompt_embeds=nppe, lora_scale=options.lora_scale, clip_skip=options.clip_skip,
            )
            inputs["embeds"] = (torch.cat([neg, pos]) if guided else pos).to(device)
            inputs["pooled"] = (torch.cat([neg_pooled, pooled]) if guided else pooled).to(device)
            batch, mode, emb_dtype = int(pos.shape[0]), "embeds", pos.dtype
        # add_time_ids exactly as the pipeline builds them (cat([negative, positive]).repeat(batch, 1))
        original_size = tuple(args.get("original_size") or (height, width))
        target_size = tuple(args.get("target_size") or (height, width))
        crops = tuple(args.get("crops_coords_top_left") or (0, 0))
        proj_dim = int(te2.config.projection_dim) if te2 is not None else int(inputs["pooled"].shape[-1])
        time_ids = pipe._get_add_time_ids(original_size, crops, target_size, dtype=emb_dtype,
                                          text_encoder_projection_dim=proj_dim)
        if guided:
            time_ids = torch.cat([time_ids, time_ids], dim=0)
        inputs["time_ids"] = time_ids.to(device).repeat(batch, 1)
        return Prepared(batch, mode, inputs)

    def encode(self, inputs, mode, guided, options):  # type: ignore[override]
        if mode == "embeds":
            emb, pooled = inputs["embeds"], inputs["pooled"]
        else:
            _, encoders = self._encoders()
            hidden, pooled = [], None
            # SDXL reads the penultimate layer; clip_skip moves the prompts' layer further back (not the negatives')
            layer = -2 if options.clip_skip is None else -(options.clip_skip + 2)
            negatives_first = guided and mode == "tokens"
            for k, te in enumerate(encoders):
                with self.lora_scaled(te, options.lora_scale):
                    out = te(inputs[f"ids{k}"], output_hidden_states=True)
                if out[0].ndim == 2:
                    pooled = out[0]
                h = out.hidden_states[layer]
                if negatives_first and layer != -2:
                    half = h.shape[0] // 2
                    h = torch.cat([out.hidden_states[-2][:half], h[half:]])
                hidden.append(h)
            emb = torch.cat(hidden, dim=-1).to(dtype=self.pipe.text_encoder_2.dtype)
            if mode == "tokens_zero_negative":
                emb = torch.cat([torch.zeros_like(emb), emb])
                pooled = torch.cat([torch.zeros_like(pooled), pooled])
        return {
            "encoder_hidden_states": emb,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": inputs["time_ids"]},
        }

    def decode(self, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        vae = self._vae32 if self._vae32 is not None else self.pipe.vae
        cfg = vae.config
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean, dtype=latents.dtype).view(1, c, 1, 1).to(latents.device)
            std_t = torch.tensor(std, dtype=latents.dtype).view(1, c, 1, 1).to(latents.device)
            latents = latents * std_t / cfg.scaling_factor + mean_t
        else:
            latents = latents / cfg.scaling_factor
        return vae.decode(latents, return_dict=False)[0]

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        if output_type != "latent" and getattr(self.pipe, "watermark", None) is not None:
            image = self.pipe.watermark.apply_watermark(image)
        images = self.pipe.image_processor.postprocess(image, output_type=output_type)
        if not return_dict:
            return (images,)
        return StableDiffusionXLPipelineOutput(images=images)
