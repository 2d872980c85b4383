"""Evaluating the model through the pipeline itself, one timestep per call (the re-fit, the refit path search and
the OSS baselines use it) or, for the re-fit programme's layers, per-row timesteps in one call; and the
student-in-the-loop re-fit driven that way."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from olss_fast.core.checks import warn_once
from olss_fast.core.dispatch import reference_forced
from olss_fast.core.refine import LayerDenoiser, sequential_refit
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import student_latent
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.distributed import (LOCAL, DistContext, all_gather_object, broadcast_object, gather_by_sum,
                                       resolve_context)
from olss_fast.fit.recording import StopSampling, quiet_progress, run_pipeline, swapped_scheduler
from olss_fast.fit.work import WorkItem, item_noise
from olss_fast.pipelines.facts import denoiser_of, latent_shape, pipeline_device, pipeline_dtype
from olss_fast.pipelines.registry import adapter_for
from olss_fast.serve.scheduler import OLSSScheduler

logger = logging.getLogger(__name__)


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
    probe = _Prober(pipe, items, record, distributed)

    def denoise(z: torch.Tensor, t: Any) -> torch.Tensor:
        if z.shape[0] != len(items):
            raise ValueError(f"denoise got {z.shape[0]} latents for {len(items)} work items")
        return probe.rows(z, [t] * z.shape[0])

    return denoise


def layer_denoiser(
    pipe: Any, items: Sequence[WorkItem], record: RecordConfig, *, distributed: bool | DistContext | None = None,
) -> LayerDenoiser | None:
    """The fast path of the re-fit programme's layers (:func:`olss_fast.core.refine.refit_programme`'s ``batched``):
    ``batched(zs, ts)`` evaluates several states (latents ``[len(items), ...]`` at one timestep each) in
    ``record.batch_size``-row pipeline calls whose rows may stand at different timesteps, so a layer of S states costs
    ``ceil(S · len(items) / batch_size)`` denoiser calls instead of ``S · ceil(len(items) / batch_size)``.

    The one dispatch point of this fast path. Returns None (the reference: one :func:`pipeline_denoiser` call per
    state) when ``OLSS_FAST_FORCE_REFERENCE=1`` or when ``pipe`` is not a registered family running its own
    ``__call__`` (a subclass's loop could use the timestep elsewhere, where per-row timesteps cannot reach). Each
    mixed call checks that the denoiser received exactly the timestep the family's adapter says
    (:meth:`~olss_fast.pipelines.base.PipelineAdapter.model_timestep`); where it did not, that call and every later
    one are evaluated one timestep at a time, with a one-time warning.
    """
    if reference_forced() or not _own_loop(pipe):
        return None
    probe = _Prober(pipe, items, record, distributed)

    def batched(zs: Sequence[torch.Tensor], ts: Sequence[Any]) -> list[torch.Tensor]:
        if len(zs) != len(ts) or any(z.shape[0] != len(items) for z in zs):
            raise ValueError(f"batched needs one timestep per state and {len(items)} latents per state")
        if not zs:
            return []
        out = probe.rows(torch.cat(list(zs)), [t for t in ts for _ in items])
        return list(out.split(len(items)))

    return batched


def _own_loop(pipe: Any) -> bool:
    """``pipe`` is of a registered family and runs exactly the family class's own ``__call__`` (diffusers' or this
    library's; not a subclass's, which might call a second model, a ControlNet say, with the timestep)."""
    adapter = adapter_for(pipe, required=False)
    call = type(pipe).__call__
    return (adapter is not None and getattr(call, "__qualname__", "") == f"{adapter.name}.__call__"
            and getattr(call, "__module__", "").startswith(("diffusers.", "olss_fast.")))


class _Prober:
    """Evaluates latent rows of ``items`` (row r is item ``r % len(items)``) through the pipeline, in
    ``record.batch_size``-row calls spread over the ranks: a call whose rows share a timestep runs the probe at it, one
    whose rows do not gives each row its own (see :func:`layer_denoiser`)."""

    def __init__(self, pipe: Any, items: Sequence[WorkItem], record: RecordConfig,
                 distributed: bool | DistContext | None) -> None:
        self.pipe, self.items, self.record = pipe, list(items), record
        self.ctx = resolve_context(distributed)
        self.device, self.dtype = pipeline_device(pipe), pipeline_dtype(pipe)
        self.kwargs = record.pipeline_kwargs()
        self.base = OLSSScheduler.from_config({k: v for k, v in dict(pipe.scheduler.config).items()
                                               if k != "schedules"})
        self.mixed_ok = True

    def rows(self, z: torch.Tensor, ts: Sequence[Any]) -> torch.Tensor:
        bs, n, ctx = self.record.batch_size, len(self.items), self.ctx
        outs = []
        for k, s in enumerate(range(0, z.shape[0], bs)):
            if k % ctx.world_size != ctx.rank:
                continue
            items = [self.items[r % n] for r in range(s, min(s + bs, z.shape[0]))]
            outs.append((s, self._call(items, z[s : s + bs], ts[s : s + bs])))
        if not ctx.enabled:
            return torch.cat([o for _, o in outs])
        full = torch.zeros(z.shape, dtype=torch.float32)
        for s, o in outs:
            full[s : s + o.shape[0]] = o
        return gather_by_sum(full, ctx)

    def _call(self, items: list[WorkItem], z: torch.Tensor, ts: Sequence[Any]) -> torch.Tensor:
        if len(set(ts)) > 1:
            if self.mixed_ok:
                try:
                    return self._probe(items, z, ts[0], ts)
                except _NoRowTimesteps as exc:
                    self.mixed_ok = False
                    warn_once(("row-timesteps", type(self.pipe).__name__), "the re-fit programme evaluates its "
                              "states one timestep at a time from now on: %s", exc, logger=logger)
            out = torch.empty(z.shape, dtype=torch.float32)
            for t in dict.fromkeys(ts):
                pos = [r for r, u in enumerate(ts) if u == t]
                out[pos] = self._probe([items[r] for r in pos], z[pos], t, None)
            return out
        return self._probe(items, z, ts[0], None)

    def _probe(self, items: list[WorkItem], z: torch.Tensor, t: Any, per_row: Sequence[Any] | None) -> torch.Tensor:
        probe = _SingleStepProbe(self.base, t)
        hook = None
        if per_row is not None:
            rows = _RowTimesteps(adapter_for(self.pipe), probe.timesteps[0], per_row)
            hook = denoiser_of(self.pipe).register_forward_pre_hook(rows, with_kwargs=True)
        try:
            with swapped_scheduler(self.pipe, probe), quiet_progress(self.pipe):
                try:
                    run_pipeline(self.pipe, items, z.to(self.device, self.dtype), 1, self.kwargs)
                except StopSampling:
                    pass
        finally:
            if hook is not None:
                hook.remove()
        if probe.output is None:
            raise ValueError(
                f"{type(self.pipe).__name__} never called scheduler.step: the re-fit (and OSS) evaluate the model "
                "through a pipeline whose loop iterates scheduler.timesteps and calls scheduler.step"
            )
        if per_row is not None and not rows.calls:
            raise _NoRowTimesteps(f"{type(self.pipe).__name__} did not call its denoiser module")
        return probe.output.to("cpu", torch.float32)


class _NoRowTimesteps(Exception):
    """The denoiser was not called as the family's adapter says: per-row timesteps cannot be given to it."""


