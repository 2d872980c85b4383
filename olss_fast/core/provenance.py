"""What a schedule was fitted for, compared with what it is used for: the comparison itself (pure, no diffusers).

An OLSS schedule is a least-squares fit to one teacher's trajectories on one model: its coefficients are only right
for that model's denoiser, that noise schedule and that output parametrisation, and they are tuned to the guidance
scale and latent size of the recording. The recording stores a ``fitted_for`` description in the statistics and
every schedule searched from them; :func:`compare` holds it against the description of where the schedule is used:

* a different **model** architecture (denoiser class or config), **noise schedule** (betas / flow shift) or
  **prediction type** is refused with a ``ValueError`` that lists every difference and names the explicit override
  (``allow_mismatch=("model", ...)``); other weights of the same architecture (a fine-tune, a fused LoRA) warn once;
* a different **guidance scale**, **latent shape** (image size) or flow **mu** (resolution shift) logs a one-time
  warning saying the schedule runs anyway, unchanged.

Both descriptions are built from pipelines in :mod:`olss_fast.pipelines.provenance`, whose ``check_schedule`` is the
one check every entry point calls. The identity helpers here read configs as plain mappings, so this module needs no
diffusers.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Mapping

from olss_fast.core.checks import warn_once

logger = logging.getLogger(__name__)

#: differences that make the coefficients wrong: refused unless named in ``allow_mismatch``
REFUSED = ("model", "noise_schedule", "prediction_type")
#: differences the coefficients were not tuned for: one warning, then used as they are
WARNED = ("guidance_scale", "latent_shape", "mu", "call_kwargs")


# ---------------------------------------------------------------------------------------------- identities
def config_dict(config: Any) -> dict[str, Any]:
    """A config object (diffusers ``FrozenDict``, a mapping, a dataclass, ``to_dict()``) as a plain dict."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(vars(config))


def is_flow(config: Mapping[str, Any], class_name: str = "") -> bool:
    """The one decision "is this scheduler config flow matching?": a ``FlowMatch*`` class (given, or the config's
    ``_class_name``, which configs read from files carry), ``prediction_type="flow"``, or flow keys (``shift``) without
    VP ones (``beta_schedule``, ``prediction_type``)."""
    name = class_name or str(config.get("_class_name", ""))
    if name.startswith("FlowMatch"):
        return True
    if "prediction_type" in config:
        return config.get("prediction_type") == "flow"
    return "shift" in config and "beta_schedule" not in config


def prediction_type_of(config: Mapping[str, Any], class_name: str = "") -> str:
    """The output parametrisation a scheduler config's model uses ("flow" for flow matching)."""
    if is_flow(config, class_name):
        return "flow"
    return str(config.get("prediction_type", "epsilon"))


def scheduler_prediction_type(scheduler: Any) -> str:
    """:func:`prediction_type_of` a scheduler object."""
    return prediction_type_of(config_dict(getattr(scheduler, "config", None)), type(scheduler).__name__)


def describe_scheduler(scheduler: Any, steps: int) -> str:
    """A short description of a (teacher) scheduler: class, steps and the config keys that matter."""
    cfg = config_dict(getattr(scheduler, "config", None))
    keys = ("timestep_spacing", "prediction_type", "beta_schedule", "algorithm_type", "solver_order", "shift")
    parts = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    return f"{type(scheduler).__name__}({steps} steps; {', '.join(parts)})"


# ---------------------------------------------------------------------------------------------- the comparison
def check_allow(allow: Iterable[str] | str) -> tuple[str, ...]:
    """Validate an ``allow_mismatch`` argument → a tuple of names from :data:`REFUSED`."""
    out = (allow,) if isinstance(allow, str) else tuple(allow)
    bad = [a for a in out if a not in REFUSED]
    if bad:
        raise ValueError(f"allow_mismatch takes names from {REFUSED}, got {bad}")
    return out


