"""Recording teacher trajectories from any diffusers pipeline by wrapping its scheduler.

The pipeline runs its own loop; :class:`RecordingScheduler` forwards every call to the teacher scheduler and keeps
the ``sample`` and ``model_output`` of each ``step`` (DESIGN.md, "Recording"). After each batch the trajectories are
added to :class:`~olss_fast.stats.GramStats` and dropped, so memory does not grow with the number of batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .stats import GramStats

logger = logging.getLogger(__name__)

#: teachers whose step runs in the VP (or flow-matching) sample space with one model evaluation per timestep
SUPPORTED_TEACHERS = (
    "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler", "OLSSScheduler",
)


class RecordingScheduler:
    """Wraps a teacher scheduler; records ``sample`` and ``model_output`` at every ``step``.

    Attribute access falls through to the teacher, so pipelines see the teacher's config, order, timesteps, etc.
    """

    def __init__(self, teacher: Any, stop_after: int | None = None) -> None:
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "samples", [])
        object.__setattr__(self, "outputs", [])
        object.__setattr__(self, "final", None)
        object.__setattr__(self, "stop_after", stop_after)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("samples", "outputs", "final", "stop_after"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.teacher, name, value)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        self.clear()
        return self.teacher.set_timesteps(*args, **kwargs)

    def clear(self) -> None:
        self.samples.clear()
        self.outputs.clear()
        object.__setattr__(self, "final", None)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        self.samples.append(sample.detach().clone())
        self.outputs.append(model_output.detach().clone())
        if self.stop_after is not None and len(self.outputs) > self.stop_after:
            raise StopSampling()
        out = self.teacher.step(model_output, timestep, sample, *args, **kwargs)
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        object.__setattr__(self, "final", prev.detach().clone())
        return out

    def trajectory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_path [T+1, B, ...], e_path [T, B, ...])`` of the last completed run."""
        if not self.outputs or self.final is None:
            raise ValueError("the pipeline did not call scheduler.step: nothing was recorded")
        x = torch.stack(self.samples + [self.final])
        e = torch.stack(self.outputs)
        return x, e


class StopSampling(Exception):
    """Raised inside a pipeline loop to stop it once the needed model outputs were recorded."""


@contextlib.contextmanager
def swapped_scheduler(pipe: Any, scheduler: Any) -> Iterator[Any]:
    """Temporarily replace ``pipe.scheduler`` (restored on exit, also on error)."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield scheduler
    finally:
        pipe.scheduler = original


def check_teacher(scheduler: Any) -> None:
    """``ValueError`` unless the teacher works in the VP/flow sample space with one evaluation per timestep."""
    name = type(scheduler).__name__
    if getattr(scheduler, "order", 1) != 1 and name not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"{name} evaluates the model more than once per step; use one of {SUPPORTED_TEACHERS} as the teacher"
        )
    sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    if abs(sigma - 1.0) > 1e-6:
        raise ValueError(
            f"{name} samples in a scaled space (init_noise_sigma = {sigma:.3g}); OLSS records in the VP/flow space: "
            f"use one of {SUPPORTED_TEACHERS} as the teacher"
        )


def describe_scheduler(scheduler: Any, steps: int) -> str:
    cfg = dict(getattr(scheduler, "config", {}) or {})
    keys = ("timestep_spacing", "prediction_type", "beta_schedule", "algorithm_type", "solver_order", "shift")
    parts = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    return f"{type(scheduler).__name__}({steps} steps; {', '.join(parts)})"


def describe_model(pipe: Any) -> str:
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    return f"{type(pipe).__name__}:{name}"


@dataclass
class WorkItem:
    """One sample to record: a prompt (or class label) and a seed index for its initial noise."""

    index: int
    prompt: Any
    seed: int


def make_work_items(prompts: Sequence[Any], seeds_per_prompt: int = 1, base_seed: int = 0) -> list[WorkItem]:
    """prompts × seeds, in a fixed order; item i's noise depends only on (base_seed, prompt index, seed index)."""
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt (or class label)")
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    items = []
    for p, prompt in enumerate(prompts):
        for s in range(seeds_per_prompt):
            items.append(WorkItem(len(items), prompt, _derive_seed(base_seed, p, s)))
    return items


def _derive_seed(base: int, prompt_index: int, seed_index: int) -> int:
    h = hashlib.sha256(f"{base}:{prompt_index}:{seed_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def item_noise(items: Sequence[WorkItem], shape: Sequence[int], device: Any = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Initial noise for a batch of work items (each from its own CPU generator, so batching does not matter)."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(it.seed), dtype=torch.float32) for it in items]
    return torch.stack(out).to(device=device, dtype=dtype)