class _RowTimesteps:
    """Forward pre-hook of the denoiser that gives each latent row its own timestep: the pipeline runs one probe
    timestep ``t`` and passes its denoiser ``adapter.model_timestep(t)``; the hook checks exactly that and replaces
    it by ``adapter.model_timestep`` of the rows' timesteps (the CFG copies of the batch alike)."""

    def __init__(self, adapter: Any, t: torch.Tensor, per_row: Sequence[Any]) -> None:
        self.adapter, self.t = adapter, t
        self.per_row = torch.tensor(list(per_row), dtype=t.dtype)
        self.calls = 0

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.calls += 1
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        keyword = "timestep" in kwargs
        tau = kwargs["timestep"] if keyword else (args[1] if len(args) > 1 else None)
        rows = len(self.per_row)
        if not isinstance(x, torch.Tensor) or not isinstance(tau, torch.Tensor) or x.shape[0] % rows:
            raise _NoRowTimesteps(f"its denoiser was called without a timestep tensor for a multiple of {rows} rows")
        expected = self.adapter.model_timestep(self.t.to(tau.device), x)
        if tau.dtype != expected.dtype or tau.dim() > 1 or not torch.equal(tau.expand_as(expected), expected):
            raise _NoRowTimesteps(f"its denoiser got timestep {tau.tolist()} where {expected.tolist()} was expected")
        given = self.adapter.model_timestep(self.per_row.to(tau.device).repeat(x.shape[0] // rows), x)
        if keyword:
            return args, dict(kwargs, timestep=given)
        return (args[0], given, *args[2:]), kwargs


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
    :func:`olss_fast.core.heldout.reuse_outputs`); it must evaluate the same pipeline on the same items.

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
