"""Choosing a path on held-out samples, and the guard against plain DDIM/Euler (docs/design.md, "Held-out choice and
guard"; beyond the paper).

The re-fit (:mod:`olss_fast.core.refine`) fits each candidate path's coefficients on the *fit part* of the re-fit
samples; every candidate is then run as the sampler that would ship (fixed coefficients, the model evaluated at the
student's own latents, exactly as ``OLSSScheduler.step`` computes them) on the *held-out part*, and judged by its
final-latent MSE against the teacher there. The candidate with the lowest held-out error is kept — unless the plain
first-order sampler of the same NFE on the uniform path (DDIM, or Euler for flow matching, written as OLSS
coefficients: ``step.ddim_step_factors``) is better on the same held-out samples, in which case that baseline is
returned instead. So the returned schedule is never worse than DDIM/Euler of the same NFE on the held-out part, and
the choice between paths is made on noise none of them was fitted on.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from olss_fast.core import checks
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import student_latent

logger = logging.getLogger(__name__)

Denoise = Callable[[torch.Tensor, Any], torch.Tensor]


def reuse_first_output(denoise: Denoise, noise: torch.Tensor, timestep: Any) -> Denoise:
    """``denoise`` that evaluates the model at ``(noise, timestep)`` once and returns that output again whenever it
    is asked for it again: every path starts at teacher index 0 with the initial noise, so step 0 of every candidate,
    every step count and the baseline is one and the same model evaluation."""
    first: list[torch.Tensor] = []

    def wrapped(z: torch.Tensor, t: Any) -> torch.Tensor:
        if t == timestep and z.shape == noise.shape and torch.equal(z.to(noise.dtype), noise):
            if not first:
                first.append(denoise(z, t))
            return first[0]
        return denoise(z, t)

    return wrapped


@torch.no_grad()
def run_student(coeffs: torch.Tensor, timesteps: list[Any], noise: torch.Tensor, denoise: Denoise) -> torch.Tensor:
    """The final latent of the n-step sampler with fixed ``coeffs`` from ``noise`` (OLSS Eq. 8 with the model's
    outputs at the student's own latents, computed as ``OLSSScheduler.step`` computes them), float32."""
    x0 = noise.to(torch.float32)
    c = coeffs.to(torch.float32)
    history: list[torch.Tensor] = []
    for j, t in enumerate(timesteps):
        z = student_latent(c, j, x0, history)
        e = denoise(z, t).detach().to(torch.float32)
        if e.shape != x0.shape:
            raise ValueError(f"the model output at student step {j} has shape {list(e.shape)}, expected "
                             f"{list(x0.shape)}")
        history.append(e)
    return student_latent(c, len(timesteps), x0, history)


def final_mse(coeffs: torch.Tensor, timesteps: list[Any], noise: torch.Tensor, target: torch.Tensor,
              denoise: Denoise) -> float:
    """Mean squared error of :func:`run_student`'s final latent against ``target`` (the teacher's final latents);
    ``inf`` when the student blew up (non-finite latents or model outputs)."""
    out = run_student(coeffs, timesteps, noise, denoise).to(torch.float64)
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - target.to(torch.float64)).pow(2).mean())


@dataclass(frozen=True)
class HeldoutChoice:
    """What :func:`choose_on_heldout` kept for one step count.

    Attributes:
        schedule: the returned schedule: the kept candidate re-fitted on the fit part, or the baseline.
        chosen: the name of the kept candidate, or ``"baseline"`` when the guard fell back.
        errors: held-out final MSE of every candidate (by name) and of ``"baseline"`` (without held-out samples:
            the re-fit's final error on the fit part, and no baseline).
        heldout_samples: how many samples judged them (0: none).
    """

    schedule: OLSSSchedule
    chosen: str
    errors: dict[str, float]
    heldout_samples: int

    @property
    def fell_back(self) -> bool:
        return self.chosen == "baseline"


