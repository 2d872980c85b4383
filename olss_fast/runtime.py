"""`compile_olss_pipeline`: run a searched OLSS schedule as one static, fused (and optionally CUDA-graphed) loop.

An OLSS schedule (Duan et al., CIKM 2023, Eq. 8) is a fixed list of timesteps plus a small coefficient matrix, so the
whole sampler is a static program::

    [text encoder] → for j in 0..n-1: UNet(x_j, t_j) → fused step (CFG + x_{j+1} = w_j x_0 + Σ_l v_{j,l} e_l) → VAE

:class:`OLSSRunner` runs exactly that program with preallocated buffers and the one-launch fused step of
:mod:`olss_fast.kernels.fused_step` (Triton on CUDA, the torch reference elsewhere):

* ``backend="eager"``: the fixed loop, uncaptured (any device, CPU included);
* ``backend="cuda_graph"``: the text encoder, all n UNet calls, all n steps and the VAE decode captured in ONE CUDA
  graph per input signature (batch, height, width, dtype, prompt mode), warmed up on a side stream and kept in a
  small LRU cache (:mod:`olss_fast.export.cuda_graph`). Tokenisation, noise sampling and post-processing stay on the
  host; token ids, labels and noise are copied into static buffers before each replay;
* ``backend="auto"``: ``cuda_graph`` on CUDA, ``eager`` otherwise;
* ``backend="onnxruntime"`` / ``"tensorrt"``: the same program exported to static-shape ONNX (and built into TensorRT
  engines) by :mod:`olss_fast.export`, cached on disk; :func:`compile_olss_pipeline` returns an
  :class:`olss_fast.export.compiled.ExportedOLSSRunner` with the same call signature and outputs;
* ``compile_unet=True``: the UNet is ``torch.compile``-d (inductor, static shapes) inside the loop.

The coefficients, timesteps and guidance scale live in device tensors read by the captured kernels, so
:meth:`OLSSRunner.update_schedule` swaps in another schedule with the same number of steps without re-capturing.

Supported pipelines: ``diffusers.StableDiffusionPipeline`` (epsilon or v-prediction: the coefficients absorb the
parametrisation), ``diffusers.StableDiffusionXLPipeline`` (added conditioning ``text_embeds`` + ``time_ids``) and
:class:`olss_fast.models.digits.DigitsPipeline` (class labels as ``prompt``). The runner mirrors their ``__call__``
(classifier-free guidance with the unconditional half first, ``latents / vae.config.scaling_factor`` before
``vae.decode``, the pipeline's ``image_processor.postprocess``) without the safety checker (``nsfw`` is ``None``).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import torch

from olss_fast.export.cuda_graph import CapturedGraph, GraphCache, StaticBuffers
from olss_fast.kernels.fused_step import fused_olss_step
from olss_fast.schedule import OLSSSchedule

if TYPE_CHECKING:  # pragma: no cover
    from olss_fast.export.compiled import ExportedOLSSRunner

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "OLSSRunner", "SUPPORTED_PIPELINES", "compile_olss_pipeline"]

BACKENDS = ("auto", "eager", "cuda_graph")
SUPPORTED_PIPELINES = (
    "diffusers.StableDiffusionPipeline (epsilon or v-prediction), diffusers.StableDiffusionXLPipeline and "
    "olss_fast.models.digits.DigitsPipeline"
)
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")

PromptType = Union[str, Sequence[str], None]


# ==================================================================================================== adapters
class _Adapter:
    """How one pipeline family encodes its conditioning, calls its UNet and decodes (host side + program side)."""

    name = "pipeline"
    extra_kwargs: tuple[str, ...] = ()

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.unet = pipe.unet

    # ------------------------------------------------------------------ sizes
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def default_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def check_size(self, height: int, width: int) -> None:
        raise NotImplementedError

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    # ------------------------------------------------------------------ host side
    def prepare(
        self, args: dict[str, Any], guided: bool, num_images: int, text_in_graph: bool, height: int, width: int
    ) -> tuple[int, str, dict[str, torch.Tensor]]:
        """Turn the call's conditioning arguments into ``(batch, mode, static conditioning inputs on the device)``."""
        raise NotImplementedError

    def placeholder_args(self, batch: int) -> dict[str, Any]:
        """Call arguments for a ``batch``-sized warm-up capture."""
        raise NotImplementedError

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ program side (captured)
    def encode(self, inputs: StaticBuffers, mode: str, guided: bool) -> dict[str, Any]:
        """UNet keyword arguments for the whole (CFG-doubled) batch, computed from the static inputs."""
        raise NotImplementedError

    def unet_forward(self, unet: Callable, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return unet(x, t, return_dict=False, **cond)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _as_prompt_list(prompt: PromptType, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt) and len(prompt) > 0:
        return list(prompt)
    raise ValueError(f"`{what}` must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def _negatives(negative: PromptType, batch: int, what: str = "negative_prompt") -> list[str]:
    if negative is None:
        return [""] * batch
    if isinstance(negative, str):
        return [negative] * batch
    neg = _as_prompt_list(negative, what)
    if len(neg) != batch:
        raise ValueError(
            f"batch size mismatch: `{what}` has {len(neg)} entries but `prompt` has {batch}; pass one negative "
            "prompt or one per prompt"
        )
    return neg


def _repeat_each(items: list, k: int) -> list:
    return [x for x in items for _ in range(k)]


class _TextMixin:
    """Shared tokenisation helpers for the CLIP-conditioned pipelines."""

    pipe: Any

    def _tokenize(self, tokenizer: Any, prompts: list[str], max_length: Optional[int] = None) -> torch.Tensor:
        return self._encode_text(tokenizer, prompts, max_length).input_ids

    def _encode_text(self, tokenizer: Any, prompts: list[str], max_length: Optional[int] = None) -> Any:
        """Tokenise as the pipelines' ``encode_prompt`` does (host side, outside any graph)."""
        from diffusers.loaders import TextualInversionLoaderMixin

        if isinstance(self.pipe, TextualInversionLoaderMixin):
            prompts = self.pipe.maybe_convert_prompt(prompts, tokenizer)
        return tokenizer(
            prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )

    def _sd_size_default(self) -> tuple[int, int]:
        ss = self.pipe.unet.config.sample_size
        h, w = (ss, ss) if isinstance(ss, int) else (ss[0], ss[1])
        f = self.pipe.vae_scale_factor
        return int(h) * f, int(w) * f

    def _check_multiple_of_8(self, height: int, width: int) -> None:
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}")


class _SDAdapter(_TextMixin, _Adapter):
    """``diffusers.StableDiffusionPipeline``: CLIP text encoder → UNet2DConditionModel → AutoencoderKL."""

    name = "StableDiffusionPipeline"

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if getattr(self.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                "UNets with a guidance embedding (time_cond_proj_dim, e.g. LCM) are not supported by the OLSS runner"
            )
        te = pipe.text_encoder
        self.use_mask = bool(getattr(te.config, "use_attention_mask", False)) if te is not None else False

    def default_size(self) -> tuple[int, int]:
        return self._sd_size_default()

    def check_size(self, height: int, width: int) -> None:
        self._check_multiple_of_8(height, width)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (batch, self.latent_channels, int(height) // f, int(width) // f)

    def prepare(self, args, guided, num_images, text_in_graph, height, width):  # type: ignore[override]
        pipe = self.pipe
        device = _pipe_device(pipe)
        prompt, negative = args.get("prompt"), args.get("negative_prompt")
        pe, npe = args.get("prompt_embeds"), args.get("negative_prompt_embeds")
        if prompt is not None and pe is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is None and pe is None:
            raise ValueError("provide either `prompt` or `prompt_embeds`")
        if negative is not None and npe is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if pe is not None and npe is not None and tuple(pe.shape) != tuple(npe.shape):
            raise ValueError(
                f"batch size mismatch: `prompt_embeds` {list(pe.shape)} and `negative_prompt_embeds` "
                f"{list(npe.shape)} must have the same shape"
            )
        use_tokens = (
            text_in_graph and pe is None and npe is None
            and pipe.text_encoder is not None and pipe.tokenizer is not None
        )
        if use_tokens:
            prompts = _as_prompt_list(prompt, "prompt")
            negs = _negatives(negative, len(prompts))
            prompts, negs = _repeat_each(prompts, num_images), _repeat_each(negs, num_images)
            enc = self._encode_text(pipe.tokenizer, prompts)
            ids, mask = enc.input_ids, enc.get("attention_mask")
            if guided:
                neg_enc = self._encode_text(pipe.tokenizer, negs, ids.shape[-1])
                ids = torch.cat([neg_enc.input_ids, ids])
                mask = torch.cat([neg_enc["attention_mask"], mask]) if self.use_mask else None
            inputs = {"ids": ids.to(device)}
            if self.use_mask:  # text encoders that take the padding mask (not CLIP's default)
                inputs["mask"] = mask.to(device)
            return len(prompts), "tokens", inputs
        # eager encoding (embeddings given, or the text encoder runs outside the graph); lists normalised first so
        # that the batch-size rules are the token path's
        prompts = _as_prompt_list(prompt, "prompt") if prompt is not None else None
        n_base = len(prompts) if prompts is not None else int(pe.shape[0])
        negs = _negatives(negative, n_base) if (guided and npe is None) else None
        pos, neg = pipe.encode_prompt(
            prompts, device, num_images, guided, negs, prompt_embeds=pe, negative_prompt_embeds=npe
        )
        emb = torch.cat([neg, pos]) if guided else pos
        return int(pos.shape[0]), "embeds", {"embeds": emb.to(device)}

    def placeholder_args(self, batch: int) -> dict[str, Any]:
        return {"prompt": [""] * batch}

    def encode(self, inputs, mode, guided):  # type: ignore[override]
        if mode == "embeds":
            return {"encoder_hidden_states": inputs["embeds"]}
        te = self.pipe.text_encoder
        mask = inputs["mask"] if "mask" in inputs else None
        emb = te(inputs["ids"], attention_mask=mask)[0]
        return {"encoder_hidden_states": emb.to(dtype=te.dtype)}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
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


class _SDXLAdapter(_TextMixin, _Adapter):
    """``diffusers.StableDiffusionXLPipeline``: two CLIP encoders, pooled ``text_embeds`` + ``time_ids``."""

    name = "StableDiffusionXLPipeline"
    extra_kwargs = (
        "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "original_size", "crops_coords_top_left", "target_size",
    )

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if getattr(self.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                "UNets with a guidance embedding (time_cond_proj_dim, e.g. LCM) are not supported by the OLSS runner"
            )
        vae = pipe.vae
        self.needs_upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        # SDXL's VAE overflows in fp16; the pipeline upcasts it for the decode. Keep a float32 copy instead of
        # converting the pipeline's VAE back and forth (which a CUDA graph could not capture).
        self._vae32 = copy.deepcopy(vae).to(torch.float32) if self.needs_upcast else None

    def default_size(self) -> tuple[int, int]:
        return self._sd_size_default()

    def check_size(self, height: int, width: int) -> None:
        self._check_multiple_of_8(height, width)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (batch, self.latent_channels, int(height) // f, int(width) // f)

    def _encoders(self) -> tuple[list, list]:
        p = self.pipe
        if p.tokenizer is not None:
            return [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2]
        return [p.tokenizer_2], [p.text_encoder_2]

    def prepare(self, args, guided, num_images, text_in_graph, height, width):  # type: ignore[override]
        pipe = self.pipe
        device = _pipe_device(pipe)
        prompt, prompt_2 = args.get("prompt"), args.get("prompt_2")
        negative, negative_2 = args.get("negative_prompt"), args.get("negative_prompt_2")
        pe, npe = args.get("prompt_embeds"), args.get("negative_prompt_embeds")
        ppe, nppe = args.get("pooled_prompt_embeds"), args.get("negative_pooled_prompt_embeds")
        if prompt is not None and pe is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is None and pe is None:
            raise ValueError("provide either `prompt` or `prompt_embeds`")
        if pe is not None and ppe is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too (SDXL conditions on both)")
        if npe is not None and nppe is None:
            raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too")
        if pe is not None and npe is not None and tuple(pe.shape) != tuple(npe.shape):
            raise ValueError(
                f"batch size mismatch: `prompt_embeds` {list(pe.shape)} and `negative_prompt_embeds` "
                f"{list(npe.shape)} must have the same shape"
            )
        te2 = pipe.text_encoder_2
        zero_negative = negative is None and bool(pipe.config.force_zeros_for_empty_prompt)
        inputs: dict[str, torch.Tensor] = {}
        use_tokens = text_in_graph and pe is None and npe is None and te2 is not None
        if use_tokens:
            prompts = _repeat_each(_as_prompt_list(prompt, "prompt"), num_images)
            prompts_2 = _repeat_each(
                _as_prompt_list(prompt_2, "prompt_2") if prompt_2 is not None else _as_prompt_list(prompt, "prompt"),
                num_images,
            )
            if len(prompts_2) != len(prompts):
                raise ValueError(
                    f"batch size mismatch: `prompt_2` has {len(prompts_2)} entries, `prompt` {len(prompts)}"
                )
            batch = len(prompts)
            n_base = batch // num_images
            negs = _repeat_each(_negatives(negative, n_base), num_images)
            negs_2 = _repeat_each(
                _negatives(negative_2, n_base, "negative_prompt_2") if negative_2 is not None
                else _negatives(negative, n_base), num_images,
            )
            tokenizers, _ = self._encoders()
            # zip as the pipeline does: (prompt, tokenizer[_2]) first, then (prompt_2, tokenizer_2)
            for k, (tok, pos_text, neg_text) in enumerate(zip(tokenizers, [prompts, prompts_2], [negs, negs_2])):
                ids = self._tokenize(tok, pos_text)
                if guided and not zero_negative:
                    ids = torch.cat([self._tokenize(tok, neg_text, ids.shape[-1]), ids])
                inputs[f"ids{k}"] = ids.to(device)
            mode = "tokens_zero_negative" if (guided and zero_negative) else "tokens"
            emb_dtype = te2.dtype
        else:
            prompts = _as_prompt_list(prompt, "prompt") if prompt is not None else None
            prompts_2 = _as_prompt_list(prompt_2, "prompt_2") if prompt_2 is not None else None
            n_base = len(prompts) if prompts is not None else int(pe.shape[0])
            negs = _negatives(negative, n_base) if negative is not None else None  # None keeps the zeroed negative
            negs_2 = _negatives(negative_2, n_base, "negative_prompt_2") if negative_2 is not None else None
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=prompts_2, device=device, num_images_per_prompt=num_images,
                do_classifier_free_guidance=guided, negative_prompt=negs, negative_prompt_2=negs_2,
                prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                negative_pooled_prompt_embeds=nppe,
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
        return batch, mode, inputs

    def placeholder_args(self, batch: int) -> dict[str, Any]:
        return {"prompt": [""] * batch}

    def encode(self, inputs, mode, guided):  # type: ignore[override]
        if mode == "embeds":
            emb, pooled = inputs["embeds"], inputs["pooled"]
        else:
            _, encoders = self._encoders()
            hidden, pooled = [], None
            for k, te in enumerate(encoders):
                out = te(inputs[f"ids{k}"], output_hidden_states=True)
                if out[0].ndim == 2:
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
            emb = torch.cat(hidden, dim=-1).to(dtype=self.pipe.text_encoder_2.dtype)
            if mode == "tokens_zero_negative":
                emb = torch.cat([torch.zeros_like(emb), emb])
                pooled = torch.cat([torch.zeros_like(pooled), pooled])
        return {
            "encoder_hidden_states": emb,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": inputs["time_ids"]},
        }

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
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


class _DigitsAdapter(_Adapter):
    """:class:`olss_fast.models.digits.DigitsPipeline`: class-conditional pixel-space UNet2DModel, null class 10."""

    name = "DigitsPipeline"
    extra_kwargs = ("class_labels",)

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        from olss_fast.models import digits

        self._digits = digits

    def _size(self) -> int:
        return int(self.unet.config.sample_size)

    def default_size(self) -> tuple[int, int]:
        return self._size(), self._size()

    def check_size(self, height: int, width: int) -> None:
        if (height, width) != self.default_size():
            raise ValueError(f"the digits model samples {self._size()}x{self._size()} images, got {height}x{width}")

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.latent_channels, self._size(), self._size())

    def prepare(self, args, guided, num_images, text_in_graph, height, width):  # type: ignore[override]
        d = self._digits
        prompt, labels_kw = args.get("prompt"), args.get("class_labels")
        if args.get("prompt_embeds") is not None or args.get("negative_prompt_embeds") is not None:
            raise ValueError("the digits pipeline is class-conditional: pass class labels as `prompt`, not embeddings")
        if prompt is not None and labels_kw is not None:
            raise ValueError("pass the digits as `prompt` or as `class_labels`, not both")
        prompt = prompt if prompt is not None else labels_kw
        labels = list(range(d.NUM_DIGITS)) if prompt is None else d.parse_class_labels(prompt, "prompt")
        labels = _repeat_each(labels, num_images)
        batch = len(labels)
        negative = args.get("negative_prompt")
        if negative is None:
            neg = [d.NULL_CLASS] * batch
        else:
            neg = d.parse_class_labels(negative, "negative_prompt")
            if len(neg) == 1:
                neg = neg * batch
            elif len(neg) * num_images == batch:
                neg = _repeat_each(neg, num_images)
            else:
                raise ValueError(
                    f"batch size mismatch: negative_prompt has {len(neg)} labels but prompt has {batch // num_images}"
                )
        device = _pipe_device(self.pipe)
        ids = torch.tensor((neg + labels) if guided else labels, dtype=torch.long, device=device)
        return batch, "labels", {"labels": ids}

    def placeholder_args(self, batch: int) -> dict[str, Any]:
        return {"prompt": [0] * batch}

    def encode(self, inputs, mode, guided):  # type: ignore[override]
        return {"class_labels": inputs["labels"]}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        from diffusers import ImagePipelineOutput

        if output_type in ("latent", "pt"):
            images: Any = image
        else:
            arr = image.cpu().permute(0, 2, 3, 1).numpy()
            images = arr if output_type == "np" else self.pipe.numpy_to_pil_gray(arr)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _make_adapter(pipe: Any) -> _Adapter:
    """Pick the adapter for ``pipe``; ``ValueError`` naming the supported pipelines otherwise."""
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    except Exception:  # pragma: no cover - diffusers is a hard dependency
        StableDiffusionPipeline = StableDiffusionXLPipeline = ()  # type: ignore[assignment,misc]
    try:
        from olss_fast.models.digits import DigitsPipeline
    except Exception:  # pragma: no cover - optional module
        DigitsPipeline = ()  # type: ignore[assignment,misc]
    if StableDiffusionXLPipeline and isinstance(pipe, StableDiffusionXLPipeline):
        return _SDXLAdapter(pipe)
    if StableDiffusionPipeline and isinstance(pipe, StableDiffusionPipeline):
        return _SDAdapter(pipe)
    if DigitsPipeline and isinstance(pipe, DigitsPipeline):
        return _DigitsAdapter(pipe)
    raise ValueError(
        f"compile_olss_pipeline does not support {type(pipe).__name__}; supported pipelines: {SUPPORTED_PIPELINES}"
    )


def _pipe_device(pipe: Any) -> torch.device:
    try:
        return torch.device(pipe._execution_device)
    except Exception:  # pragma: no cover - non-DiffusionPipeline stand-ins
        return next(pipe.unet.parameters()).device


# ==================================================================================================== schedules
def _resolve_schedule(schedule: Any, num_inference_steps: Optional[int], pipe: Any) -> OLSSSchedule:
    """An :class:`OLSSSchedule` from a schedule, an ``OLSSScheduler`` (or anything with a ``schedules`` mapping)."""
    if schedule is None:
        schedule = getattr(pipe, "scheduler", None)
        if not hasattr(schedule, "schedules"):
            raise ValueError(
                "pass an OLSSSchedule (or an OLSSScheduler) as `schedule`, or set pipe.scheduler to an OLSSScheduler"
            )
    if isinstance(schedule, OLSSSchedule):
        if num_inference_steps is not None and int(num_inference_steps) != schedule.num_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} but the schedule has {schedule.num_steps} steps"
            )
        return schedule
    schedules = getattr(schedule, "schedules", None)
    if not isinstance(schedules, Mapping):
        raise ValueError(
            f"`schedule` must be an OLSSSchedule or an OLSSScheduler (an object with a `schedules` mapping), "
            f"got {type(schedule).__name__}"
        )
    available = sorted(int(k) for k in schedules)
    if num_inference_steps is None:
        if len(available) == 1:
            return schedules[available[0]]
        current = getattr(schedule, "schedule", None)
        if isinstance(current, OLSSSchedule):
            return current
        raise ValueError(
            f"the scheduler holds schedules for {available} steps; choose one with num_inference_steps="
        )
    n = int(num_inference_steps)
    if n in schedules:
        return schedules[n]
    if not schedules and hasattr(schedule, "ddim_schedule"):
        logger.info("the OLSSScheduler holds no searched schedule; using DDIM's coefficients for %d steps", n)
        return schedule.ddim_schedule(n)
    raise ValueError(f"the scheduler holds schedules for {available} steps, not {n}")


