"""Recording teacher trajectories from any diffusers pipeline by wrapping its scheduler.

The pipeline runs its own loop; :class:`RecordingScheduler` forwards every call to the teacher scheduler and keeps
the ``sample`` and ``model_output`` of each ``step`` (docs/design.md, "The method"). After each batch the trajectories are
added to :class:`~olss_fast.core.stats.GramStats` and dropped, so memory does not grow with the number of batches.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from olss_fast.core import checks
from olss_fast.core.files import exclusive_lock
from olss_fast.core.fingerprint import modules_fingerprint
from olss_fast.core.provenance import describe_scheduler, scheduler_prediction_type
from olss_fast.core.stats import GramStats
from olss_fast.fit.checkpoint import RecordCheckpointer, job_fingerprint, stats_identity
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.distributed import (LOCAL, DistContext, agree_on_error, all_reduce_stats, broadcast_object,
                                       broadcast_stats, resolve_context, shard_batches)
from olss_fast.fit.teacher import check_teacher, default_teacher
from olss_fast.fit.work import WorkItem, item_noise, make_work_items, prompt_list
from olss_fast.pipelines.facts import (NEGATIVE_PROMPTS, call_default_guidance, describe_model, jsonable_config,
                                       latent_shape, pipeline_device, pipeline_dtype, pipeline_modules)
from olss_fast.pipelines.provenance import recording_context
from olss_fast.pipelines.registry import adapter_for

logger = logging.getLogger(__name__)


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


def run_pipeline(pipe: Any, items: Sequence[WorkItem], latents: torch.Tensor, num_inference_steps: int,
                 call_kwargs: dict[str, Any]) -> None:
    """Call the pipeline once for a batch of work items, keeping only what the scheduler wrapper recorded."""
    kwargs = dict(call_kwargs)
    kwargs.setdefault("output_type", "latent")
    for key in NEGATIVE_PROMPTS:  # one negative prompt for all items, as a list like the prompts
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]] * len(items)
    with torch.no_grad():
        pipe(prompt=[it.prompt for it in items], latents=latents, num_inference_steps=num_inference_steps, **kwargs)


def check_recordable(pipe: Any) -> None:
    """``ValueError`` up front unless ``pipe``'s ``__call__`` takes ``prompt`` and ``latents`` (recording and the
    re-fit drive the pipeline's own loop with chosen prompts and noise)."""
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


@dataclass
class _Job:
    """A recording resolved before any pipeline call: teacher, work items, shapes and descriptions."""

    teacher: Any
    items: list[WorkItem]
    prompts: list[Any]
    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    timesteps: list[Any]
    context: dict[str, Any]
    teacher_desc: str
    model_desc: str
    scheduler_config: dict[str, Any]

    def new_stats(self) -> GramStats:
        out = GramStats(self.timesteps, teacher=self.teacher_desc, model=self.model_desc,
                        prediction_type=scheduler_prediction_type(self.teacher), context=self.context)
        out.meta["scheduler_config"] = self.scheduler_config
        return out


