"""Sample-quality metrics: RMSE / PSNR against a reference sampler, the Fréchet distance between feature statistics
(the digits-specific ones are in :mod:`olss_fast.models.digit_metrics`).

All computations are done in float64. Inputs may be torch tensors or numpy arrays.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["rmse", "psnr", "frechet_distance", "feature_statistics"]


def _as_f64(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:
            raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued")
    return t.to(dtype=torch.float64)


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _as_f64(a, "a"), _as_f64(b, "b")
    if ta.shape != tb.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    if ta.numel() == 0:
        raise ValueError("a and b are empty")
    return ta, tb.to(ta.device)


def _mse(a: Any, b: Any, per_sample: bool) -> torch.Tensor:
    ta, tb = _pair(a, b)
    d2 = (ta - tb).square()
    if per_sample:
        if ta.ndim < 1:
            raise ValueError("per_sample needs a leading batch dimension")
        return d2.reshape(d2.shape[0], -1).mean(1)
    return d2.mean()


def rmse(a: Any, b: Any, per_sample: bool = False) -> float | torch.Tensor:
    """Root-mean-square error between two batches, in float64.

    Args:
        a, b: same-shaped batches ``[B, ...]`` (e.g. few-step samples and reference samples from the same noise).
        per_sample: return one RMSE per batch element (a float64 tensor ``[B]``) instead of the RMSE over the
            whole batch.

    Returns:
        ``sqrt(mean((a - b)**2))`` over the whole batch as a Python float, or a ``[B]`` float64 tensor.
    """
    m = _mse(a, b, per_sample)
    return m.sqrt() if per_sample else math.sqrt(float(m))


def psnr(a: Any, b: Any, data_range: float = 2.0, per_sample: bool = False) -> float | torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``20*log10(data_range) - 10*log10(MSE)``, in float64.

    ``data_range=2.0`` is for samples in [-1, 1]. Identical inputs give ``inf``.

    Args:
        a, b: same-shaped batches.
        data_range: max minus min of the signal's range.
        per_sample: one PSNR per batch element (``[B]`` float64 tensor) instead of the PSNR of the batch MSE.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    m = _mse(a, b, per_sample)
    val = 20.0 * math.log10(data_range) - 10.0 * torch.log10(m)  # log10(0) = -inf -> PSNR inf
    return val if per_sample else float(val)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a (numerically) positive semi-definite matrix via eigh, negatives clamped."""
    s = (s + s.T) / 2
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``, computed in float64. The trace term
    uses ``tr((sigma1 sigma2)^{1/2}) = tr((S sigma2 S)^{1/2})`` with ``S = sigma1^{1/2}``, i.e. two symmetric
    eigen-decompositions, which is stable for singular covariances (few samples, dead features) where a general
    ``sqrtm`` can return complex values. Tiny negative results from round-off are clamped to 0.
    """
    m1, m2 = _as_f64(mu1, "mu1").reshape(-1), _as_f64(mu2, "mu2").reshape(-1)
    s1, s2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    d = m1.shape[0]
    if m2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {tuple(m1.shape)}, mu2 {tuple(m2.shape)}, "
                         f"sigma1 {tuple(s1.shape)}, sigma2 {tuple(s2.shape)}")
    s2, m2 = s2.to(s1.device), m2.to(s1.device)
    m1 = m1.to(s1.device)
    for name, t in (("mu1", m1), ("mu2", m2), ("sigma1", s1), ("sigma2", s2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN/inf values")
    r1 = _sqrt_psd(s1)
    inner = r1 @ ((s2 + s2.T) / 2) @ r1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = (m1 - m2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    fd = float(fd)
    if fd < 0:
        if fd < -1e-6 * max(1.0, float(torch.trace(s1) + torch.trace(s2))):
            logger.warning("Fréchet distance %.3g < 0 beyond round-off; clamping to 0", fd)
        fd = 0.0
    return fd


def feature_statistics(features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]`` (N >= 2)."""
    f = _as_f64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


