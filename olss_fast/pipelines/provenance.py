"""Provenance of pipelines: what a recording was made for, what a schedule is used for, and the one check between
the two that every entry point calls (the scheduler in a pipeline, the runner, the export, the fit from saved
statistics). The comparison rules are :func:`olss_fast.core.provenance.compare`'s.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterable, Mapping, Optional

from olss_fast.core.checks import warn_once
from olss_fast.core.files import digest
from olss_fast.core.fingerprint import model_id
from olss_fast.core.provenance import check_allow, check_timesteps, compare, config_dict, prediction_type_of
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.pipelines.base import PipelineAdapter
from olss_fast.pipelines.facts import NEGATIVE_PROMPTS, call_parameters, denoiser_of, noise_schedule_id

logger = logging.getLogger(__name__)


def recording_context(*, pipe: Any, teacher: Any, teacher_steps: int, guidance_scale: Optional[float],
                      latent_shape: Iterable[int], prompts: Any, call_kwargs: Mapping[str, Any],
                      mu: Optional[float] = None) -> dict[str, Any]:
    """The ``fitted_for`` description of a recording (stored in ``GramStats.context`` and every schedule)."""
    denoiser = denoiser_of(pipe)
    cfg = config_dict(getattr(teacher, "config", None))
    out: dict[str, Any] = {
        "model": model_id(denoiser) if denoiser is not None else None,
        "noise_schedule": noise_schedule_id(cfg, type(teacher).__name__),
        "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        "latent_shape": [int(v) for v in latent_shape],
        "teacher": {"class": type(teacher).__name__, "steps": int(teacher_steps),
                    "config_sha256": digest({k: v for k, v in cfg.items() if not str(k).startswith("_")})},
        "prompts_sha256": digest(_jsonable(prompts)),
        "call_kwargs_sha256": digest(_jsonable(dict(call_kwargs))),
        # the recorded call arguments themselves (negative prompts: the empty one when none was given), compared
        # where the schedule is used
        "call_kwargs": dict({k: "" for k in call_parameters(pipe) if k in NEGATIVE_PROMPTS},
                            **{k: v for k, v in _jsonable(dict(call_kwargs)).items() if isinstance(v, (str, int, float))}),
    }
    if mu is not None:
        out["mu"] = float(mu)
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=repr))


def call_usage(schedule: OLSSSchedule, args: Mapping[str, Any]) -> dict[str, Any]:
    """The call arguments the schedule was recorded with (``fitted_for["call_kwargs"]``: negative prompts, ...) as
    this call passes them (a list of one repeated value counts as that value; a missing negative prompt is the empty
    one, as the pipelines use it)."""
    out = {}
    for key in schedule.fitted_for.get("call_kwargs", {}):
        value = args.get(key)
        if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
            value = value[0]
        out[key] = "" if value is None and key.startswith("negative_prompt") else value
    return {"call_kwargs": out}


def scheduler_usage(scheduler: Any) -> dict[str, Any]:
    """What a schedule is used with when it runs under ``scheduler`` (its config): prediction type, noise schedule."""
    cfg = config_dict(getattr(scheduler, "config", scheduler))
    if not cfg:
        return {}
    name = type(scheduler).__name__ if hasattr(scheduler, "config") else ""
    return {"prediction_type": prediction_type_of(cfg, name), "noise_schedule": noise_schedule_id(cfg, name)}


def usage(adapter: PipelineAdapter, *, guidance: float, height: int, width: int,
          call_args: Optional[Mapping[str, Any]] = None, guided: Optional[bool] = None,
          model: bool = True) -> dict[str, Any]:
    """What a schedule is used with on ``adapter``'s pipeline at this guidance and size (``guided``: whether the call
    runs classifier-free guidance, default as the adapter decides for ``call_args``; ``model``: also the denoiser's
    identity, which costs a pass over its weights)."""
    args = dict(call_args or {})
    if guided is None:
        guided = adapter.is_guided(dict(args, negative_prompt=args.get("negative_prompt", "")), guidance)
    actual = dict(scheduler_usage(getattr(adapter.pipe, "scheduler", None)),
                  guidance_scale=adapter.fitted_guidance(args, guidance, guided),
                  latent_shape=list(adapter.latent_shape(1, height, width)[1:]),
                  mu=adapter.flow_mu(height, width))
    if model:
        actual["model"] = model_id(adapter.denoiser)
    return actual


def check_schedule(schedule: OLSSSchedule, actual: Mapping[str, Any], *, allow: Iterable[str] = (),
                   where: str = "here", what: Optional[str] = None) -> None:
    """The one provenance check: ``schedule`` (its ``fitted_for`` and prediction type) against ``actual`` (from
    :func:`usage` or :func:`scheduler_usage`, or a part of it). A mismatch the schedule's file accepted explicitly
    (``fitted_for["accepted_mismatch"]``, written by ``OLSSScheduler.from_schedules(..., allow_mismatch=...)``)
    counts as allowed for exactly the setting it accepted. The timesteps must lie on the noise schedule used.
    ``ValueError`` on a refused difference; one warning per warned one, and one per schedule (by content) whose file
    does not record what ``actual`` could be checked against."""
    what = what or f"the {schedule.num_steps}-step schedule"
    check_timesteps(schedule.timesteps, actual.get("noise_schedule"), f"{what} (used {where})")
    fitted = schedule.fitted_for
    unknown = [k for k in ("noise_schedule", "model") if fitted.get(k) is None and actual.get(k) is not None
               and not (k == "model" and schedule.path == "ddim")]
    if unknown:
        key = hashlib.sha256(schedule.coeffs.numpy().tobytes() + repr(schedule.timesteps).encode()).hexdigest()
        warn_once(("no-provenance", key, tuple(unknown), where),
                  "%s records no %s it was fitted for (written by an older olss_fast, by hand, or edited): it cannot "
                  "be checked %s and runs unchecked", what, " and no ".join(k.replace("_", " ") for k in unknown),
                  where, logger=logger)
    compare(dict(fitted, prediction_type=schedule.prediction_type), actual, allow=check_allow(allow), what=what,
            where=where, accepted=fitted.get("accepted_mismatch"))


#: what a re-fit on given statistics shares with their recording (it runs the pipeline again on the same samples)
REFIT_SAME = ("model", "noise_schedule", "teacher", "guidance_scale", "latent_shape", "call_kwargs_sha256",
              "prediction_type")


def check_statistics(context: Mapping[str, Any], prediction_type: str, actual: Mapping[str, Any], *,
                     refuse: Iterable[str] = REFIT_SAME, head: str, hint: str) -> None:
    """A recording (its ``context`` and prediction type) against ``actual`` (a :func:`recording_context` or a part
    of it): every difference in ``refuse`` is a ``ValueError`` starting with ``head`` (the same comparison as
    :func:`check_schedule`, strict: a fine-tune is another model here)."""
    compare(dict(context, prediction_type=prediction_type), actual, refuse=refuse, warn=(), fine_tune_warns=False,
            what="the recording", head=head, hint=hint)
