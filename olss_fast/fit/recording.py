"""Recording teacher trajectories from any diffusers pipeline by wrapping its scheduler.

The pipeline runs its own loop; :class:`RecordingScheduler` forwards every call to the teacher scheduler and keeps
the ``sample`` and ``model_output`` of each ``step`` (docs/design.md, "The method"). After each batch the trajectories are
added to :class:`~olss_fast.core.stats.GramStats` and dropped, so memory does not grow with the number of batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from olss_fast.core.files import exclusive_lock
from olss_fast.pipelines import adapter_for
from olss_fast.core.provenance import recording_context
from olss_fast.core.stats import GramStats

if TYPE_CHECKING:  # pragma: no cover
    from olss_fast.fit.checkpoint import RecordCheckpointer
    from olss_fast.fit.distributed import DistContext

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

    def __init__(self, teacher: Any) -> None:
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "samples", [])
        object.__setattr__(self, "outputs", [])
        object.__setattr__(self, "stepped_at", [])
        object.__setattr__(self, "final", None)
        object.__setattr__(self, "set_timesteps", _with_signature_of(teacher.set_timesteps, self._set_timesteps))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("samples", "outputs", "stepped_at", "final"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.teacher, name, value)

    def _set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        self.clear()
        return self.teacher.set_timesteps(*args, **kwargs)

    def clear(self) -> None:
        self.samples.clear()
        self.outputs.clear()
        self.stepped_at.clear()
        object.__setattr__(self, "final", None)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        self.samples.append(sample.detach().clone())
        self.outputs.append(model_output.detach().clone())
        self.stepped_at.append(float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep))
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


def _with_signature_of(model: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with ``model``'s signature: pipelines inspect ``scheduler.set_timesteps`` to see whether it takes custom
    ``sigmas`` / ``timesteps`` (flow pipelines pass them), so a wrapper must show the wrapped scheduler's."""
    import functools
    import inspect

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    try:
        wrapper.__signature__ = inspect.signature(model)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # pragma: no cover - a scheduler without a signature
        pass
    return wrapper


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


def default_teacher(scheduler: Any) -> Any:
    """The default teacher for a pipeline's scheduler: its own class for flow matching (an Euler ODE solver on the
    velocity), DPM-Solver++(2M) with trailing timesteps on the same noise schedule otherwise (ending at clean data).

    Chosen by measurement (benchmarks/quality.py --part teachers, benchmarks/RESULTS.md issue 14): on the analytic
    Gaussian mixture, against the exact probability-flow ODE on 500 held-out noises, DPM-Solver++(2M) with 100 steps
    has an RMSE of 0.0181 where DDIM-100 (the default before) has 0.0592 and even DDIM-250 has 0.0550; UniPC-100 is
    as accurate (0.0182) but has a corrector; OLSS fitted from the DPM-Solver++-100 teacher reaches 0.0182 at 10 NFE
    against the exact ODE where from DDIM-100 it reaches 0.0593 (the teacher is the limit).
    """
    from diffusers import DPMSolverMultistepScheduler

    if "FlowMatch" in type(scheduler).__name__:
        return type(scheduler).from_config(scheduler.config)
    base = {k: v for k, v in dict(scheduler.config).items() if k != "schedules"}
    return DPMSolverMultistepScheduler.from_config(
        base, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", timestep_spacing="trailing",
        final_sigmas_type="zero", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
        thresholding=False, variance_type=None,
    )


def teacher_prediction_type(teacher: Any) -> str:
    """The output parametrisation the teacher's model uses ("flow" for flow-matching schedulers)."""
    if "FlowMatch" in type(teacher).__name__:
        return "flow"
    return str(teacher.config.get("prediction_type", "epsilon"))


def describe_scheduler(scheduler: Any, steps: int) -> str:
    cfg = dict(getattr(scheduler, "config", {}) or {})
    keys = ("timestep_spacing", "prediction_type", "beta_schedule", "algorithm_type", "solver_order", "shift")
    parts = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    return f"{type(scheduler).__name__}({steps} steps; {', '.join(parts)})"


def call_default_guidance(pipe: Any, argument: str = "guidance_scale") -> float | None:
    """The default ``guidance_scale`` (or another ``argument``) of ``pipe.__call__``, or None when it takes none
    (unconditional pipelines)."""
    import inspect

    try:
        param = inspect.signature(type(pipe).__call__).parameters.get(argument)
    except (TypeError, ValueError):
        param = None
    if param is None or not isinstance(param.default, (int, float)) or isinstance(param.default, bool):
        return None
    return float(param.default)