def check_timesteps(timesteps: Any, noise_schedule: Any, what: str) -> None:
    """``ValueError`` unless ``timesteps`` lie on the grid of ``noise_schedule`` (a noise-schedule description,
    :func:`olss_fast.pipelines.facts.noise_schedule_id`): integers in ``[0, N)`` for a VP schedule of N training
    timesteps (a model never saw 5000 on a 1000-step schedule, nor 500.5), numbers in ``[0, N]`` for flow matching
    (``σ·N``). Descriptions that do not say how many timesteps they have are not checked."""
    if not isinstance(noise_schedule, Mapping):
        return
    n, kind = noise_schedule.get("num_train_timesteps"), noise_schedule.get("kind")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return
    for t in timesteps:
        if kind == "vp" and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n):
            raise ValueError(f"{what} holds the timestep {str(t)[:30]}, which is not one of the VP noise schedule's "
                             f"integer timesteps 0 … {n - 1}")
        if kind == "flow" and not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= n):
            raise ValueError(f"{what} holds the timestep {str(t)[:30]}, outside the flow-matching schedule's "
                             f"[0, {n}]")


def same_value(key: str, a: Any, b: Any) -> bool:
    """Whether two ``fitted_for`` values of ``key`` describe the same setting (guidance and mu up to rounding)."""
    try:
        return _same(key, a, b)
    except (TypeError, ValueError):
        return False


def _same(key: str, a: Any, b: Any) -> bool:
    if key in ("guidance_scale", "mu"):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if key == "latent_shape":
        return [int(v) for v in a] == [int(v) for v in b]
    return a == b


def _describe(key: str, value: Any) -> str:
    if key == "model" and isinstance(value, dict):
        return f"{value.get('class')} (config {str(value.get('config_sha256'))[:12]}…, " \
               f"weights {str(value.get('weights_sha256'))[:12]}…)"
    if key == "noise_schedule" and isinstance(value, dict) and value.get("kind") == "vp":
        return f"VP, {value.get('num_train_timesteps')} steps, ᾱ {str(value.get('alphas_cumprod_sha256'))[:12]}…"
    return repr(value)


def compare(fitted: Mapping[str, Any], actual: Mapping[str, Any], *, allow: Iterable[str] = (),
            what: str = "the schedule", where: str = "here", refuse: Iterable[str] = REFUSED,
            warn: Iterable[str] = WARNED, fine_tune_warns: bool = True, hint: str | None = None,
            head: str | None = None, accepted: Mapping[str, Any] | None = None) -> None:
    """Compare a ``fitted_for`` description (plus ``prediction_type``) with ``actual``.

    Only keys present (not None) on both sides are compared. ``accepted`` maps a refused key to the one value it was
    explicitly accepted for (``fitted_for["accepted_mismatch"]``): that value, and no other, counts as allowed.
    Differences in ``refuse`` not named in ``allow`` raise
    one ``ValueError`` listing all of them (after ``head``, by default "``what`` was fitted for another setting than
    it is used ``where``", and ending in ``hint``, by default how to override); with
    ``fine_tune_warns`` a model of the same class and config with other weights only warns. Differences in ``warn``
    log once each.
    """
    allow = check_allow(allow)
    refused = []
    for key in refuse:
        a, b = fitted.get(key), actual.get(key)
        if a is None or b is None or key in allow or same_value(key, a, b):
            continue
        if accepted and key in accepted and same_value(key, accepted[key], b):
            continue
        if fine_tune_warns and key == "model" and isinstance(a, dict) and isinstance(b, dict) and all(
                a.get(k) == b.get(k) for k in ("class", "config_sha256")):
            # the same architecture with other weights: a fine-tune or a fused LoRA, most likely close enough
            warn_once(("weights", what, repr(a), repr(b)),
                      "%s was fitted on other weights of the same %s (a fine-tune or a fused LoRA?) than %s; it runs "
                      "unchanged (re-fit on these weights for the best quality)", what, a.get("class"), where,
                      logger=logger)
            continue
        refused.append(f"{key.replace('_', ' ')}: fitted for {_describe(key, a)}, used with {_describe(key, b)}")
    if refused:
        names = ", ".join(repr(k) for k in REFUSED)
        raise ValueError(
            (head or f"{what} was fitted for another setting than it is used {where}") + ": " + "; ".join(refused)
            + ". "
            + (hint or "Its coefficients are only right for what it was fitted on: search a schedule for this one, or "
               f"pass allow_mismatch=(...) with any of {names} (CLI: --allow-mismatch) to use it anyway")
        )
    for key in warn:
        a, b = fitted.get(key), actual.get(key)
        if a is None or b is None or same_value(key, a, b):
            continue
        warn_once(("mismatch", what, key, repr(a), repr(b)),
                  "%s was fitted at %s = %s but runs at %s = %s %s; it runs unchanged, tuned for %s (search a "
                  "schedule at this setting for the best quality)", what, key, a, key, b, where, a, logger=logger)
