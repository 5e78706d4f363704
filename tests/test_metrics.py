"""Frechet distance against closed forms and scipy; per-image PSNR / MSE; accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from distill.core.metrics import (
    PSNR_CAP_DB,
    accuracy,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    mean_psnr,
    mse,
    psnr,
)


def _standardised(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n x d samples with exactly zero mean and identity (unbiased) covariance."""
    z = rng.normal(size=(n, d))
    z -= z.mean(axis=0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))
    return z @ np.linalg.inv(chol).T


def test_gaussian_stats_shapes_and_values() -> None:
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = gaussian_stats(x)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False))
    mu1, cov1 = gaussian_stats(np.arange(5.0)[:, None])
    assert mu1.shape == (1,) and cov1.shape == (1, 1)
    with pytest.raises(ValueError):
        gaussian_stats(np.zeros((1, 3)))


def test_identical_sets_give_zero() -> None:
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_one_dimensional_closed_form() -> None:
    rng = np.random.default_rng(1)
    z = _standardised(500, 1, rng)
    m1, s1, m2, s2 = 0.3, 0.5, -1.2, 2.0
    fd = frechet_distance(m1 + s1 * z, m2 + s2 * z)
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-9)


def test_diagonal_covariances_closed_form() -> None:
    rng = np.random.default_rng(2)
    z = _standardised(1000, 4, rng)
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, -1.0, 0.5])
    sd1, sd2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 0.1, 0.5, 1.0])
    fd = frechet_distance(mu1 + sd1 * z, mu2 + sd2 * z)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)
    assert fd == pytest.approx(expected, rel=1e-9)


def test_from_stats_handles_singular_covariance() -> None:
    cov = np.diag([1.0, 0.0])  # rank-deficient: fewer samples than dims happens in practice
    assert frechet_distance_from_stats(np.zeros(2), cov, np.zeros(2), cov) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance_from_stats(np.zeros(2), cov, np.ones(2), np.eye(2)) == pytest.approx(2.0 + 1.0)


@pytest.mark.parametrize("n,d", [(300, 8), (50, 64)])
def test_matches_scipy_sqrtm(n: int, d: int) -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.5 + rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_mse_and_psnr_per_image() -> None:
    a = np.zeros((3, 1, 2, 2), np.float32)
    b = a.copy()
    b[1] += 0.1
    b[2, 0, 0, 0] = 2.0
    np.testing.assert_allclose(mse(a, b), [0.0, 0.01, 1.0], rtol=1e-6)
    p = psnr(a, b)
    assert p.shape == (3,) and np.isinf(p[0])
    np.testing.assert_allclose(p[1:], [10 * np.log10(4 / 0.01), 10 * np.log10(4.0)], rtol=1e-5)
    assert psnr(a[1:2], b[1:2], data_range=1.0)[0] == pytest.approx(20.0, rel=1e-5)
    assert mean_psnr(a, b) == pytest.approx((PSNR_CAP_DB + p[1] + p[2]) / 3, rel=1e-6)
    assert mean_psnr(a, a) == PSNR_CAP_DB
    with pytest.raises(ValueError):
        mse(a, b[:2])


def test_accuracy() -> None:
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4], np.int32)) == 0.75
    assert accuracy(np.array([], int), np.array([], int)) == 0.0
    with pytest.raises(ValueError):
        accuracy(np.array([1, 2]), np.array([1]))
