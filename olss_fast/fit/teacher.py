"""The teacher: which schedulers can be recorded, and the default one."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from olss_fast.core.provenance import scheduler_prediction_type
from olss_fast.core.step import ddim_coefficients, ddim_step_factors, unroll_linear_steps

#: teachers whose step runs in the VP (or flow-matching) sample space with one model evaluation per timestep
SUPPORTED_TEACHERS = (
    "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler", "OLSSScheduler",
)


def check_teacher(scheduler: Any) -> None:
    """``ValueError`` unless the teacher works in the VP/flow sample space with one evaluation per timestep."""
    name = type(scheduler).__name__
    if getattr(scheduler, "order", 1) != 1 and name not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"{name} evaluates the model more than once per step; use one of {SUPPORTED_TEACHERS} as the teacher"
        )
    sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    if abs(sigma - 1.0) > 1e-6:
        raise ValueError(
            f"{name} samples in a scaled space (init_noise_sigma = {sigma:.3g}); OLSS records in the VP/flow space: "
            f"use one of {SUPPORTED_TEACHERS} as the teacher"
        )


def default_teacher(scheduler: Any) -> Any:
    """The default teacher for a pipeline's scheduler: its own class for flow matching (an Euler ODE solver on the
    velocity), DPM-Solver++(2M) with trailing timesteps on the same noise schedule otherwise (ending at clean data).

    Chosen by measurement (benchmarks/quality.py --part teachers; benchmarks/RESULTS.md, learned-step baselines): on the
    analytic Gaussian mixture, against the exact probability-flow ODE on 500 held-out noises, DPM-Solver++(2M) with 100
    steps has an RMSE of 0.0181 where DDIM-100 (the default before) has 0.0592 and even DDIM-250 has 0.0550; UniPC-100
    is as accurate (0.0182) but has a corrector; OLSS fitted from the DPM-Solver++-100 teacher reaches 0.0182 at 10 NFE
    against the exact ODE where from DDIM-100 it reaches 0.0593 (the teacher is the limit).
    """
    flow = scheduler_prediction_type(scheduler) == "flow"
    cls = FlowMatchEulerDiscreteScheduler if flow else DPMSolverMultistepScheduler
    if flow and isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        cls = type(scheduler)
    # only the keys the teacher's class takes (a pipeline that already runs an OLSSScheduler holds schedules)
    base = {k: v for k, v in dict(scheduler.config).items() if k in cls._get_init_keys(cls)}
    if flow:
        return cls.from_config(base)
    return DPMSolverMultistepScheduler.from_config(
        base, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", timestep_spacing="trailing",
        final_sigmas_type="zero", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
        thresholding=False, variance_type=None,
    )


def final_alpha_bar(teacher: Any) -> float:
    """ᾱ where a VP teacher scheduler ends sampling (1.0 = clean data)."""
    if hasattr(teacher, "final_alpha_cumprod"):  # DDIM (and OLSSScheduler, its superset)
        return float(teacher.final_alpha_cumprod)
    cfg = dict(getattr(teacher, "config", {}) or {})
    if cfg.get("final_sigmas_type", "zero") == "zero":
        return 1.0
    return float(teacher.alphas_cumprod[0])


def first_order_coefficients(teacher: Any, timesteps: Sequence[Any], indices: Sequence[int],
                             prediction_type: str) -> torch.Tensor:
    """The plain first-order sampler along the teacher timesteps at ``indices`` — DDIM (eta = 0) in the VP space,
    Euler on the velocity for flow matching — ending where the teacher ends, as OLSS coefficients ``[n, n+1]``
    float64 (``step.ddim_coefficients``; Euler: ``step.ddim_step_factors`` unrolled). On the uniform path it is the
    guard's baseline: what a re-fitted schedule must beat on held-out samples (:mod:`olss_fast.core.heldout`).

    VP: ᾱ at each timestep from ``teacher.alphas_cumprod``, the end from :func:`final_alpha_bar`. Flow matching:
    σ = t / ``num_train_timesteps`` (``FlowMatchEulerDiscreteScheduler``'s timesteps are σ·num_train_timesteps),
    ending at σ = 0.
    """
    ts = [timesteps[i] for i in indices]
    if prediction_type != "flow":  # DDIM's own update, ending at ``final_alpha_bar`` (prev timestep -1)
        return ddim_coefficients(teacher.alphas_cumprod, ts, ts[1:] + [-1], final_alpha_bar(teacher), prediction_type)
    scale = float(teacher.config.num_train_timesteps)
    sigmas = [float(t) / scale for t in ts] + [0.0]
    return unroll_linear_steps([ddim_step_factors(sigmas[j], sigmas[j + 1], "flow") for j in range(len(ts))])
