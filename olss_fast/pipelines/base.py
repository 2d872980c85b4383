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

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from olss_fast.core.checks import warn_once


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


@dataclass(frozen=True)
class CondInput:
    """One conditioning input of the exported denoiser.

    Attributes:
        name: the ONNX input name (the denoiser module's argument, in order).
        key: the :class:`Prepared` input it is fed from at run time.
        shape: its static shape (the CFG-doubled batch first, when ``batched``).
        dtype: ``"model"`` (the export dtype), ``"float32"`` or ``"int64"``.
        batched: whether its first dimension is the (CFG-doubled) batch (position ids, say, are not).
    """

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    batched: bool = True


@dataclass
class ExportSpec:
    """What the ONNX exporter needs from a pipeline family (torch modules with fixed signatures + shapes).

    ``denoiser``: ``(sample [M, ...], timestep 0-d, *cond) → model output`` with the ``cond`` inputs in order;
    ``decoder``: ``latents → image``; ``text_encoder`` (optional): ``input_ids [M, L] → `` the conditioning input
    named ``text_input``. ``uncond`` is the unconditional row of the ids (the empty prompt's token ids, or the null
    class) when the export takes ids, else None.
    """

    denoiser: torch.nn.Module
    decoder: torch.nn.Module
    cond: list[CondInput]
    image_range: str
    modules: dict[str, torch.nn.Module]
    uncond: Any = None
    id_limit: int = 0
    id_input: Optional[str] = None
    text_encoder: Optional[torch.nn.Module] = None
    text_input: Optional[str] = None
    token_length: int = 0


