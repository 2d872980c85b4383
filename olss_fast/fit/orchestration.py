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
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from olss_fast.core.checks import warn_once
from olss_fast.core.heldout import choose_on_heldout, reuse_outputs
from olss_fast.core.provenance import scheduler_prediction_type
from olss_fast.core.grid import programme_grid, programme_states
from olss_fast.core.refine import refit_path_search, refit_programme
from olss_fast.core.shift import shift_evaluations, shift_timesteps
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.search import SearchConfig, coefficient_errors, paper_schedule, uniform_path, warn_paper_fit
from olss_fast.core.stats import GramStats
from olss_fast.fit.checkpoint import checkpoint_info
from olss_fast.fit.config import FitConfig, RecordConfig, fit_configs
from olss_fast.fit.distributed import DistContext, broadcast_object, resolve_context
from olss_fast.fit.probe import (LatentKeeper, layer_denoiser, pipeline_denoiser, refine_through_pipeline,
                                student_noise)
from olss_fast.fit.recording import check_recordable, record_trajectories
from olss_fast.fit.teacher import default_teacher, first_order_coefficients
from olss_fast.fit.work import WorkItem, make_work_items, prompt_list, spread_indices
from olss_fast.pipelines.facts import call_default_guidance, latent_shape, noise_schedule_id
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
    shift = _timestep_shift(fit, base_config)
    # (no work items needed when searching given statistics without refinement: the pipeline is never run)
    need_items = stats is None or fit.refine
    items = make_work_items(prompts, record.seeds_per_prompt, record.base_seed) if need_items else []
    for n in fit.num_steps:
        if n > record.teacher_steps:
            raise ValueError(f"cannot fit {n} steps from a {record.teacher_steps}-step teacher")
    plan = plan_fit(record.teacher_steps, fit.num_steps, stats.num_samples if stats is not None else len(items),
                    len(items), fit, shift=shift) if fit.refine else None
    limit = plan.refit_samples if plan is not None else 0
    needed = None
    if fit.path == "uniform":
        needed = sorted({i for n in fit.num_steps for i in uniform_path(record.teacher_steps, n)} | {record.teacher_steps})
    keeper = LatentKeeper(limit, needed)
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
    if fit.refine:
        teacher = teacher if teacher is not None else default_teacher(pipe.scheduler)
        final, paper = _fit_refined(pipe, stats, teacher, items[:limit], keeper.teacher_latents(T, ctx), record,
                                    fit, plan, progress, ctx)
    else:
        warn_paper_fit("fit_olss_scheduler(refine=False)")
        paper = {n: _search_on_rank0(stats, n, fit, ctx)
                 for n in tqdm(sorted(fit.num_steps), desc="searching schedules",
                               disable=not progress or not ctx.is_main)}
        final = dict(paper)
    scheduler = OLSSScheduler.from_schedules(list(final.values()), config=base_config)
    return FitResult(scheduler=scheduler, stats=stats, schedules=final, paper_schedules=paper)


def _timestep_shift(fit: FitConfig, base_config: Mapping[str, Any]) -> bool:
    """Whether ``path="refit"`` judges a timestep-shifted proposal too (``fit.timestep_shift``); ``ValueError`` on a
    flow-matching model (its float timesteps are not shifted). (FitConfig allows it with ``path="refit"`` only.)"""
    if not fit.timestep_shift:
        return False
    if noise_schedule_id(base_config).get("kind") == "flow":
        raise ValueError("timestep_shift=True is not supported for flow-matching models (the shift is fitted on "
                         "the integer timesteps of VP models); leave it out")
    return True


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


def _search_on_rank0(stats: GramStats, n: int, fit: FitConfig, ctx: DistContext,
                     path: str | None = None) -> OLSSSchedule:
    """The paper's search (``path``, default ``fit.path``) on rank 0, its result (or its ValueError) on every rank."""
    config = _search_config(fit, path or fit.path)
    if not ctx.enabled:
        return paper_schedule(stats, n, config=config)
    result, error = None, None
    if ctx.is_main:
        try:
            result = paper_schedule(stats, n, config=config)
        except ValueError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise ValueError(error)
    return result