def describe_model(pipe: Any) -> str:
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    return f"{type(pipe).__name__}:{name}"


@dataclass
class WorkItem:
    """One sample to record: a prompt (or class label) and a seed index for its initial noise."""

    index: int
    prompt: Any
    seed: int


def spread_indices(total: int, count: int) -> list[int]:
    """``min(count, total)`` indices spread evenly over ``range(total)`` (first and last included), so that a subset
    of work items covers every prompt."""
    count = min(count, total)
    return sorted({round(k * (total - 1) / max(count - 1, 1)) for k in range(count)})


def make_work_items(prompts: Sequence[Any], seeds_per_prompt: int = 1, base_seed: int = 0) -> list[WorkItem]:
    """prompts × seeds, in a fixed order; item i's noise depends only on (base_seed, prompt index, seed index)."""
    prompts = as_prompt_list(prompts)
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
    """Per-sample latent shape of a pipeline: its family adapter's (:mod:`olss_fast.pipelines`), else ``(C, h, w)``
    from the denoiser's config (or its ``sample_shape``, for the analytic test models)."""
    from olss_fast.pipelines import adapter_for

    adapter = adapter_for(pipe, required=False)
    if adapter is not None:
        dh, dw = adapter.default_size()
        return tuple(adapter.latent_shape(1, height or dh, width or dw)[1:])
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
    for key in NEGATIVE_PROMPT_KWARGS:  # one negative prompt for all items, as a list like the prompts
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]] * len(items)
    with torch.no_grad():
        pipe(prompt=[it.prompt for it in items], latents=latents, num_inference_steps=num_inference_steps, **kwargs)


#: pipeline call arguments the recording sets itself
MANAGED_CALL_KWARGS = ("prompt", "latents", "num_inference_steps", "output_type", "generator", "num_images_per_prompt",
                       "return_dict", "timesteps", "sigmas")
MAX_TEACHER_STEPS = 10_000
NEGATIVE_PROMPT_KWARGS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``; ``ValueError`` for bools, floats (3.9 is not 3) and out-of-range values."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_finite(name: str, value: Any) -> float:
    """``value`` as a finite float; ``ValueError`` for NaN, infinities, bools and non-numbers."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def as_prompt_list(prompts: Any) -> list[Any]:
    """Prompts as a list: a string (or a single label / None) is ONE prompt, a list or tuple is many."""
    if isinstance(prompts, (str, bytes)) or prompts is None or not isinstance(prompts, (list, tuple)):
        if isinstance(prompts, (dict, set)) or hasattr(prompts, "__next__"):
            raise ValueError(f"prompts must be a string, a label or a list of them, got {type(prompts).__name__}")
        return [prompts]
    return list(prompts)


def check_recordable(pipe: Any) -> None:
    """``ValueError`` up front unless ``pipe``'s ``__call__`` takes ``prompt`` and ``latents`` (recording and the
    re-fit drive the pipeline's own loop with chosen prompts and noise)."""
    import inspect

    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # a wrapper passing everything on: cannot tell
    missing = [name for name in ("prompt", "latents") if name not in params]
    if missing:
        raise ValueError(
            f"{type(pipe).__name__}.__call__ takes no {' and no '.join(f'`{m}`' for m in missing)}: olss_fast records "
            "the teacher and re-fits the student through the pipeline's own loop, with its prompts (or class labels) "
            "and chosen initial noise. Unconditional pipelines that draw their own noise (DDPMPipeline-style) are not "
            "supported; record the trajectories yourself and use GramStats.update + search_schedule (README, "
            "'lower-level API')"
        )