class PipelineAdapter:
    """Base class of the pipeline families (see the module docstring for the contract)."""

    #: the pipeline class name, used in messages
    name = "pipeline"
    #: the pipeline's attributes besides the denoiser whose modules the program runs (when present): see modules()
    module_names: tuple[str, ...] = ()
    #: call arguments beyond the common ones (prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, latents,
    #: generator, output_type, return_dict, height, width, num_images_per_prompt, guidance_scale, num_inference_steps)
    extra_kwargs: tuple[str, ...] = ()
    #: which CallOptions fields the family supports
    options_supported: tuple[str, ...] = ("guidance_rescale",)
    #: why the ONNX/TensorRT export does not support the family (None: it does, see :meth:`export_spec`)
    export_unsupported: Optional[str] = "(not implemented for this family yet)"
    #: the call argument that is the classifier-free guidance scale (Flux: ``true_cfg_scale``; its
    #: ``guidance_scale`` is the distilled guidance embedding, an ordinary conditioning input)
    cfg_argument = "guidance_scale"

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
        """The torch modules the program runs, by name (what a runner watches for changes): the denoiser and the
        pipeline's modules named in ``module_names`` that it has."""
        out = {"denoiser": self.denoiser}
        for name in self.module_names:
            if getattr(self.pipe, name, None) is not None:
                out[name] = getattr(self.pipe, name)
        return out

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

    # ------------------------------------------------------------------ recording and provenance
    def teacher_timestep_kwargs(self, teacher: Any, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """The arguments the pipeline's own loop passes to ``scheduler.set_timesteps`` for ``num_steps`` steps at
        this size (so that the recorded teacher timesteps are the ones the pipeline runs)."""
        return {"num_inference_steps": num_steps}

    def flow_mu(self, height: int, width: int) -> Optional[float]:
        """The resolution-dependent time shift ``mu`` the pipeline passes to a flow-matching scheduler with dynamic
        shifting at this size (None when it passes none)."""
        return None

    def dynamic_shift(self, image_seq_len: int, default_max_shift: float) -> Optional[float]:
        """The resolution shift ``mu`` diffusers' flow pipelines compute for ``image_seq_len`` tokens (a line through
        ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``), None without dynamic shifting;
        warns once when the line is extrapolated beyond ``[base_shift, max_shift]`` (images larger or smaller than the
        scheduler was configured for: the timesteps then crowd at one end)."""
        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return None
        lo_len, hi_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", default_max_shift)
        m = (hi - lo) / (hi_len - lo_len)  # (the arithmetic of diffusers' calculate_shift)
        mu = image_seq_len * m + (lo - m * lo_len)
        if not min(lo, hi) - 1e-9 <= mu <= max(lo, hi) + 1e-9:
            warn_once(("mu-range", self.name, image_seq_len, lo, hi),
                      "%s: %d image tokens give the resolution shift mu = %.3g, outside the scheduler's configured "
                      "[base_shift, max_shift] = [%s, %s] (for %d to %d tokens): the timesteps crowd at one end of the "
                      "noise schedule; check the scheduler config for this image size", self.name, image_seq_len, mu,
                      lo, hi, lo_len, hi_len)
        return float(mu)

    def draw_noise(self, batch: int, height: int, width: int, generator: Any, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        """The initial noise exactly as the pipeline's ``prepare_latents`` draws it from ``generator`` (same seed, same
        image), in :meth:`latent_shape`."""
        return randn_tensor(self.latent_shape(batch, height, width), generator=generator, device=device, dtype=dtype)

    def fitted_guidance(self, args: Mapping[str, Any], guidance: float, guided: bool) -> Optional[float]:
        """The guidance value a schedule is fitted for, as this call uses it (the recording records the pipeline's
        ``guidance_scale``): the CFG scale when guided, else None."""
        return guidance if guided else None

    def is_guided(self, args: Mapping[str, Any], guidance: float) -> bool:
        """Whether the call runs classifier-free guidance (the denoiser sees the doubled batch)."""
        return guidance > 1.0

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
        """Call arguments for a ``batch``-sized warm-up (default: empty text prompts)."""
        return {"prompt": [""] * batch}

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        """The program's output → what the pipeline's ``__call__`` returns."""
        raise NotImplementedError

    # ------------------------------------------------------------------ program side (captured with the loop)
    def encode(self, inputs: Mapping[str, torch.Tensor], mode: str, guided: bool,
               options: CallOptions) -> dict[str, Any]:
        """Denoiser keyword arguments for the whole (CFG-doubled) batch, from the static inputs."""
        raise NotImplementedError

    def model_timestep(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The timestep argument the family's pipeline passes its denoiser for scheduler timestep(s) ``t`` (0-d, or
        one per row of ``x``) and latents ``x``, one per row: ``t`` itself (Flux: σ = t / 1000)."""
        return t.expand(x.shape[0])

    def denoise(self, denoiser: Any, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any],
                options: CallOptions) -> torch.Tensor:
        """One denoiser call on the (CFG-doubled) batch."""
        kw = dict(cond)
        if options.cross_attention_kwargs is not None:
            kw["cross_attention_kwargs"] = options.cross_attention_kwargs
        return denoiser(x, t, return_dict=False, **kw)[0]

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ export
    def check_exportable(self) -> None:
        """``ValueError`` when the ONNX/TensorRT export does not support this family."""
        if self.export_unsupported is not None:
            raise ValueError(f"the ONNX/TensorRT export does not support {self.name} {self.export_unsupported}; use "
                             "backend='cuda_graph' or 'eager'")

    def export_spec(self, batch: int, height: int, width: int, guided: bool,
                    args: Optional[Mapping[str, Any]] = None,
                    example: Optional[Mapping[str, torch.Tensor]] = None) -> ExportSpec:
        """The torch modules and shapes the exporter needs (families with ``export_unsupported = None``). The
        conditioning shapes are ``example``'s (the host side's inputs of a call) or, without one, those of
        placeholder prompts with the call arguments ``args`` (e.g. ``max_sequence_length``)."""
        self.check_exportable()
        raise NotImplementedError

    def example_conditioning(self, batch: int, height: int, width: int, guided: bool,
                             args: Optional[Mapping[str, Any]] = None,
                             example: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """``example``, or the host side's conditioning for placeholder prompts (its shapes are the export's)."""
        if example is not None:
            return dict(example)
        call = dict(self.placeholder_args(batch), **dict(args or {}))
        if guided and "negative_prompt" not in call:
            call["negative_prompt"] = ""
        with torch.no_grad():
            return self.prepare(call, guided, 1, False, height, width, CallOptions()).inputs


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


def check_prompt_args(args: Mapping[str, Any], *, pooled_by: str | None = None, exclusive_negative: bool = False,
                      same_shape: bool = False) -> None:
    """The prompt / embedding rules the text families share (their diffusers pipelines' ``check_inputs``), in one
    order: ``prompt`` or ``prompt_embeds``, exactly one; for a family ``pooled_by`` that conditions on pooled
    embeddings too, every embedding comes with its pooled one; with ``exclusive_negative``, ``negative_prompt`` or
    ``negative_prompt_embeds``, not both; with ``same_shape``, prompt and negative embeddings of one shape."""
    prompt, pe, npe = args.get("prompt"), args.get("prompt_embeds"), args.get("negative_prompt_embeds")
    if prompt is not None and pe is not None:
        raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
    if prompt is None and pe is None:
        raise ValueError("provide either `prompt` or `prompt_embeds`")
    if pooled_by is not None:
        if pe is not None and args.get("pooled_prompt_embeds") is None:
            raise ValueError(f"`prompt_embeds` needs `pooled_prompt_embeds` too ({pooled_by} conditions on both)")
        if npe is not None and args.get("negative_pooled_prompt_embeds") is None:
            raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too")
    if exclusive_negative and args.get("negative_prompt") is not None and npe is not None:
        raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
    if same_shape and pe is not None and npe is not None and tuple(pe.shape) != tuple(npe.shape):
        raise ValueError(
            f"batch size mismatch: `prompt_embeds` {list(pe.shape)} and `negative_prompt_embeds` "
            f"{list(npe.shape)} must have the same shape"
        )


def postprocessed_output(pipe: Any, image: torch.Tensor, output_type: str, return_dict: bool, output_cls: Any) -> Any:
    """The decoded images as the pipeline returns them: latents as they are, else its image processor's
    ``postprocess``; a one-tuple, or ``output_cls(images=...)``."""
    images = image if output_type == "latent" else pipe.image_processor.postprocess(image, output_type)
    if not return_dict:
        return (images,)
    return output_cls(images=images)


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
