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
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from olss_fast.fit.recording import (
    MAX_TEACHER_STEPS, RecordConfig, StopSampling, WorkItem, _quiet_progress, as_prompt_list, call_default_guidance,
    call_kwargs_for, check_int, check_recordable, default_teacher, item_noise, latent_shape, make_work_items,
    pipeline_device, pipeline_dtype, record_trajectories, run_pipeline, spread_indices, swapped_scheduler,
    teacher_prediction_type,
)
from olss_fast.core.provenance import recording_context
from olss_fast.fit.checkpoint import checkpoint_info
from olss_fast.fit.distributed import LOCAL, DistContext, all_gather_object, broadcast_object, gather_by_sum, resolve_context
from olss_fast.core.refine import refit_path_search, sequential_refit
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import olss_combine
from olss_fast.serve.scheduler import OLSSScheduler
from olss_fast.core.schedule import GRANULARITIES
from olss_fast.core.search import DEFAULT_PATH, DEFAULT_STATS_PATH, PATHS, STATS_PATHS, search_schedule, uniform_path
from olss_fast.core.stats import GramStats

logger = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Options of :func:`fit_olss_scheduler` beyond recording.

    Attributes:
        num_steps: student step counts to search (one schedule each): an int or a list of ints.
        path: "uniform", "minimax" (the paper's search on the statistics) or "refit" (the path judged by the final
            error after the re-fit: OSS's dynamic programme with the re-fit inside, then optional coordinate
            descent, :func:`olss_fast.core.refine.refit_path_search`; needs ``refine=True``). Default (None):
            ``search.DEFAULT_PATH`` with the re-fit, ``search.DEFAULT_STATS_PATH`` without it.
        granularity: "global" or "channel".
        refine: run the student-in-the-loop re-fit after the search (recommended).
        refine_samples: how many of the recorded samples the re-fit uses (default: all, up to 64).
        search_samples: how many of the re-fit samples (spread over them) judge paths in ``path="refit"``
            (default: all re-fit samples). Its cost is about ``max(num_steps) × teacher_steps`` model evaluations
            of this many samples.
        search_stride: the programme of ``path="refit"`` places steps on every this-many-th teacher index only
            (default 1: all; 2 halves its cost).
        search_sweeps: coordinate-descent passes after the programme in ``path="refit"`` (default 0: on held-out
            noise the descent's gains on the search samples did not carry over, benchmarks/RESULTS.md issue 14).
    """

    num_steps: Sequence[int] = (5, 10)
    path: str | None = None
    granularity: str = "global"
    refine: bool = True
    refine_samples: int | None = None
    search_samples: int | None = None
    search_stride: int = 1
    search_sweeps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, numbers.Integral) and not isinstance(self.num_steps, bool):
            self.num_steps = (int(self.num_steps),)  # one step count
        if isinstance(self.num_steps, (str, bytes)) or not isinstance(self.num_steps, Sequence):
            raise ValueError(f"num_steps must be a positive integer or a list of them, got {self.num_steps!r}")
        steps = [check_int("num_steps", n, 1, MAX_TEACHER_STEPS) for n in self.num_steps]
        if not steps:
            raise ValueError("num_steps is empty: give at least one student step count")
        if len(set(steps)) != len(steps):
            raise ValueError(f"num_steps has duplicates: {steps}")
        self.num_steps = tuple(steps)
        if not isinstance(self.refine, bool):
            raise ValueError(f"refine must be True or False, got {self.refine!r}")
        if self.path is None:
            self.path = DEFAULT_PATH if self.refine else DEFAULT_STATS_PATH
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; choose one of {PATHS}")
        if self.path == "refit" and not self.refine:
            raise ValueError("path='refit' judges each path by the error after the re-fit: it cannot be combined "
                             f"with refine=False; without the re-fit choose a path of {STATS_PATHS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        if self.refine_samples is not None:
            check_int("refine_samples", self.refine_samples, 1, 2**31)
        if self.search_samples is not None:
            check_int("search_samples", self.search_samples, 1, 2**31)
        check_int("search_sweeps", self.search_sweeps, 0, 1000)
        check_int("search_stride", self.search_stride, 1, MAX_TEACHER_STEPS)
        unused = [name for name, value, default in (("search_samples", self.search_samples, None),
                                                    ("search_stride", self.search_stride, 1),
                                                    ("search_sweeps", self.search_sweeps, 0)) if value != default]
        if unused and self.path != "refit":
            raise ValueError(f"{', '.join(unused)} only apply to path='refit' (the path search judged after the "
                             f"re-fit), not to path={self.path!r}: drop them or use path='refit'")


@dataclass
class FitResult:
    """What :func:`fit_olss_scheduler` produced."""

    scheduler: OLSSScheduler
    stats: GramStats
    schedules: dict[int, OLSSSchedule]
    paper_schedules: dict[int, OLSSSchedule] = field(default_factory=dict)


class _LatentKeeper:
    """Keeps the teacher latents of the work items with ``index < limit`` at the teacher indices the re-fit needs.

    Positional (item i is the i-th work item), so it works for any batching and for this rank's share of the items
    under torch.distributed; :meth:`teacher_latents` assembles the full tensor on every rank.
    """

    def __init__(self, limit: int, indices: Sequence[int] | None) -> None:
        self.limit = limit
        self.indices = sorted(set(indices)) if indices is not None else None
        self.kept: dict[int, torch.Tensor] = {}  # item index -> [K, ...] on CPU

    def __call__(self, items: list[WorkItem], x_path: torch.Tensor, e_path: torch.Tensor) -> None:
        cols = [b for b, it in enumerate(items) if it.index < self.limit and it.index not in self.kept]
        if not cols:
            return
        x = x_path[:, cols]
        if self.indices is not None:
            x = x[self.indices]
        x = x.detach().to("cpu", torch.float32)
        for c, b in enumerate(cols):
            self.kept[items[b].index] = x[:, c].clone()

    def missing(self, ctx: DistContext = LOCAL) -> list[int]:
        """Indices below ``limit`` that no rank has kept (collective under torch.distributed)."""
        have: set[int] = set()
        for part in all_gather_object(sorted(self.kept), ctx):
            have.update(part)
        return [i for i in range(self.limit) if i not in have]

    def teacher_latents(self, T: int, ctx: DistContext = LOCAL, only: Sequence[int] | None = None) -> torch.Tensor:
        """``[T+1, limit, ...]`` with the kept (or ``only`` the given) teacher indices filled, others NaN (never read).

        Collective under torch.distributed (an exact all-gather of every rank's items).
        """
        kept_idx = list(range(T + 1)) if self.indices is None else self.indices
        rows = sorted(set(only)) if only is not None else kept_idx
        if any(r not in kept_idx for r in rows):
            raise ValueError(f"teacher indices {sorted(set(rows) - set(kept_idx))} were not kept for the re-fit")
        pos = [kept_idx.index(r) for r in rows]
        shapes = {tuple(v.shape[1:]) for v in self.kept.values()}
        shape = all_gather_object(sorted(shapes), ctx)
        shapes = {tuple(s) for part in shape for s in part}
        if len(shapes) != 1:
            raise ValueError(f"no or inconsistent teacher latents kept for the re-fit (shapes {sorted(shapes)})")
        sample_shape = shapes.pop()
        part = torch.zeros(len(rows), self.limit, *sample_shape, dtype=torch.float32)
        for i, v in self.kept.items():
            part[:, i] = v[pos]
        part = gather_by_sum(part, ctx)
        full = torch.full((T + 1, self.limit, *sample_shape), float("nan"))
        full[rows] = part
        return full


class _SingleStepProbe:
    """Scheduler stand-in that makes a pipeline evaluate its model once, at one timestep, on the latents it is given.

    Its ``step`` records the (guided) model output and raises :class:`StopSampling`; everything else a pipeline may
    read (``config``, ``order``, ``add_noise``, ...) falls through to an ``OLSSScheduler`` on the same noise schedule.
    """

    def __init__(self, base: OLSSScheduler, timestep: int | float) -> None:
        self._base = base
        self._t = timestep
        self.output: torch.Tensor | None = None
        self.init_noise_sigma = 1.0
        self.order = 1
        self.timesteps = self._timesteps(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def _timesteps(self, device: Any) -> torch.Tensor:
        dtype = torch.long if isinstance(self._t, int) else torch.float32
        return torch.tensor([self._t], dtype=dtype, device=device)

    def set_timesteps(self, num_inference_steps: Any = None, device: Any = None, timesteps: Any = None,
                      sigmas: Any = None, mu: Any = None) -> None:  # (flow pipelines pass sigmas and mu: ignored)
        self.timesteps = self._timesteps(device)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        self.output = model_output.detach()
        raise StopSampling()


def pipeline_denoiser(
    pipe: Any, items: Sequence[WorkItem], record: RecordConfig, *, distributed: bool | DistContext | None = None,
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``denoise(z, t) -> e``: the (guided) model output of ``pipe`` at latents ``z`` ``[len(items), ...]`` and
    timestep t, for the prompts of ``items``, computed by the pipeline itself (one-timestep probe scheduler, see the
    module docstring), in ``record.batch_size`` batches, on CPU in float32.

    Under torch.distributed batch k is evaluated by rank ``k % world_size`` and the outputs are all-gathered exactly
    (collective: every rank must call ``denoise`` with the same arguments).
    """
    ctx = resolve_context(distributed)
    device, dtype = pipeline_device(pipe), pipeline_dtype(pipe)
    kwargs = record.pipeline_kwargs()
    bs = record.batch_size
    base = OLSSScheduler.from_config({k: v for k, v in dict(pipe.scheduler.config).items() if k != "schedules"})
    items = list(items)

    def denoise(z: torch.Tensor, t: Any) -> torch.Tensor:
        if z.shape[0] != len(items):
            raise ValueError(f"denoise got {z.shape[0]} latents for {len(items)} work items")
        probe = _SingleStepProbe(base, t)
        outs = []
        with swapped_scheduler(pipe, probe), _quiet_progress(pipe):
            for k, s in enumerate(range(0, len(items), bs)):
                if k % ctx.world_size != ctx.rank:
                    continue
                batch = items[s : s + bs]
                probe.output = None
                try:
                    run_pipeline(pipe, batch, z[s : s + bs].to(device, dtype), 1, kwargs)
                except StopSampling:
                    pass
                if probe.output is None:
                    raise ValueError(
                        f"{type(pipe).__name__} never called scheduler.step: the re-fit (and OSS) evaluate the model "
                        "through a pipeline whose loop iterates scheduler.timesteps and calls scheduler.step"
                    )
                outs.append((s, probe.output.to("cpu", torch.float32)))
        if not ctx.enabled:
            return torch.cat([o for _, o in outs])
        full = torch.zeros((len(items), *z.shape[1:]), dtype=torch.float32)
        for s, o in outs:
            full[s : s + o.shape[0]] = o
        return gather_by_sum(full, ctx)

    return denoise


def refine_through_pipeline(
    pipe: Any,
    schedule: OLSSSchedule,
    items: Sequence[WorkItem],
    teacher_latents: torch.Tensor,
    record: RecordConfig,
    granularity: str | None = None,
    progress: bool = True,
    *,
    distributed: bool | DistContext | None = None,
) -> OLSSSchedule:
    """Student-in-the-loop re-fit driving ``pipe`` itself (see module docstring).

    Under torch.distributed (``distributed``, see :func:`olss_fast.fit.distributed.resolve_context`) the refinement
    batches (``items`` cut into ``record.batch_size`` batches, as a single process would) are evaluated by rank
    ``k % world_size``; the model outputs are all-gathered exactly, every rank runs the same float64 fit with rank 0's
    coefficients, and the result equals a single-process run's to float64 rounding. Collective: every rank must call
    it with the same arguments.
    """
    ctx = resolve_context(distributed)
    shape = latent_shape(pipe, record.height, record.width)
    dtype = pipeline_dtype(pipe)
    # the noise as the pipeline sees it (rounded to its dtype), in float32 like OLSSScheduler's x0
    x0 = item_noise(items, shape, "cpu", torch.float32).to(dtype).to(torch.float32)
    T = schedule.teacher_steps
    targets = teacher_latents[list(schedule.indices[1:]) + [T]]
    denoise = pipeline_denoiser(pipe, items, record, distributed=ctx)

    def evaluate(j: int, coeffs: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        # the student's latent at step j, computed exactly as OLSSScheduler.step computes it at inference
        z = x0 if j == 0 else olss_combine(coeffs, j - 1, x0, history)
        return denoise(z, schedule.timesteps[j])

    def evaluate_with_rank0_coeffs(j: int, coeffs: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        return evaluate(j, broadcast_object(coeffs, ctx), history)

    refined = sequential_refit(schedule, x0, targets, evaluate_with_rank0_coeffs, granularity,
                               progress and ctx.is_main)
    return broadcast_object(refined, ctx)


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
    **kwargs: Any,
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
    prompts = as_prompt_list(prompts)
    rec_keys = set(RecordConfig.__dataclass_fields__)
    fit_keys = set(FitConfig.__dataclass_fields__)
    rec_kw = {k: v for k, v in kwargs.items() if k in rec_keys}
    fit_kw = {k: v for k, v in kwargs.items() if k in fit_keys}
    extra = {k: v for k, v in kwargs.items() if k not in rec_keys and k not in fit_keys}
    for given, loose, name in ((record, rec_kw, "record=RecordConfig"), (fit, fit_kw, "fit=FitConfig")):
        if given is not None and loose:
            raise ValueError(f"pass these options in {name}(...) or as keywords, not both: {sorted(loose)}")
    if extra:  # the pipeline's own call arguments (negative_prompt, ...) pass through to every pipeline call
        if pipe is None:
            raise ValueError(f"unknown option(s) {sorted(extra)}; see RecordConfig and FitConfig")
        extra = call_kwargs_for(pipe, extra)
        if record is not None:
            raise ValueError(f"pass pipeline call arguments {sorted(extra)} in record.call_kwargs when giving record=")
        both = sorted(set(extra) & set(rec_kw.get("call_kwargs", {})))
        if both:
            raise ValueError(f"{both} given both as keywords and in call_kwargs; pass each once")
        rec_kw["call_kwargs"] = dict(rec_kw.get("call_kwargs", {}), **extra)
    if stats is not None and record is None:
        rec_kw.setdefault("teacher_steps", stats.num_teacher_steps)
        fitted_g = stats.context.get("guidance_scale")
        if "guidance_scale" not in rec_kw and fitted_g is not None:
            rec_kw["guidance_scale"] = fitted_g  # re-fit at the guidance the statistics were recorded at
    record = record or RecordConfig(**rec_kw)
    fit = fit or FitConfig(**fit_kw)
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
    keeper = _LatentKeeper(limit if fit.refine else 0, needed)
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
    diffs = []
    for key, what in (("model", "model"), ("noise_schedule", "noise schedule"), ("teacher", "teacher"),
                      ("guidance_scale", "guidance scale"), ("latent_shape", "latent shape (image size)"),
                      ("call_kwargs_sha256", "pipeline call arguments")):
        a, b = fitted.get(key), actual.get(key)
        if a is not None and b is not None and a != b:
            diffs.append(f"{what}: {a!r} when recorded vs {b!r} now")
    if stats.prediction_type != teacher_prediction_type(teacher):
        diffs.append(f"prediction type: {stats.prediction_type!r} vs {teacher_prediction_type(teacher)!r}")
    if diffs:
        raise ValueError(
            "the re-fit runs the pipeline, which must be the one the statistics were recorded with, but "
            + "; ".join(diffs) + ". Pass the recorded settings (guidance_scale / height / width / teacher), re-search "
            "without the re-fit (refine=False, CLI --no-refine), or record again"
        )


def _search_on_rank0(stats: GramStats, n: int, fit: FitConfig, ctx: DistContext) -> OLSSSchedule:
    """``search_schedule`` on rank 0, its result (or its ValueError) on every rank."""
    if not ctx.enabled:
        return search_schedule(stats, n, path=fit.path, granularity=fit.granularity)
    result, error = None, None
    if ctx.is_main:
        try:
            result = search_schedule(stats, n, path=fit.path, granularity=fit.granularity)
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
    minimax = {n: search_schedule(stats, n, path="minimax", granularity=fit.granularity).indices
               for n in fit.num_steps}
    found = refit_path_search(
        stats.timesteps, x0, latents[:, pick], pipeline_denoiser(pipe, items, record, distributed=ctx),
        sorted(fit.num_steps), start=minimax, stride=fit.search_stride, sweeps=fit.search_sweeps,
        granularity=fit.granularity,
        progress=progress and ctx.is_main, agree=(lambda v: broadcast_object(v, ctx)) if ctx.enabled else None,
    )
    out = {}
    for n, res in found.items():
        schedule = search_schedule(stats, n, path=res.indices, granularity=fit.granularity)
        meta = dict(schedule.meta, refit_search={
            "samples": len(items), "error": res.error, "uniform_error": res.start_error,
            "proposal": res.proposal, "proposal_error": res.proposal_error, "paths_tried": res.paths_tried,
            "evaluations": res.evaluations, "programme_evaluations": res.meta.get("programme_evaluations", 0)})
        out[n] = dataclasses.replace(schedule, path="refit", meta=meta)
    return out


def _check_noise_schedules(base_config: dict[str, Any], stats: GramStats | None, teacher: Any) -> None:
    """``ValueError`` before any work when the teacher or the given statistics have another noise schedule than the
    scheduler config the result is built on."""
    from olss_fast.core import provenance

    want = provenance.noise_schedule_id(base_config)
    found = []
    if stats is not None and stats.context.get("noise_schedule") is not None:
        found.append(("the statistics", stats.context["noise_schedule"]))
    if teacher is not None:
        cfg = dict(provenance.config_dict(getattr(teacher, "config", None)), _class_name=type(teacher).__name__)
        found.append(("the teacher", provenance.noise_schedule_id(cfg)))
    for what, ns in found:
        if ns != want:
            raise ValueError(f"{what} use another noise schedule than the pipeline's scheduler config ({ns} vs "
                             f"{want}): the searched schedules would not fit the scheduler; record with a teacher on "
                             "the pipeline's own noise schedule")


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