def _fit_refined(pipe: Any, stats: GramStats, teacher: Any, refine_items: Sequence[WorkItem], latents: torch.Tensor,
                 record: RecordConfig, fit: FitConfig, plan: FitPlan, progress: bool,
                 ctx: DistContext) -> tuple[dict[int, OLSSSchedule], dict[int, OLSSSchedule]]:
    """The re-fit with its held-out choice and guard (docs/design.md, "Held-out choice and guard"): the re-fit samples
    are split into a fit part and a held-out part (``heldout_samples``, spread over them); every candidate path
    (``path="refit"``: the programme's proposal from ``search_samples`` of the fit part, the paths of
    ``plan.candidates`` (the min-max path, and the uniform path unless the plan dropped it) and with ``plan.shift``
    the shifted proposal; otherwise the one path asked for) is re-fitted on the fit part and judged on the held-out
    part against plain DDIM/Euler of the same NFE (:func:`olss_fast.core.heldout.choose_on_heldout`). Returns the
    final schedules and the paper's fit on their paths."""
    T = stats.num_teacher_steps
    steps = sorted(fit.num_steps)
    held, fitpos = split_heldout(len(refine_items), plan.heldout_samples)
    x0 = student_noise(pipe, refine_items, record)
    agree = (lambda v: broadcast_object(v, ctx)) if ctx.enabled else None
    fit_items = [refine_items[k] for k in fitpos]
    fit_denoise = reuse_outputs(pipeline_denoiser(pipe, fit_items, record, distributed=ctx))

    def refit(schedule: OLSSSchedule) -> OLSSSchedule:
        return refine_through_pipeline(pipe, schedule, fit_items, latents[:, fitpos], record, fit.granularity,
                                       progress, distributed=ctx, denoise=fit_denoise)

    heldout = None
    if held:
        held_denoise = reuse_outputs(pipeline_denoiser(pipe, [refine_items[k] for k in held], record, distributed=ctx))
        heldout = (x0[held], latents[T, held], held_denoise)
    else:
        warn_once(("no-heldout",), "no held-out re-fit samples (%d re-fit sample(s), heldout_samples=%s): the "
                  "re-fitted schedules are not checked against plain DDIM/Euler on held-out noise; use more "
                  "samples", len(refine_items), fit.heldout_samples, logger=logger)
    # the paths of the statistics (the paper's search; with path="refit" the min-max and the uniform path unless the
    # plan dropped it; otherwise the one path asked for, which plan_fit gives as its candidate)
    stats_paths = plan.candidates
    known = {n: {p: _search_on_rank0(stats, n, fit, ctx, p) for p in stats_paths} for n in steps}
    proposals: dict[int, list[int]] = {}
    search_info: dict[str, Any] = {}
    if fit.path == "refit":
        distinct = {n: 1 + len({tuple(c.indices) for c in known[n].values()}) for n in steps}
        proposals, search_info = _programme(pipe, stats, refine_items, fitpos, x0, latents, record, fit, held,
                                            distinct, plan, progress, ctx)
    shifted = search_info.pop("shifted", {})
    final, paper = {}, {}
    for n in tqdm(steps, desc="re-fitting schedules", disable=not progress or not ctx.is_main):
        candidates = {}
        if n in proposals:
            candidates["proposal"] = paper_schedule(stats, n, config=_search_config(fit, tuple(proposals[n])))
            if shifted.get(n) is not None and shifted[n] != list(candidates["proposal"].timesteps):
                candidates["shifted"] = dataclasses.replace(candidates["proposal"], timesteps=shifted[n])
        candidates.update(known[n])
        baseline = _baseline_schedule(stats, n, teacher)
        choice = choose_on_heldout(candidates, baseline, refit, heldout, fit_samples=len(fitpos), agree=agree)
        schedule = choice.schedule
        if fit.path == "refit":  # what the search ran on, also when the guard fell back (candidate "baseline")
            meta = dict(schedule.meta, refit_search=dict(search_info, candidate=choice.chosen,
                                                         proposal=proposals.get(n),
                                                         shifted_timesteps=shifted.get(n)))
            schedule = dataclasses.replace(schedule, meta=meta, path=schedule.path if choice.fell_back else "refit")
        final[n] = schedule
        paper[n] = baseline if choice.fell_back else candidates[choice.chosen]
        if choice.chosen == "shifted":  # the paper's fit is of the teacher timesteps: its schedule keeps them
            paper[n] = candidates["proposal"]
    return final, paper


