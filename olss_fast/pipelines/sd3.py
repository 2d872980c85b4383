"""Stable Diffusion 3 (``diffusers.StableDiffusion3Pipeline``): flow matching with an MMDiT transformer, two CLIP
encoders and a T5 encoder, classifier-free guidance on a doubled batch.

The three text encoders run on the host (``pipe.encode_prompt``, outside the captured program: T5-XXL alone is 4.7 B
parameters and runs once per call); the transformer loop and the VAE decode are the program. Timesteps are the flow
sigmas × 1000, as the pipeline passes them to the transformer.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from olss_fast.pipelines.base import (CondInput, ExportSpec, PipelineAdapter, Prepared, as_prompt_list, check_prompt_args, negatives,
                   postprocessed_output)


def _texts(value: Any, what: str, batch: int) -> Optional[list[str]]:
    return None if value is None else negatives(value, batch, what)


class SD3Denoiser(torch.nn.Module):
    """``(sample, timestep 0-d, encoder_hidden_states, pooled_projections) → velocity`` (for the exporter)."""

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=sample, timestep=timestep.expand(sample.shape[0]),
                                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                return_dict=False)[0]


class SD3Decoder(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # as StableDiffusion3Adapter.decode
        cfg = self.vae.config
        return self.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]


class StableDiffusion3Adapter(PipelineAdapter):
    name = "StableDiffusion3Pipeline"
    module_names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    extra_kwargs = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "pooled_prompt_embeds",
                    "negative_pooled_prompt_embeds", "max_sequence_length")
    options_supported = ()
    export_unsupported = None

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import StableDiffusion3Pipeline

        return isinstance(pipe, StableDiffusion3Pipeline)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    # ------------------------------------------------------------------ sizes
    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)
        return size, size

    def check_size(self, height: int, width: int) -> None:
        k = int(self.pipe.vae_scale_factor) * int(self.denoiser.config.patch_size)
        if height % k or width % k:
            raise ValueError(f"`height` and `width` have to be divisible by {k} but are {height} and {width}")

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = int(self.pipe.vae_scale_factor)
        return (batch, self.latent_channels, int(height) // f, int(width) // f)

    # ------------------------------------------------------------------ recording
    def flow_mu(self, height: int, width: int) -> Optional[float]:
        p = int(self.denoiser.config.patch_size)
        _, _, h, w = self.latent_shape(1, height, width)
        return self.dynamic_shift((h // p) * (w // p), 1.16)

    def teacher_timestep_kwargs(self, teacher: Any, num_steps: int, height: int, width: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_inference_steps": num_steps}
        mu = self.flow_mu(height, width)
        if mu is not None:
            kwargs["mu"] = mu
        return kwargs

    # ------------------------------------------------------------------ host side
    def prepare(self, args, guided, num_images, text_in_graph, height, width, options):  # type: ignore[override]
        pipe = self.pipe
        prompt, pe, npe = args.get("prompt"), args.get("prompt_embeds"), args.get("negative_prompt_embeds")
        ppe, nppe = args.get("pooled_prompt_embeds"), args.get("negative_pooled_prompt_embeds")
        check_prompt_args(args, pooled_by="SD3", exclusive_negative=True)
        prompts = as_prompt_list(prompt, "prompt") if prompt is not None else None
        n = len(prompts) if prompts is not None else int(pe.shape[0])
        max_len = args.get("max_sequence_length")
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=_texts(args.get("prompt_2"), "prompt_2", n),
            prompt_3=_texts(args.get("prompt_3"), "prompt_3", n),
            negative_prompt=_texts(args.get("negative_prompt"), "negative_prompt", n),
            negative_prompt_2=_texts(args.get("negative_prompt_2"), "negative_prompt_2", n),
            negative_prompt_3=_texts(args.get("negative_prompt_3"), "negative_prompt_3", n),
            do_classifier_free_guidance=guided, prompt_embeds=pe, negative_prompt_embeds=npe,
            pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=nppe, device=self.device,
            num_images_per_prompt=num_images, max_sequence_length=256 if max_len is None else int(max_len),
        )
        if guided and tuple(neg.shape) != tuple(pos.shape):
            raise ValueError(f"batch size mismatch: prompt embeddings {list(pos.shape)} and negative ones "
                             f"{list(neg.shape)} must have the same shape")
        embeds = torch.cat([neg, pos]) if guided else pos
        pooled = torch.cat([neg_pooled, pooled]) if guided else pooled
        return Prepared(int(pos.shape[0]), "embeds", {"embeds": embeds.to(self.device),
                                                      "pooled": pooled.to(self.device)})

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

        return postprocessed_output(self.pipe, image, output_type, return_dict, StableDiffusion3PipelineOutput)

    # ------------------------------------------------------------------ program side
    def encode(self, inputs, mode, guided, options):  # type: ignore[override]
        return {"encoder_hidden_states": inputs["embeds"], "pooled_projections": inputs["pooled"]}

    def denoise(self, denoiser, x, t, cond, options):  # type: ignore[override]
        return denoiser(hidden_states=x, timestep=self.model_timestep(t, x), return_dict=False, **cond)[0]

    def decode(self, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return self.pipe.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]

    # ------------------------------------------------------------------ export
    def export_spec(self, batch: int, height: int, width: int, guided: bool, args: Any = None,
                    example: Any = None) -> ExportSpec:
        ex = self.example_conditioning(batch, height, width, guided, args, example)
        return ExportSpec(
            denoiser=SD3Denoiser(self.denoiser), decoder=SD3Decoder(self.pipe.vae),
            cond=[CondInput("encoder_hidden_states", "embeds", tuple(ex["embeds"].shape), "model"),
                  CondInput("pooled_projections", "pooled", tuple(ex["pooled"].shape), "model")],
            image_range="[-1,1]", modules={"transformer": self.denoiser, "vae": self.pipe.vae},
        )
