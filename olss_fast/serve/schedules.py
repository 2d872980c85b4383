"""Where a schedule to run comes from (a schedule, an ``OLSSScheduler``, a scheduler folder or a schedule file), and
the checked way to put schedules into a pipeline (:func:`use_olss_scheduler`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from olss_fast.core import checks
from olss_fast.core.files import read_json
from olss_fast.core.fingerprint import model_id
from olss_fast.core.provenance import check_allow
from olss_fast.core.schedule import MAX_SCHEDULE_BYTES, OLSSSchedule
from olss_fast.pipelines.facts import default_guidance, denoiser_of
from olss_fast.pipelines.provenance import check_schedule, scheduler_usage, usage
from olss_fast.pipelines.registry import adapter_for
from olss_fast.serve.scheduler import OLSSScheduler
from olss_fast.serve.scheduler_config import MAX_CONFIG_BYTES

logger = logging.getLogger(__name__)


def load_schedule_source(path: str | os.PathLike) -> "OLSSSchedule | OLSSScheduler":
    """An ``OLSSScheduler`` (a ``save_pretrained`` folder or its ``scheduler_config.json``) or an ``OLSSSchedule``
    (a schedule JSON) from ``path``; ``ValueError`` when it is missing, unreadable, modified or something else."""
    p = Path(path)
    if p.is_dir():
        if not (p / OLSSScheduler.config_name).is_file():
            raise ValueError(f"{p} is not an OLSSScheduler folder (no {OLSSScheduler.config_name})")
        return OLSSScheduler.from_pretrained(p)
    data = read_json(p, max(MAX_CONFIG_BYTES, MAX_SCHEDULE_BYTES), "schedule file")
    if isinstance(data, dict) and "schedules" in data and "timesteps" not in data:
        return OLSSScheduler.from_config_data(data, str(p))
    try:
        return OLSSSchedule.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"schedule file {p}: {exc}") from None


# ==================================================================================================== schedules
def resolve_schedule(schedule: Any, num_inference_steps: Optional[int], pipe: Any) -> OLSSSchedule:
    """The :class:`OLSSSchedule` to compile, from a schedule, an ``OLSSScheduler`` (or anything with a ``schedules``
    mapping), a scheduler folder / schedule JSON path, or ``None`` (``pipe.scheduler``).

    A scheduler holding one schedule needs no ``num_inference_steps``; with several it must name one (the choice
    never depends on what the pipeline ran last). A scheduler without searched schedules gives DDIM's coefficients.
    """
    n = checks.optional(checks.integer, num_inference_steps, "num_inference_steps", 1)
    if schedule is None:
        schedule = getattr(pipe, "scheduler", None)
        if not hasattr(schedule, "schedules"):
            raise ValueError(
                "pass a schedule: an OLSSSchedule, an OLSSScheduler, or the path of a scheduler folder / schedule "
                f"JSON (or set pipe.scheduler to an OLSSScheduler); pipe.scheduler is a {type(schedule).__name__}"
            )
    if isinstance(schedule, (str, os.PathLike)):
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


def use_olss_scheduler(pipe: Any, source: Any = None, *, allow_mismatch: Iterable[str] = (),
                       guidance_scale: Optional[float] = None, height: Optional[int] = None,
                       width: Optional[int] = None) -> OLSSScheduler:
    """The checked way to put searched schedules into a pipeline: check every schedule against ``pipe``, then set
    ``pipe.scheduler``; returns the scheduler.

    ``source`` is an ``OLSSScheduler``, a scheduler folder / config file, a schedule JSON, an ``OLSSSchedule`` or a
    list of them (built on the pipeline's current scheduler config), or ``None`` (``pipe.scheduler``). Each schedule
    is checked with :func:`olss_fast.pipelines.provenance.check_schedule` against what the plain swap
    (``pipe.scheduler = ...``) cannot see: the denoiser's weights and architecture, the prediction type and noise
    schedule of the pipeline's current scheduler (the one being replaced), the guidance scale and image size (the
    pipeline's defaults unless given). Another model, noise schedule or prediction type raises ``ValueError``
    (``allow_mismatch`` names accepted ones); another guidance scale or size warns once.
    """
    allow = check_allow(allow_mismatch)
    if source is None:
        source = pipe.scheduler
    if isinstance(source, (str, os.PathLike)):
        source = load_schedule_source(source)
    if isinstance(source, OLSSSchedule) or (isinstance(source, (list, tuple)) and source):
        source = OLSSScheduler.from_schedules(source, config=dict(pipe.scheduler.config), allow_mismatch=allow)
    if not isinstance(source, OLSSScheduler):
        raise ValueError(f"use_olss_scheduler takes an OLSSScheduler, a scheduler folder, a schedule file or "
                         f"OLSSSchedule(s), got {type(source).__name__}")
    adapter = adapter_for(pipe, required=False)
    if adapter is not None:
        dh, dw = adapter.default_size()
        g = guidance_scale if guidance_scale is not None else default_guidance(pipe, adapter.cfg_argument)
        actual = usage(adapter, guidance=checks.real(g, "guidance_scale"),
                       height=checks.optional(checks.integer, height, "height", 1) or dh,
                       width=checks.optional(checks.integer, width, "width", 1) or dw)
    else:  # a pipeline of no registered family: what its scheduler and denoiser tell
        denoiser = denoiser_of(pipe)
        actual = dict(scheduler_usage(pipe.scheduler), **({"model": model_id(denoiser)} if denoiser else {}))
    for schedule in source.schedules.values():
        check_schedule(schedule, actual, allow=allow, where=f"on this {type(pipe).__name__}")
    source.checked_for = type(pipe).__name__
    pipe.scheduler = source
    return source