def heldout_count(count: int, heldout: int | None) -> int:
    """How many of ``count`` re-fit samples are held out: ``heldout`` when given, else a quarter, at least one when
    there are two or more."""
    if heldout is None:
        return max(1, count // 4) if count >= 2 else 0
    return heldout


def split_heldout(count: int, heldout: int | None) -> tuple[list[int], list[int]]:
    """Positions of the held-out part and of the fit part of ``count`` re-fit samples: :func:`heldout_count` of them
    spread evenly over them (so over the prompts)."""
    heldout = heldout_count(count, heldout)
    if heldout >= count:
        raise ValueError(f"heldout_samples={heldout} leaves none of the {count} re-fit samples to fit on: use fewer "
                         "held-out samples or more re-fit samples (refine_samples)")
    held = spread_indices(count, heldout) if heldout else []
    return held, [k for k in range(count) if k not in set(held)]


#: the planned programme's grid: about this many teacher indices (stride ``round(T / 25)``: 4 for 100 teacher steps,
#: :func:`olss_fast.core.grid.programme_grid`), never fewer than :data:`GRID_PER_STEP` per step; finer only when
#: every fit sample fits the budget on it, coarser only to reach :data:`MIN_SEARCH_SAMPLES` (and never in the reduced
#: plans of :func:`plan_fit`, see :data:`TIGHT_SEARCH_SAMPLES`). Measured on held-out noise (benchmarks/RESULTS.md,
#: "Cheaper default search"): at the same cost, more search samples on this grid chose better paths than fewer samples
#: on the full grid (digits, 5 NFE: 0.052 vs 0.069 teacher RMSE; the mixture, 4-5 NFE, three training seeds) or on
#: this grid refined by ±2 indices around its proposal.
GRID_NODES = 25
GRID_PER_STEP = 1.5
MIN_SEARCH_SAMPLES = 8


@dataclass(frozen=True)
class SearchPlan:
    """How :func:`plan_search` sized the programme of ``path="refit"``: ``samples`` search samples on the grid of
    ``stride`` (:func:`olss_fast.core.grid.programme_grid`), and the planned model evaluations of the whole fit
    (``evaluations``, in evaluations of one sample; an upper bound) against ``budget`` (the same unit)."""

    samples: int
    stride: int
    evaluations: int
    budget: int


#: re-fit samples (held-out part included) when ``refine_samples`` is not given: every recorded sample, up to this many
DEFAULT_REFIT_SAMPLES = 64
#: the reduced plans of :func:`plan_fit` keep at least this many re-fit samples, and run the programme on at least
#: :data:`TIGHT_SEARCH_SAMPLES` search samples on the planned grid, never a coarser one. Measured on held-out noise
#: with the tiny SD3 / Flux pipelines (28 teacher steps for 4-10 steps; benchmarks/RESULTS.md, "Short teachers: the
#: reduced plan"): 2 search samples on the full grid (28 indices) chose better paths at 5-10 NFE than 4 on the
#: stride-2 grid (15 indices for 10 steps), whose paths were up to 41 % worse.
MIN_REFIT_SAMPLES = 12
TIGHT_SEARCH_SAMPLES = 2
#: the paths of the statistics judged next to the programme's proposal: in the full plan, and the min-max path alone
#: with the timestep shift (its shifted proposal takes the uniform path's place) and in the reduced plans
FULL_CANDIDATES = ("minimax", "uniform")
MINIMAX_CANDIDATE = ("minimax",)
#: the timestep shift of ``path="refit"`` runs on at most this many of the search samples (spread over them)
SHIFT_SAMPLES = 16


@dataclass(frozen=True)
class FitPlan:
    """What the re-fit of :func:`fit_olss_scheduler` runs on (:func:`plan_fit`): the first ``refit_samples`` work
    items, ``heldout_samples`` of them held out; with ``path="refit"``, the paths of the statistics judged next to the
    programme's proposal (``candidates``), the fewest search samples its programme runs on (``min_search_samples``)
    and the programme's plan (``search``; the fit sizes it again once it knows which candidate paths coincide, which
    only leaves more room, so never a coarser grid). ``reduced``: the full plan did not fit the budget and this one
    does (or, where none does, is the cheapest). ``shift``: a timestep-shifted proposal is judged too
    (:func:`olss_fast.core.shift.shift_timesteps`, on up to :data:`SHIFT_SAMPLES` search samples)."""

    refit_samples: int
    heldout_samples: int
    candidates: tuple[str, ...] = FULL_CANDIDATES
    min_search_samples: int = MIN_SEARCH_SAMPLES
    search: SearchPlan | None = None
    reduced: bool = False
    shift: bool = False


def plan_fit(T: int, steps: Sequence[int], recorded: int, available: int, fit: FitConfig,
             shift: bool = False) -> FitPlan:
    """The re-fit's samples and, for ``path="refit"``, its candidate paths and programme, sized so that the whole fit
    stays within ``fit.evaluation_budget`` times the teacher recording (``recorded`` samples of ``T`` steps;
    ``available``: the work items there are to re-fit on; ``shift``: the timestep shift runs, and its shifted
    proposal takes the uniform path's place among the candidates).

    The full plan: every recorded sample up to :data:`DEFAULT_REFIT_SAMPLES` (or ``refine_samples``), a quarter of
    them held out (or ``heldout_samples``), at least :data:`MIN_SEARCH_SAMPLES` search samples (:func:`plan_search`),
    and next to the proposal the min-max path and the uniform path, or with ``shift`` the min-max path and the
    shifted proposal (in the uniform path's place: with both, the shift's cost left the programme too few samples on
    the mixture benchmark). Where that is over the budget (a small recording, or a teacher with about as many steps
    as the step counts add up to: each candidate's re-fit then costs about one recording) and none of ``shift``,
    ``refine_samples``, ``heldout_samples``, ``search_samples`` and ``search_stride`` is asked for, the first reduced
    plan that fits: the min-max path the only other candidate, then re-fit samples removed one at a time, down to
    :data:`MIN_REFIT_SAMPLES`, with at least :data:`TIGHT_SEARCH_SAMPLES` search samples on the planned grid (not a
    coarser one: where the budget is that tight, the grid counts for more than the samples); if none fits, the cheapest
    of them all, the smallest reduced plan on a coarser grid included, over the budget (the fit warns): a lower budget
    never makes the fit cost more. Where those sizes or the shift are asked for, the full plan, over the budget if
    need be (the fit warns).
    """
    count = min(available, fit.refine_samples or DEFAULT_REFIT_SAMPLES)
    split_heldout(count, fit.heldout_samples)  # (its ValueError before any work)
    if fit.path != "refit":
        return FitPlan(refit_samples=count, heldout_samples=heldout_count(count, fit.heldout_samples),
                       candidates=(fit.path,))

    def make(refit: int, candidates: tuple[str, ...], floor: int, *, reduced: bool, shift: bool,
             coarsen: bool) -> FitPlan:
        held = heldout_count(refit, fit.heldout_samples)
        search = plan_search(T, steps, recorded, max(0, refit - held), held, fit,
                             {n: 1 + len(candidates) for n in steps}, min_samples=floor, shift=shift,
                             coarsen=coarsen)
        return FitPlan(refit_samples=refit, heldout_samples=held, candidates=candidates, min_search_samples=floor,
                       search=search, reduced=reduced, shift=shift)

    full = make(count, MINIMAX_CANDIDATE if shift else FULL_CANDIDATES, MIN_SEARCH_SAMPLES, reduced=False,
                shift=shift, coarsen=True)
    given = (fit.refine_samples, fit.heldout_samples, fit.search_samples, fit.search_stride)
    if shift or full.search.evaluations <= full.search.budget or any(v is not None for v in given):
        return full
    plans = [full]
    for refit in range(count, min(count, MIN_REFIT_SAMPLES) - 1, -1):
        plans.append(make(refit, MINIMAX_CANDIDATE, TIGHT_SEARCH_SAMPLES, reduced=True, shift=False, coarsen=False))
        if plans[-1].search.evaluations <= plans[-1].search.budget:
            return plans[-1]
    plans.append(make(plans[-1].refit_samples, MINIMAX_CANDIDATE, TIGHT_SEARCH_SAMPLES, reduced=True, shift=False,
                      coarsen=True))
    return min(plans, key=lambda p: p.search.evaluations)  # the closest to the budget (a lower one never costs more)


def plan_search(T: int, steps: Sequence[int], recorded: int, fit_samples: int, heldout_samples: int,
                fit: FitConfig, candidates: Mapping[int, int] | None = None,
                min_samples: int = MIN_SEARCH_SAMPLES, shift: bool = False, coarsen: bool = True) -> SearchPlan:
    """Size the programme of ``path="refit"`` so that the whole fit stays within ``fit.evaluation_budget`` times the
    teacher recording's model evaluations (``recorded × T``).

    The rest of the fit costs, in evaluations of one sample: the recording, the re-fit of the ``candidates[n]``
    distinct candidate paths of each step count n (default 3: the proposal, the min-max and the uniform path) on the
    fit part (n per sample each) and their runs on the held-out part plus the DDIM/Euler baseline's, less the step-0
    output every path shares (one evaluation per sample). A proposal that repeats another path, paths that share
    their first steps (:func:`olss_fast.core.heldout.reuse_outputs`), or a candidate refused for its amplification,
    cost less: the plan is an upper bound. The programme costs :func:`programme_states` per search sample; with
    ``shift``, the timestep shift of every step count's proposal costs
    :func:`olss_fast.core.shift.shift_evaluations` on each of :data:`SHIFT_SAMPLES` search samples (fewer if there
    are fewer), and the shifted proposal is one candidate more. Given ``search_samples``/``search_stride`` are kept
    (the other one is sized to the budget); otherwise the grid is about :data:`GRID_NODES` teacher indices with as
    many fit samples as the budget allows (see there), and where not even ``min_samples``
    (:data:`MIN_SEARCH_SAMPLES`; fewer in the reduced plans of :func:`plan_fit`) fit on the coarsest grid, that many
    run there anyway (``evaluations`` then exceeds ``budget``, and the fit warns). ``coarsen=False`` (the reduced
    plans) keeps the planned grid instead of a coarser one: ``min_samples`` run on it, over the budget if need be.
    """
    counts = {n: (candidates or {}).get(n, 3) + (1 if shift else 0) for n in steps}
    fitted = sum(counts[n] * n for n in steps) - sum(counts.values()) + 1  # per fit sample, step 0 once
    held = sum((counts[n] + 1) * n for n in steps) - sum(counts.values()) - len(steps) + 1  # candidates + baseline
    most = min(fit_samples, fit.search_samples or fit_samples)
    shifting = min(most, SHIFT_SAMPLES) * sum(shift_evaluations(n) for n in steps) if shift else 0
    fixed = recorded * T + fit_samples * fitted + heldout_samples * held + shifting
    budget = int(fit.evaluation_budget * recorded * T)
    room = max(0, budget - fixed)
    n_max = max(steps)
    # (the regular part of the grid and its last index must hold GRID_PER_STEP indices per step)
    strides = [g for g in range(1, T + 1) if len(range(0, T, g)) + 1 >= max(n_max, math.ceil(GRID_PER_STEP * n_max))]
    strides = [g for g in strides if len(programme_grid(T, g)) >= n_max] or [1]

    def fitting(g: int) -> int:
        return min(most, room // programme_states(T, steps, g))

    if fit.search_stride is not None:
        stride = fit.search_stride
        samples = fit.search_samples or max(1, fitting(stride))
    elif fit.search_samples is not None:
        fits = [g for g in strides if most * programme_states(T, steps, g) <= room]
        stride, samples = (fits[0] if fits else strides[-1]), most
    else:
        at = min(max(1, round(T / GRID_NODES)), strides[-1])
        stride = at
        if fitting(at) == most:  # budget to spare: a finer grid while every fit sample still fits
            stride = min(g for g in strides if g <= at and fitting(g) == most)
        elif coarsen:  # a coarser grid only to reach the minimum number of search samples
            enough = [g for g in strides if g >= at and fitting(g) >= min(most, min_samples)]
            stride = enough[0] if enough else strides[-1]
        # the minimum does not fit (on any grid, or with coarsen=False on this one): it runs anyway (the budget
        # cannot hold: the re-fit of the candidates alone nearly fills it, which happens when the step counts add up
        # to about the teacher's steps)
        floor = min(most, min_samples)
        samples = fitting(stride) if fitting(stride) >= floor else floor
    return SearchPlan(samples=samples, stride=stride, budget=budget,
                      evaluations=fixed + samples * programme_states(T, steps, stride))


def _programme(pipe: Any, stats: GramStats, refine_items: Sequence[WorkItem], fitpos: list[int], x0: torch.Tensor,
               latents: torch.Tensor, record: RecordConfig, fit: FitConfig, held: list[int],
               candidates: Mapping[int, int], fit_plan: FitPlan, progress: bool,
               ctx: DistContext) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """The proposal of :func:`refit_programme` for every step count, on ``search_samples`` of the fit part (with
    ``search_sweeps``: improved by coordinate descent on the same samples), sized by :func:`plan_search` unless
    ``search_samples``/``search_stride`` are given."""
    steps = sorted(fit.num_steps)
    plan = plan_search(stats.num_teacher_steps, steps, stats.num_samples, len(fitpos), len(held), fit,
                       candidates, min_samples=fit_plan.min_search_samples, shift=fit_plan.shift)
    info: dict[str, Any] = {"samples": plan.samples, "stride": plan.stride, "planned_evaluations": plan.evaluations,
                            "budget": plan.budget, "refit_samples": fit_plan.refit_samples,
                            "candidates": list(fit_plan.candidates)}
    if plan.evaluations > plan.budget:
        warn_once(("over-budget", plan), "the fit plans %d model evaluations of one sample, %.2fx the teacher "
                  "recording's, above evaluation_budget=%s (the step counts add up to %d, the teacher has %d steps: "
                  "the re-fit of the candidate paths alone nearly fills it, or search_samples/search_stride/"
                  "timestep_shift ask for more); the programme (%d samples, stride %d) runs anyway. Record more "
                  "samples or more teacher steps, or raise evaluation_budget",
                  plan.evaluations, plan.evaluations / (stats.num_samples * stats.num_teacher_steps),
                  fit.evaluation_budget, sum(steps), stats.num_teacher_steps, plan.samples, plan.stride,
                  logger=logger)
    pick = [fitpos[k] for k in spread_indices(len(fitpos), plan.samples)]
    items = [refine_items[k] for k in pick]
    denoise = pipeline_denoiser(pipe, items, record, distributed=ctx)
    found, evaluations = refit_programme(stats.timesteps, x0[pick], latents[:, pick], denoise, steps,
                                         granularity=fit.granularity, stride=plan.stride,
                                         progress=progress and ctx.is_main,
                                         batched=layer_denoiser(pipe, items, record, distributed=ctx))
    if ctx.enabled:
        found = broadcast_object(found, ctx)
    proposals = {n: list(found[n][0]) for n in steps}
    if fit.search_sweeps:
        better = refit_path_search(stats.timesteps, x0[pick], latents[:, pick], denoise, steps, programme=False,
                                   start=proposals, sweeps=fit.search_sweeps, granularity=fit.granularity,
                                   progress=progress and ctx.is_main,
                                   agree=(lambda v: broadcast_object(v, ctx)) if ctx.enabled else None)
        proposals = {n: list(better[n].indices) for n in steps}
    info["programme_evaluations"] = evaluations
    logger.info("refit programme on %d samples, stride %d: %d model evaluations of those samples; proposals %s",
                len(pick), plan.stride, evaluations, proposals)
    if fit_plan.shift:
        T = stats.num_teacher_steps
        sub = spread_indices(len(pick), min(len(pick), SHIFT_SAMPLES))
        spick = [pick[k] for k in sub]
        model = pipeline_denoiser(pipe, [items[k] for k in sub], record, distributed=ctx)
        made = [0]  # model evaluations made (shift_timesteps counts those it asks for; re-used ones are not made)

        def counted(z: torch.Tensor, t: Any) -> torch.Tensor:
            made[0] += 1
            return model(z, t)

        shared = reuse_outputs(counted)
        shifted: dict[int, list[int]] = {}
        for n in tqdm(steps, desc="timestep shift", disable=not progress or not ctx.is_main, leave=False):
            nominal = [int(stats.timesteps[i]) for i in proposals[n]]
            times, _, _ = shift_timesteps(nominal, x0[spick], latents[proposals[n][1:] + [T]][:, spick], shared,
                                          granularity=fit.granularity)
            shifted[n] = times
        if ctx.enabled:
            shifted = broadcast_object(shifted, ctx)
        info["shift_evaluations"] = made[0]
        info["shifted"] = shifted
        logger.info("timestep shift of the proposals: %s", shifted)
    return proposals, info


def _baseline_schedule(stats: GramStats, n: int, teacher: Any) -> OLSSSchedule:
    """Plain DDIM (Euler for flow matching) on the uniform path of ``n`` teacher indices, as an OLSS schedule: the
    guard's baseline and what a fit falls back to."""
    path = uniform_path(stats.num_teacher_steps, n)
    coeffs = first_order_coefficients(teacher, stats.timesteps, path, stats.prediction_type)
    flow = stats.prediction_type == "flow"
    return OLSSSchedule(
        timesteps=[stats.timesteps[i] for i in path], indices=path, coeffs=coeffs,
        errors=coefficient_errors(stats, path, coeffs), teacher_steps=stats.num_teacher_steps,
        prediction_type=stats.prediction_type, path="euler" if flow else "ddim", refined=False,
        teacher=stats.teacher,
        fitted_for=dict(stats.context, num_samples=stats.num_samples) if stats.context else {},
        meta={"num_samples": stats.num_samples, "model": stats.model,
              "baseline": "Euler on the velocity" if flow else "DDIM (eta = 0)"},
    )


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
