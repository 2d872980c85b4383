"""Sample-quality metrics: RMSE / PSNR against a reference sampler, and classifier-based metrics for the
bundled digits model (Fréchet distance in the classifier's feature space, class accuracy).

All computations are done in float64. Inputs may be torch tensors or numpy arrays.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["rmse", "psnr", "frechet_distance", "feature_statistics", "classifier_features",
           "digits_frechet_distance", "class_accuracy"]


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


_CLASSIFIER_CACHE: dict[str, torch.nn.Module] = {}


def _default_classifier() -> torch.nn.Module:
    from olss_fast.models.digits import load_digits_classifier

    if "cpu" not in _CLASSIFIER_CACHE:
        _CLASSIFIER_CACHE["cpu"] = load_digits_classifier("cpu")
    return _CLASSIFIER_CACHE["cpu"]


def _image_size(clf: torch.nn.Module) -> int:
    cfg = getattr(clf, "config", None)
    return int(cfg.get("image_size", 16)) if isinstance(cfg, dict) else 16


def _prepare_images(images: Any, size: int) -> torch.Tensor:
    x = images.detach() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[1] != 1 and x.shape[-1] == 1:
        x = x.permute(0, 3, 1, 2)  # [B, H, W, 1] -> [B, 1, H, W]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be [B, 1, H, W], [B, H, W] or [B, H, W, 1], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("images is empty")
    if not torch.isfinite(x).all():
        raise ValueError("images hold NaN/inf values")
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    return x.clamp(-1, 1)


@torch.no_grad()
def classifier_features(images: Any, classifier: torch.nn.Module | None = None,
                        batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer features ``[B, D]`` (float64, CPU) of digit images in [-1, 1].

    Args:
        images: ``[B, 1, H, W]`` / ``[B, H, W]`` / ``[B, H, W, 1]`` in [-1, 1] (e.g. ``output_type="latent"``
            samples of the digits pipeline); values are clamped to [-1, 1] and resized to 16x16 if needed.
        classifier: a module with a ``features`` method (default: the bundled digits classifier).
    """
    clf = _default_classifier() if classifier is None else classifier
    x = _prepare_images(images, _image_size(clf))
    p = next(clf.parameters())
    feats = [clf.features(x[i:i + batch_size].to(device=p.device, dtype=p.dtype)).double().cpu()
             for i in range(0, x.shape[0], batch_size)]
    return torch.cat(feats)


def digits_frechet_distance(samples: Any, classifier: torch.nn.Module | None = None) -> float:
    """Fréchet distance between the classifier features of ``samples`` (in [-1, 1]) and those of the real digits.

    Uses the bundled classifier and reference statistics (``feature_stats.safetensors``) unless ``classifier`` is
    given, in which case the reference statistics must match its features. The estimate is biased upwards for small
    sample counts (hundreds of samples or more give stable comparisons); compare samplers at equal counts.
    """
    from olss_fast.models.digits import digits_reference_stats

    f = classifier_features(samples, classifier)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 samples for a Fréchet distance")
    mu, sigma = feature_statistics(f)
    mu_ref, sigma_ref = digits_reference_stats()
    if mu_ref.shape != mu.shape:
        raise ValueError(f"classifier features have dim {mu.shape[0]}, reference stats have dim {mu_ref.shape[0]}")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


@torch.no_grad()
def class_accuracy(samples: Any, labels: Any, classifier: torch.nn.Module | None = None) -> float:
    """Fraction of ``samples`` (in [-1, 1]) that the digits classifier assigns to ``labels`` (ints 0-9)."""
    clf = _default_classifier() if classifier is None else classifier
    x = _prepare_images(samples, _image_size(clf))
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)).reshape(-1)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError("labels must be integers 0-9")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {y.shape[0]} labels")
    p = next(clf.parameters())
    pred = torch.cat([clf(x[i:i + 1024].to(device=p.device, dtype=p.dtype)).argmax(1).cpu()
                      for i in range(0, x.shape[0], 1024)])
    return float((pred == y.long()).double().mean())