def call_kwargs_for(pipe: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` keyword arguments checked against ``pipe.__call__`` (``ValueError`` naming unknown ones)."""
    import inspect

    if not extra:
        return {}
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return dict(extra)
    named = {k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if not named:
        return dict(extra)  # a wrapper passing everything on: cannot tell
    # only named parameters: diffusers pipelines swallow **kwargs (deprecated arguments), which would hide typos
    unknown = sorted(k for k in extra if k not in named)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}: neither fit options (RecordConfig, FitConfig) nor arguments of "
                         f"{type(pipe).__name__}.__call__")
    return dict(extra)


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
        check_int("teacher_steps", self.teacher_steps, 1, MAX_TEACHER_STEPS)
        check_int("batch_size", self.batch_size, 1, 2**20)
        check_int("seeds_per_prompt", self.seeds_per_prompt, 1, 2**20)
        check_int("base_seed", self.base_seed, -(2**63), 2**63 - 1)
        if self.guidance_scale is not None:
            self.guidance_scale = check_finite("guidance_scale", self.guidance_scale)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, 2**16)
        if not isinstance(self.call_kwargs, dict) or not all(isinstance(k, str) for k in self.call_kwargs):
            raise ValueError(f"call_kwargs must be a dict of keyword arguments, got {self.call_kwargs!r}")
        managed = sorted(set(self.call_kwargs) & set(MANAGED_CALL_KWARGS))
        if managed:
            raise ValueError(f"call_kwargs {managed} are set by the recording itself (prompts, noise, teacher steps); "
                             "remove them")
        moved = sorted(set(self.call_kwargs) & {"guidance_scale", "height", "width"})
        if moved:
            raise ValueError(f"pass {moved} as RecordConfig fields / fit options, not in call_kwargs")
        for key in NEGATIVE_PROMPT_KWARGS:
            if key in self.call_kwargs and not isinstance(self.call_kwargs[key], str):
                raise ValueError(f"{key} must be one string used for every prompt (per-prompt negatives are not "
                                 f"supported by the recording), got {type(self.call_kwargs[key]).__name__}")

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
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    distributed: "bool | DistContext | None" = None,
    **config_kwargs: Any,
) -> GramStats:
    """Run the teacher through ``pipe`` on prompts × seeds and stream the trajectories into ``GramStats``.

    Args:
        pipe: a diffusers pipeline whose loop calls ``scheduler.step`` once per timestep.
        prompts: prompts (or class labels, for class-conditional pipelines) passed as ``prompt=``.
        teacher: the teacher scheduler (default: :func:`default_teacher`, DPM-Solver++(2M) with trailing timesteps
            on the pipeline's noise schedule; flow matching: the pipeline's own scheduler).
        config: a :class:`RecordConfig`; or pass its fields as keywords (``teacher_steps=100, batch_size=4, ...``).
        stats: statistics to add to (default: new ones).
        items: explicit work items (default: ``make_work_items(prompts, seeds_per_prompt, base_seed)``).
        on_batch: called with ``(items, x_path, e_path)`` after each batch, before the trajectories are dropped
            (under torch.distributed: for this rank's batches only; not for batches restored from a checkpoint).
        progress: show a progress bar over samples (rank 0's share when distributed; resumed items count as done).
        checkpoint: file to checkpoint the statistics to (see :mod:`olss_fast.fit.checkpoint`); when the recording
            finishes it holds the finished statistics, which ``fit_olss_scheduler(stats=GramStats.load(...))`` or
            ``olss-fast search --stats`` re-search without recording again.
        checkpoint_every: write the checkpoint every this many batches (and when done).
        resume: continue from ``checkpoint`` (an unfinished one resumes after its last finished batch, a finished
            one is returned without recording). Without ``resume`` an existing checkpoint is refused.
        distributed: None (default): shard the batches over the torch.distributed process group when there is one
            (or torchrun's environment asks for one) and all-reduce the statistics (:mod:`olss_fast.fit.distributed`);
            False: this process only.

    Raises:
        ValueError: bad options; a corrupted checkpoint, or one of another job (teacher, model, prompts, seeds,
            shape, ...), named field by field.
    """
    from olss_fast.fit.checkpoint import RecordCheckpointer, job_fingerprint, model_fingerprint, stats_identity
    from olss_fast.fit.distributed import all_reduce_stats, resolve_context, shard_batches

    if config is not None and config_kwargs:
        raise ValueError(f"pass recording options as config=RecordConfig(...) or as keywords, not both "
                         f"({sorted(config_kwargs)})")
    config = config or RecordConfig(**config_kwargs)
    prompts = as_prompt_list(prompts)
    check_recordable(pipe)
    if teacher is None:
        teacher = default_teacher(pipe.scheduler)
    check_teacher(teacher)
    items = list(items) if items is not None else make_work_items(prompts, config.seeds_per_prompt, config.base_seed)
    shape = latent_shape(pipe, config.height, config.width)
    device, dtype = pipeline_device(pipe), pipeline_dtype(pipe)
    # the teacher timesteps exactly as the pipeline's loop will set them (flow pipelines pass sigmas and mu)
    adapter = adapter_for(pipe, required=False)
    if adapter is not None:
        dh, dw = adapter.default_size()
        h, w = config.height or dh, config.width or dw
        teacher.set_timesteps(**adapter.teacher_timestep_kwargs(teacher, config.teacher_steps, h, w))
        mu = adapter.flow_mu(h, w)
    else:
        teacher.set_timesteps(config.teacher_steps)
        mu = None
    timesteps = [t.item() for t in teacher.timesteps]
    ctx = resolve_context(distributed)
    kwargs = config.pipeline_kwargs()
    teacher_desc = describe_scheduler(teacher, config.teacher_steps)
    model_desc = describe_model(pipe)

    context = recording_context(
        pipe=pipe, teacher=teacher, teacher_steps=config.teacher_steps,
        guidance_scale=config.guidance_scale if config.guidance_scale is not None else call_default_guidance(pipe),
        latent_shape=shape, prompts=list(prompts), call_kwargs=config.call_kwargs, mu=mu,
    )

    def new_stats() -> GramStats:
        out = GramStats(timesteps, teacher=teacher_desc, model=model_desc,
                        prediction_type=teacher_prediction_type(teacher), context=context)
        out.meta["scheduler_config"] = jsonable_config(getattr(pipe.scheduler, "config", {}))
        return out

    plain = checkpoint is None and not ctx.enabled
    if plain:  # the original single-process path: stream straight into the caller's statistics
        if stats is None:
            stats = new_stats()
        target = stats
    else:
        target = None
    with contextlib.ExitStack() as locks:  # a checkpoint has one writer at a time
        done: set[int] = set()
        ckpt = None
        if checkpoint is not None:
            if len({it.index for it in items}) != len(items):
                raise ValueError("work item indices must be unique to checkpoint a recording")
            fingerprint = job_fingerprint(
                teacher_description=teacher_desc, teacher_config=teacher.config, teacher_steps=config.teacher_steps,
                model_description=model_desc, model_sha256=model_fingerprint(pipe), prompts=list(prompts),
                seeds_per_prompt=config.seeds_per_prompt, base_seed=config.base_seed, items=items,
                guidance_scale=config.guidance_scale, call_kwargs=config.call_kwargs, sample_shape=shape,
                pipeline_dtype=dtype,
                stats_identity=stats_identity(new_stats()),
            )
            layout = {"batch_size": config.batch_size, "world_size": ctx.world_size, "rank": ctx.rank}
            ckpt = RecordCheckpointer(Path(checkpoint), checkpoint_every, fingerprint, layout,
                                      [it.index for it in items], ctx)
            locks.enter_context(exclusive_lock(ckpt.shard_path, "recording checkpoint"))
            if ctx.enabled and ctx.is_main:
                locks.enter_context(exclusive_lock(ckpt.path, "recording checkpoint"))
            finished, target, done = _open_checkpoint(ckpt, resume, ctx)
            if finished is not None:
                logger.info("checkpoint %s is finished (%d samples): nothing left to record", checkpoint,
                            finished.num_samples)
                if progress and ctx.is_main:
                    tqdm(total=len(items), initial=len(items), desc="recording teacher (from checkpoint)",
                         unit="sample").close()
                return finished if stats is None else stats.merge_(finished)
        if target is None:
            target = new_stats()
        elif "scheduler_config" not in target.meta:
            target.meta["scheduler_config"] = jsonable_config(getattr(pipe.scheduler, "config", {}))

        mine = shard_batches(items, config.batch_size, ctx)
        my_indices = {it.index for _, b in mine for it in b}
        if not done <= my_indices:
            raise ValueError(
                f"checkpoint {checkpoint} lists finished work items that are not this process's share "
                f"({ctx.describe()}); it is corrupted or from another job"
            )
        # batches are recorded in a fixed order: the finished items must be exactly this process's first k batches
        finished = 0
        for _, batch in mine:
            if not any(it.index in done for it in batch):
                break
            finished += 1
        if done != {it.index for _, b in mine[:finished] for it in b}:
            raise ValueError(f"checkpoint {checkpoint} is corrupted: its finished work items are not the first batches "
                             "of this recording (batches are recorded in order)")
        if done:
            logger.info("resuming %s: %d of %d samples already recorded (%s)", checkpoint, len(done),
                        len(my_indices), ctx.describe())
        recorder = RecordingScheduler(teacher)
        desc = "recording teacher" + (f" ({ctx.describe()})" if ctx.enabled else "")
        my_total = sum(len(b) for _, b in mine)
        restored = sum(len(b) for _, b in mine if b[0].index in done)
        bar = tqdm(total=my_total, initial=restored, desc=desc, unit="sample", disable=not progress or not ctx.is_main)
        with swapped_scheduler(pipe, recorder), _quiet_progress(pipe):
            for _, batch in mine:
                if batch[0].index in done:
                    continue
                noise = item_noise(batch, shape, device, dtype)
                run_pipeline(pipe, batch, noise, config.teacher_steps, kwargs)
                x_path, e_path = recorder.trajectory()
                if x_path.shape[0] != target.num_teacher_steps + 1:
                    raise ValueError(
                        f"the pipeline ran {x_path.shape[0] - 1} steps but the teacher has {target.num_teacher_steps}"
                    )
                if not _same_timesteps(recorder.stepped_at, target.timesteps):
                    raise ValueError(
                        f"the pipeline ran the teacher at other timesteps than recorded ({recorder.stepped_at[:3]}… vs "
                        f"{list(target.timesteps[:3])}…): it sets the scheduler's timesteps in a way olss_fast does "
                        "not know (height/width or the scheduler's shift?); statistics would be mislabelled"
                    )
                target.update(x_path, e_path, items=[it.index for it in batch])
                if on_batch is not None:
                    on_batch(batch, x_path, e_path)
                recorder.clear()
                del x_path, e_path
                done.update(it.index for it in batch)
                if ckpt is not None:
                    ckpt.step(target, done)
                bar.update(len(batch))
        bar.close()
        if plain:
            return stats
        if ckpt is not None:
            ckpt.save_shard(target, done, complete=True)
        if ctx.enabled:
            target = all_reduce_stats(target, ctx, sample_shape=shape)
            if ckpt is not None:
                ckpt.save_final(target)
                ctx.barrier()  # the finished file exists before any shard file goes away
                ckpt.remove_shard()
        if stats is None:
            return target
        return stats.merge_(target)


def _same_timesteps(ran: Sequence[float], recorded: Sequence[Any]) -> bool:
    return len(ran) == len(recorded) and all(abs(a - float(b)) <= 1e-4 * max(1.0, abs(float(b)))
                                             for a, b in zip(ran, recorded))


def _open_checkpoint(
    ckpt: "RecordCheckpointer", resume: bool, ctx: "DistContext"
) -> tuple[GramStats | None, GramStats | None, set[int]]:
    """``(finished statistics or None, this rank's partial statistics or None, its finished items)``.

    Collective under torch.distributed: every rank raises the same ``ValueError`` when any rank finds a problem.
    """
    from olss_fast.fit.distributed import agree_on_error, broadcast_object, broadcast_stats

    error = None
    final = None
    try:
        others = ckpt.other_layout_shards()
        if others:
            raise ValueError(
                f"found per-rank checkpoint(s) {[p.name for p in others]} of a run with another number of "
                f"processes next to {ckpt.path}; resume with that many processes (torchrun --nproc_per_node), or "
                "delete them to start over"
            )
        if not resume:
            existing = [p for p in dict.fromkeys([ckpt.path, ckpt.shard_path]) if p.exists()]
            if existing:
                raise ValueError(
                    f"checkpoint {existing[0]} exists: pass resume=True (olss-fast search --resume) to continue it, "
                    "or delete it to start over"
                )
        elif ctx.is_main:
            final = ckpt.load_final()
    except ValueError as exc:
        error = str(exc)
    agree_on_error(error, ctx)
    if broadcast_object(final is not None, ctx):
        final = broadcast_stats(final, ctx)
        ckpt.remove_shard()
        return final, None, set()
    partial, done, error = None, set(), None
    if resume:
        try:
            partial, done = ckpt.load_shard()
        except ValueError as exc:
            error = str(exc)
    agree_on_error(error, ctx)
    return None, partial, done


def jsonable_config(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON data (tuples become lists, tensors/arrays lists, other objects strings)."""

    def default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        return str(obj)

    try:
        return json.loads(json.dumps(dict(config or {}), default=default))
    except (TypeError, ValueError):
        return {}


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
