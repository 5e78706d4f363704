"""Sample-quality metrics as pure numpy functions (no scipy, no MindSpore).

Images follow the project convention: float32 N x C x H x W in [-1, 1].
"""

from __future__ import annotations

import numpy as np

#: ``mean_psnr`` caps each per-image PSNR here so identical images (infinite PSNR)
#: still give a finite, comparable mean. 100 dB is far above any real difference.
PSNR_CAP_DB = 100.0


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of N x D features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an N x D feature matrix with N >= 2, got shape {f.shape}")
    mu = f.mean(axis=0)
    cov = np.atleast_2d(np.cov(f, rowvar=False))
    return mu, cov


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    d, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(d, 0.0, None))) @ v.T


def frechet_distance_from_stats(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2).

    tr sqrt(S1 S2) is computed as sum sqrt(eig(S1^1/2 S2 S1^1/2)): that matrix is
    symmetric PSD, so eigvalsh is stable and no complex sqrtm is needed.
    """
    root1 = _sqrt_psd(cov1)
    m = root1 @ cov2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum())
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two N x D feature sets."""
    mu1, cov1 = gaussian_stats(feats_a)
    mu2, cov2 = gaussian_stats(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance_from_stats(mu1, cov1, mu2, cov2)


def _per_image(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image mean squared error, shape (N,)."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"shapes differ: {np.shape(a)} vs {np.shape(b)}")
    return ((_per_image(a) - _per_image(b)) ** 2).mean(axis=1)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    """Per-image PSNR in dB, shape (N,); ``inf`` where the images are identical.

    ``data_range`` is max - min of the pixel scale: 2.0 for images in [-1, 1].
    """
    err = mse(a, b)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / err)


def mean_psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, cap: float = PSNR_CAP_DB) -> float:
    """Mean of per-image PSNR, each capped at ``cap`` dB (identical images count as ``cap``)."""
    return float(np.minimum(psnr(a, b, data_range), cap).mean())


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels (0.0 for empty input)."""
    pred, labels = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    if pred.shape != labels.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {labels.shape}")
    return float((pred == labels).mean()) if pred.size else 0.0
