"""olss_fast.core.metrics against direct numpy / scipy computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from olss_fast.core import metrics as M
from olss_fast.models import digit_metrics as DM
from olss_fast.models.digits import DIGITS_DIR

needs_weights = pytest.mark.skipif(not (DIGITS_DIR / "classifier" / "model.safetensors").is_file(),
                                   reason="bundled digits classifier not trained yet")


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_rmse_matches_numpy():
    r = _rng()
    a, b = r.normal(size=(5, 1, 4, 4)), r.normal(size=(5, 1, 4, 4))
    assert M.rmse(a, b) == pytest.approx(np.sqrt(np.mean((a - b) ** 2)), rel=1e-12)
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    assert M.rmse(ta, tb) == pytest.approx(np.sqrt(np.mean((a - b) ** 2)), rel=1e-6)
    per = M.rmse(a, b, per_sample=True)
    assert per.dtype == torch.float64 and per.shape == (5,)
    np.testing.assert_allclose(per.numpy(), np.sqrt(((a - b) ** 2).reshape(5, -1).mean(1)), rtol=1e-12)
    assert M.rmse(a, a) == 0.0
    with pytest.raises(ValueError):
        M.rmse(a, b[:4])


def test_psnr_matches_numpy():
    r = _rng(1)
    a = r.uniform(-1, 1, size=(4, 1, 8, 8))
    b = np.clip(a + 0.05 * r.normal(size=a.shape), -1, 1)
    mse = np.mean((a - b) ** 2)
    assert M.psnr(a, b) == pytest.approx(10 * np.log10(2.0 ** 2 / mse), rel=1e-12)
    assert M.psnr(a, b, data_range=1.0) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-12)
    per = M.psnr(a, b, per_sample=True)
    np.testing.assert_allclose(per.numpy(), 10 * np.log10(4.0 / ((a - b) ** 2).reshape(4, -1).mean(1)), rtol=1e-12)
    assert M.psnr(a, a) == math.inf
    with pytest.raises(ValueError):
        M.psnr(a, b, data_range=0)


def _random_spd(r, d, rank=None):
    a = r.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def _fd_scipy(mu1, s1, mu2, s2):
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 3, 16, 64])
def test_frechet_matches_scipy(d):
    r = _rng(d)
    mu1, mu2 = r.normal(size=d), r.normal(size=d)
    s1, s2 = _random_spd(r, d), _random_spd(r, d)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)
    # symmetric, and accepts torch input of either dtype
    assert M.frechet_distance(torch.tensor(mu2), torch.tensor(s2), torch.tensor(mu1), torch.tensor(s1)) == \
        pytest.approx(got, rel=1e-9)
    assert M.frechet_distance(torch.tensor(mu1, dtype=torch.float32), torch.tensor(s1, dtype=torch.float32),
                              mu2, s2) == pytest.approx(got, rel=1e-4)


def test_frechet_identical_is_zero_and_1d_formula():
    r = _rng(7)
    mu, s = r.normal(size=32), _random_spd(r, 32)
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # rank-deficient (as with few samples): still exact 0 and finite
    s_low = _random_spd(r, 32, rank=5)
    assert M.frechet_distance(mu, s_low, mu, s_low) == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(M.frechet_distance(mu, s_low, mu + 1, s))
    # 1-D: (m1-m2)^2 + (sqrt(v1) - sqrt(v2))^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
    # diagonal covariances: sum over dims of the 1-D formula
    v1, v2 = r.uniform(0.1, 2, 5), r.uniform(0.1, 2, 5)
    want = np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert M.frechet_distance(np.zeros(5), np.diag(v1), np.zeros(5), np.diag(v2)) == pytest.approx(want, rel=1e-10)


def test_frechet_bad_shapes():
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError):
        M.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))


def test_feature_statistics_matches_numpy():
    f = _rng(3).normal(size=(50, 6))
    mu, sigma = M.feature_statistics(f)
    np.testing.assert_allclose(mu.numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f, rowvar=False), rtol=1e-10, atol=1e-14)


class _ToyClassifier(torch.nn.Module):
    """Predicts class 1 when the mean pixel is > 0, else class 0; features = [mean, mean^2]."""

    config = {"image_size": 16}

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def features(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, m * m], 1)

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], 1)


def test_class_accuracy_hand_made():
    clf = _ToyClassifier()
    x = torch.cat([torch.full((3, 1, 16, 16), 0.5), torch.full((2, 1, 16, 16), -0.5)])
    assert DM.class_accuracy(x, [1, 1, 1, 0, 0], clf) == 1.0
    assert DM.class_accuracy(x, [1, 0, 1, 0, 1], clf) == pytest.approx(3 / 5)
    assert DM.class_accuracy(x[:, 0].numpy(), np.array([0, 0, 0, 1, 1]), clf) == 0.0  # [B, H, W] numpy
    assert DM.class_accuracy(x.permute(0, 2, 3, 1), torch.tensor([1, 1, 1, 0, 0]), clf) == 1.0  # [B, H, W, 1]
    f = DM.classifier_features(torch.full((4, 1, 32, 32), 0.25), clf)  # resized to 16x16
    assert f.dtype == torch.float64 and f.shape == (4, 2)
    torch.testing.assert_close(f[:, 0], torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError):
        DM.class_accuracy(x, [1, 1], clf)
    with pytest.raises(ValueError):
        DM.class_accuracy(x, [0.5] * 5, clf)
    with pytest.raises(ValueError):
        DM.classifier_features(torch.zeros(2, 3, 16, 16), clf)


def _real_digits():
    from olss_fast.models.train_digits import load_digit_images

    return load_digit_images(16)


@needs_weights
def test_bundled_classifier_on_real_digits():
    x, y = _real_digits()
    assert DM.class_accuracy(x, y) >= 0.97
    assert DM.class_accuracy(x, (y + 1) % 10) <= 0.05
    f = DM.classifier_features(x[:10])
    assert f.dtype == torch.float64 and f.shape[0] == 10 and 32 <= f.shape[1] <= 64


@needs_weights
def test_digits_frechet_distance():
    from olss_fast.models.digits import digits_reference_stats

    x, _ = _real_digits()
    mu, sigma = digits_reference_stats()
    # the reference stats are those of all real digits
    mu_all, sigma_all = M.feature_statistics(DM.classifier_features(x))
    torch.testing.assert_close(mu_all, mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma_all, sigma, rtol=1e-4, atol=1e-5)
    assert DM.digits_frechet_distance(x) == pytest.approx(0.0, abs=1e-3)
    g = torch.Generator().manual_seed(0)
    real = DM.digits_frechet_distance(x[torch.randperm(len(x), generator=g)[:300]])
    noise = DM.digits_frechet_distance(torch.rand(300, 1, 16, 16, generator=g) * 2 - 1)
    assert 0 < real < noise
    with pytest.raises(ValueError):
        DM.digits_frechet_distance(x[:1])
