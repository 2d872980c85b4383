"""`compile_olss_pipeline`: run a searched OLSS schedule as one static, fused (and optionally captured) program.

An OLSS schedule (Duan et al., CIKM 2023, Eq. 8) is a fixed list of timesteps plus a small coefficient matrix, so the
whole sampler is a static program (:mod:`olss_fast.serve.program`)::

    [text encoder] → n × (denoiser(x_j, t_j) → fused step: CFG + x_{j+1} = w_j x_0 + Σ_l v_{j,l} e_l) → [decoder]

:class:`OLSSRunner` is the one front end: validate the call → ``adapter.prepare`` (the pipeline family's host side,
:mod:`olss_fast.pipelines`) → ``backend.run`` (the program) → ``adapter.finish``. Program backends are
interchangeable:

* ``"eager"``: the fixed loop, uncaptured (any device, CPU included);
* ``"cuda_graph"``: text encoder, all n denoiser calls, all n steps and the decoder captured in ONE CUDA graph per
  input signature (:mod:`olss_fast.serve.cuda_graph`), kept in a small LRU cache, all graphs in one memory pool;
* with ``compile``, either of these runs the modules ``torch.compile``-d, artefacts persisted across processes
  (:mod:`olss_fast.serve.compile_cache`);
* ``"onnxruntime"`` / ``"tensorrt"``: the same program exported to static ONNX (and TensorRT engines), registered by
  :mod:`olss_fast.export` (:data:`BACKENDS` maps the names to their classes);
* ``"auto"``: ``cuda_graph`` on CUDA, ``eager`` otherwise.

Options live in one :class:`RuntimeConfig` (hardware-derived defaults). The coefficients, timesteps and guidance scale
are device tensors read by the captured kernels, so :meth:`OLSSRunner.update_schedule` swaps a schedule of the same
length in without re-capturing.

**The runner follows its pipeline.** Components are read from the pipeline at call time; a reassigned
``pipe.unet``/``text_encoder``/``vae``, new parameter tensors or parameters changed in place by PyTorch ops are noticed
before every call (module identities, parameter addresses and version counters) and the backend re-captures
(cuda_graph), re-compiles (``compile``; ``channels_last`` and ``fuse_qkv`` are applied to the new modules) or
re-exports (onnxruntime, tensorrt; these also compare a sampled digest of the weight values, which sees ``.data``
edits such as a fused LoRA). A schedule is checked against the
pipeline it runs on (:mod:`olss_fast.core.provenance`): another model architecture, noise schedule or prediction type is
refused unless ``allow_mismatch`` names it; another guidance scale or image size warns once.
"""
from __future__ import annotations

import logging
from itertools import chain
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from olss_fast.core import checks
from olss_fast.core.fingerprint import module_state, weights_checksum
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.pipelines.base import CallOptions, PipelineAdapter
from olss_fast.pipelines.facts import default_guidance
from olss_fast.pipelines.provenance import call_usage, check_schedule, usage
from olss_fast.pipelines.registry import adapter_for
from olss_fast.serve.backend import (BackendSetup, CaptureFailed, ProgramRequest, ProgramState, backend_class)
from olss_fast.serve.config import CUDAGRAPH_MODES, EXPORTED_BACKENDS, TORCH_BACKENDS, RuntimeConfig
from olss_fast.serve.schedules import resolve_schedule
from olss_fast.serve.torch_backend import TorchBackend  # noqa: F401  (registers "eager" and "cuda_graph")

logger = logging.getLogger(__name__)

__all__ = ["OLSSRunner", "compile_olss_pipeline"]

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_COMMON_KWARGS = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "latents", "generator",
                  "output_type", "return_dict", "height", "width", "num_images_per_prompt", "guidance_scale",
                  "num_inference_steps", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
                  "cross_attention_kwargs", "guidance_rescale", "clip_skip")


# ==================================================================================================== following the pipeline
def modules_token(modules: Mapping[str, torch.nn.Module], values: bool = False) -> int:
    """What a program built from the pipeline's modules depends on, as a hash: the modules' identities; their tensors'
    addresses, version counters, shapes and dtypes; every submodule's plain state (``training``, diffusers' FreeU
    factors, PEFT's active and disabled adapters and scalings, the identity of each attention processor); and, with
    ``values``, a checksum of every weight value (:func:`olss_fast.core.fingerprint.weights_checksum`: in-place
    ``.data`` edits bump no version counter)."""
    parts: list[Any] = []
    for name in sorted(modules):
        m = modules[name]
        if m is None:
            parts.append((name, None))
            continue
        parts.append((name, id(m), tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                                         for t in chain(m.parameters(), m.buffers()))))
        parts.append(module_state(m, identities=True))
    if values:
        parts.append(weights_checksum(modules))
    return hash(tuple(parts))