# ==================================================================================================== runner
@dataclass
class _Entry:
    """One program instance: its static inputs, work buffers and (for cuda_graph) the captured graph."""

    key: tuple
    mode: str
    guided: bool
    decode: bool
    inputs: StaticBuffers
    x0: torch.Tensor  # float32 [B, ...]
    history: torch.Tensor  # float32 [n, B, ...]
    x_in: torch.Tensor  # model dtype [2B or B, ...]
    final: torch.Tensor  # model dtype [B, ...]
    graph: Optional[CapturedGraph] = None
    runs: int = 0
    meta: dict = field(default_factory=dict)


class _CaptureFailed(RuntimeError):
    def __init__(self, mode: str, error: BaseException) -> None:
        super().__init__(f"CUDA-graph capture failed ({mode} mode): {error!r}")
        self.mode = mode
        self.error = error


class OLSSRunner:
    """A compiled fixed-step OLSS sampler for one pipeline; call it like the pipeline.

    Build with :func:`compile_olss_pipeline`. Not thread-safe (static buffers are shared between calls).

    Attributes:
        pipe: the wrapped pipeline.
        schedule: the :class:`OLSSSchedule` currently loaded (see :meth:`update_schedule`).
        backend: ``"eager"`` or ``"cuda_graph"`` (``"auto"`` resolved).
        device / dtype: where and in which dtype the loop runs (the UNet's).
        num_captures: how many CUDA graphs (or eager buffer sets) were created so far.
        text_encoder_in_graph: whether the text encoder runs inside the captured program (it falls back to running
            before the graph if capturing it fails; a warning is logged).
    """

    def __init__(
        self,
        pipe: Any,
        schedule: OLSSSchedule,
        *,
        backend: str = "auto",
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: int = 1,
        guidance_scale: Optional[float] = None,
        dtype: Optional[torch.dtype] = None,
        compile_unet: bool = False,
        compile_mode: Optional[str] = None,
        cache_size: int = 4,
        warmup_iters: int = 2,
        step_backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r}; the OLSS runner supports {BACKENDS} (compile_olss_pipeline also takes "
                "'onnxruntime' and 'tensorrt', see olss_fast.export)"
            )
        self.pipe = pipe
        self.adapter = _make_adapter(pipe)
        if dtype is not None and self.adapter.unet.dtype != dtype:
            logger.info("converting the pipeline's modules to %s", dtype)
            pipe.to(dtype=dtype)
            self.adapter = _make_adapter(pipe)
        self.device = _pipe_device(pipe)
        self.dtype = self.adapter.unet.dtype
        if backend == "auto":
            backend = "cuda_graph" if self.device.type == "cuda" else "eager"
        if backend == "cuda_graph" and (self.device.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(f"backend='cuda_graph' needs the pipeline on a CUDA device, it is on {self.device}")
        self.backend = backend
        self.batch_size, self.height, self.width, self.guidance_scale = check_init_args(
            self.adapter, pipe, batch_size, height, width, guidance_scale
        )
        self.warmup_iters = int(warmup_iters)
        self.step_backend = step_backend
        self.text_encoder_in_graph = True
        self.num_captures = 0

        self._check_schedule(schedule)
        self.schedule = schedule
        self._coeffs = schedule.coeffs.to(device=self.device, dtype=torch.float32).contiguous()
        self._timesteps = _timesteps_tensor(schedule, self.device)
        self._guidance = torch.full((1,), self.guidance_scale, dtype=torch.float32, device=self.device)

        self.compile_unet = bool(compile_unet)
        if self.compile_unet:
            self._unet: Callable = torch.compile(self.adapter.unet, mode=compile_mode, dynamic=False)
        else:
            self._unet = self.adapter.unet
        self._cache: GraphCache[_Entry] = GraphCache(cache_size)

    # ------------------------------------------------------------------ schedule handling
    @property
    def num_inference_steps(self) -> int:
        return self.schedule.num_steps

    def _check_schedule(self, schedule: OLSSSchedule) -> None:
        if not isinstance(schedule, OLSSSchedule):
            raise ValueError(f"expected an OLSSSchedule, got {type(schedule).__name__}")
        c = schedule.num_channels
        if c is not None and c != self.adapter.latent_channels:
            raise ValueError(
                f"the schedule has per-channel coefficients for {c} channels but the latents have "
                f"{self.adapter.latent_channels}"
            )
        sched = getattr(self.pipe, "scheduler", None)
        ptype = getattr(getattr(sched, "config", None), "prediction_type", None)
        if ptype is not None and ptype != schedule.prediction_type:
            logger.warning(
                "the schedule was fitted for prediction_type=%r but the pipeline's scheduler says %r",
                schedule.prediction_type, ptype,
            )

    def update_schedule(self, schedule: OLSSSchedule) -> None:
        """Load another schedule with the same number of steps (and coefficient layout) into the static buffers.

        Captured graphs read coefficients and timesteps from device tensors, so they keep working without
        re-capture. ``ValueError`` when the step count, the coefficient shape or the timestep type differs (build a
        new runner for those).
        """
        self._check_schedule(schedule)
        if schedule.num_steps != self.schedule.num_steps:
            raise ValueError(
                f"update_schedule needs a schedule with {self.schedule.num_steps} steps (the captured loop's length), "
                f"got {schedule.num_steps}; compile a new runner for another step count"
            )
        if tuple(schedule.coeffs.shape) != tuple(self._coeffs.shape):
            raise ValueError(
                f"coefficient shape {list(schedule.coeffs.shape)} differs from the loaded {list(self._coeffs.shape)} "
                "(global vs per-channel); compile a new runner"
            )
        ts = _timesteps_tensor(schedule, self.device)
        if ts.dtype != self._timesteps.dtype:
            raise ValueError(
                f"timestep type {ts.dtype} differs from the loaded {self._timesteps.dtype}; compile a new runner"
            )
        self._coeffs.copy_(schedule.coeffs.to(torch.float32))
        self._timesteps.copy_(ts)
        self.schedule = schedule

    # ------------------------------------------------------------------ calling
    def __call__(
        self,
        prompt: Any = None,
        negative_prompt: Any = None,
        *,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        latents: Optional[torch.Tensor] = None,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        guidance_scale: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        **kwargs: Any,
    ) -> Any:
        """Sample like the pipeline's ``__call__`` (same keyword names; the step count is the schedule's).

        Returns what the pipeline returns: ``StableDiffusionPipelineOutput`` (``nsfw_content_detected=None``, no
        safety checker), ``StableDiffusionXLPipelineOutput``, ``ImagePipelineOutput``, or a tuple when
        ``return_dict=False``.
        """
        unknown = sorted(set(kwargs) - set(self.adapter.extra_kwargs))
        if unknown:
            raise ValueError(
                f"unsupported argument(s) {unknown} for the OLSS runner of a {self.adapter.name}; it accepts prompt, "
                "negative_prompt, prompt_embeds, negative_prompt_embeds, latents, generator, output_type, "
                "return_dict, height, width, num_images_per_prompt, guidance_scale, num_inference_steps"
                + (", " + ", ".join(self.adapter.extra_kwargs) if self.adapter.extra_kwargs else "")
            )
        num_images, height, width, g = check_call_args(
            self, num_inference_steps, output_type, num_images_per_prompt, height, width, guidance_scale
        )
        guided = g > 1.0
        args = dict(kwargs, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds)

        with torch.no_grad():
            batch, mode, cond = self.adapter.prepare(args, guided, num_images, self.text_encoder_in_graph,
                                                     height, width)
            lat = self._prepare_latents(batch, height, width, latents, generator)
            if guided:
                self._guidance.fill_(g)
            decode = output_type != "latent"
            try:
                out = self._execute(mode, guided, decode, {**cond, "latents": lat})
            except _CaptureFailed as exc:
                if not (exc.mode.startswith("tokens") and self.text_encoder_in_graph):
                    raise _capture_error(exc) from exc.error
                logger.warning(
                    "capturing the text encoder in the CUDA graph failed (%r); it runs before the graph from now on",
                    exc.error,
                )
                self.text_encoder_in_graph = False
                batch, mode, cond = self.adapter.prepare(args, guided, num_images, False, height, width)
                try:
                    out = self._execute(mode, guided, decode, {**cond, "latents": lat})
                except _CaptureFailed as exc2:
                    raise _capture_error(exc2) from exc2.error
            image = out.clone()
        return self.adapter.finish(image, output_type, return_dict)

    def _prepare_latents(
        self, batch: int, height: int, width: int, latents: Optional[torch.Tensor], generator: Any
    ) -> torch.Tensor:
        """Initial noise like the pipelines' ``prepare_latents`` (``init_noise_sigma`` is 1 for OLSS)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.adapter.latent_shape(batch, height, width)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"batch size mismatch: {len(generator)} generators for an effective batch of {batch} images"
            )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != tuple(shape):
            what = "batch size mismatch" if latents.dim() == len(shape) and latents.shape[0] != batch else "wrong shape"
            raise ValueError(
                f"`latents` has shape {list(latents.shape)} but {list(shape)} is expected for batch {batch} at "
                f"{height}x{width} ({what})"
            )
        return latents.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ program
    def _key(self, mode: str, guided: bool, decode: bool, inputs: Mapping[str, torch.Tensor]) -> tuple:
        from olss_fast.export.cuda_graph import tensor_signature

        return (self.backend, mode, guided, decode, str(self.dtype), tensor_signature(inputs))

    def _new_entry(self, key: tuple, mode: str, guided: bool, decode: bool,
                   inputs: Mapping[str, torch.Tensor]) -> _Entry:
        lat = inputs["latents"]
        b = int(lat.shape[0])
        n = self.num_inference_steps
        dev = self.device
        entry = _Entry(
            key=key, mode=mode, guided=guided, decode=decode, inputs=StaticBuffers(inputs),
            x0=torch.empty(lat.shape, dtype=torch.float32, device=dev),
            history=torch.empty((n, *lat.shape), dtype=torch.float32, device=dev),
            x_in=torch.empty(((2 * b) if guided else b, *lat.shape[1:]), dtype=self.dtype, device=dev),
            final=torch.empty(lat.shape, dtype=self.dtype, device=dev),
        )
        return entry

    def _program(self, entry: _Entry) -> torch.Tensor:
        """The static loop: [text encoder] → n × (UNet → fused OLSS step) → [decode]. Capturable."""
        with torch.no_grad():
            inputs = entry.inputs
            cond = self.adapter.encode(inputs, entry.mode, entry.guided)
            lat = inputs["latents"]
            b = lat.shape[0]
            entry.x0.copy_(lat)
            if entry.guided:
                entry.x_in[:b].copy_(lat)
                entry.x_in[b:].copy_(lat)
            else:
                entry.x_in.copy_(lat)
            g = self._guidance if entry.guided else None
            n = self.num_inference_steps
            for j in range(n):
                out = self.adapter.unet_forward(self._unet, entry.x_in, self._timesteps[j], cond)
                target = entry.x_in if j < n - 1 else entry.final
                fused_olss_step(out, self._coeffs, j, entry.x0, entry.history, target, g, backend=self.step_backend)
            if entry.decode:
                return self.adapter.decode(entry.final)
            return entry.final

    def _execute(self, mode: str, guided: bool, decode: bool, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        key = self._key(mode, guided, decode, inputs)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._new_entry(key, mode, guided, decode, inputs)
            if self.backend == "cuda_graph":
                entry.inputs.load(inputs)
                logger.info(
                    "capturing the %d-step OLSS loop in a CUDA graph for latents %s (%s, %s mode)",
                    self.num_inference_steps, list(inputs["latents"].shape), self.dtype, mode,
                )
                try:
                    entry.graph = CapturedGraph(
                        key, lambda e=entry: self._program(e), entry.inputs, state=entry,
                        warmup_iters=self.warmup_iters, device=self.device,
                    )
                except Exception as exc:  # noqa: BLE001 - re-raised with context by the caller
                    raise _CaptureFailed(mode, exc) from exc
            self.num_captures += 1
            self._cache.put(key, entry)
        entry.runs += 1
        if entry.graph is not None:
            return entry.graph.replay(inputs)
        entry.inputs.load(inputs)
        return self._program(entry)

    # ------------------------------------------------------------------ utilities
    def warmup(self, batch_size: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
               output_type: str = "pil") -> None:
        """Capture (or allocate) the program for ``batch_size`` × ``height`` × ``width`` ahead of the first call."""
        batch = int(batch_size or self.batch_size)
        args = self.adapter.placeholder_args(batch)
        self(**args, height=height, width=width, output_type=output_type,
             latents=torch.zeros(self.adapter.latent_shape(batch, int(height or self.height), int(width or self.width)),
                                 device=self.device, dtype=self.dtype))

    def cache_info(self) -> dict[str, Any]:
        """Cache statistics: entries (least recently used first), hits, misses, evictions, captures."""
        return {
            "entries": self._cache.keys(), "size": len(self._cache), "max_size": self._cache.max_size,
            "hits": self._cache.hits, "misses": self._cache.misses, "evictions": self._cache.evictions,
            "captures": self.num_captures,
        }

    def __repr__(self) -> str:
        return (
            f"OLSSRunner({self.adapter.name}, backend={self.backend!r}, steps={self.num_inference_steps}, "
            f"dtype={self.dtype}, device={self.device}, compile_unet={self.compile_unet})"
        )


def _capture_error(exc: _CaptureFailed) -> RuntimeError:
    return RuntimeError(f"capturing the OLSS loop in a CUDA graph failed: {exc.error!r}; use backend='eager'")


def check_init_args(
    adapter: Any, pipe: Any, batch_size: Any, height: Optional[int], width: Optional[int],
    guidance_scale: Optional[float],
) -> tuple[int, int, int, float]:
    """Validate a runner's construction arguments → ``(batch_size, height, width, guidance_scale)``.

    Shared by :class:`OLSSRunner` and the exported runners; ``None`` size/guidance take the pipeline's defaults.
    """
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dh, dw = adapter.default_size()
    height, width = int(height or dh), int(width or dw)
    adapter.check_size(height, width)
    guidance = _check_guidance(default_guidance(pipe) if guidance_scale is None else guidance_scale)
    return int(batch_size), height, width, guidance


def check_call_args(
    runner: Any,
    num_inference_steps: Optional[int],
    output_type: str,
    num_images_per_prompt: Any,
    height: Optional[int],
    width: Optional[int],
    guidance_scale: Optional[float],
) -> tuple[int, int, int, float]:
    """Validate a runner call's common arguments → ``(num_images, height, width, guidance_scale)``.

    Shared by :class:`OLSSRunner` and the exported runners (``runner`` has ``num_inference_steps``, ``height``,
    ``width``, ``guidance_scale`` and ``adapter``).
    """
    if num_inference_steps is not None and int(num_inference_steps) != runner.num_inference_steps:
        raise ValueError(
            f"this runner runs its {runner.num_inference_steps}-step schedule; got num_inference_steps="
            f"{num_inference_steps} (compile another runner for another step count)"
        )
    if output_type not in _OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
    if isinstance(num_images_per_prompt, bool) or int(num_images_per_prompt) < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
    height, width = int(height or runner.height), int(width or runner.width)
    runner.adapter.check_size(height, width)
    g = runner.guidance_scale if guidance_scale is None else _check_guidance(guidance_scale)
    return int(num_images_per_prompt), height, width, g


def default_guidance(pipe: Any) -> float:
    """The default ``guidance_scale`` of ``pipe.__call__`` (7.5 when it has none)."""
    from olss_fast.recording import call_default_guidance

    g = call_default_guidance(pipe)
    return 7.5 if g is None else g


def _check_guidance(g: Any) -> float:
    try:
        value = float(g)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a number, got {g!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"guidance_scale must be finite, got {value}")
    return value


def _timesteps_tensor(schedule: OLSSSchedule, device: torch.device) -> torch.Tensor:
    """The schedule's timesteps as the OLSSScheduler stores them (int64 for integer timesteps, else float32)."""
    is_int = all(isinstance(t, int) for t in schedule.timesteps)
    return torch.tensor(schedule.timesteps, dtype=torch.long if is_int else torch.float32, device=device)


# ==================================================================================================== entry point
def compile_olss_pipeline(
    pipe: Any,
    schedule: Any = None,
    *,
    backend: str = "auto",
    num_inference_steps: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 1,
    guidance_scale: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    compile_unet: bool = False,
    compile_mode: Optional[str] = None,
    cache_size: int = 4,
    warmup_iters: int = 2,
    step_backend: str = "auto",
    warmup: bool = False,
    cache_dir: Optional[str] = None,
) -> Union[OLSSRunner, "ExportedOLSSRunner"]:
    """Build an :class:`OLSSRunner` that samples ``pipe`` with an OLSS schedule as one static loop.

    Args:
        pipe: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or ``DigitsPipeline``.
        schedule: an :class:`OLSSSchedule`; or an ``OLSSScheduler`` (anything with a ``schedules`` mapping
            ``{n: OLSSSchedule}``) with ``num_inference_steps`` choosing one; ``None`` uses ``pipe.scheduler``.
        backend: ``"auto"`` (``cuda_graph`` on CUDA, else ``eager``), ``"eager"``, ``"cuda_graph"``, or
            ``"onnxruntime"`` / ``"tensorrt"`` (ONNX export / TensorRT engines, see :mod:`olss_fast.export`; these
            return an ``ExportedOLSSRunner`` and ignore ``compile_unet``, ``cache_size`` and ``warmup_iters``).
        num_inference_steps: which schedule of an ``OLSSScheduler`` to run (must match an ``OLSSSchedule``).
        height, width: default image size (the pipeline's default when ``None``); calls may override.
        batch_size: the batch :meth:`OLSSRunner.warmup` prepares (calls may use other batches: each new input
            signature gets its own capture, kept in an LRU cache of ``cache_size``).
        guidance_scale: classifier-free guidance scale (> 1 enables CFG); ``None`` takes the default of the
            pipeline's ``__call__`` (7.5 for Stable Diffusion, 1.5 for the digits model); calls may override (no
            re-capture unless CFG is switched on or off).
        dtype: convert the pipeline's modules to this dtype first (in place); ``None`` keeps the UNet's dtype.
        compile_unet: ``torch.compile`` the UNet (inductor, static shapes; ``compile_mode`` is passed on — do not
            use ``"reduce-overhead"`` with ``cuda_graph``, the whole loop is already captured).
        warmup_iters: eager iterations on a side stream before each capture.
        step_backend: fused-step backend (``"auto"``, ``"triton"``, ``"reference"``), see
            :func:`olss_fast.kernels.fused_step.select_backend`.
        warmup: capture for ``batch_size`` × ``height`` × ``width`` now instead of at the first call.
        cache_dir: where the ``onnxruntime`` / ``tensorrt`` backends keep exports and engines (default
            ``$OLSS_FAST_CACHE`` or ``~/.cache/olss_fast``).

    Raises:
        ValueError: unsupported pipeline or backend, a schedule that does not fit the pipeline, bad sizes.
        RuntimeError: ``backend="tensorrt"`` without the ``tensorrt`` package.
    """
    resolved = _resolve_schedule(schedule, num_inference_steps, pipe)
    if backend in ("onnxruntime", "tensorrt"):  # the exported program (olss_fast.export)
        from olss_fast.export.compiled import ExportedOLSSRunner

        exported = ExportedOLSSRunner(
            pipe, resolved, backend=backend, height=height, width=width, batch_size=batch_size,
            guidance_scale=guidance_scale, dtype=dtype, cache_dir=cache_dir, step_backend=step_backend,
        )
        if warmup:
            exported.warmup()
        return exported
    runner = OLSSRunner(
        pipe, resolved, backend=backend, height=height, width=width, batch_size=batch_size,
        guidance_scale=guidance_scale, dtype=dtype, compile_unet=compile_unet, compile_mode=compile_mode,
        cache_size=cache_size, warmup_iters=warmup_iters, step_backend=step_backend,
    )
    if warmup:
        runner.warmup()
    return runner
