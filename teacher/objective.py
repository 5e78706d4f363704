"""CFG teacher training: condition dropout to the null class, eps or v objective."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import mindspore as ms

from distill.core import diffusion as dm
from distill.core.data import ImageData, step_batches
from distill.core.errors import UserError
from teacher.unet import UNet


def regression_loss(net: UNet, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_neg: ms.Tensor,
                    target: ms.Tensor, weight: ms.Tensor) -> ms.Tensor:
    """Weighted MSE between the network output (negative class ``y_neg``, used by a student that takes
    one) and a precomputed target (per-example weight)."""
    err = (net(z, t, y, w, y_neg) - target) ** 2
    return (err.mean(axis=(1, 2, 3)) * weight).mean()


def check_p_uncond(p_uncond: float) -> None:
    if not 0.0 <= p_uncond < 1.0:
        raise UserError(f"teacher: p_uncond {p_uncond} must be in [0, 1)")


def teacher_batch_maker(
    data: ImageData,
    batch_size: int,
    seed: int,
    start_step: int,
    schedule: str,
    prediction: str,
    p_uncond: float,
    share: Optional[tuple[int, int]] = None,
) -> Callable[[int], tuple[np.ndarray, ...]]:
    """Host-side batches for :func:`regression_loss`: (z_t, t, y', w, y_neg, target, weight)
    (w and the negative class are unused by the teacher's backbone).

    Labels are replaced by the null class with probability ``p_uncond`` so that one network
    learns both the conditional and the unconditional model. ``share``: read only this rank's rows of
    a streamed batch (:func:`distill.core.data.iterate_batches`).
    """
    check_p_uncond(p_uncond)
    draw = step_batches(data, batch_size, seed, start_step, 1, share=share)
    null_class = data.num_classes

    def make(step: int) -> tuple[np.ndarray, ...]:
        x, y, rng = draw(step)
        b = x.shape[0]
        t = rng.uniform(0.0, 1.0, b).astype(np.float32)
        eps = rng.standard_normal(x.shape).astype(np.float32)
        drop = rng.uniform(size=b) < p_uncond
        y = np.where(drop, null_class, y).astype(np.int32)
        z, alpha, sigma = dm.noisy_at(schedule, x, eps, t)
        a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        target = dm.output_from_x0_eps(x, eps, a, s, prediction).astype(np.float32)
        w = np.ones(b, np.float32)
        y_neg = np.full(b, null_class, np.int32)
        weight = np.ones(b, np.float32)
        return z, t, y, w, y_neg, target, weight

    return make
