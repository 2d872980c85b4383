"""Flux (``diffusers.FluxPipeline``): flow matching with packed latents, a CLIP and a T5 encoder, a distilled
guidance embedding (the pipeline's ``guidance_scale``) and optional true classifier-free guidance
(``true_cfg_scale`` > 1 with a negative prompt).

Latents are packed 2×2 (``[B, (h/2)·(w/2), 4C]``) with position ids for the image tokens; the adapter packs nothing
itself (the noise is drawn in the packed shape, a permutation of a standard normal), unpacks for the VAE and builds the
ids. True CFG runs the negative and positive conditioning as one doubled batch (the pipeline makes two calls: the
same result). The text encoders run on the host (``pipe.encode_prompt``, outside the captured program); the transformer
loop and the VAE decode are the program. Timesteps are passed to the transformer divided by 1000, as the pipeline
does.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from olss_fast.pipelines.facts import call_default_guidance
from olss_fast.pipelines.base import (CondInput, ExportSpec, PipelineAdapter, Prepared, as_prompt_list, check_prompt_args, negatives,
                   postprocessed_output)


class FluxAdapter(PipelineAdapter):
    name = "FluxPipeline"
    module_names = ("vae", "text_encoder", "text_encoder_2")
    extra_kwargs = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                    "max_sequence_length", "true_cfg_scale")
    options_supported = ()
    export_unsupported = None
    cfg_argument = "true_cfg_scale"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from diffusers import FluxPipeline

        return isinstance(pipe, FluxPipeline)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)  # packed: 4 × the VAE's channels

    # ------------------------------------------------------------------ sizes
    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)
        return size, size

    def check_size(self, height: int, width: int) -> None:
        k = 2 * int(self.pipe.vae_scale_factor)
        if height % k or width % k:
            raise ValueError(f"`height` and `width` have to be divisible by {k} (the VAE factor × 2 for the packed "
                             f"latents) but are {height} and {width}")

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        k = 2 * int(self.pipe.vae_scale_factor)
        return int(height) // k, int(width) // k  # packed tokens per column and row

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        gh, gw = self._grid(height, width)
        return (batch, gh * gw, self.latent_channels)

    # ------------------------------------------------------------------ recording
    def flow_mu(self, height: int, width: int) -> Optional[float]:
        gh, gw = self._grid(height, width)
        return self.dynamic_shift(gh * gw, 1.15)

    def draw_noise(self, batch: int, height: int, width: int, generator: Any, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        # FluxPipeline.prepare_latents draws the unpacked [B, C/4, 2·gh, 2·gw] latents, then packs them
        gh, gw = self._grid(height, width)
        c = self.latent_channels // 4
        noise = randn_tensor((batch, c, 2 * gh, 2 * gw), generator=generator, device=device, dtype=dtype)
        return self.pipe._pack_latents(noise, batch, c, 2 * gh, 2 * gw)

    def teacher_timestep_kwargs(self, teacher: Any, num_steps: int, height: int, width: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
        mu = self.flow_mu(height, width)
        if mu is not None:
            kwargs["mu"] = mu
        return kwargs

    def _distilled_guidance(self, args: Mapping[str, Any]) -> float:
        g = args.get("guidance_scale")
        if g is None:
            g = call_default_guidance(self.pipe)
        return float(3.5 if g is None else g)

    def fitted_guidance(self, args: Mapping[str, Any], guidance: float, guided: bool) -> Optional[float]:
        # the recording passes the pipeline's guidance_scale: Flux's distilled guidance embedding
        return self._distilled_guidance(args) if self.denoiser.config.guidance_embeds else None

    def is_guided(self, args: Mapping[str, Any], guidance: float) -> bool:
        has_negative = args.get("negative_prompt") is not None or args.get("negative_prompt_embeds") is not None
        return guidance > 1.0 and has_negative  # as FluxPipeline: true CFG needs a negative prompt

    # ------------------------------------------------------------------ host side
    def prepare(self, args, guided, num_images, text_in_graph, height, width, options):  # type: ignore[override]
        pipe = self.pipe
        prompt, pe, ppe = args.get("prompt"), args.get("prompt_embeds"), args.get("pooled_prompt_embeds")
        npe, nppe = args.get("negative_prompt_embeds"), args.get("negative_pooled_prompt_embeds")
        check_prompt_args(args, pooled_by="Flux")
        prompts = as_prompt_list(prompt, "prompt") if prompt is not None else None
        n = len(prompts) if prompts is not None else int(pe.shape[0])
        max_len = args.get("max_sequence_length")
        max_len = 512 if max_len is None else int(max_len)
        prompt_2 = args.get("prompt_2")
        pos, pooled, text_ids = pipe.encode_prompt(
            prompt=prompts, prompt_2=None if prompt_2 is None else negatives(prompt_2, n, "prompt_2"),
            prompt_embeds=pe, pooled_prompt_embeds=ppe, device=self.device, num_images_per_prompt=num_images,
            max_sequence_length=max_len,
        )
        embeds, pooled_all = pos, pooled
        if guided:
            negative, negative_2 = args.get("negative_prompt"), args.get("negative_prompt_2")
            neg, neg_pooled, _ = pipe.encode_prompt(
                prompt=None if negative is None else negatives(negative, n),
                prompt_2=None if negative_2 is None else negatives(negative_2, n, "negative_prompt_2"),
                prompt_embeds=npe, pooled_prompt_embeds=nppe, device=self.device,
                num_images_per_prompt=num_images, max_sequence_length=max_len,
            )
            if tuple(neg.shape) != tuple(pos.shape):
                raise ValueError(f"batch size mismatch: prompt embeddings {list(pos.shape)} and negative ones "
                                 f"{list(neg.shape)} must have the same shape")
            embeds, pooled_all = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        batch = int(pos.shape[0])
        gh, gw = self._grid(height, width)
        img_ids = pipe._prepare_latent_image_ids(batch, gh, gw, self.device, pos.dtype)
        inputs = {"embeds": embeds.to(self.device), "pooled": pooled_all.to(self.device),
                  "txt_ids": text_ids.to(self.device), "img_ids": img_ids}
        if self.denoiser.config.guidance_embeds:
            inputs["guidance"] = torch.full((embeds.shape[0],), self._distilled_guidance(args), dtype=torch.float32,
                                            device=self.device)
        return Prepared(batch, "embeds", inputs)

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        return postprocessed_output(self.pipe, image, output_type, return_dict, FluxPipelineOutput)

    # ------------------------------------------------------------------ program side
    def encode(self, inputs, mode, guided, options):  # type: ignore[override]
        cond = {"encoder_hidden_states": inputs["embeds"], "pooled_projections": inputs["pooled"],
                "txt_ids": inputs["txt_ids"], "img_ids": inputs["img_ids"]}
        if "guidance" in inputs:
            cond["guidance"] = inputs["guidance"]
        return cond

    def model_timestep(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flux_timestep(t, x)

    def denoise(self, denoiser, x, t, cond, options):  # type: ignore[override]
        return denoiser(hidden_states=x, timestep=self.model_timestep(t, x), return_dict=False, **cond)[0]

    def decode(self, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        vae = self.pipe.vae
        unpacked = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        return vae.decode(unpacked / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]

    # ------------------------------------------------------------------ export
    def export_spec(self, batch: int, height: int, width: int, guided: bool, args: Any = None,
                    example: Any = None) -> ExportSpec:
        ex = self.example_conditioning(batch, height, width, guided, args, example)
        names = [("encoder_hidden_states", "embeds", "model", True), ("pooled_projections", "pooled", "model", True),
                 ("txt_ids", "txt_ids", "model", False), ("img_ids", "img_ids", "model", False)]
        if "guidance" in ex:
            names.append(("guidance", "guidance", "float32", True))
        return ExportSpec(
            denoiser=FluxDenoiser(self.denoiser, "guidance" in ex), decoder=FluxDecoder(self.pipe, height, width),
            cond=[CondInput(name, key, tuple(ex[key].shape), dt, batched) for name, key, dt, batched in names],
            image_range="[-1,1]", modules={"transformer": self.denoiser, "vae": self.pipe.vae},
        )


def flux_timestep(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The timestep FluxPipeline passes its transformer for scheduler timestep(s) ``t`` and latents ``x``: σ, in the
    latents' dtype."""
    return t.expand(x.shape[0]).to(x.dtype) / 1000


class FluxDenoiser(torch.nn.Module):
    """``(sample, timestep 0-d, encoder_hidden_states, pooled_projections, txt_ids, img_ids[, guidance])`` →
    velocity, as :meth:`FluxAdapter.denoise` calls the transformer (for the exporter)."""

    def __init__(self, transformer: Any, with_guidance: bool) -> None:
        super().__init__()
        self.transformer = transformer
        self.with_guidance = with_guidance

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, txt_ids: torch.Tensor, img_ids: torch.Tensor,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.transformer(hidden_states=sample, timestep=flux_timestep(timestep, sample),
                                guidance=guidance if self.with_guidance else None,
                                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                                txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


class FluxDecoder(torch.nn.Module):
    """Unpack the latents and decode them (as :meth:`FluxAdapter.decode`) at a fixed image size."""

    def __init__(self, pipe: Any, height: int, width: int) -> None:
        super().__init__()
        self.vae = pipe.vae
        self.unpack = pipe._unpack_latents
        self.height, self.width, self.factor = int(height), int(width), int(pipe.vae_scale_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        unpacked = self.unpack(latents, self.height, self.width, self.factor)
        return self.vae.decode(unpacked / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
