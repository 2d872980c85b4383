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

import dataclasses
import importlib
import logging
import math
import numbers
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from olss_fast.core import provenance
from olss_fast.core.files import default_cache_dir
from olss_fast.serve.compile_cache import CompileCache, cache_key, environment, inductor_counters
from olss_fast.serve.cuda_graph import CapturedGraph, GraphCache, StaticBuffers, tensor_signature
from olss_fast.pipelines import CallOptions, PipelineAdapter, adapter_for
from olss_fast.serve.program import ProgramBuffers, allocate_buffers, run_loop
from olss_fast.core.schedule import OLSSSchedule

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "OLSSRunner", "ProgramRequest", "RuntimeConfig", "TorchBackend", "compile_olss_pipeline",
           "resolve_schedule"]

#: backend name → the class that runs the program (a "module:Class" path is imported on first use)
BACKENDS: dict[str, Any] = {
    "eager": "olss_fast.serve.runner:TorchBackend",
    "cuda_graph": "olss_fast.serve.runner:TorchBackend",
    "onnxruntime": "olss_fast.export.backends:OnnxRuntimeBackend",
    "tensorrt": "olss_fast.export.backends:TensorRTBackend",
}
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_COMMON_KWARGS = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "latents", "generator",
                  "output_type", "return_dict", "height", "width", "num_images_per_prompt", "guidance_scale",
                  "num_inference_steps", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
                  "cross_attention_kwargs", "guidance_rescale", "clip_skip")


# ==================================================================================================== configuration
@dataclass(frozen=True)
class RuntimeConfig:
    """Options of :func:`compile_olss_pipeline` (one object instead of loose keyword arguments).

    Attributes:
        backend: ``"auto"`` (``cuda_graph`` on CUDA, else ``eager``), ``"eager"``, ``"cuda_graph"``,
            ``"onnxruntime"`` or ``"tensorrt"``.
        height, width: default image size (the pipeline's default when None); calls may override.
        batch_size: the batch :meth:`OLSSRunner.warmup` prepares (calls may use other batches: each new input
            signature gets its own program instance, kept in an LRU cache of ``cache_size``).
        guidance_scale: classifier-free guidance scale (> 1 enables CFG); None: the default of the pipeline's
            ``__call__``; calls may override.
        dtype: convert the pipeline's modules to this dtype first (in place); None keeps the denoiser's.
        compile: ``torch.compile`` (inductor, static shapes) the program's modules: ``True`` for all of them, or a
            tuple of ``"text_encoder"`` (the encoder that runs inside the program), ``"denoiser"`` and ``"decoder"``
            (eager and cuda_graph backends; inside the one CUDA graph with ``cuda_graph``). The first call of each
            input signature compiles (see ``warmup`` of :func:`compile_olss_pipeline`).
        compile_mode: ``torch.compile``'s mode: None (its default), ``"max-autotune-no-cudagraphs"`` (opt-in: minutes
            of autotuning per module on a GPU); ``"reduce-overhead"`` / ``"max-autotune"`` capture CUDA graphs of
            their own and are refused with ``backend="cuda_graph"``, which captures the whole program already.
        compile_cache: keep the compiled artefacts on disk under ``cache_dir/compile`` (:mod:`olss_fast.serve.compile_cache`,
            keyed by the modules' digests, shapes, dtype, software versions and device), so that another process
            loads them instead of compiling again; a corrupted or stale entry is ignored with a warning.
        channels_last: convert the pipeline's convolutional modules to ``torch.channels_last`` (in place).
        fuse_qkv: fuse the attention projections of the modules diffusers offers it for (``fuse_qkv_projections``,
            in place; refused on modules with LoRA adapters, whose fused weights would silently drop the LoRA).
        cache_size: program instances (captured graphs, exports) kept per runner.
        warmup_iters: eager iterations on a side stream before each CUDA-graph capture.
        step_backend: fused-step backend (``"auto"``, ``"triton"``, ``"reference"``).
        cache_dir: where compiled artefacts, exports and engines are kept (default ``$OLSS_FAST_CACHE`` or
            ``~/.cache/olss_fast``).
        allow_mismatch: accept a schedule fitted for another ``"model"``, ``"noise_schedule"`` or
            ``"prediction_type"`` (see :mod:`olss_fast.core.provenance`).
        providers, session_options: onnxruntime execution providers and session options (default: CUDA when the
            pipeline is on CUDA and onnxruntime has it, then CPU).
        use_cuda_graph: tensorrt: capture the engine loop in a CUDA graph.
    """

    backend: str = "auto"
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 1
    guidance_scale: Optional[float] = None
    dtype: Optional[torch.dtype] = None
    compile: Union[bool, tuple[str, ...]] = False
    compile_mode: Optional[str] = None
    compile_cache: bool = True
    channels_last: bool = False
    fuse_qkv: bool = False
    cache_size: int = 4
    warmup_iters: int = 2
    step_backend: str = "auto"
    cache_dir: Optional[Union[str, os.PathLike]] = None
    allow_mismatch: tuple[str, ...] = ()
    providers: Optional[tuple] = None
    session_options: Any = None
    use_cuda_graph: bool = True

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {('auto', *BACKENDS)}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name, lo in (("batch_size", 1), ("cache_size", 1), ("warmup_iters", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale))
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype (e.g. torch.float16), got {self.dtype!r}")
        if self.step_backend not in ("auto", "triton", "reference"):
            raise ValueError(f"step_backend must be 'auto', 'triton' or 'reference', got {self.step_backend!r}")
        for name in ("use_cuda_graph", "compile_cache", "channels_last", "fuse_qkv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "compile", check_compile_parts(self.compile))
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_mode is not None and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} needs compile=True (or the modules to compile)")
        if self.backend in ("onnxruntime", "tensorrt"):
            torch_only = [name for name in ("compile", "channels_last", "fuse_qkv") if getattr(self, name)]
            if torch_only:
                raise ValueError(f"{torch_only} apply to the PyTorch backends ('eager', 'cuda_graph'), not to "
                                 f"backend={self.backend!r}, which runs an exported program")
        object.__setattr__(self, "allow_mismatch", provenance.check_allow(self.allow_mismatch))
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))

    def resolve_backend(self, device: torch.device) -> str:
        """``"auto"`` → ``"cuda_graph"`` on a CUDA device, ``"eager"`` elsewhere."""
        if self.backend == "auto":
            return "cuda_graph" if device.type == "cuda" else "eager"
        return self.backend


