"""One call from a diffusers pipeline to an `OLSSScheduler`: record the teacher, search, refine.

The refinement drives the pipeline itself (its text encoder, guidance and UNet calls) with a partially fitted
``OLSSScheduler``: pass j runs the student's first j steps and stops the pipeline right after the model output of step
j was computed. That works for any pipeline whose loop calls ``scheduler.step``, at ``n(n+1)/2`` model evaluations per
refinement sample for an n-step schedule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .recording import (
    RecordConfig, RecordingScheduler, StopSampling, WorkItem, _quiet_progress, item_noise, latent_shape,
    make_work_items, pipeline_device, pipeline_dtype, record_trajectories, run_pipeline, swapped_scheduler,
)
from .refine import sequential_refit
from .schedule import OLSSSchedule
from .scheduler import OLSSScheduler
from .search import DEFAULT_PATH, search_schedule, uniform_path
from .stats import GramStats

logger = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Options of :func:`fit_olss_scheduler` beyond recording.

    Attributes:
        num_steps: student step counts to search (one schedule each).
        path: "uniform" (default, best held-out quality) or "minimax" (the paper's).
        granularity: "global" or "channel".
        refine: run the student-in-the-loop re-fit after the search (recommended).
        refine_samples: how many of the recorded samples the re-fit uses (default: all, up to 64).
    """

    num_steps: Sequence[int] = (5, 10)
    path: str = DEFAULT_PATH
    granularity: str = "global"
    refine: bool = True
    refine_samples: int | None = None

    def __post_init__(self) -> None:
        steps = list(self.num_steps)
        if not steps or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in steps):
            raise ValueError(f"num_steps must be positive integers, got {self.num_steps!r}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"num_steps has duplicates: {steps}")
        if self.refine_samples is not None and self.refine_samples < 1:
            raise ValueError("refine_samples must be >= 1")


@dataclass
class FitResult:
    """What :func:`fit_olss_scheduler` produced."""

    scheduler: OLSSScheduler
    stats: GramStats
    schedules: dict[int, OLSSSchedule]
    paper_schedules: dict[int, OLSSSchedule] = field(default_factory=dict)


class _LatentKeeper:
    """Keeps the teacher latents of the first ``limit`` work items at the teacher indices the re-fit needs."""

    def __init__(self, limit: int, indices: Sequence[int] | None) -> None:
        self.limit = limit
        self.indices = sorted(set(indices)) if indices is not None else None
        self.items: list[WorkItem] = []
        self.latents: list[torch.Tensor] = []  # per batch [K, b, ...] on CPU

    def __call__(self, items: list[WorkItem], x_path: torch.Tensor, e_path: torch.Tensor) -> None:
        room = self.limit - len(self.items)
        if room <= 0:
            return
        take = items[:room]
        x = x_path[:, : len(take)]
        if self.indices is not None:
            x = x[self.indices]
        self.items.extend(take)
        self.latents.append(x.detach().to("cpu", torch.float32))

    def teacher_latents(self, T: int) -> torch.Tensor:
        """``[T+1, B, ...]`` with only the kept indices filled (others NaN, never read)."""
        x = torch.cat(self.latents, dim=1)
        if self.indices is None:
            return x
        full = torch.full((T + 1, *x.shape[1:]), float("nan"))
        full[self.indices] = x
        return full


def refine_through_pipeline(
    pipe: Any,
    schedule: OLSSSchedule,
    items: Sequence[WorkItem],
    teacher_latents: torch.Tensor,
    record: RecordConfig,
    granularity: str | None = None,
    progress: bool = True,
) -> OLSSSchedule:
    """Student-in-the-loop re-fit driving ``pipe`` itself (see module docstring)."""
    n = schedule.num_steps
    shape = latent_shape(pipe, record.height, record.width)
    device, dtype = pipeline_device(pipe), pipeline_dtype(pipe)
    x0 = item_noise(items, shape, "cpu", torch.float32)
    T = schedule.teacher_steps
    targets = teacher_latents[list(schedule.indices[1:]) + [T]]
    kwargs = record.pipeline_kwargs()
    bs = record.batch_size
    base_config = dict(pipe.scheduler.config)

    def evaluate(j: int, coeffs: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        partial = OLSSSchedule(
            timesteps=schedule.timesteps, indices=schedule.indices, coeffs=coeffs.to(torch.float64),
            teacher_steps=T, prediction_type=schedule.prediction_type, path=schedule.path,
        )
        student = OLSSScheduler.from_schedules([partial], config=base_config)
        recorder = RecordingScheduler(student, stop_after=j)
        outs = []
        with swapped_scheduler(pipe, recorder), _quiet_progress(pipe):
            for s in range(0, len(items), bs):
                batch = list(items[s : s + bs])
                recorder.clear()
                try:
                    run_pipeline(pipe, batch, x0[s : s + bs].to(device, dtype), n, kwargs)
                except StopSampling:
                    pass
                if len(recorder.outputs) != j + 1:
                    raise ValueError(
                        f"the pipeline made {len(recorder.outputs)} scheduler steps, expected {j + 1}: it must call "
                        "scheduler.step once per timestep"
                    )
                outs.append(recorder.outputs[j].to("cpu", torch.float32))
        return torch.cat(outs)

    return sequential_refit(schedule, x0, targets, evaluate, granularity, progress)


def fit_olss_scheduler(
    pipe: Any,
    prompts: Sequence[Any],
    *,
    teacher: Any | None = None,
    record: RecordConfig | None = None,
    fit: FitConfig | None = None,
    stats: GramStats | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> FitResult:
    """Record a teacher through ``pipe``, search OLSS schedules for several step counts, refine them.

    Keyword arguments not given as configs are split between :class:`RecordConfig` (``teacher_steps``,
    ``batch_size``, ``seeds_per_prompt``, ``base_seed``, ``guidance_scale``, ``height``, ``width``,
    ``call_kwargs``) and :class:`FitConfig` (``num_steps``, ``path``, ``granularity``, ``refine``,
    ``refine_samples``). Pass ``stats`` to skip recording (re-search a finished recording); refinement then needs a
    new, short teacher run on the refinement samples.
    """
    rec_keys = set(RecordConfig.__dataclass_fields__)
    fit_keys = set(FitConfig.__dataclass_fields__)
    unknown = set(kwargs) - rec_keys - fit_keys
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; see RecordConfig and FitConfig")
    record = record or RecordConfig(**{k: v for k, v in kwargs.items() if k in rec_keys})
    fit = fit or FitConfig(**{k: v for k, v in kwargs.items() if k in fit_keys})
    items = make_work_items(prompts, record.seeds_per_prompt, record.base_seed)
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
                                    on_batch=keeper, progress=progress)
    elif fit.refine:
        # statistics given: re-run the teacher on the refinement samples only, to get their latents
        record_trajectories(pipe, prompts, teacher=teacher, config=record, items=items[:limit],
                            on_batch=keeper, progress=progress)
    paper: dict[int, OLSSSchedule] = {}
    final: dict[int, OLSSSchedule] = {}
    for n in tqdm(sorted(fit.num_steps), desc="searching schedules", disable=not progress):
        sched = search_schedule(stats, n, path=fit.path, granularity=fit.granularity)
        paper[n] = sched
        if fit.refine:
            latents = keeper.teacher_latents(stats.num_teacher_steps)
            sched = refine_through_pipeline(pipe, sched, keeper.items, latents, record, fit.granularity, progress)
        final[n] = sched
    scheduler = OLSSScheduler.from_schedules(list(final.values()), config=dict(pipe.scheduler.config))
    return FitResult(scheduler=scheduler, stats=stats, schedules=final, paper_schedules=paper)
