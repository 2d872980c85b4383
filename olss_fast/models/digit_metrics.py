"""Quality metrics of digit samples in the bundled classifier's feature space: Fréchet distance to the real digits and
class accuracy (the demo and the quality benchmark use them)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from olss_fast.core.metrics import feature_statistics, frechet_distance
from olss_fast.models.digits import digits_reference_stats, load_digits_classifier


_CLASSIFIER_CACHE: dict[str, torch.nn.Module] = {}


def _default_classifier() -> torch.nn.Module:
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