#: the program's modules ``RuntimeConfig.compile`` can name, in program order
COMPILE_PARTS = ("text_encoder", "denoiser", "decoder")
#: ``torch.compile`` modes; the last two capture CUDA graphs of their own
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_parts(value: Any) -> tuple[str, ...]:
    """``RuntimeConfig.compile`` → the tuple of module names to compile (``True``: all, ``False``: none)."""
    if isinstance(value, bool):
        return COMPILE_PARTS if value else ()
    parts = (value,) if isinstance(value, str) else value
    if not isinstance(parts, (tuple, list)) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"compile must be True, False or a tuple of {COMPILE_PARTS}, got {value!r}")
    unknown = sorted(set(parts) - set(COMPILE_PARTS))
    if unknown:
        raise ValueError(f"compile names unknown module(s) {unknown}; choose from {COMPILE_PARTS} (or True for all)")
    return tuple(p for p in COMPILE_PARTS if p in parts)


def check_guidance(g: Any) -> float:
    if isinstance(g, bool) or not isinstance(g, numbers.Real) or not math.isfinite(float(g)):
        raise ValueError(f"guidance_scale must be a finite number, got {g!r}")
    return float(g)


def default_guidance(pipe: Any, argument: str = "guidance_scale") -> float:
    """The default classifier-free guidance scale of ``pipe.__call__`` (its ``argument``; 7.5 when it has none)."""
    from olss_fast.fit.recording import call_default_guidance

    g = call_default_guidance(pipe, argument)
    return 7.5 if g is None else g


