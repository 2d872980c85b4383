"""Least squares from Gram statistics (float64, guarded).

For a basis set S and a target y, both given as rows of a Gram matrix G, the least-squares coefficients are
``coef = solve(G[S,S], G[S,y])`` and the residual sum of squares ``SSE = G[y,y] − coef · G[S,y]``
(OLSS, Duan et al. 2023, Eq. 9–10: the normal equations of the per-step fit).

The solve is Jacobi-scaled (unit diagonal) and done by Cholesky; when the scaled matrix is not numerically positive
definite (collinear or vanishing basis vectors) it falls back to an eigenvalue pseudo-inverse with the same cutoff
LAPACK's ``gelsd`` uses, i.e. the minimum-norm least-squares solution that ``torch.linalg.lstsq`` returns.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

# reciprocal condition number below which the Cholesky solve is not trusted
_RCOND_CHOLESKY = 1e-12


def gram_lstsq(
    gram: torch.Tensor, basis: Sequence[int], target: int, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit of vector ``target`` on vectors ``basis`` from their Gram matrix.

    Args:
        gram: ``[..., M, M]`` float64 Gram matrix (a leading batch dimension fits each group separately,
            e.g. one per latent channel).
        basis: row indices of the basis vectors.
        target: row index of the target vector.

    Returns:
        ``(coef [..., |S|], sse [...])`` in float64; ``sse`` is clamped at zero.
    """
    if gram.dtype != torch.float64:
        raise ValueError(f"Gram statistics must be float64, got {gram.dtype}")
    idx = torch.as_tensor(list(basis), dtype=torch.long, device=gram.device)
    a = gram.index_select(-2, idx).index_select(-1, idx)  # [..., k, k]
    b = gram[..., idx, target]  # [..., k]
    yy = gram[..., target, target]
    coef = solve_spd(a, b, ridge)
    if ridge:  # SSE of shrunk coefficients: ‖y − Xc‖² = G_yy − 2c·G_Sy + cᵀG_SS c
        quad = (coef.unsqueeze(-2) @ a @ coef.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        sse = yy - 2 * (coef * b).sum(-1) + quad
    else:  # normal equations hold: G_SS c = G_Sy
        sse = yy - (coef * b).sum(-1)
    sse = sse.clamp_min(0.0)
    return coef, sse


def solve_spd(a: torch.Tensor, b: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Solve ``a @ x = b`` for symmetric positive semi-definite ``a`` (batched), guarded as described above.

    ``ridge > 0`` solves ``(a + ridge·diag(a)) x = b`` instead (Tikhonov regularisation relative to each basis
    vector's norm, i.e. ridge on the Jacobi-scaled system).
    """
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    scale = torch.where(diag > 0, diag.rsqrt(), torch.zeros_like(diag))  # zero vectors get zero coefficients
    a_s = a * scale.unsqueeze(-1) * scale.unsqueeze(-2)
    b_s = b * scale
    if ridge:
        a_s = a_s + ridge * torch.eye(a_s.shape[-1], dtype=a_s.dtype, device=a_s.device)
    chol, info = torch.linalg.cholesky_ex(a_s)
    ok = info == 0
    if ok.all():
        d = torch.diagonal(chol, dim1=-2, dim2=-1)
        # rcond of a_s ≈ (min diag L / max diag L)^2 — a cheap, conservative estimate
        rcond = (d.min(-1).values / d.max(-1).values.clamp_min(1e-300)) ** 2
        ok = rcond > _RCOND_CHOLESKY
    if ok.all():
        x_s = torch.cholesky_solve(b_s.unsqueeze(-1), chol).squeeze(-1)
        return x_s * scale
    logger.debug("ill-conditioned normal equations; using the minimum-norm pseudo-inverse solve")
    # unscaled, so that the answer is the minimum-norm solution in the caller's coordinates (as gelsd's)
    a_r = a + ridge * torch.diag_embed(diag) if ridge else a
    x = _pinv_solve(a_r, b)
    if ok.any():  # keep the accurate Cholesky answers where they were fine
        x_chol = torch.cholesky_solve(b_s.unsqueeze(-1), chol).squeeze(-1) * scale
        x = torch.where(ok.unsqueeze(-1), x_chol, x)
    return x


def _pinv_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(a)
    k = a.shape[-1]
    # gelsd's default cutoff on singular values of the data matrix is eps·max(m, n)·s_max; the Gram matrix holds
    # their squares, and its own rounding is ~eps·λ_max, so use a cutoff relative to λ_max.
    cutoff = evals.amax(-1, keepdim=True).clamp_min(0) * (k * torch.finfo(torch.float64).eps) * 10
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    proj = (evecs.transpose(-1, -2) @ b.unsqueeze(-1)).squeeze(-1)
    return (evecs @ (inv * proj).unsqueeze(-1)).squeeze(-1)


def numerical_rank(gram: torch.Tensor, basis: Sequence[int]) -> int:
    """Rank of the basis vectors (the smallest over a batch of groups), from their scaled Gram matrix."""
    idx = torch.as_tensor(list(basis), dtype=torch.long, device=gram.device)
    a = gram.index_select(-2, idx).index_select(-1, idx)
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    scale = torch.where(diag > 0, diag.rsqrt(), torch.zeros_like(diag))
    evals = torch.linalg.eigvalsh(a * scale.unsqueeze(-1) * scale.unsqueeze(-2))
    cutoff = evals.amax(-1, keepdim=True).clamp_min(0) * len(idx) * 1e-12
    return int((evals > cutoff).sum(-1).min().item())
