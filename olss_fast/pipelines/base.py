"""The pipeline-adapter contract: everything the runtime, the recording and the exporters need to know about one
pipeline family, in one place.

An adapter wraps one diffusers pipeline object and answers, for the fixed OLSS program (docs/design.md, "Layers")::

    host:    prepare(call arguments) → static conditioning inputs        (tokenise, validate batch sizes)
    program: encode(inputs) → denoiser conditioning                       (text encoders; captured with the loop)
             denoise(denoiser, x, t, cond) → model output                 (one denoiser call, CFG batch)
             decode(latents) → image                                      (VAE; captured with the loop)
    host:    finish(image) → the pipeline's own output object
    sizes:   default_size, check_size, latent_shape
    export:  export_spec(...) → torch modules with fixed call signatures for the ONNX exporter

Everything it reads from the pipeline (``pipe.unet``, ``pipe.text_encoder``, ``pipe.vae``) is read at call time, so a
runner follows components reassigned on the pipeline. Adapters register themselves with
:func:`olss_fast.pipelines.register_adapter`; nothing else in the library branches on the pipeline class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch


@dataclass(frozen=True)
class CallOptions:
    """Call arguments that change the program itself (they are part of a captured program's key).

    Attributes:
        clip_skip: skip this many final CLIP layers (diffusers' ``clip_skip``).
        lora_scale: ``cross_attention_kwargs={"scale": s}``: the LoRA scale of the text encoders and the denoiser.
        guidance_rescale: diffusers' ``guidance_rescale`` (Lin et al. 2023, Eq. 16), 0 = off.
    """

    clip_skip: Optional[int] = None
    lora_scale: Optional[float] = None
    guidance_rescale: float = 0.0

    @property
    def cross_attention_kwargs(self) -> Optional[dict[str, Any]]:
        return None if self.lora_scale is None else {"scale": self.lora_scale}


@dataclass
class Prepared:
    """The host side's result: the batch, the conditioning mode (part of the program key) and static inputs."""

    batch: int
    mode: str
    inputs: dict[str, torch.Tensor]


@dataclass
class ExportSpec:
    """What the ONNX exporter needs from a pipeline family (torch modules with fixed signatures + shapes).

    ``text_encoder``: ``input_ids [M, L] → embeddings [M, L, D]`` (None: class-conditional, labels go straight to the
    denoiser); ``denoiser``: ``(sample [M, C, h, w], timestep 0-d, cond) → model output``; ``decoder``:
    ``latents → image``. ``uncond`` is the unconditional row (the empty prompt's token ids, or the null class).
    """

    denoiser: torch.nn.Module
    decoder: torch.nn.Module
    cond_input: str
    cond_shape: tuple[int, ...]
    cond_is_int: bool
    uncond: Any
    id_limit: int
    image_range: str
    modules: dict[str, torch.nn.Module]
    text_encoder: Optional[torch.nn.Module] = None
    token_length: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class PipelineAdapter:
    """Base class of the pipeline families (see the module docstring for the contract)."""

    #: the pipeline class name, used in messages
    name = "pipeline"
    #: call arguments beyond the common ones (prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, latents,
    #: generator, output_type, return_dict, height, width, num_images_per_prompt, guidance_scale, num_inference_steps)
    extra_kwargs: tuple[str, ...] = ()
    #: which CallOptions fields the family supports
    options_supported: tuple[str, ...] = ("guidance_rescale",)
    #: why the ONNX/TensorRT export does not support the family (None: it does, see :meth:`export_spec`)
    export_unsupported: Optional[str] = "(not implemented for this family yet)"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @classmethod
    def matches(cls, pipe: Any) -> bool:  # pragma: no cover - every adapter overrides it
        raise NotImplementedError

    # ------------------------------------------------------------------ components (read live from the pipeline)
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def modules(self) -> dict[str, torch.nn.Module]:
        """The torch modules the program runs, by name (what a runner watches for changes)."""
        return {"denoiser": self.denoiser}

    def refresh(self) -> None:
        """Called when the pipeline's modules changed (an adapter that keeps derived copies rebuilds them)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        try:
            return torch.device(self.pipe._execution_device)
        except Exception:  # pragma: no cover - non-DiffusionPipeline stand-ins
            return next(self.denoiser.parameters()).device

    # ------------------------------------------------------------------ sizes
    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def default_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def check_size(self, height: int, width: int) -> None:
        raise NotImplementedError

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    # ------------------------------------------------------------------ host side
    def check_options(self, options: CallOptions) -> None:
        unsupported = [name for name in ("clip_skip", "lora_scale", "guidance_rescale")
                       if name not in self.options_supported and getattr(options, name) not in (None, 0.0)]
        if unsupported:
            raise ValueError(f"{self.name} does not support {unsupported} (the pipeline itself takes no such argument)")

    def prepare(self, args: Mapping[str, Any], guided: bool, num_images: int, text_in_graph: bool, height: int,
                width: int, options: CallOptions) -> Prepared:
        """The call's conditioning arguments → static inputs on the device (``ValueError`` on bad input)."""
        raise NotImplementedError

    def placeholder_args(self, batch: int) -> dict[str, Any]:
        """Call arguments for a ``batch``-sized warm-up."""
        raise NotImplementedError

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        """The program's output → what the pipeline's ``__call__`` returns."""
        raise NotImplementedError

    # ------------------------------------------------------------------ program side (captured with the loop)
    def encode(self, inputs: Mapping[str, torch.Tensor], mode: str, guided: bool,
               options: CallOptions) -> dict[str, Any]:
        """Denoiser keyword arguments for the whole (CFG-doubled) batch, from the static inputs."""
        raise NotImplementedError

    def denoise(self, denoiser: Any, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any],
                options: CallOptions) -> torch.Tensor:
        """One denoiser call on the (CFG-doubled) batch."""
        kw = dict(cond)
        if options.cross_attention_kwargs is not None:
            kw["cross_attention_kwargs"] = options.cross_attention_kwargs
        return denoiser(x, t, return_dict=False, **kw)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ export
    def check_exportable(self) -> None:
        """``ValueError`` when the ONNX/TensorRT export does not support this family."""
        if self.export_unsupported is not None:
            raise ValueError(f"the ONNX/TensorRT export does not support {self.name} {self.export_unsupported}; use "
                             "backend='cuda_graph' or 'eager'")

    def export_spec(self, batch: int, height: int, width: int, guided: bool) -> ExportSpec:
        """The torch modules and shapes the exporter needs (families with ``export_unsupported = None``)."""
        self.check_exportable()
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- shared helpers
def as_prompt_list(prompt: Any, what: str) -> list[str]:
    """A string or a non-empty list of strings as a list (``ValueError`` otherwise)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt) and len(prompt) > 0:
        return list(prompt)
    raise ValueError(f"`{what}` must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def negatives(negative: Any, batch: int, what: str = "negative_prompt") -> list[str]:
    """One negative prompt per prompt: None → the empty prompt, one string → repeated, a list → as many as prompts."""
    if negative is None:
        return [""] * batch
    if isinstance(negative, str):
        return [negative] * batch
    neg = as_prompt_list(negative, what)
    if len(neg) != batch:
        raise ValueError(
            f"batch size mismatch: `{what}` has {len(neg)} entries but `prompt` has {batch}; pass one negative "
            "prompt or one per prompt"
        )
    return neg


def repeat_each(items: Sequence[Any], k: int) -> list:
    return [x for x in items for _ in range(k)]


class TextEncodingMixin:
    """Tokenisation and text-encoder helpers shared by the CLIP-conditioned families."""

    pipe: Any

    def tokenize(self, tokenizer: Any, prompts: list[str], max_length: Optional[int] = None) -> Any:
        """Tokenise as the pipelines' ``encode_prompt`` does (host side, outside any graph)."""
        from diffusers.loaders import TextualInversionLoaderMixin

        if isinstance(self.pipe, TextualInversionLoaderMixin):
            prompts = self.pipe.maybe_convert_prompt(prompts, tokenizer)
        return tokenizer(
            prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )

    def unet_pixel_size(self) -> tuple[int, int]:
        ss = self.pipe.unet.config.sample_size
        h, w = (ss, ss) if isinstance(ss, int) else (ss[0], ss[1])
        f = self.pipe.vae_scale_factor
        return int(h) * f, int(w) * f

    @staticmethod
    def check_multiple_of_8(height: int, width: int) -> None:
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}")

    @staticmethod
    def lora_scaled(module: Any, scale: Optional[float]) -> Any:
        """A context manager that applies a LoRA scale to ``module``'s PEFT layers (as ``encode_prompt`` does)."""
        import contextlib

        if scale is None or module is None:
            return contextlib.nullcontext()
        from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

        if not USE_PEFT_BACKEND:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def scaled() -> Any:
            scale_lora_layers(module, scale)
            try:
                yield
            finally:
                unscale_lora_layers(module, scale)

        return scaled()
