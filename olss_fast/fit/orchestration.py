"""One call from a diffusers pipeline to an `OLSSScheduler`: record the teacher, search, refine.

The refinement drives the pipeline itself (its text encoder, guidance and UNet calls): for student step j the
pipeline is called with the student's latents z_j (from the coefficients fitted so far) and a one-timestep probe
scheduler whose only timestep is t_j, which records the guided model output and stops the loop. That works for any
pipeline whose loop iterates ``scheduler.timesteps`` and calls ``scheduler.step``, at n model evaluations per
refinement sample for an n-step schedule.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from olss_fast.core.provenance import scheduler_prediction_type
from olss_fast.core.refine import refit_path_search
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.search import SearchConfig, search_schedule, uniform_path
from olss_fast.core.stats import GramStats
from olss_fast.fit.checkpoint import checkpoint_info
from olss_fast.fit.config import FitConfig, RecordConfig, fit_configs
from olss_fast.fit.distributed import DistContext, broadcast_object, resolve_context
from olss_fast.fit.probe import LatentKeeper, pipeline_denoiser, refine_through_pipeline
from olss_fast.fit.recording import check_recordable, record_trajectories
from olss_fast.fit.teacher import default_teacher
from olss_fast.fit.work import WorkItem, item_noise, make_work_items, prompt_list, spread_indices
from olss_fast.pipelines.facts import call_default_guidance, latent_shape, noise_schedule_id, pipeline_dtype
from olss_fast.pipelines.provenance import check_statistics, recording_context, scheduler_usage
from olss_fast.serve.scheduler import OLSSScheduler

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit_olss_scheduler` produced."""

    scheduler: OLSSScheduler
    stats: GramStats
    schedules: dict[int, OLSSSchedule]
    paper_schedules: dict[int, OLSSSchedule] = field(default_factory=dict)


