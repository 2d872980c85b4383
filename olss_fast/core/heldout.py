"""Choosing a path on held-out samples, and the guard against plain DDIM/Euler (docs/design.md, "Held-out choice and
guard"; beyond the paper).

The re-fit (:mod:`olss_fast.core.refine`) fits each candidate path's coefficients on the *fit part* of the re-fit
samples; every candidate is then run as the sampler that would ship (fixed coefficients, the model evaluated at the
student's own latents, exactly as ``OLSSScheduler.step`` computes them) on the *held-out part* and judged by its
final-latent MSE against the teacher there. Candidates whose coefficients amplify far more than the plain sampler's
are refused unrun; candidates worse than the plain first-order sampler of the same NFE on the uniform path (DDIM, or
Euler for flow matching, written as OLSS coefficients: ``step.ddim_step_factors``) on the held-out part are refused;
of the rest the lowest pooled error wins, and if none is left the plain sampler itself is returned. So the returned
schedule is never worse than DDIM/Euler of the same NFE on the held-out part.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from olss_fast.core import checks
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import student_latent

logger = logging.getLogger(__name__)

Denoise = Callable[[torch.Tensor, Any], torch.Tensor]


#: at most this many bytes of model outputs are kept by :func:`reuse_outputs` (the least recently used go first)
REUSE_BYTES = 2 * 2**30


def reuse_outputs(denoise: Denoise, max_bytes: int = REUSE_BYTES) -> Denoise:
    """``denoise`` that evaluates the model once per distinct (latents, timestep) and returns the kept output when
    asked again (up to ``max_bytes`` of outputs, least recently used dropped first).

    The re-fit of step j depends only on the path up to it (its timesteps, and the teacher indices its rows were
    fitted to), so candidate paths that share their first steps have bit-identical student latents there, on the fit
    part and, with those rows, on the held-out part: step 0 (the initial noise at the first teacher timestep) of
    every path, every step count and the baseline, and the longer prefixes the min-max path and the programme's
    proposals for several step counts often share. Latents are told apart by a BLAKE2b-256 digest of their bytes,
    with their shape and dtype.
    """
    kept: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
    size = 0

    def wrapped(z: torch.Tensor, t: Any) -> torch.Tensor:
        nonlocal size
        data = z.detach().to("cpu").contiguous()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=32).digest()
        key = (t.item() if isinstance(t, torch.Tensor) else t, str(z.dtype), tuple(z.shape), digest)
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
        out = denoise(z, t)
        nbytes = out.numel() * out.element_size()
        if nbytes <= max_bytes:
            kept[key] = out
            size += nbytes
            while size > max_bytes:
                _, old = kept.popitem(last=False)
                size -= old.numel() * old.element_size()
        return out

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


#: the most a re-fitted candidate's coefficients may amplify, relative to the baseline's (:func:`amplification`).
#: Normal re-fits stay within 1.5x of DDIM on the Gaussian mixture and below DDIM on digits; the mixture's uniform
#: 8-step re-fit of training seed 0 reached 13x (coefficients of +160 and -166 on two nearly collinear model outputs)
#: and gave RMSE 105 on 3 of 500 held-out noises that none of the 64 held-out re-fit samples resembled
#: (benchmarks/RESULTS.md, "Cheaper default search").
AMPLIFICATION_LIMIT = 3.0


def amplification(coeffs: torch.Tensor) -> float:
    """The largest row sum of absolute coefficients (over channels too): how much the sampler can amplify a
    deviation of the noise or of the model outputs it combines. A fitted row that reaches its target by cancelling
    large terms holds only where those terms cancel, i.e. on noise like the one it was fitted on."""
    return float(coeffs.to(torch.float64).abs().sum(-1).max())


@dataclass(frozen=True)
class HeldoutChoice:
    """What :func:`choose_on_heldout` kept for one step count.

    Attributes:
        schedule: the returned schedule: the kept candidate re-fitted on the fit part, or the baseline.
        chosen: the name of the kept candidate, or ``"baseline"`` when the guard fell back.
        errors: held-out final MSE of every candidate (by name) and of ``"baseline"`` (without held-out samples:
            the re-fit's final error on the fit part, and no baseline); ``inf`` for a candidate refused for its
            amplification (not run on the held-out part).
        pooled: the error that chose between the candidates that beat the baseline (see :func:`choose_on_heldout`).
        amplification: each candidate's :func:`amplification` relative to the baseline's.
        heldout_samples: how many samples judged them (0: none).
    """

    schedule: OLSSSchedule
    chosen: str
    errors: dict[str, float]
    pooled: dict[str, float]
    amplification: dict[str, float]
    heldout_samples: int

    @property
    def fell_back(self) -> bool:
        return self.chosen == "baseline"


def choose_on_heldout(
    candidates: Mapping[str, OLSSSchedule],
    baseline: OLSSSchedule,
    refit: Callable[[OLSSSchedule], OLSSSchedule],
    heldout: tuple[torch.Tensor, torch.Tensor, Denoise] | None,
    *,
    fit_samples: int = 0,
    agree: Callable[[Any], Any] | None = None,
) -> HeldoutChoice:
    """Re-fit every candidate on the fit part, judge it, keep the best that beats ``baseline`` on the held-out part.

    A re-fitted candidate whose :func:`amplification` exceeds :data:`AMPLIFICATION_LIMIT` times the baseline's is
    refused without being run. Every other one runs on the held-out part; the guard refuses those whose held-out
    final MSE is above the baseline's there. Of the rest, the lowest *pooled* final MSE wins: the held-out MSE and
    the re-fit's own final MSE on the ``fit_samples`` fit samples, weighted by their sample counts (the held-out part
    alone is small, and the error of few-step samplers is dominated by rare samples: on the Gaussian mixture the
    pooled error chose better paths for held-out noise than the held-out part alone, benchmarks/RESULTS.md, "Cheaper default search").
    When no candidate is left, the baseline is returned (with a one-time warning).

    Args:
        candidates: ``{name: schedule}`` of one step count (e.g. the programme's proposal, the min-max and the
            uniform path with the paper's fit on them); a path given under two names is re-fitted and judged once.
            Ties keep the first name.
        baseline: the plain first-order sampler of the same step count (DDIM/Euler coefficients on the uniform
            path): returned, unchanged, when no re-fitted candidate beats it on the held-out part.
        refit: the student-in-the-loop re-fit of a schedule on the fit part
            (e.g. ``lambda s: refine_schedule(s, denoise, noise, teacher_latents)``).
        heldout: ``(noise [B_h, ...], final teacher latents [B_h, ...], denoise)`` of the held-out part, or None:
            then the candidates are judged by the re-fit's own final error and the baseline is returned only when
            every candidate is refused for its amplification.
        fit_samples: the number of fit samples (the weight of the re-fit's own error in the pooled error).
        agree: maps each error to the one every process uses (rank 0's under torch.distributed).

    Raises:
        ValueError: no candidates, candidates of another step count than the baseline.
    """
    if not candidates:
        raise ValueError("no candidate schedules to judge")
    n = baseline.num_steps
    if any(s.num_steps != n for s in candidates.values()):
        raise ValueError(f"every candidate must have the baseline's {n} steps, got "
                         f"{ {k: s.num_steps for k, s in candidates.items()} }")
    fit_samples = checks.integer(fit_samples, "fit_samples", 0)
    agree = agree or (lambda v: v)
    held = 0
    if heldout is not None:
        noise, target, denoise = heldout
        held = int(noise.shape[0])
    base_gain = amplification(baseline.coeffs)
    errors: dict[str, float] = {}  # held-out final MSE (inf: refused for its amplification)
    pooled: dict[str, float] = {}  # what decides between the candidates that pass
    gains: dict[str, float] = {}
    fitted: dict[str, OLSSSchedule] = {}
    seen: dict[tuple[tuple[Any, ...], tuple[Any, ...]], str] = {}

    def path_key(cand: OLSSSchedule) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The same path evaluated at the same timesteps is the same candidate."""
        return tuple(cand.indices), tuple(cand.timesteps)

    for name, cand in candidates.items():
        if path_key(cand) in seen:
            continue
        seen[path_key(cand)] = name
        fitted[name] = refit(cand)
        gains[name] = amplification(fitted[name].coeffs) / base_gain
        own = float(agree(fitted[name].errors[-1]))
        if gains[name] > AMPLIFICATION_LIMIT:
            errors[name] = pooled[name] = math.inf
        elif heldout is None:
            errors[name] = pooled[name] = own
        else:
            errors[name] = float(agree(final_mse(fitted[name].coeffs, fitted[name].timesteps, noise, target,
                                                 denoise)))
            pooled[name] = (errors[name] * held + own * fit_samples) / max(held + fit_samples, 1)
    if heldout is not None:
        errors["baseline"] = float(agree(final_mse(baseline.coeffs, baseline.timesteps, noise, target, denoise)))
    passing = [k for k in fitted if math.isfinite(errors[k]) and errors[k] <= errors.get("baseline", math.inf)]
    if passing:
        chosen = min(passing, key=lambda k: pooled[k])
        schedule = fitted[chosen]
    else:
        best = min(fitted, key=lambda k: errors[k])
        chosen, schedule = "baseline", baseline
        checks.warn_once(
            ("heldout-guard", n, tuple(fitted[best].indices), errors[best]),
            "no re-fitted %d-step schedule beats plain %s of the same NFE (best: %s, path %s, held-out final MSE "
            "%.4g against %.4g on %d held-out samples; amplification %.3g x the plain sampler's, limit %g): "
            "returning the plain sampler instead",
            n, baseline.path, best, fitted[best].indices, errors[best], errors.get("baseline", math.nan), held,
            gains[best], AMPLIFICATION_LIMIT, logger=logger,
        )
    for name, cand in candidates.items():  # a path given twice has the results of its first name
        first = seen[path_key(cand)]
        errors.setdefault(name, errors[first])
        gains.setdefault(name, gains[first])
        pooled.setdefault(name, pooled[first])

    def shown(values: dict[str, float]) -> dict[str, float | None]:
        return {k: (v if math.isfinite(v) else None) for k, v in values.items()}  # (JSON has no inf)

    meta = dict(schedule.meta, heldout={"errors": shown(errors), "pooled": shown(pooled), "chosen": chosen,
                                        "heldout_samples": held, "fit_samples": fit_samples,
                                        "amplification": dict(gains)})
    schedule = dataclasses.replace(schedule, meta=meta)
    logger.info("%d steps: held-out final MSE %s, pooled %s, amplification %s; kept %s", n,
                {k: f"{v:.4g}" for k, v in errors.items()}, {k: f"{v:.4g}" for k, v in pooled.items()},
                {k: f"{v:.3g}" for k, v in gains.items()}, chosen)
    return HeldoutChoice(schedule=schedule, chosen=chosen, errors=errors, pooled=pooled, amplification=gains,
                         heldout_samples=held)