# ==================================================================================================== schedules
def resolve_schedule(schedule: Any, num_inference_steps: Optional[int], pipe: Any) -> OLSSSchedule:
    """The :class:`OLSSSchedule` to compile, from a schedule, an ``OLSSScheduler`` (or anything with a ``schedules``
    mapping), a scheduler folder / schedule JSON path, or ``None`` (``pipe.scheduler``).

    A scheduler holding one schedule needs no ``num_inference_steps``; with several it must name one (the choice
    never depends on what the pipeline ran last). A scheduler without searched schedules gives DDIM's coefficients.
    """
    n = None
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
    if schedule is None:
        schedule = getattr(pipe, "scheduler", None)
        if not hasattr(schedule, "schedules"):
            raise ValueError(
                "pass a schedule: an OLSSSchedule, an OLSSScheduler, or the path of a scheduler folder / schedule "
                f"JSON (or set pipe.scheduler to an OLSSScheduler); pipe.scheduler is a {type(schedule).__name__}"
            )
    if isinstance(schedule, (str, os.PathLike)):
        from olss_fast.serve.scheduler import load_schedule_source

        schedule = load_schedule_source(schedule)
    if isinstance(schedule, OLSSSchedule):
        if n is not None and n != schedule.num_steps:
            raise ValueError(f"num_inference_steps={n} but the schedule has {schedule.num_steps} steps")
        return schedule
    schedules = getattr(schedule, "schedules", None)
    if not isinstance(schedules, Mapping):
        raise ValueError(
            "`schedule` must be an OLSSSchedule, an OLSSScheduler (an object with a `schedules` mapping) or a path, "
            f"got {type(schedule).__name__}"
        )
    available = sorted(int(k) for k in schedules)
    if not available:
        if n is None:
            raise ValueError("the OLSSScheduler holds no searched schedule: pass num_inference_steps to compile DDIM's "
                             "coefficients for that many steps, or a searched schedule")
        if getattr(schedule, "is_flow", False) or not hasattr(schedule, "ddim_schedule"):
            raise ValueError("the scheduler holds no searched schedule; compile a searched schedule")
        cfg = dict(getattr(schedule, "config", {}) or {})
        if cfg.get("clip_sample") or cfg.get("thresholding"):
            raise ValueError("DDIM with clip_sample/thresholding is not a linear sampler and cannot be compiled; "
                             "compile a searched schedule")
        logger.info("the OLSSScheduler holds no searched schedule; compiling DDIM's coefficients for %d steps", n)
        return schedule.ddim_schedule(n)
    if n is None:
        if len(available) == 1:
            return schedules[available[0]]
        raise ValueError(
            f"the scheduler holds searched schedules for {available} steps; choose one with num_inference_steps="
            f"{available[0]} (or another of {available})"
        )
    if n not in schedules:
        raise ValueError(f"the scheduler holds searched schedules for {available} steps, not {n}; pass one of "
                         f"{available} or search a schedule for {n} steps")
    return schedules[n]


def _timesteps_tensor(schedule: OLSSSchedule, device: torch.device) -> torch.Tensor:
    """The schedule's timesteps as the OLSSScheduler stores them (int64 for integer timesteps, else float32)."""
    is_int = all(isinstance(t, int) for t in schedule.timesteps)
    return torch.tensor(schedule.timesteps, dtype=torch.long if is_int else torch.float32, device=device)


def _scheduler_prediction_type(pipe: Any) -> Optional[str]:
    sched = getattr(pipe, "scheduler", None)
    cfg = provenance.config_dict(getattr(sched, "config", None))
    if not cfg:
        return None
    if provenance.is_flow_config(dict(cfg, _class_name=type(sched).__name__)):
        return "flow"
    return cfg.get("prediction_type")


# ==================================================================================================== requests
@dataclass
class ProgramRequest:
    """One call of the program, as the front end hands it to a backend.

    Attributes:
        mode: the conditioning mode (the adapter's: "tokens", "embeds", "labels", ...).
        guided: classifier-free guidance on (the denoiser sees the doubled batch).
        decode: run the decoder (False for ``output_type="latent"``).
        inputs: static inputs (the adapter's conditioning tensors and ``"latents"``), on the device.
        guidance: the guidance scale.
        height, width: the image size.
        options: call options that change the program (clip_skip, LoRA scale, guidance_rescale).
        on_step: ``(j, latents)`` after each step (eager only: ``callback_on_step_end``).
    """

    mode: str
    guided: bool
    decode: bool
    inputs: dict[str, torch.Tensor]
    guidance: float
    height: int
    width: int
    options: CallOptions = CallOptions()
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None

    @property
    def batch(self) -> int:
        return int(self.inputs["latents"].shape[0])


class _CaptureFailed(RuntimeError):
    def __init__(self, mode: str, error: BaseException) -> None:
        super().__init__(f"CUDA-graph capture failed ({mode} mode): {error!r}")
        self.mode = mode
        self.error = error


def _capture_error(exc: _CaptureFailed) -> RuntimeError:
    return RuntimeError(f"capturing the OLSS loop in a CUDA graph failed: {exc.error!r}; use backend='eager'")


# ==================================================================================================== torch backends
@dataclass
class _Entry:
    """One program instance: its static inputs, work buffers and (cuda_graph) the captured graph."""

    key: tuple
    mode: str
    guided: bool
    decode: bool
    options: CallOptions
    height: int
    width: int
    inputs: StaticBuffers
    buffers: ProgramBuffers
    graph: Optional[CapturedGraph] = None
    runs: int = 0
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None