def _resolve_job(pipe: Any, prompts: list[Any], teacher: Any, config: RecordConfig,
                 items: Optional[Sequence[WorkItem]]) -> _Job:
    check_recordable(pipe)
    teacher = default_teacher(pipe.scheduler) if teacher is None else teacher
    check_teacher(teacher)
    items = list(items) if items is not None else make_work_items(prompts, config.seeds_per_prompt, config.base_seed)
    shape = latent_shape(pipe, config.height, config.width)
    # the teacher timesteps exactly as the pipeline's loop will set them (flow pipelines pass sigmas and mu)
    adapter = adapter_for(pipe, required=False)
    mu = None
    if adapter is not None:
        dh, dw = adapter.default_size()
        h, w = config.height or dh, config.width or dw
        teacher.set_timesteps(**adapter.teacher_timestep_kwargs(teacher, config.teacher_steps, h, w))
        mu = adapter.flow_mu(h, w)
    else:
        teacher.set_timesteps(config.teacher_steps)
    guidance = config.guidance_scale if config.guidance_scale is not None else call_default_guidance(pipe)
    context = recording_context(pipe=pipe, teacher=teacher, teacher_steps=config.teacher_steps,
                                guidance_scale=guidance, latent_shape=shape, prompts=list(prompts),
                                call_kwargs=config.call_kwargs, mu=mu)
    return _Job(teacher=teacher, items=items, prompts=list(prompts), shape=shape, device=pipeline_device(pipe),
                dtype=pipeline_dtype(pipe), timesteps=[t.item() for t in teacher.timesteps], context=context,
                teacher_desc=describe_scheduler(teacher, config.teacher_steps), model_desc=describe_model(pipe),
                scheduler_config={k: v for k, v in jsonable_config(getattr(pipe.scheduler, "config", {})).items()
                                  if k != "_use_default_values"})  # diffusers' bookkeeping, in random order


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
    distributed: bool | DistContext | None = None,
    **options: Any,
) -> GramStats:
    """Run the teacher through ``pipe`` on prompts × seeds and stream the trajectories into ``GramStats``.

    Args:
        pipe: a diffusers pipeline whose loop calls ``scheduler.step`` once per timestep.
        prompts: prompts (or class labels, for class-conditional pipelines) passed as ``prompt=``.
        teacher: the teacher scheduler (default: :func:`~olss_fast.fit.teacher.default_teacher`, DPM-Solver++(2M)
            with trailing timesteps on the pipeline's noise schedule; flow matching: the pipeline's own scheduler).
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
    config = checks.options(RecordConfig, config, options, "recording")
    job = _resolve_job(pipe, prompt_list(prompts), teacher, config, items)
    ctx = resolve_context(distributed)
    if checkpoint is None and not ctx.enabled:  # one process, no checkpoint: stream into the caller's statistics
        target = stats if stats is not None else job.new_stats()
        _record(pipe, job, config, target, shard_batches(job.items, config.batch_size, LOCAL), set(), None, on_batch,
                progress, ctx)
        return target
    with contextlib.ExitStack() as locks:  # a checkpoint has one writer at a time
        ckpt, finished, target, done = None, None, None, set()
        if checkpoint is not None:
            ckpt = _checkpointer(pipe, job, config, Path(checkpoint), checkpoint_every, ctx)
            locks.enter_context(exclusive_lock(ckpt.shard_path, "recording checkpoint"))
            if ctx.enabled and ctx.is_main:
                locks.enter_context(exclusive_lock(ckpt.path, "recording checkpoint"))
            finished, target, done = _open_checkpoint(ckpt, resume, ctx)
        if finished is not None:
            logger.info("checkpoint %s is finished (%d samples): nothing left to record", checkpoint,
                        finished.num_samples)
            if progress and ctx.is_main:
                tqdm(total=len(job.items), initial=len(job.items), desc="recording teacher (from checkpoint)",
                     unit="sample").close()
            return finished if stats is None else stats.merge_(finished)
        if target is None:
            target = job.new_stats()
        elif "scheduler_config" not in target.meta:
            target.meta["scheduler_config"] = job.scheduler_config
        mine = shard_batches(job.items, config.batch_size, ctx)
        _check_resumed_items(done, mine, checkpoint, ctx)
        _record(pipe, job, config, target, mine, done, ckpt, on_batch, progress, ctx)
        if ckpt is not None:
            ckpt.save_shard(target, done, complete=True)
        if ctx.enabled:
            target = all_reduce_stats(target, ctx, sample_shape=job.shape)
            if ckpt is not None:
                ckpt.save_final(target)
                ctx.barrier()  # the finished file exists before any shard file goes away
                ckpt.remove_shard()
        return target if stats is None else stats.merge_(target)


def _checkpointer(pipe: Any, job: _Job, config: RecordConfig, path: Path, every: int,
                  ctx: DistContext) -> RecordCheckpointer:
    if len({it.index for it in job.items}) != len(job.items):
        raise ValueError("work item indices must be unique to checkpoint a recording")
    fingerprint = job_fingerprint(
        teacher_description=job.teacher_desc, teacher_config=job.teacher.config,
        teacher_steps=config.teacher_steps, model_description=job.model_desc,
        model_sha256=modules_fingerprint(pipeline_modules(pipe)), prompts=job.prompts,
        seeds_per_prompt=config.seeds_per_prompt, base_seed=config.base_seed, items=job.items,
        guidance_scale=config.guidance_scale, call_kwargs=config.call_kwargs, sample_shape=job.shape,
        pipeline_dtype=job.dtype, stats_identity=stats_identity(job.new_stats()),
    )
    layout = {"batch_size": config.batch_size, "world_size": ctx.world_size, "rank": ctx.rank}
    return RecordCheckpointer(path, every, fingerprint, layout, [it.index for it in job.items], ctx)


def _check_resumed_items(done: set[int], mine: list[tuple[int, list[WorkItem]]], checkpoint: Any,
                         ctx: DistContext) -> None:
    """The finished items of a resumed checkpoint must be exactly this process's first k batches (batches are
    recorded in a fixed order)."""
    my_indices = {it.index for _, b in mine for it in b}
    if not done <= my_indices:
        raise ValueError(
            f"checkpoint {checkpoint} lists finished work items that are not this process's share "
            f"({ctx.describe()}); it is corrupted or from another job"
        )
    finished = 0
    for _, batch in mine:
        if not any(it.index in done for it in batch):
            break
        finished += 1
    if done != {it.index for _, b in mine[:finished] for it in b}:
        raise ValueError(f"checkpoint {checkpoint} is corrupted: its finished work items are not the first batches "
                         "of this recording (batches are recorded in order)")
    if done:
        logger.info("resuming %s: %d of %d samples already recorded (%s)", checkpoint, len(done), len(my_indices),
                    ctx.describe())


def _record(pipe: Any, job: _Job, config: RecordConfig, target: GramStats, mine: list[tuple[int, list[WorkItem]]],
            done: set[int], ckpt: Optional[RecordCheckpointer], on_batch: Any, progress: bool,
            ctx: DistContext) -> None:
    """Run the teacher on this process's batches not in ``done`` and add their trajectories to ``target``."""
    recorder = RecordingScheduler(job.teacher)
    restored = sum(len(b) for _, b in mine if b[0].index in done)
    bar = tqdm(total=sum(len(b) for _, b in mine), initial=restored, unit="sample",
               desc="recording teacher" + (f" ({ctx.describe()})" if ctx.enabled else ""),
               disable=not progress or not ctx.is_main)
    kwargs = config.pipeline_kwargs()
    with swapped_scheduler(pipe, recorder), quiet_progress(pipe):
        for _, batch in mine:
            if batch[0].index in done:
                continue
            run_pipeline(pipe, batch, item_noise(batch, job.shape, job.device, job.dtype), config.teacher_steps,
                         kwargs)
            x_path, e_path = recorder.trajectory()
            if x_path.shape[0] != target.num_teacher_steps + 1:
                raise ValueError(
                    f"the pipeline ran {x_path.shape[0] - 1} steps but the teacher has {target.num_teacher_steps}"
                )
            if not _same_timesteps(recorder.stepped_at, target.timesteps):
                raise ValueError(
                    f"the pipeline ran the teacher at other timesteps than recorded ({recorder.stepped_at[:3]}… vs "
                    f"{list(target.timesteps[:3])}…): it sets the scheduler's timesteps in a way olss_fast does not "
                    "know (height/width or the scheduler's shift?); statistics would be mislabelled"
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


def _same_timesteps(ran: Sequence[float], recorded: Sequence[Any]) -> bool:
    return len(ran) == len(recorded) and all(abs(a - float(b)) <= 1e-4 * max(1.0, abs(float(b)))
                                             for a, b in zip(ran, recorded))


def _open_checkpoint(
    ckpt: RecordCheckpointer, resume: bool, ctx: DistContext
) -> tuple[GramStats | None, GramStats | None, set[int]]:
    """``(finished statistics or None, this rank's partial statistics or None, its finished items)``.

    Collective under torch.distributed: every rank raises the same ``ValueError`` when any rank finds a problem.
    """
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


@contextlib.contextmanager
def quiet_progress(pipe: Any) -> Iterator[None]:
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
