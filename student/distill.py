"""Stage-one distillation batches: the two-pass guided teacher output is the student's target.

Each step draws data x with labels y, t ~ U(0, 1), w ~ U[w_min, w_max] per example and
z_t = q_sample(x, t). The frozen teacher (EMA weights) gives ``uncond + w (cond - uncond)``
in one batched call; the student regresses onto it with :func:`teacher.train.regression_loss`
and a per-example weight that puts the loss in x-space (truncated SNR), eps or v.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import mindspore as ms

from distill import diffusion as dm
from distill.data import ImageData, iterate_batches
from distill.errors import UserError


def check_w_range(w_min: float, w_max: float) -> None:
    if not (np.isfinite(w_min) and np.isfinite(w_max)) or w_min < 0 or w_max < w_min:
        raise UserError(f"student: w range [{w_min}, {w_max}] must satisfy 0 <= w_min <= w_max")


def distill_inputs(data: ImageData, batch_size: int, seed: int, start_step: int, schedule: str,
                   w_min: float, w_max: float) -> Callable[[int], tuple[np.ndarray, ...]]:
    """step -> (z_t, t, y, w, alpha, sigma): the inputs of one distillation step, on the host."""
    check_w_range(w_min, w_max)
    stream = iterate_batches(data.train_images, data.train_labels, batch_size, seed, start_step)

    def make(step: int) -> tuple[np.ndarray, ...]:
        x, y = next(stream)
        rng = np.random.default_rng((seed, 2, step))
        b = x.shape[0]
        t = rng.uniform(0.0, 1.0, b).astype(np.float32)
        w = rng.uniform(w_min, w_max, b).astype(np.float32)
        eps = rng.standard_normal(x.shape).astype(np.float32)
        alpha, sigma = dm.alpha_sigma(dm.logsnr_schedule(schedule, t))
        z = dm.q_sample(x, eps, alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)).astype(np.float32)
        return z, t, y.astype(np.int32), w, alpha, sigma

    return make


def teacher_targets(teacher_predict: Callable[..., ms.Tensor], null_class: int,
                    inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """The two-pass guided teacher output for one batch of distillation inputs."""
    z, t, y, w, _, _ = inputs
    y_null = np.full_like(y, null_class)
    out = teacher_predict(ms.Tensor(z), ms.Tensor(t), ms.Tensor(y), ms.Tensor(w), ms.Tensor(y_null))
    return out.asnumpy()


def regression_batch(inputs: tuple[np.ndarray, ...], target: np.ndarray, loss_space: str,
                     prediction: str) -> tuple[np.ndarray, ...]:
    """(z, t, y, w, target, weight) for :func:`teacher.train.regression_loss`."""
    z, t, y, w, alpha, sigma = inputs
    weight = dm.output_space_weight(loss_space, prediction, alpha, sigma)
    return z, t, y, w, target.astype(np.float32), weight