class TorchBackend:
    """The program in PyTorch: eager (``runner.backend == "eager"``) or captured in one CUDA graph per input
    signature (``"cuda_graph"``). Program instances (buffers, graphs) live in an LRU cache of ``cache_size``; the
    graphs share one memory pool (safe: they replay one at a time, their outputs are copied out right after each
    replay, and every tensor that outlives a replay — static inputs, work buffers — is allocated outside the pool).

    With ``RuntimeConfig.compile`` the named modules run ``torch.compile``-d (static shapes), inside the captured graph
    with ``cuda_graph``; with ``compile_cache`` their artefacts are loaded from and saved to disk
    (:mod:`olss_fast.serve.compile_cache`). ``channels_last`` / ``fuse_qkv`` are applied to the pipeline's modules here,
    again whenever the runner notices new modules.
    """

    #: whether a change of weight *values* (not only tensors) requires rebuilding the program
    needs_weight_values = False

    def __init__(self, runner: "OLSSRunner") -> None:
        self.runner = runner
        cfg = runner.config
        self.cache: GraphCache[_Entry] = GraphCache(cfg.cache_size)
        self.num_captures = 0
        self.num_builds = 0
        self._compiled: dict[str, Any] = {}
        self._pool: Any = None
        self._announced: set[tuple] = set()
        self._warned_host_text = False
        self.compile_cache: Optional[CompileCache] = None
        if cfg.compile and cfg.compile_cache:
            root = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()
            self.compile_cache = CompileCache(root / "compile")
        self.prepare_modules()

    @property
    def capturing(self) -> bool:
        return self.runner.backend == "cuda_graph"

    def prepare_modules(self) -> None:
        """Apply ``channels_last`` / ``fuse_qkv`` to the pipeline's current modules (in place)."""
        r, cfg = self.runner, self.runner.config
        modules = {k: m for k, m in r.adapter.modules().items() if m is not None}
        if cfg.channels_last:
            for m in modules.values():
                m.to(memory_format=torch.channels_last)
        if cfg.fuse_qkv:
            fusable = {k: m for k, m in modules.items() if hasattr(m, "fuse_qkv_projections")}
            if not fusable:
                _warn_once(("fuse_qkv", r.adapter.name),
                           "fuse_qkv: no module of this %s offers fuse_qkv_projections; attention stays unfused",
                           r.adapter.name)
            for name, m in fusable.items():
                if _has_lora_layers(m):
                    raise ValueError(
                        f"fuse_qkv cannot fuse the {name}'s attention: it has LoRA adapter layers, which the fused "
                        "projection would silently leave out; fuse the LoRA into the weights and unload it first "
                        "(pipe.fuse_lora(); pipe.unload_lora_weights()) or set fuse_qkv=False"
                    )
                try:
                    m.fuse_qkv_projections()
                except ValueError as exc:  # e.g. diffusers refuses models with added KV projections
                    raise ValueError(f"fuse_qkv: the {name} cannot be fused ({exc}); set fuse_qkv=False") from None

    def invalidate(self) -> None:
        """The pipeline's modules changed: drop every captured program and compiled wrapper, prepare the new
        modules."""
        self.cache.clear()
        self._compiled.clear()
        self._pool = None
        self.prepare_modules()

    def _maybe_compiled(self, part: str, fn: Any) -> Any:
        """``fn`` itself, or its ``torch.compile``-d wrapper when ``RuntimeConfig.compile`` names ``part``."""
        cfg = self.runner.config
        if part not in cfg.compile:
            return fn
        compiled = self._compiled.get(part)
        if compiled is None:
            compiled = self._compiled[part] = torch.compile(fn, mode=cfg.compile_mode, dynamic=False)
        return compiled

    def denoiser(self) -> Any:
        return self._maybe_compiled("denoiser", self.runner.adapter.denoiser)

    def _key(self, req: ProgramRequest) -> tuple:
        return (self.runner.backend, req.mode, req.guided, req.decode, str(self.runner.dtype), req.options,
                req.height, req.width, tensor_signature(req.inputs))

    def _program(self, entry: _Entry) -> torch.Tensor:
        """The static program: [text encoder] → run_loop → [decode]. Capturable."""
        r = self.runner
        adapter = r.adapter
        with torch.no_grad():
            encode = self._maybe_compiled("text_encoder", adapter.encode) if entry.mode == "tokens" else adapter.encode
            cond = encode(dict(entry.inputs.items()), entry.mode, entry.guided, entry.options)
            denoiser = self.denoiser()
            timesteps = r._timesteps

            def step(j: int, x: torch.Tensor) -> torch.Tensor:
                return adapter.denoise(denoiser, x, timesteps[j], cond, entry.options)

            final = run_loop(step, entry.inputs["latents"], entry.buffers, r._coeffs,
                             r._guidance if entry.guided else None, step_backend=r.config.step_backend,
                             guidance_rescale=entry.options.guidance_rescale, on_step=entry.on_step)
            if not entry.decode:
                return final
            return self._maybe_compiled("decoder", adapter.decode)(final, entry.height, entry.width)

    def _graph_pool(self) -> Any:
        if self._pool is None and torch.cuda.is_available():
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _compile_description(self, req: ProgramRequest) -> dict[str, Any]:
        """What the compiled code of a program depends on (:func:`olss_fast.serve.compile_cache.cache_key`)."""
        r, cfg = self.runner, self.runner.config
        return {
            "pipeline": r.adapter.name, "backend": r.backend, "dtype": str(r.dtype),
            "program": {"mode": req.mode, "guided": req.guided, "decode": req.decode, "height": req.height,
                        "width": req.width, "options": dataclasses.asdict(req.options),
                        "inputs": [[name, list(shape), dtype] for name, shape, dtype, _ in
                                   tensor_signature(req.inputs)]},
            "compile": list(cfg.compile), "compile_mode": cfg.compile_mode, "channels_last": cfg.channels_last,
            "fuse_qkv": cfg.fuse_qkv,
            "modules": {name: provenance.model_id(m) for name, m in sorted(r.adapter.modules().items())
                        if m is not None},
            **environment(r.device),
        }

    def _announce(self, key: tuple, req: ProgramRequest) -> None:
        """Log once per new input signature that this call builds (compiles / captures) a program."""
        r = self.runner
        if key in self._announced or not (self.capturing or r.config.compile):
            return
        self._announced.add(key)
        what = " and ".join(w for w, on in (("compiles", bool(r.config.compile)), ("captures", self.capturing)) if on)
        lat = list(req.inputs["latents"].shape)
        if r.warming_up:
            logger.info("warm-up: %s the %d-step program for latents %s (%s, %s mode, %dx%d)", what,
                        r.num_inference_steps, lat, r.dtype, req.mode, req.height, req.width)
        else:
            logger.warning(
                "this call %s the %d-step program for a new input (latents %s, %s mode, %dx%d, %s): it is slow "
                "once; build it ahead with compile_olss_pipeline(..., warmup=[(batch, height, width), ...])",
                what, r.num_inference_steps, lat, req.mode, req.height, req.width,
                "decoded" if req.decode else "latent output",
            )

    def run(self, req: ProgramRequest) -> torch.Tensor:
        r = self.runner
        key = self._key(req)
        entry = self.cache.get(key)
        pending: Optional[tuple[str, dict[str, Any], dict[str, int]]] = None
        if entry is None:
            self._announce(key, req)
            if "text_encoder" in r.config.compile and req.mode != "tokens" and not self._warned_host_text:
                self._warned_host_text = True
                logger.warning("compile: the text encoder of this %s runs on the host for these calls (embeddings "
                               "given, or the family encodes outside the program) and is not compiled",
                               r.adapter.name)
            if self.compile_cache is not None:
                desc = self._compile_description(req)
                ck = cache_key(desc)
                if ck not in self.compile_cache.loaded and ck not in self.compile_cache.saved:
                    self.compile_cache.load(ck, desc)
                pending = (ck, desc, inductor_counters())
            lat = req.inputs["latents"]
            entry = _Entry(key=key, mode=req.mode, guided=req.guided, decode=req.decode, options=req.options,
                           height=req.height, width=req.width, inputs=StaticBuffers(req.inputs),
                           buffers=allocate_buffers(tuple(lat.shape), r.num_inference_steps, r.dtype, req.guided,
                                                    r.device))
            if self.capturing:
                if req.on_step is not None:
                    raise ValueError("callback_on_step_end runs Python between steps, which a CUDA graph replay "
                                     "cannot; use backend='eager' for callbacks")
                entry.inputs.load(req.inputs)
                logger.info("capturing the %d-step OLSS loop in a CUDA graph for latents %s (%s, %s mode)",
                            r.num_inference_steps, list(lat.shape), r.dtype, req.mode)
                try:
                    entry.graph = CapturedGraph(key, lambda e=entry: self._program(e), entry.inputs, state=entry,
                                                warmup_iters=r.config.warmup_iters, device=r.device,
                                                pool=self._graph_pool())
                except Exception as exc:  # noqa: BLE001 - re-raised with context by the front end
                    raise _CaptureFailed(req.mode, exc) from exc
                self.num_captures += 1
            self.num_builds += 1
            self.cache.put(key, entry)
        entry.runs += 1
        if entry.graph is not None:
            out = entry.graph.replay(req.inputs).clone()
        else:
            entry.inputs.load(req.inputs)
            entry.on_step = req.on_step
            try:
                out = self._program(entry).clone()
            finally:
                entry.on_step = None
        if pending is not None:
            self._save_compiled(*pending)
        return out

    def _save_compiled(self, ck: str, desc: dict[str, Any], before: dict[str, int]) -> None:
        """Persist what the first run of a program compiled, unless its entry was loaded and nothing new was
        compiled since."""
        assert self.compile_cache is not None
        after = inductor_counters()
        compiled_new = after.get("fxgraph_cache_miss", 1) > before.get("fxgraph_cache_miss", 0)
        if (ck in self.compile_cache.loaded or ck in self.compile_cache.saved) and not compiled_new:
            return
        self.compile_cache.save(ck, desc)

    def cache_info(self) -> dict[str, Any]:
        c = self.cache
        info = {"entries": c.keys(), "size": len(c), "max_size": c.max_size, "hits": c.hits,
                "misses": c.misses, "evictions": c.evictions, "captures": self.num_captures, "builds": self.num_builds}
        if self.compile_cache is not None:
            info["compile_cache"] = {"folder": str(self.compile_cache.folder),
                                     "loaded": sorted(self.compile_cache.loaded),
                                     "saved": sorted(self.compile_cache.saved)}
        return info


