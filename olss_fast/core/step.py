"""The OLSS step formula and DDIM's coefficients written in the same form.

Pure functions, no state: the scheduler, the compiled runner and the kernels' reference all call these.
"""
from __future__ import annotations

from typing import Sequence

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def olss_combine(coeffs: torch.Tensor, step: int, x0: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x_{j+1} = w_j · x0 + Σ_{l ≤ j} v_{j,l} · e_l`` (OLSS Eq. 8) in the dtype of ``x0``.

    Args:
        coeffs: ``[n, n+1]`` (global) or ``[C, n, n+1]`` (per channel, channel = dim 1 of the latents).
        step: j, the student step just evaluated.
        x0: ``[B, C, ...]`` initial noise.
        history: model outputs ``e_0 .. e_j`` (at least j+1 of them), each shaped like ``x0``.
    """
    if len(history) < step + 1:
        raise ValueError(f"step {step} needs {step + 1} model outputs in the history, got {len(history)}")
    row = coeff_row(coeffs, step, x0)
    out = x0 * row[0]
    for l in range(step + 1):
        out = out + history[l].to(x0.dtype) * row[l + 1]
    return out


def student_latent(coeffs: torch.Tensor, j: int, x0: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
    """The student's latent at step j, as the scheduler computes it at inference: the initial noise ``x0`` at step 0,
    else row j−1 of the OLSS combination (Eq. 8) of ``x0`` and the model outputs ``e_0 … e_{j−1}``."""
    return x0 if j == 0 else olss_combine(coeffs, j - 1, x0, history)


def coeff_row(coeffs: torch.Tensor, step: int, like: torch.Tensor) -> torch.Tensor:
    """Row ``step`` of ``coeffs`` as ``[n+1, ...]`` that broadcasts against latents shaped like ``like``."""
    row = coeffs[..., step, :].to(device=like.device, dtype=like.dtype)
    if coeffs.dim() == 2:
        return row.view([-1] + [1] * like.dim())
    c = coeffs.shape[0]
    if like.dim() < 2 or like.shape[1] != c:
        raise ValueError(
            f"per-channel coefficients for {c} channels, but the latents have shape {list(like.shape)}"
        )
    return row.t().reshape([-1, 1, c] + [1] * (like.dim() - 2))


def ddim_step_factors(
    alpha_t: float, alpha_prev: float, prediction_type: str = "epsilon"
) -> tuple[float, float]:
    """DDIM (eta = 0) as ``x_prev = A·x_t + B·model_output`` (Song et al. 2021, Eq. 12), in float64.

    ``alpha_*`` are cumulative products ᾱ. For flow matching pass σ_t and σ_prev with ``prediction_type="flow"``
    (Euler on the velocity: ``x_prev = x_t + (σ_prev − σ_t)·v``).
    """
    if prediction_type == "flow":
        return 1.0, float(alpha_prev) - float(alpha_t)
    a = torch.tensor(float(alpha_t), dtype=torch.float64)
    ap = torch.tensor(float(alpha_prev), dtype=torch.float64)
    sa, s1a, sap, s1ap = a.sqrt(), (1 - a).sqrt(), ap.sqrt(), (1 - ap).sqrt()
    if prediction_type == "epsilon":
        A, B = sap / sa, s1ap - sap * s1a / sa
    elif prediction_type == "v_prediction":
        A, B = sap * sa + s1ap * s1a, s1ap * sa - sap * s1a
    elif prediction_type == "sample":
        A, B = s1ap / s1a, sap - s1ap * sa / s1a
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return float(A), float(B)


def unroll_linear_steps(factors: Sequence[tuple[float, float]]) -> torch.Tensor:
    """Turn per-step updates ``x_{j+1} = A_j x_j + B_j e_j`` into OLSS rows over ``[x0, e_0, …, e_{n-1}]``.

    Returns float64 ``[n, n+1]``: row j expresses ``x_{j+1}`` in the basis (x0 and the outputs so far).
    """
    n = len(factors)
    coeffs = torch.zeros(n, n + 1, dtype=torch.float64)
    row = torch.zeros(n + 1, dtype=torch.float64)
    row[0] = 1.0
    for j, (A, B) in enumerate(factors):
        row = row * A
        row[j + 1] += B
        coeffs[j] = row
    return coeffs


def ddim_coefficients(
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    prev_timesteps: Sequence[int],
    final_alpha_cumprod: float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """DDIM's own update at ``timesteps`` written as an OLSS coefficient matrix ``[n, n+1]`` (float64).

    ``prev_timesteps[j] < 0`` means "the end of sampling" and uses ``final_alpha_cumprod``, exactly as
    ``diffusers.DDIMScheduler.step`` does.
    """
    ac = alphas_cumprod.to(torch.float64)
    factors = []
    for t, tp in zip(timesteps, prev_timesteps):
        a_t = float(ac[int(t)])
        a_p = float(ac[int(tp)]) if int(tp) >= 0 else float(final_alpha_cumprod)
        factors.append(ddim_step_factors(a_t, a_p, prediction_type))
    return unroll_linear_steps(factors)