def choose_on_heldout(
    candidates: Mapping[str, OLSSSchedule],
    baseline: OLSSSchedule | None,
    refit: Callable[[OLSSSchedule], OLSSSchedule],
    heldout: tuple[torch.Tensor, torch.Tensor, Denoise] | None,
    *,
    agree: Callable[[Any], Any] | None = None,
) -> HeldoutChoice:
    """Re-fit every candidate on the fit part, judge it on the held-out part, keep the best; guard with ``baseline``.

    Args:
        candidates: ``{name: schedule}`` of one step count (e.g. the programme's proposal, the min-max and the
            uniform path with the paper's fit on them); a path given under two names is re-fitted and judged once.
            Ties keep the first name.
        baseline: the plain first-order sampler of the same step count (DDIM/Euler coefficients on the uniform
            path): returned, unchanged, when no re-fitted candidate beats it on the held-out part.
        refit: the student-in-the-loop re-fit of a schedule on the fit part
            (e.g. ``lambda s: refine_schedule(s, denoise, noise, teacher_latents)``).
        heldout: ``(noise [B_h, ...], final teacher latents [B_h, ...], denoise)`` of the held-out part, or None:
            then the candidates are judged by the re-fit's own final error on the fit part and nothing is guarded.
        agree: maps each error to the one every process uses (rank 0's under torch.distributed).

    Raises:
        ValueError: no candidates, candidates of different step counts, a baseline without held-out samples.
    """
    if not candidates:
        raise ValueError("no candidate schedules to judge")
    counts = {s.num_steps for s in candidates.values()} | ({baseline.num_steps} if baseline is not None else set())
    if len(counts) != 1:
        raise ValueError(f"every candidate (and the baseline) must have the same number of steps, got "
                         f"{ {k: s.num_steps for k, s in candidates.items()} }")
    if (baseline is None) != (heldout is None):
        raise ValueError("the baseline guard needs held-out samples, and held-out samples need a baseline")
    n = counts.pop()
    agree = agree or (lambda v: v)
    errors: dict[str, float] = {}
    fitted: dict[str, OLSSSchedule] = {}
    seen: dict[tuple[int, ...], str] = {}
    for name, cand in candidates.items():
        key = tuple(cand.indices)
        if key in seen:
            errors[name] = errors[seen[key]]
            continue
        seen[key] = name
        fitted[name] = refit(cand)
        if heldout is None:
            errors[name] = float(agree(fitted[name].errors[-1]))
        else:
            noise, target, denoise = heldout
            errors[name] = float(agree(final_mse(fitted[name].coeffs, fitted[name].timesteps, noise, target,
                                                 denoise)))
    best = min(fitted, key=lambda k: errors[k])
    chosen, schedule = best, fitted[best]
    if baseline is not None and heldout is not None:
        noise, target, denoise = heldout
        errors["baseline"] = float(agree(final_mse(baseline.coeffs, baseline.timesteps, noise, target, denoise)))
        if errors[best] > errors["baseline"]:
            chosen, schedule = "baseline", baseline
            checks.warn_once(
                ("heldout-guard", n, tuple(fitted[best].indices), errors[best]),
                "the best re-fitted %d-step schedule (%s, path %s) has a held-out final MSE of %.4g, worse than "
                "plain %s of the same NFE (%.4g) on %d held-out samples: returning that plain sampler instead",
                n, best, fitted[best].indices, errors[best], baseline.path, errors["baseline"], target.shape[0],
                logger=logger,
            )
    heldout_samples = int(heldout[0].shape[0]) if heldout is not None else 0
    shown = {k: (v if math.isfinite(v) else None) for k, v in errors.items()}  # (JSON has no inf)
    meta = dict(schedule.meta, heldout={"errors": shown, "chosen": chosen, "heldout_samples": heldout_samples})
    schedule = dataclasses.replace(schedule, meta=meta)
    logger.info("%d steps: %s final MSE %s; kept %s", n, "held-out" if heldout is not None else "training",
                {k: f"{v:.4g}" for k, v in errors.items()}, chosen)
    return HeldoutChoice(schedule=schedule, chosen=chosen, errors=errors, heldout_samples=heldout_samples)