_WARNED: set[Any] = set()


def _warn_once(key: Any, msg: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


def _has_lora_layers(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _backend_class(name: str) -> Any:
    target = BACKENDS[name]
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
    return target


# ==================================================================================================== following the pipeline
def modules_token(modules: Mapping[str, torch.nn.Module], values: bool = False) -> int:
    """A hash of the identity of a pipeline's modules and their tensors (addresses, version counters, shapes,
    dtypes), and with ``values`` a sampled digest of the weight values (:func:`provenance.module_fingerprint`)."""
    parts: list[Any] = []
    for name in sorted(modules):
        m = modules[name]
        if m is None:
            parts.append((name, None))
            continue
        parts.append((name, id(m), tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                                         for t in chain(m.parameters(), m.buffers()))))
        if values:
            parts.append(provenance.module_fingerprint(m))
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

    def __init__(self, pipe: Any, schedule: OLSSSchedule, config: Optional[RuntimeConfig] = None) -> None:
        config = config or RuntimeConfig()
        self.pipe = pipe
        self.adapter: PipelineAdapter = adapter_for(pipe)
        self.config = config
        self.device = self.adapter.device
        self.backend = config.resolve_backend(self.device)
        if self.backend == "cuda_graph" and config.compile_mode in _CUDAGRAPH_MODES:
            raise ValueError(
                f"compile_mode={config.compile_mode!r} captures CUDA graphs of its own, which cannot run inside the "
                "cuda_graph backend's capture of the whole program; use compile_mode='max-autotune-no-cudagraphs' "
                "(or None), or backend='eager'"
            )
        if self.backend == "cuda_graph" and (self.device.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(f"backend='cuda_graph' needs the pipeline on a CUDA device, it is on {self.device}")
        if config.dtype is not None and self.adapter.dtype != config.dtype \
                and config.backend not in ("onnxruntime", "tensorrt"):  # those export a converted copy
            logger.info("converting the pipeline's modules to %s", config.dtype)
            pipe.to(dtype=config.dtype)
        self.dtype = config.dtype if (config.dtype is not None and config.backend in ("onnxruntime", "tensorrt")) \
            else self.adapter.dtype
        dh, dw = self.adapter.default_size()
        self.height, self.width = int(config.height or dh), int(config.width or dw)
        self.adapter.check_size(self.height, self.width)
        self.batch_size = int(config.batch_size)
        self.guidance_scale = config.guidance_scale if config.guidance_scale is not None else \
            check_guidance(default_guidance(pipe, self.adapter.cfg_argument))
        self.text_encoder_in_graph = True
        self._check_schedule(schedule, initial=True)
        self.schedule = schedule
        self._coeffs = schedule.coeffs.to(device=self.device, dtype=torch.float32).contiguous()
        self._timesteps = _timesteps_tensor(schedule, self.device)
        self._guidance = torch.full((1,), self.guidance_scale, dtype=torch.float32, device=self.device)
        self.warming_up = False
        self._program = _backend_class(self.backend)(self)
        self._token = modules_token(self.adapter.modules(), self._program.needs_weight_values)

    # ------------------------------------------------------------------ schedule handling
    @property
    def num_inference_steps(self) -> int:
        return self.schedule.num_steps

    def _actual(self, guidance: float, height: int, width: int, model: bool) -> dict[str, Any]:
        actual: dict[str, Any] = {
            "prediction_type": _scheduler_prediction_type(self.pipe),
            "guidance_scale": self.adapter.fitted_guidance({}, guidance, self.adapter.is_guided({}, guidance)),
            "latent_shape": list(self.adapter.latent_shape(1, height, width)[1:]),
            "mu": self.adapter.flow_mu(height, width),
        }
        sched = getattr(self.pipe, "scheduler", None)
        cfg = provenance.config_dict(getattr(sched, "config", None))
        if cfg:
            actual["noise_schedule"] = provenance.noise_schedule_id(dict(cfg, _class_name=type(sched).__name__))
        if model:
            actual["model"] = provenance.model_id(self.adapter.denoiser)
        return actual

    def _check_schedule(self, schedule: OLSSSchedule, initial: bool = False) -> None:
        if not isinstance(schedule, OLSSSchedule):
            raise ValueError(f"expected an OLSSSchedule, got {type(schedule).__name__}")
        c = schedule.num_channels
        if c is not None and c != self.adapter.latent_channels:
            raise ValueError(
                f"the schedule has per-channel coefficients for {c} channels but the latents have "
                f"{self.adapter.latent_channels}"
            )
        fitted = dict(schedule.fitted_for, prediction_type=schedule.prediction_type)
        provenance.check_fitted_for(
            fitted, self._actual(self.guidance_scale, self.height, self.width, model=True),
            allow=tuple(self.config.allow_mismatch) + tuple(schedule.fitted_for.get("accepted_mismatch", ())),
            what=f"the {schedule.num_steps}-step schedule", where=f"on this {self.adapter.name}",
        )

    def update_schedule(self, schedule: OLSSSchedule) -> None:
        """Load another schedule with the same number of steps (and coefficient layout) into the static buffers.

        Captured graphs read coefficients and timesteps from device tensors, so they keep working without
        re-capture (exported backends export it on their next call). ``ValueError`` when the step count, the
        coefficient shape or the timestep type differs (build a new runner for those).
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
        if hasattr(self._program, "schedule_changed"):
            self._program.schedule_changed()

    # ------------------------------------------------------------------ following the pipeline
    def _follow_pipeline(self) -> None:
        """Notice reassigned modules or changed weights (see the module docstring) before a call."""
        token = modules_token(self.adapter.modules(), self._program.needs_weight_values)
        if token == self._token:
            return
        logger.info("the pipeline's modules or weights changed since the last call: rebuilding the %s program",
                    self.backend)
        self.adapter.refresh()
        self._program.invalidate()  # may change the modules again (channels_last, fuse_qkv)
        self._token = modules_token(self.adapter.modules(), self._program.needs_weight_values)
        fitted = dict(self.schedule.fitted_for, prediction_type=self.schedule.prediction_type)
        provenance.check_fitted_for(
            fitted, self._actual(self.guidance_scale, self.height, self.width, model=True),
            allow=tuple(self.config.allow_mismatch) + tuple(self.schedule.fitted_for.get("accepted_mismatch", ())),
            what=f"the {self.num_inference_steps}-step schedule", where=f"on this {self.adapter.name}",
        )

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
            accepted = list(_COMMON_KWARGS) + list(self.adapter.extra_kwargs)
            raise ValueError(
                f"unsupported argument(s) {unknown} for the OLSS runner of a {self.adapter.name}; it accepts "
                + ", ".join(accepted)
            )
        if num_inference_steps is not None and num_inference_steps != self.num_inference_steps:
            raise ValueError(
                f"this runner runs its {self.num_inference_steps}-step schedule; got num_inference_steps="
                f"{num_inference_steps} (compile another runner for another step count)"
            )
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, numbers.Integral) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        for name, v in (("height", height), ("width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        height, width = int(height or self.height), int(width or self.width)
        self.adapter.check_size(height, width)
        args = dict(kwargs, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds)
        cfg_name = self.adapter.cfg_argument
        if cfg_name == "guidance_scale":
            cfg_value = guidance_scale
        else:  # the family's own guidance_scale is conditioning (Flux: the distilled guidance embedding)
            cfg_value = args.pop(cfg_name, None)
            args["guidance_scale"] = None if guidance_scale is None else check_guidance(guidance_scale)
        g = self.guidance_scale if cfg_value is None else check_guidance(cfg_value)
        guided = self.adapter.is_guided(args, g)
        options = self._options(cross_attention_kwargs, guidance_rescale, clip_skip)
        on_step = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._follow_pipeline()
        if self.schedule.fitted_for:  # another guidance scale, size or resolution shift: warn once each
            provenance.check_fitted_for(
                {k: self.schedule.fitted_for.get(k) for k in ("guidance_scale", "latent_shape", "mu")},
                {"guidance_scale": self.adapter.fitted_guidance(args, g, guided),
                 "latent_shape": list(self.adapter.latent_shape(1, height, width)[1:]),
                 "mu": self.adapter.flow_mu(height, width)},
                what=f"the {self.num_inference_steps}-step schedule", where="in this call",
            )
        with torch.no_grad():
            prepared = self.adapter.prepare(args, guided, int(num_images_per_prompt), self.text_encoder_in_graph,
                                            height, width, options)
            lat = self._prepare_latents(prepared.batch, height, width, latents, generator)
            if guided:
                self._guidance.fill_(g)
            req = ProgramRequest(mode=prepared.mode, guided=guided, decode=output_type != "latent",
                                 inputs={**prepared.inputs, "latents": lat}, guidance=g, height=height, width=width,
                                 options=options, on_step=on_step)
            try:
                image = self._program.run(req)
            except _CaptureFailed as exc:
                if not (exc.mode.startswith("tokens") and self.text_encoder_in_graph):
                    raise _capture_error(exc) from exc.error
                logger.warning(
                    "capturing the text encoder in the CUDA graph failed (%r); it runs before the graph from now on",
                    exc.error,
                )
                self.text_encoder_in_graph = False
                prepared = self.adapter.prepare(args, guided, int(num_images_per_prompt), False, height, width,
                                                options)
                req.mode, req.inputs = prepared.mode, {**prepared.inputs, "latents": lat}
                try:
                    image = self._program.run(req)
                except _CaptureFailed as exc2:
                    raise _capture_error(exc2) from exc2.error
        return self.adapter.finish(image, output_type, return_dict)

    def _options(self, cross_attention_kwargs: Any, guidance_rescale: Any, clip_skip: Any) -> CallOptions:
        lora_scale = None
        if cross_attention_kwargs is not None:
            if not isinstance(cross_attention_kwargs, Mapping) or set(cross_attention_kwargs) - {"scale"}:
                raise ValueError(
                    "cross_attention_kwargs may only hold the LoRA scale ({'scale': s}) for the OLSS runner, got "
                    f"{cross_attention_kwargs!r}"
                )
            if "scale" in cross_attention_kwargs:
                lora_scale = check_finite_number("cross_attention_kwargs['scale']", cross_attention_kwargs["scale"])
        rescale = check_finite_number("guidance_rescale", guidance_rescale)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral)
                                      or clip_skip < 0):
            raise ValueError(f"clip_skip must be an integer >= 0, got {clip_skip!r}")
        options = CallOptions(clip_skip=None if clip_skip is None else int(clip_skip), lora_scale=lora_scale,
                              guidance_rescale=rescale)
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

    # ------------------------------------------------------------------ utilities
    def warmup(self, batch_size: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
               output_type: str = "pil") -> None:
        """Build (compile, capture, export) the program for ``batch_size`` × ``height`` × ``width`` (the configured
        ones by default) ahead of the first call, so that serving never builds on a request."""
        for name, v in (("batch_size", batch_size), ("height", height), ("width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"warm-up {name} must be a positive integer, got {v!r}")
        batch = int(batch_size or self.batch_size)
        h, w = int(height or self.height), int(width or self.width)
        self.warming_up = True
        try:
            self(**self.adapter.placeholder_args(batch), height=h, width=w, output_type=output_type,
                 latents=torch.zeros(self.adapter.latent_shape(batch, h, w), device=self.device, dtype=self.dtype))
        finally:
            self.warming_up = False

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


def check_finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ==================================================================================================== entry point
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
    if config is not None and options:
        raise ValueError(f"pass runtime options in config=RuntimeConfig(...) or as keywords, not both "
                         f"({sorted(options)})")
    if config is None:
        known = {f.name for f in dataclasses.fields(RuntimeConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; RuntimeConfig takes {sorted(known)}")
        config = RuntimeConfig(**options)
    elif not isinstance(config, RuntimeConfig):
        raise ValueError(f"config must be a RuntimeConfig, got {type(config).__name__}")
    shapes = _warmup_shapes(warmup)
    adapter_for(pipe)  # ValueError for unsupported pipelines before anything else
    resolved = resolve_schedule(schedule, num_inference_steps, pipe)
    runner = OLSSRunner(pipe, resolved, config)
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
        if not isinstance(item, (list, tuple)) or len(item) != 3 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in item):
            raise ValueError(f"each warm-up shape must be (batch_size, height, width) with positive integers, got "
                             f"{item!r}")
        shapes.append(tuple(int(v) for v in item))
    return shapes

