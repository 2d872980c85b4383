"""Where a schedule to run comes from: a schedule, an ``OLSSScheduler``, a scheduler folder or a schedule file."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from olss_fast.core import checks
from olss_fast.core.files import read_json
from olss_fast.core.schedule import MAX_SCHEDULE_BYTES, OLSSSchedule
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