# ==================================================================================================== the runner
class OLSSRunner:
    """A compiled fixed-step OLSS sampler for one pipeline; call it like the pipeline.

    Build with :func:`compile_olss_pipeline`. Not thread-safe (static buffers are shared between calls).

    Attributes:
        pipe: the wrapped pipeline.
        adapter: its family's :class:`~olss_fast.pipelines.base.PipelineAdapter`.
        schedule: the :class:`OLSSSchedule` currently loaded (see :meth:`update_schedule`).
        config: the :class:`RuntimeConfig`.
        backend: the program backend's name (``"auto"`` resolved).
        device / dtype: where and in which dtype the loop runs (the denoiser's).
        text_encoder_in_graph: whether the text encoder runs inside the program (for ``cuda_graph`` it falls back to
            running before the graph if capturing it fails; a warning is logged).
    """

    def __init__(self, pipe: Any, schedule: OLSSSchedule, config: Optional[RuntimeConfig] = None, *,
                 from_pipe_scheduler: bool = False) -> None:
        config = config or RuntimeConfig()
        self.pipe = pipe
        self.adapter: PipelineAdapter = adapter_for(pipe)
        self.config = config
        self.device = self.adapter.device
        self.backend = config.resolve_backend(self.device)
        if self.backend == "cuda_graph" and config.compile_mode in CUDAGRAPH_MODES:
            raise ValueError(
                f"compile_mode={config.compile_mode!r} captures CUDA graphs of its own, which cannot run inside the "
                "cuda_graph backend's capture of the whole program; use compile_mode='max-autotune-no-cudagraphs' "
                "(or None), or backend='eager'"
            )
        if self.backend == "cuda_graph" and (self.device.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(f"backend='cuda_graph' needs the pipeline on a CUDA device, it is on {self.device}")
        exported = config.backend in EXPORTED_BACKENDS  # (those export a converted copy)
        if config.dtype is not None and self.adapter.dtype != config.dtype and not exported:
            logger.info("converting the pipeline's modules to %s", config.dtype)
            pipe.to(dtype=config.dtype)
        self.dtype = config.dtype if (config.dtype is not None and exported) else self.adapter.dtype
        dh, dw = self.adapter.default_size()
        self.height, self.width = int(config.height or dh), int(config.width or dw)
        self.adapter.check_size(self.height, self.width)
        self.batch_size = int(config.batch_size)
        self.guidance_scale = config.guidance_scale if config.guidance_scale is not None else \
            default_guidance(pipe, self.adapter.cfg_argument)
        self.text_encoder_in_graph = True
        self._warming_up = False
        #: the scheduler the schedule came from when compiled from ``pipe.scheduler`` (followed when replaced)
        self._scheduler = pipe.scheduler if from_pipe_scheduler else None
        self._check_schedule(schedule)
        self.state = ProgramState.create(schedule, self.guidance_scale, self.device)
        self._program = backend_class(self.backend)(BackendSetup(
            pipe=pipe, adapter=self.adapter, config=config, backend=self.backend, device=self.device,
            dtype=self.dtype, state=self.state))
        self._token = modules_token(self.adapter.modules(), self._program.needs_weight_values)

    # ------------------------------------------------------------------ schedule handling
    @property
    def schedule(self) -> OLSSSchedule:
        """The :class:`OLSSSchedule` currently loaded (see :meth:`update_schedule`)."""
        return self.state.schedule

    @property
    def num_inference_steps(self) -> int:
        return self.state.num_steps

    def _check_schedule(self, schedule: OLSSSchedule) -> None:
        if not isinstance(schedule, OLSSSchedule):
            raise ValueError(f"expected an OLSSSchedule, got {type(schedule).__name__}")
        c = schedule.num_channels
        if c is not None and c != self.adapter.latent_channels:
            raise ValueError(
                f"the schedule has per-channel coefficients for {c} channels but the latents have "
                f"{self.adapter.latent_channels}"
            )
        check_schedule(schedule, usage(self.adapter, guidance=self.guidance_scale, height=self.height,
                                       width=self.width), allow=self.config.allow_mismatch,
                       where=f"on this {self.adapter.name}")

    def update_schedule(self, schedule: OLSSSchedule) -> None:
        """Load another schedule with the same number of steps (and coefficient layout) into the static buffers.

        Captured graphs read coefficients and timesteps from device tensors, so they keep working without
        re-capture (exported backends export it on their next call). ``ValueError`` when the step count, the
        coefficient shape or the timestep type differs (build a new runner for those).
        """
        self._check_schedule(schedule)
        self.state.load(schedule)
        self._program.schedule_changed()

    # ------------------------------------------------------------------ following the pipeline
    def _follow_pipeline(self) -> None:
        """Follow the pipeline before a call (see the module docstring): a scheduler swapped in after compiling from
        ``pipe.scheduler`` loads its schedule; changed modules, weights, module state or dtype rebuild the program."""
        if self._scheduler is not None and self.pipe.scheduler is not self._scheduler:
            self._scheduler = self.pipe.scheduler
            logger.info("pipe.scheduler was replaced since compiling: loading its %d-step schedule",
                        self.num_inference_steps)
            self.update_schedule(resolve_schedule(None, self.num_inference_steps, self.pipe))
        token = modules_token(self.adapter.modules(), self._program.needs_weight_values)
        if token == self._token:
            return
        logger.info("the pipeline's modules, weights or their state changed since the last call: rebuilding the %s "
                    "program", self.backend)
        self.adapter.refresh()
        if self.backend in TORCH_BACKENDS and self.adapter.dtype != self.dtype:  # pipe.to(dtype) after compiling
            self.dtype = self._program.setup.dtype = self.adapter.dtype
        self._program.invalidate()  # may change the modules again (channels_last, fuse_qkv)
        self._token = modules_token(self.adapter.modules(), self._program.needs_weight_values)
        self._check_schedule(self.schedule)

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
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        **kwargs: Any,
    ) -> Any:
        """Sample like the pipeline's ``__call__`` (same keyword names; the step count is the schedule's).

        Returns what the pipeline returns: ``StableDiffusionPipelineOutput`` (``nsfw_content_detected=None``, no
        safety checker), ``StableDiffusionXLPipelineOutput``, ``ImagePipelineOutput``, or a tuple when
        ``return_dict=False``. ``callback_on_step_end`` runs with the eager backend only and may read the
        ``latents`` but not change them (``ValueError``: the OLSS step could not honour the edit).
        """
        unknown = sorted(set(kwargs) - set(self.adapter.extra_kwargs))
        if unknown:
            raise ValueError(f"unsupported argument(s) {unknown} for the OLSS runner of a {self.adapter.name}; it "
                             f"accepts " + ", ".join(list(_COMMON_KWARGS) + list(self.adapter.extra_kwargs)))
        if num_inference_steps is not None and num_inference_steps != self.num_inference_steps:
            raise ValueError(
                f"this runner runs its {self.num_inference_steps}-step schedule; got num_inference_steps="
                f"{num_inference_steps} (compile another runner for another step count)"
            )
        checks.choice(output_type, "output_type", _OUTPUT_TYPES)
        num_images = checks.integer(num_images_per_prompt, "num_images_per_prompt", 1)
        height = checks.optional(checks.integer, height, "height", 1) or self.height
        width = checks.optional(checks.integer, width, "width", 1) or self.width
        self.adapter.check_size(height, width)
        args = dict(kwargs, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds)
        if self.adapter.cfg_argument == "guidance_scale":
            cfg_value = guidance_scale
        else:  # the family's own guidance_scale is conditioning (Flux: the distilled guidance embedding)
            cfg_value = args.pop(self.adapter.cfg_argument, None)
            args["guidance_scale"] = checks.optional(checks.real, guidance_scale, "guidance_scale")
        g = self.guidance_scale if cfg_value is None else checks.real(cfg_value, "guidance_scale")
        guided = self.adapter.is_guided(args, g)
        options = self._options(cross_attention_kwargs, guidance_rescale, clip_skip)
        on_step = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._follow_pipeline()
        # another guidance scale, size or resolution shift than fitted for: warn once each
        check_schedule(self.schedule, dict(usage(self.adapter, guidance=g, height=height, width=width, call_args=args,
                                                 guided=guided, model=False), **call_usage(self.schedule, args)),
                       where="in this call")
        with torch.no_grad():
            image = self._run(args, guided, g, num_images, height, width, options, latents, generator,
                              output_type != "latent", on_step)
        return self.adapter.finish(image, output_type, return_dict)

    def _run(self, args: dict[str, Any], guided: bool, g: float, num_images: int, height: int, width: int,
             options: CallOptions, latents: Any, generator: Any, decode: bool, on_step: Any) -> torch.Tensor:
        """Prepare the inputs and run the program (falling back to a text encoder outside the CUDA graph once, if
        capturing it fails)."""
        prepared = self.adapter.prepare(args, guided, num_images, self.text_encoder_in_graph, height, width, options)
        lat = self._prepare_latents(prepared.batch, height, width, latents, generator)
        if guided:
            self.state.guidance.fill_(g)
        req = ProgramRequest(mode=prepared.mode, guided=guided, decode=decode, warmup=self._warming_up,
                             inputs={**prepared.inputs, "latents": lat}, guidance=g, height=height, width=width,
                             options=options, on_step=on_step)
        try:
            return self._program.run(req)
        except CaptureFailed as exc:
            if not (exc.mode.startswith("tokens") and self.text_encoder_in_graph):
                raise _capture_error(exc) from exc.error
            logger.warning("capturing the text encoder in the CUDA graph failed (%r); it runs before the graph from "
                           "now on", exc.error)
        self.text_encoder_in_graph = False
        prepared = self.adapter.prepare(args, guided, num_images, False, height, width, options)
        req.mode, req.inputs = prepared.mode, {**prepared.inputs, "latents": lat}
        try:
            return self._program.run(req)
        except CaptureFailed as exc2:
            raise _capture_error(exc2) from exc2.error

    def _options(self, cross_attention_kwargs: Any, guidance_rescale: Any, clip_skip: Any) -> CallOptions:
        lora_scale = None
        if cross_attention_kwargs is not None:
            if not isinstance(cross_attention_kwargs, Mapping) or set(cross_attention_kwargs) - {"scale"}:
                raise ValueError(
                    "cross_attention_kwargs may only hold the LoRA scale ({'scale': s}) for the OLSS runner, got "
                    f"{cross_attention_kwargs!r}"
                )
            if "scale" in cross_attention_kwargs:
                lora_scale = checks.real(cross_attention_kwargs["scale"], "cross_attention_kwargs['scale']")
        options = CallOptions(clip_skip=checks.optional(checks.integer, clip_skip, "clip_skip", 0),
                              lora_scale=lora_scale,
                              guidance_rescale=checks.real(guidance_rescale, "guidance_rescale", 0.0, 1.0))
        self.adapter.check_options(options)
        return options

    def _callback(self, callback: Any, tensor_inputs: Sequence[str]) -> Optional[Callable[[int, torch.Tensor], None]]:
        if callback is None:
            return None
        if not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        names = list(getattr(callback, "tensor_inputs", None) or tensor_inputs)
        if set(names) - {"latents"}:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(set(names) - {'latents'})} are not available in the "
                "OLSS runner's fixed program; the callback may read 'latents'"
            )
        if self.backend != "eager":
            raise ValueError(f"callback_on_step_end runs Python between steps, which the {self.backend} backend "
                             "cannot; use backend='eager' for callbacks")
        timesteps = self.schedule.timesteps

        def on_step(j: int, latents: torch.Tensor) -> None:
            given = latents.clone()  # the callback's copy: editing it in place is an edit too
            out = callback(self.pipe, j, torch.tensor(timesteps[j]), {name: given for name in names})
            if out is not None and not isinstance(out, Mapping):
                raise ValueError(f"callback_on_step_end must return a dict, got {type(out).__name__}")
            out = dict(out or {})
            returned = out.pop("latents", given)
            edited = sorted(out) + (["latents"] if not (torch.equal(given, latents)
                                                        and torch.equal(returned, latents)) else [])
            if edited:
                raise ValueError(
                    f"callback_on_step_end at step {j} changed {edited}: the OLSS program computes each latent from "
                    "the initial noise and the model outputs and cannot take such edits into account; a callback "
                    "may only read the latents"
                )

        return on_step

    def _prepare_latents(self, batch: int, height: int, width: int, latents: Optional[torch.Tensor],
                         generator: Any) -> torch.Tensor:
        """Initial noise like the pipelines' ``prepare_latents`` (``init_noise_sigma`` is 1 for OLSS)."""
        shape = self.adapter.latent_shape(batch, height, width)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"batch size mismatch: {len(generator)} generators for an effective batch of {batch} images"
            )
        if latents is None:
            return self.adapter.draw_noise(batch, height, width, generator, self.device, self.dtype)
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != tuple(shape):
            what = "batch size mismatch" if latents.dim() == len(shape) and latents.shape[0] != batch else "wrong shape"
            raise ValueError(
                f"`latents` has shape {list(latents.shape)} but {list(shape)} is expected for batch {batch} at "
                f"{height}x{width} ({what})"
            )
        return latents.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ utilities
    def warmup(self, batch_size: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
               output_type: str = "pil") -> None:
        """Build (compile, capture, export) the program for ``batch_size`` × ``height`` × ``width`` (the configured
        ones by default) ahead of the first call, so that serving never builds on a request."""
        batch = checks.optional(checks.integer, batch_size, "warm-up batch_size", 1) or self.batch_size
        h = checks.optional(checks.integer, height, "warm-up height", 1) or self.height
        w = checks.optional(checks.integer, width, "warm-up width", 1) or self.width
        self._warming_up = True
        try:
            self(**self.adapter.placeholder_args(batch), height=h, width=w, output_type=output_type,
                 latents=torch.zeros(self.adapter.latent_shape(batch, h, w), device=self.device, dtype=self.dtype))
        finally:
            self._warming_up = False

    def cache_info(self) -> dict[str, Any]:
        """The backend's program cache: entries (least recently used first), hits, misses, evictions, captures."""
        return self._program.cache_info()

    @property
    def num_captures(self) -> int:
        return self.cache_info().get("captures", 0)

    def __repr__(self) -> str:
        return (
            f"OLSSRunner({self.adapter.name}, backend={self.backend!r}, steps={self.num_inference_steps}, "
            f"dtype={self.dtype}, device={self.device}, compile={self.config.compile})"
        )