def latent_shape(pipe: Any, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """Per-sample latent shape ``(C, h, w)`` of a diffusers pipeline."""
    unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no unet/transformer; pass latent_shape explicitly")
    if hasattr(unet, "sample_shape"):
        return tuple(unet.sample_shape)
    cfg = unet.config
    channels = cfg.in_channels
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor and hasattr(pipe, "vae"):
        h = (height or size[0] * factor) // factor
        w = (width or size[1] * factor) // factor
        return (channels, h, w)
    return (channels, *size)


def pipeline_dtype(pipe: Any) -> torch.dtype:
    unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return getattr(unet, "dtype", torch.float32)


def pipeline_device(pipe: Any) -> torch.device:
    dev = getattr(pipe, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def run_pipeline(pipe: Any, items: Sequence[WorkItem], latents: torch.Tensor, num_inference_steps: int,
                 call_kwargs: dict[str, Any]) -> None:
    """Call the pipeline once for a batch of work items, keeping only what the scheduler wrapper recorded."""
    kwargs = dict(call_kwargs)
    kwargs.setdefault("output_type", "latent")
    with torch.no_grad():
        pipe(prompt=[it.prompt for it in items], latents=latents, num_inference_steps=num_inference_steps, **kwargs)


@dataclass
class RecordConfig:
    """Options of :func:`record_trajectories`.

    Attributes:
        teacher_steps: T, the teacher's number of steps.
        batch_size: samples per pipeline call.
        seeds_per_prompt: initial noises per prompt.
        base_seed: seed from which every work item's noise is derived.
        guidance_scale: passed to the pipeline when not None.
        height, width: image size for latent-diffusion pipelines (default: the model's).
        call_kwargs: extra keyword arguments for every pipeline call.
    """

    teacher_steps: int = 100
    batch_size: int = 4
    seeds_per_prompt: int = 1
    base_seed: int = 0
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {self.teacher_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def pipeline_kwargs(self) -> dict[str, Any]:
        kw = dict(self.call_kwargs)
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        if self.height is not None:
            kw["height"] = self.height
        if self.width is not None:
            kw["width"] = self.width
        return kw


def record_trajectories(
    pipe: Any,
    prompts: Sequence[Any],
    *,
    teacher: Any | None = None,
    config: RecordConfig | None = None,
    stats: GramStats | None = None,
    items: Sequence[WorkItem] | None = None,
    on_batch: Callable[[list[WorkItem], torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = True,
    **config_kwargs: Any,
) -> GramStats:
    """Run the teacher through ``pipe`` on prompts × seeds and stream the trajectories into ``GramStats``.

    Args:
        pipe: a diffusers pipeline whose loop calls ``scheduler.step`` once per timestep.
        prompts: prompts (or class labels, for class-conditional pipelines) passed as ``prompt=``.
        teacher: the teacher scheduler (default: DDIM with trailing timesteps on the pipeline's noise schedule).
        config: a :class:`RecordConfig`; or pass its fields as keywords (``teacher_steps=100, batch_size=4, ...``).
        stats: statistics to add to (default: new ones).
        items: explicit work items (default: ``make_work_items(prompts, seeds_per_prompt, base_seed)``).
        on_batch: called with ``(items, x_path, e_path)`` after each batch, before the trajectories are dropped.
        progress: show a progress bar over samples.
    """
    from diffusers import DDIMScheduler

    config = config or RecordConfig(**config_kwargs)
    if teacher is None:
        base = {k: v for k, v in dict(pipe.scheduler.config).items() if k != "schedules"}
        teacher = DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=False)
    check_teacher(teacher)
    items = list(items) if items is not None else make_work_items(prompts, config.seeds_per_prompt, config.base_seed)
    shape = latent_shape(pipe, config.height, config.width)
    device, dtype = pipeline_device(pipe), pipeline_dtype(pipe)
    teacher.set_timesteps(config.teacher_steps)
    timesteps = [t.item() for t in teacher.timesteps]
    if stats is None:
        stats = GramStats(
            timesteps, teacher=describe_scheduler(teacher, config.teacher_steps), model=describe_model(pipe),
            prediction_type=teacher.config.get("prediction_type", "epsilon"),
        )
    recorder = RecordingScheduler(teacher)
    kwargs = config.pipeline_kwargs()
    bar = tqdm(total=len(items), desc="recording teacher", unit="sample", disable=not progress)
    with swapped_scheduler(pipe, recorder), _quiet_progress(pipe):
        for start in range(0, len(items), config.batch_size):
            batch = items[start : start + config.batch_size]
            noise = item_noise(batch, shape, device, dtype)
            run_pipeline(pipe, batch, noise, config.teacher_steps, kwargs)
            x_path, e_path = recorder.trajectory()
            if x_path.shape[0] != stats.num_teacher_steps + 1:
                raise ValueError(
                    f"the pipeline ran {x_path.shape[0] - 1} steps but the teacher has {stats.num_teacher_steps}"
                )
            stats.update(x_path, e_path)
            if on_batch is not None:
                on_batch(batch, x_path, e_path)
            recorder.clear()
            del x_path, e_path
            bar.update(len(batch))
    bar.close()
    return stats


@contextlib.contextmanager
def _quiet_progress(pipe: Any) -> Iterator[None]:
    """Silence the pipeline's own per-call progress bar while ours runs."""
    setter = getattr(pipe, "set_progress_bar_config", None)
    old = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    if setter is not None:
        setter(disable=True)
    try:
        yield
    finally:
        if setter is not None:
            pipe._progress_bar_config = old