def fit_olss_scheduler(
    pipe: Any,
    prompts: Sequence[Any],
    *,
    teacher: Any | None = None,
    record: RecordConfig | None = None,
    fit: FitConfig | None = None,
    stats: GramStats | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    distributed: bool | DistContext | None = None,
    **options: Any,
) -> FitResult:
    """Record a teacher through ``pipe``, search OLSS schedules for several step counts, refine them.

    ``prompts`` is one prompt (a string, or one class label) or a list of them. Keyword arguments not given as
    configs are split between :class:`RecordConfig` (``teacher_steps``, ``batch_size``, ``seeds_per_prompt``,
    ``base_seed``, ``guidance_scale``, ``height``, ``width``, ``call_kwargs``) and :class:`FitConfig`
    (``num_steps``, ``path``, ``granularity``, ``refine``, ``refine_samples``); any other keyword must be an argument
    of ``pipe.__call__`` (``negative_prompt``, ``cross_attention_kwargs``, ...) and is passed to every pipeline
    call. Pass ``stats`` to skip recording (re-search a finished recording; ``teacher_steps`` and
    ``guidance_scale`` default to the statistics'); with ``refine=False`` the pipeline is then never run, otherwise
    the refinement re-runs the teacher on the (whole batches holding the) refinement samples to get their latents,
    and refuses (``ValueError``) a pipeline, guidance scale or size other than the recorded ones.

    The pipeline must take ``prompt`` and ``latents`` (unconditional pipelines that draw their own noise are refused
    up front).

    ``checkpoint``/``checkpoint_every``/``resume`` make the recording resumable (see :func:`record_trajectories`
    and :mod:`olss_fast.fit.checkpoint`). Under torchrun (``distributed``, default auto) recording and refinement are
    sharded over the processes and every rank returns the same result (:mod:`olss_fast.fit.distributed`); only rank 0
    should write files.
    """
    ctx = resolve_context(distributed)
    prompts = prompt_list(prompts)
    record, fit = fit_configs(pipe, record, fit, stats, options)
    if pipe is not None:
        check_recordable(pipe)
    if stats is not None:
        if not isinstance(stats, GramStats):
            raise ValueError(f"stats must be GramStats, got {type(stats).__name__}")
        stats._require_data()
        if stats.num_teacher_steps != record.teacher_steps:
            raise ValueError(
                f"the statistics hold a {stats.num_teacher_steps}-step teacher but teacher_steps="
                f"{record.teacher_steps}; leave teacher_steps out (or set it to {stats.num_teacher_steps})"
            )
        info = checkpoint_info(stats)
        if info is not None and not info.get("complete", False):
            logger.warning("searching on an unfinished recording checkpoint (%d samples)", stats.num_samples)
        _check_stats_match(stats, pipe, teacher, record, fit, prompts)
    # the scheduler the result becomes must accept the schedules: check now, not after the recording and search
    base_config = _scheduler_config(pipe, stats)
    _check_noise_schedules(base_config, stats, teacher)
    # (no work items needed when searching given statistics without refinement: the pipeline is never run)
    need_items = stats is None or fit.refine
    items = make_work_items(prompts, record.seeds_per_prompt, record.base_seed) if need_items else []
    for n in fit.num_steps:
        if n > record.teacher_steps:
            raise ValueError(f"cannot fit {n} steps from a {record.teacher_steps}-step teacher")
    limit = min(len(items), fit.refine_samples or 64)
    needed = None
    if fit.path == "uniform":
        needed = sorted({i for n in fit.num_steps for i in uniform_path(record.teacher_steps, n)} | {record.teacher_steps})
    keeper = LatentKeeper(limit if fit.refine else 0, needed)
    if stats is None:
        stats = record_trajectories(pipe, prompts, teacher=teacher, config=record, items=items,
                                    on_batch=keeper, progress=progress, checkpoint=checkpoint,
                                    checkpoint_every=checkpoint_every, resume=resume, distributed=ctx)
    if fit.refine:
        # latents of refinement samples not recorded in this call (statistics given, or restored from a
        # checkpoint): re-run the teacher on the whole single-process batches holding them, so that they are
        # bitwise the latents an uninterrupted recording would have produced
        missing = keeper.missing(ctx)
        if missing:
            bs = record.batch_size
            rerun = [it for b in sorted({i // bs for i in missing}) for it in items[b * bs : (b + 1) * bs]]
            record_trajectories(pipe, prompts, teacher=teacher, config=record, items=rerun, on_batch=keeper,
                                progress=progress, distributed=ctx)
    T = stats.num_teacher_steps
    latents = None
    paper: dict[int, OLSSSchedule] = {}
    if fit.path == "refit":
        latents = keeper.teacher_latents(T, ctx)  # every teacher index
        paper = _refit_path_schedules(pipe, stats, items[:limit], latents, record, fit, progress, ctx)
    else:
        for n in tqdm(sorted(fit.num_steps), desc="searching schedules", disable=not progress or not ctx.is_main):
            paper[n] = _search_on_rank0(stats, n, fit, ctx)
    final: dict[int, OLSSSchedule] = {}
    if fit.refine:
        if latents is None:
            rows = sorted({i for s in paper.values() for i in s.indices[1:]} | {T})
            latents = keeper.teacher_latents(T, ctx, rows)
        refine_items = items[:limit]
        for n in sorted(fit.num_steps):
            final[n] = refine_through_pipeline(pipe, paper[n], refine_items, latents, record, fit.granularity,
                                               progress, distributed=ctx)
    else:
        final = {n: paper[n] for n in sorted(fit.num_steps)}
    scheduler = OLSSScheduler.from_schedules(list(final.values()), config=base_config)
    return FitResult(scheduler=scheduler, stats=stats, schedules=final, paper_schedules=paper)


def _check_stats_match(stats: GramStats, pipe: Any, teacher: Any, record: RecordConfig, fit: FitConfig,
                       prompts: Sequence[Any]) -> None:
    """Given statistics must be of this job: ``ValueError`` for what would silently mix two settings.

    A search alone uses only the statistics (options that would change a recording are refused as having no
    effect); a re-fit also runs ``pipe``, which must be the recorded model, noise schedule, guidance and size.
    """
    fitted = stats.context
    if not fit.refine:
        if record.guidance_scale is not None and fitted.get("guidance_scale") is not None and not math.isclose(
                record.guidance_scale, fitted["guidance_scale"], rel_tol=1e-6):
            raise ValueError(
                f"guidance_scale={record.guidance_scale} has no effect on a search of finished statistics (recorded "
                f"at guidance {fitted['guidance_scale']}) without the re-fit (refine=False); leave it out, or record "
                "again"
            )
        return
    if not fitted:
        logger.warning("the statistics record nothing about the recording (an older olss_fast): the re-fit cannot "
                       "check that the pipeline, guidance and size are the recorded ones")
        return
    teacher = teacher if teacher is not None else default_teacher(pipe.scheduler)
    actual = recording_context(
        pipe=pipe, teacher=teacher, teacher_steps=record.teacher_steps,
        guidance_scale=record.guidance_scale if record.guidance_scale is not None else call_default_guidance(pipe),
        latent_shape=latent_shape(pipe, record.height, record.width), prompts=list(prompts),
        call_kwargs=record.call_kwargs,
    )
    check_statistics(fitted, stats.prediction_type, dict(actual, prediction_type=scheduler_prediction_type(teacher)),
                     head="the re-fit runs the pipeline again, which must be the one the statistics were recorded "
                          "with, but",
                     hint="Pass the recorded settings (guidance_scale / height / width / teacher), re-search without "
                          "the re-fit (refine=False, CLI --no-refine), or record again")


def _search_config(fit: FitConfig, path: Any) -> SearchConfig:
    return SearchConfig(path=path, granularity=fit.granularity, bisection_iters=fit.bisection_iters)


def _search_on_rank0(stats: GramStats, n: int, fit: FitConfig, ctx: DistContext) -> OLSSSchedule:
    """``search_schedule`` on rank 0, its result (or its ValueError) on every rank."""
    if not ctx.enabled:
        return search_schedule(stats, n, config=_search_config(fit, fit.path))
    result, error = None, None
    if ctx.is_main:
        try:
            result = search_schedule(stats, n, config=_search_config(fit, fit.path))
        except ValueError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise ValueError(error)
    return result


def _refit_path_schedules(pipe: Any, stats: GramStats, refine_items: Sequence[WorkItem], latents: torch.Tensor,
                          record: RecordConfig, fit: FitConfig, progress: bool,
                          ctx: DistContext) -> dict[int, OLSSSchedule]:
    """``path="refit"``: the paths of :func:`refit_path_search` (one programme for all step counts; the uniform and
    the min-max path of ``stats`` are judged too, so the result is never worse than either on the search samples) on
    ``search_samples`` of the re-fit samples (spread evenly over them, so over the prompts), each with the paper's
    fit on it (the re-fit that follows re-fits it on all re-fit samples)."""
    pick = spread_indices(len(refine_items), fit.search_samples or len(refine_items))
    items = [refine_items[k] for k in pick]
    shape = latent_shape(pipe, record.height, record.width)
    x0 = item_noise(items, shape, "cpu", torch.float32).to(pipeline_dtype(pipe)).to(torch.float32)
    minimax = {n: search_schedule(stats, n, config=_search_config(fit, "minimax")).indices
               for n in fit.num_steps}
    found = refit_path_search(
        stats.timesteps, x0, latents[:, pick], pipeline_denoiser(pipe, items, record, distributed=ctx),
        sorted(fit.num_steps), start=minimax, stride=fit.search_stride, sweeps=fit.search_sweeps,
        granularity=fit.granularity,
        progress=progress and ctx.is_main, agree=(lambda v: broadcast_object(v, ctx)) if ctx.enabled else None,
    )
    out = {}
    for n, res in found.items():
        schedule = search_schedule(stats, n, config=_search_config(fit, tuple(res.indices)))
        meta = dict(schedule.meta, refit_search={
            "samples": len(items), "error": res.error, "uniform_error": res.start_error,
            "proposal": res.proposal, "proposal_error": res.proposal_error, "paths_tried": res.paths_tried,
            "evaluations": res.evaluations, "programme_evaluations": res.meta.get("programme_evaluations", 0)})
        out[n] = dataclasses.replace(schedule, path="refit", meta=meta)
    return out


def _check_noise_schedules(base_config: dict[str, Any], stats: GramStats | None, teacher: Any) -> None:
    """``ValueError`` before any work when the teacher or the given statistics have another noise schedule than the
    scheduler config the result is built on."""
    want = {"noise_schedule": noise_schedule_id(base_config)}
    hint = ("The searched schedules would not fit the scheduler; record with a teacher on the pipeline's own noise "
            "schedule")
    for what, fitted, prediction_type in (("the statistics", stats.context if stats is not None else None, None),
                                          ("the teacher", scheduler_usage(teacher) if teacher is not None else None,
                                           None)):
        if fitted is not None:
            check_statistics(fitted, prediction_type, want, refuse=("noise_schedule",), hint=hint,
                             head=f"{what} use another noise schedule than the pipeline's scheduler config")


def _scheduler_config(pipe: Any, stats: GramStats | None) -> dict[str, Any]:
    """The base config of the returned ``OLSSScheduler``: the pipeline's scheduler's, else the one recorded."""
    sched = getattr(pipe, "scheduler", None) if pipe is not None else None
    if sched is not None and getattr(sched, "config", None) is not None:
        return dict(sched.config)
    cfg = stats.meta.get("scheduler_config") if stats is not None and isinstance(stats.meta, dict) else None
    if not cfg:
        raise ValueError(
            "no scheduler config: pass the pipeline (or statistics recorded by this version, which store it)"
        )
    return {k: v for k, v in cfg.items() if not str(k).startswith("_")}