# ==================================================================================================== entry point
def _capture_error(exc: CaptureFailed) -> RuntimeError:
    return RuntimeError(f"capturing the OLSS loop in a CUDA graph failed: {exc.error!r}; use backend='eager'")


def compile_olss_pipeline(
    pipe: Any,
    schedule: Any = None,
    *,
    num_inference_steps: Optional[int] = None,
    config: Optional[RuntimeConfig] = None,
    warmup: Union[bool, Sequence[Sequence[int]]] = False,
    **options: Any,
) -> OLSSRunner:
    """Build an :class:`OLSSRunner` that samples ``pipe`` with an OLSS schedule as one static program.

    Args:
        pipe: a pipeline of a registered family (:func:`olss_fast.pipelines.supported_pipelines`).
        schedule: an :class:`OLSSSchedule`; an ``OLSSScheduler`` (one schedule: used; several:
            ``num_inference_steps`` chooses); a path to a scheduler folder or schedule JSON; ``None``:
            ``pipe.scheduler``.
        num_inference_steps: which schedule of a scheduler to run.
        config: a :class:`RuntimeConfig`; or pass its fields as keywords (``backend="cuda_graph"``,
            ``guidance_scale=5.0``, ...) — not both.
        warmup: build (compile / capture / export) programs now, so that no request pays for it: ``True`` for the
            configured batch and size, or a list of ``(batch_size, height, width)`` shapes. A call with a shape not
            warmed up builds its program then and logs a warning once.

    Raises:
        ValueError: unsupported pipeline or backend, a schedule that does not fit the pipeline (or was fitted for
            another model, noise schedule or prediction type, see ``allow_mismatch``), bad sizes.
        RuntimeError: ``backend="tensorrt"`` without the ``tensorrt`` package.
    """
    config = checks.options(RuntimeConfig, config, options, "runtime")
    shapes = _warmup_shapes(warmup)
    adapter_for(pipe)  # ValueError for unsupported pipelines before anything else
    resolved = resolve_schedule(schedule, num_inference_steps, pipe)
    runner = OLSSRunner(pipe, resolved, config, from_pipe_scheduler=schedule is None)
    for shape in shapes:
        runner.warmup(*shape)
    return runner


def _warmup_shapes(warmup: Any) -> list[tuple[Optional[int], ...]]:
    """``warmup`` of :func:`compile_olss_pipeline` → the shapes to build (``(None, None, None)``: the configured)."""
    if isinstance(warmup, bool):
        return [(None, None, None)] if warmup else []
    if not isinstance(warmup, (list, tuple)) or not warmup:
        raise ValueError(f"warmup must be True, False or a non-empty list of (batch_size, height, width), got "
                         f"{warmup!r}")
    shapes = []
    for item in warmup:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise ValueError(f"each warm-up shape must be (batch_size, height, width) with positive integers, got "
                             f"{item!r}")
        shapes.append(tuple(checks.integer(v, "a warm-up shape's size", 1) for v in item))
    return shapes

