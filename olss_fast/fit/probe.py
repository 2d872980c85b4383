"""Evaluating the model through the pipeline itself, one timestep at a time (the re-fit, the refit path search and
the OSS baselines use it), and the student-in-the-loop re-fit driven that way."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from olss_fast.core.refine import sequential_refit
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import student_latent
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.distributed import (LOCAL, DistContext, all_gather_object, broadcast_object, gather_by_sum,
                                       resolve_context)
from olss_fast.fit.recording import StopSampling, quiet_progress, run_pipeline, swapped_scheduler
from olss_fast.fit.work import WorkItem, item_noise
from olss_fast.pipelines.facts import latent_shape, pipeline_device, pipeline_dtype
from olss_fast.serve.scheduler import OLSSScheduler

class LatentKeeper:
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
        with swapped_scheduler(pipe, probe), quiet_progress(pipe):
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


def student_noise(pipe: Any, items: Sequence[WorkItem], record: RecordConfig) -> torch.Tensor:
    """The initial noise of ``items`` as the pipeline sees it (rounded to its dtype), in float32 like
    ``OLSSScheduler``'s x0: what the student starts from."""
    shape = latent_shape(pipe, record.height, record.width)
    return item_noise(items, shape, "cpu", torch.float32).to(pipeline_dtype(pipe)).to(torch.float32)


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
    denoise: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> OLSSSchedule:
    """Student-in-the-loop re-fit driving ``pipe`` itself (see module docstring).

    ``denoise`` replaces the :func:`pipeline_denoiser` of ``items`` (e.g. one that re-uses the step-0 output,
    :func:`olss_fast.core.heldout.reuse_first_output`); it must evaluate the same pipeline on the same items.

    Under torch.distributed (``distributed``, see :func:`olss_fast.fit.distributed.resolve_context`) the refinement
    batches (``items`` cut into ``record.batch_size`` batches, as a single process would) are evaluated by rank
    ``k % world_size``; the model outputs are all-gathered exactly, every rank runs the same float64 fit with rank 0's
    coefficients, and the result equals a single-process run's to float64 rounding. Collective: every rank must call
    it with the same arguments.
    """
    ctx = resolve_context(distributed)
    x0 = student_noise(pipe, items, record)
    T = schedule.teacher_steps
    targets = teacher_latents[list(schedule.indices[1:]) + [T]]
    denoise = denoise or pipeline_denoiser(pipe, items, record, distributed=ctx)

    def evaluate(j: int, coeffs: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        # the student's latent at step j, computed exactly as OLSSScheduler.step computes it at inference
        z = student_latent(coeffs, j, x0, history)
        return denoise(z, schedule.timesteps[j])

    def evaluate_with_rank0_coeffs(j: int, coeffs: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        return evaluate(j, broadcast_object(coeffs, ctx), history)

    refined = sequential_refit(schedule, x0, targets, evaluate_with_rank0_coeffs, granularity,
                               progress and ctx.is_main)
    return broadcast_object(refined, ctx)
